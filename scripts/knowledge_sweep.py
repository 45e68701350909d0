"""The knowledge yardstick per recipe: F1 with the right documents' LoRAs and with unrelated documents' LoRAs,
their difference with its 95% paired-bootstrap interval, in `prag` and `combine`, and the offline seconds per
document each run built. Each run is a `prag eval` directory that answered prag, combine, prag-unrelated and
combine-unrelated; `closed` and `rag` come from the run itself or from `--baseline DATASET=RUN`. A RUN_DIR may
be several directories joined by commas: chunks of one evaluation on disjoint questions (`--offset`), pooled.
A second table gives each recipe against `rag`: `prag` - `rag` and `combine` - `rag` with their intervals, and
`combine` / `rag`.

python scripts/knowledge_sweep.py default=runs/f1/default-hotpotqa "none e3=runs/s21/ctxnone-e3-lr1e-3-hotpotqa" \
    --plot docs/knowledge_sweep.png
"""

from __future__ import annotations

import argparse
import textwrap

from compare import by_mode, fmt, load_run, mean, paired


def pooled(runs: str) -> tuple[dict[str, dict[str, float]], dict]:
    """Per-question F1 and metrics of one or more comma-separated runs of the same evaluation on disjoint
    questions (pooled as `prag pool` does: the offline seconds and documents are summed)."""
    records, metrics = load_run(runs)
    return by_mode(records), metrics


def row(label: str, runs: str, baselines: dict[str, str]) -> dict:
    scores, metrics = pooled(runs)
    dataset, offline = metrics["dataset"], metrics["offline"]
    base = scores if "rag" in scores else pooled(baselines[dataset])[0]
    built = offline.get("documents_parameterized") or 0
    out = {"dataset": dataset, "recipe": label, "n": len(scores["prag"]), "slice": metrics["slice"]["name"]}
    out.update(closed=mean(base["closed"]), rag=mean(base["rag"]))
    for mode in ("prag", "combine"):
        out[mode] = mean(scores[mode])
        out[f"{mode} unrelated"] = mean(scores[f"{mode}-unrelated"])
        out[f"{mode} right - unrelated"] = paired(scores[f"{mode}-unrelated"], scores[mode])
        out[f"{mode} - rag"] = paired(base["rag"], scores[mode])
    out["s/doc"] = (offline["augment_s"] / built, offline["train_s"] / built) if built else None
    return out


def markdown(rows: list[dict]) -> str:
    lines = [
        "| dataset | recipe | n | closed | rag | prag | prag unrelated | prag right - unrelated | combine | "
        "combine unrelated | combine right - unrelated | offline s/doc (augment + train) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cost = f"{sum(r['s/doc']):.1f} ({r['s/doc'][0]:.1f} + {r['s/doc'][1]:.1f})" if r["s/doc"] else ""
        lines.append(
            f"| {r['dataset']} | {r['recipe']} | {r['n']} | {r['closed']:.3f} | {r['rag']:.3f} | "
            + " | ".join(
                f"{r[m]:.3f} | {r[m + ' unrelated']:.3f} | {fmt(r[m + ' right - unrelated'])}"
                for m in ("prag", "combine")
            )
            + f" | {cost} |"
        )
    lines += ["", "| dataset | recipe | n | prag - rag | combine - rag | combine / rag |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['combine'] / r['rag']:.2f}" if r["rag"] else ""
        lines.append(
            f"| {r['dataset']} | {r['recipe']} | {r['n']} | {fmt(r['prag - rag'])} | {fmt(r['combine - rag'])} "
            f"| {ratio} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig = Figure(figsize=(7 * len(datasets), 4.2))
    FigureCanvasAgg(fig)
    for i, dataset in enumerate(datasets):
        ax = fig.add_subplot(1, len(datasets), i + 1)
        shown = [r for r in rows if r["dataset"] == dataset]
        x = range(len(shown))
        for j, (mode, color) in enumerate((("prag", "C0"), ("combine", "C1"))):
            left = [k + (j - 1) * 0.4 for k in x]
            ax.bar([k + 0.1 for k in left], [r[mode] for r in shown], 0.2, color=color, edgecolor="0.2", label=mode)
            ax.bar(
                [k + 0.3 for k in left],
                [r[f"{mode} unrelated"] for r in shown],
                0.2,
                color="white",
                edgecolor=color,
                hatch="///",
                label=f"{mode}, unrelated LoRAs",
            )
        for k, r in zip(x, shown, strict=True):  # each row's own rag (rows may answer different questions)
            ax.hlines(
                r["rag"], k - 0.45, k + 0.45, color="0.3", linestyle="--", linewidth=1, label="rag" if k == 0 else None
            )
        ax.set_xticks(list(x), [f"{textwrap.fill(r['recipe'], 14)}\n(n={r['n']})" for r in shown], fontsize=7)
        ax.set_title(f"{dataset}, {shown[0]['slice']} slice")
        ax.set_ylabel("token F1")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    parser.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="DATASET=RUN_DIR",
        help="where closed and rag come from for runs that did not answer them",
    )
    parser.add_argument("--plot", help="write right vs unrelated LoRAs per recipe here (PNG)")
    args = parser.parse_args()
    baselines = {d: runs for d, _, runs in (b.partition("=") for b in args.baseline)}
    rows = [row(label, runs, baselines) for label, _, runs in (r.partition("=") for r in args.runs)]
    print(markdown(rows))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
