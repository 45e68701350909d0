"""Paired comparison of two recipes evaluated on the same questions: F1 per mode with bootstrap CIs.

Each recipe is one `prag eval` directory per dataset (a pattern with {dataset}). One of the two must hold
`closed` and `rag` (taken from the candidate, `--b`, where it has them); the other may hold only the parametric
modes, since `closed` and `rag` do not depend on how documents are parameterized.
Where `--b` holds only `closed` and `rag` (a change to the model that every mode sees, such as a format
adapter), the two are compared mode by mode.
Where a run also answered with unrelated documents' LoRAs (`prag-unrelated`, `combine-unrelated`), a
third table gives right minus unrelated: what the documents' own parameters carry.
Differences are means over questions of per-question F1 differences; the 95% interval is a paired
bootstrap over questions (10,000 resamples), so it says how much the question sample alone could
move the difference.

python scripts/compare.py --a 'runs/q100/paper/{dataset}' --b 'runs/q100/default/{dataset}' \
    --labels paper default --datasets hotpotqa popqa 2wikimultihopqa --plot docs/default_vs_paper.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prag.evaluate import paired_bootstrap, pool_runs

RESAMPLES = 10_000


def load_run(spec: str | Path) -> tuple[list[dict], dict]:
    """The per-question records and the metrics of a `prag eval` directory, or of several joined by commas:
    chunks of one evaluation on disjoint questions, pooled and checked by `prag pool`'s code."""
    dirs = str(spec).split(",")
    if len(dirs) > 1:
        metrics, records = pool_runs(dirs)
        return records, metrics
    run = Path(dirs[0])
    with open(run / "predictions.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return records, json.loads((run / "metrics.json").read_text())


def by_mode(records: list[dict], field: str = "f1") -> dict[str, dict[str, float]]:
    """mode -> question id -> the record's `field` (F1 by default)."""
    scores: dict[str, dict[str, float]] = {}
    for row in records:
        scores.setdefault(row["mode"], {})[row["id"]] = row[field]
    return scores


def per_question_f1(spec: str | Path) -> dict[str, dict[str, float]]:
    """mode -> question id -> F1 of a run (or comma-joined chunks, see `load_run`)."""
    return by_mode(load_run(spec)[0])


def paired(x: dict[str, float], y: dict[str, float]) -> tuple[float, float, float]:
    """Mean of y - x over the questions both answered, with a 95% paired-bootstrap interval."""
    ids = sorted(x.keys() & y.keys())
    if len(ids) != len(x) or len(ids) != len(y):
        raise ValueError(f"the runs answered different questions ({len(x)} vs {len(y)}, {len(ids)} shared)")
    d = paired_bootstrap([y[i] for i in ids], [x[i] for i in ids], resamples=RESAMPLES)
    return d["diff"], d["low"], d["high"]


def mean(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


def fmt(d: tuple[float, float, float]) -> str:
    return f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]"


Runs = dict[str, tuple[dict, dict]]  # dataset -> (recipe a's, recipe b's) mode -> question id -> F1


def load_runs(a: str, b: str, datasets: list[str]) -> Runs:
    """Both recipes' per-question F1 for each dataset, read once for every table and plot."""
    return {
        d: (per_question_f1(Path(a.format(dataset=d))), per_question_f1(Path(b.format(dataset=d)))) for d in datasets
    }


def compare(runs: Runs) -> dict[str, dict]:
    out = {}
    for dataset, (run_a, run_b) in runs.items():
        baselines = run_b if {"closed", "rag"} <= run_b.keys() else run_a
        if not {"closed", "rag"} <= baselines.keys():
            raise SystemExit(f"{dataset}: neither recipe's run answered both `closed` and `rag`")
        closed, rag = baselines["closed"], baselines["rag"]
        out[dataset] = {
            "n": len(closed),
            "closed": mean(closed),
            "rag": mean(rag),
            "a": {m: mean(run_a[m]) for m in ("closed", "rag", "prag", "combine") if m in run_a},
            "b": {m: mean(run_b[m]) for m in ("closed", "rag", "prag", "combine") if m in run_b},
            "b_minus_a": {m: paired(run_a[m], run_b[m]) for m in ("prag", "combine")},
            "b_vs_baselines": {
                "prag - closed": paired(closed, run_b["prag"]),  # the candidate against the baselines
                "prag - rag": paired(rag, run_b["prag"]),
                "combine - rag": paired(rag, run_b["combine"]),
            },
            "unrelated": {
                label: {m: mean(run[f"{m}-unrelated"]) for m in ("prag", "combine") if f"{m}-unrelated" in run}
                for label, run in (("a", run_a), ("b", run_b))
            },
            # what the documents' own LoRAs add over unrelated documents' LoRAs (where the controls ran)
            "right_minus_unrelated": {
                label: {
                    m: paired(run[f"{m}-unrelated"], run[m]) for m in ("prag", "combine") if f"{m}-unrelated" in run
                }
                for label, run in (("a", run_a), ("b", run_b))
            },
        }
    return out


def every_mode(runs: Runs, labels: tuple[str, str]) -> str:
    """Where both recipes answered the same modes (for example two answer styles, which change `closed` and `rag`
    too): F1 per mode under each, b - a with its interval, and the mean over the modes."""
    la, lb = labels
    lines = [f"| dataset | mode | {la} | {lb} | {lb} - {la} |", "|---|---|---|---|---|"]
    for dataset, (run_a, run_b) in runs.items():
        modes = [m for m in run_b if m in run_a]
        for m in modes:
            lines.append(
                f"| {dataset} | {m} | {mean(run_a[m]):.3f} | {mean(run_b[m]):.3f} | {fmt(paired(run_a[m], run_b[m]))} |"
            )
        mean_a, mean_b = (sum(mean(run[m]) for m in modes) / len(modes) for run in (run_a, run_b))
        lines.append(f"| {dataset} | mean of the {len(modes)} | {mean_a:.3f} | {mean_b:.3f} | {mean_b - mean_a:+.3f} |")
    return "\n".join(lines)


def markdown(table: dict[str, dict], labels: tuple[str, str]) -> str:
    a, b = labels
    lines = [
        f"| dataset | n | closed | rag | prag {a} | prag {b} | prag {b} - {a} | combine {a} | combine {b} "
        f"| combine {b} - {a} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dataset, r in table.items():
        lines.append(
            f"| {dataset} | {r['n']} | {r['closed']:.3f} | {r['rag']:.3f} "
            f"| {r['a']['prag']:.3f} | {r['b']['prag']:.3f} "
            f"| {fmt(r['b_minus_a']['prag'])} | {r['a']['combine']:.3f} | {r['b']['combine']:.3f} "
            f"| {fmt(r['b_minus_a']['combine'])} |"
        )
    lines += ["", f"| dataset | {b}: prag - closed | prag - rag | combine - rag |", "|---|---|---|---|"]
    for dataset, r in table.items():
        lines.append(f"| {dataset} | " + " | ".join(fmt(d) for d in r["b_vs_baselines"].values()) + " |")
    if any(any(r["right_minus_unrelated"].values()) for r in table.values()):
        lines += [
            "",
            f"| dataset | prag right - unrelated, {a} | {b} | combine right - unrelated, {a} | {b} |",
            "|---|---|---|---|---|",
        ]
        for dataset, r in table.items():
            cells = [r["right_minus_unrelated"][side].get(m) for m in ("prag", "combine") for side in ("a", "b")]
            lines.append(f"| {dataset} | " + " | ".join(fmt(c) if c else "" for c in cells) + " |")
    return "\n".join(lines)


def plot(table: dict[str, dict], labels: tuple[str, str], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * len(table), 4))
    FigureCanvasAgg(fig)
    for i, (dataset, r) in enumerate(table.items()):
        ax = fig.add_subplot(1, len(table), i + 1)
        names, values, colors, hatches = [], [], [], []
        both = "closed" in r["a"] and "closed" in r["b"]
        if not both:  # the baselines do not depend on the recipes: drawn once
            names, values, colors, hatches = ["closed", "rag"], [r["closed"], r["rag"]], ["0.6", "0.3"], ["", ""]
        for mode in ("closed", "rag", "prag", "combine") if both else ("prag", "combine"):
            for side, color in (("a", "C0"), ("b", "C1")):
                names.append(f"{mode}\n{labels[side == 'b']}")
                values.append(r[side][mode])
                colors.append(color)
                hatches.append("")
                if mode in r["unrelated"].get(side, {}):  # the same recipe with unrelated documents' LoRAs
                    names.append(f"{mode}\n{labels[side == 'b']}\nunrelated")
                    values.append(r["unrelated"][side][mode])
                    colors.append("white")
                    hatches.append("///")
        bars = ax.bar(range(len(values)), values, color=colors, edgecolor="0.2")
        for bar, hatch in zip(bars, hatches, strict=True):
            bar.set_hatch(hatch)
        ax.set_xticks(range(len(values)), names, fontsize=6)
        ax.set_title(f"{dataset} (n={r['n']})")
        ax.set_ylabel("token F1")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_every_mode(runs: Runs, labels: tuple[str, str], path: str) -> None:
    """F1 of every mode both recipes answered, side by side per dataset (runs of the baselines alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3 * len(runs), 3.5))
    FigureCanvasAgg(fig)
    for i, (dataset, (run_a, run_b)) in enumerate(runs.items()):
        modes = [m for m in run_b if m in run_a]
        ax = fig.add_subplot(1, len(runs), i + 1)
        for j, (run, label) in enumerate(((run_a, labels[0]), (run_b, labels[1]))):
            ax.bar([x + 0.4 * j for x in range(len(modes))], [mean(run[m]) for m in modes], 0.4, label=label)
        ax.set_xticks([x + 0.2 for x in range(len(modes))], modes)
        ax.set_title(f"{dataset} (n={len(run_b[modes[0]])})")
        ax.set_ylabel("token F1")
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--a", required=True, help="baseline recipe's runs, e.g. 'runs/q100/paper/{dataset}'")
    parser.add_argument(
        "--b", required=True, help="candidate recipe's runs (the parametric modes, with or without the baselines)"
    )
    parser.add_argument("--labels", nargs=2, default=("a", "b"))
    parser.add_argument("--datasets", nargs="+", required=True)
    parser.add_argument("--plot", help="write F1 per mode and recipe here (PNG)")
    args = parser.parse_args()
    labels = tuple(args.labels)
    runs = load_runs(args.a, args.b, args.datasets)
    if not all({"prag", "combine"} <= run_b.keys() for _, run_b in runs.values()):
        # runs of `closed` and `rag` alone: every shared mode, side by side
        print(every_mode(runs, labels))
        if args.plot:
            plot_every_mode(runs, labels, args.plot)
        return
    table = compare(runs)
    print(markdown(table, labels))
    if all("closed" in r["a"] and "closed" in r["b"] for r in table.values()):  # both answered the baselines too
        print("\n" + every_mode(runs, labels))
    if args.plot:
        plot(table, labels, args.plot)


if __name__ == "__main__":
    main()
