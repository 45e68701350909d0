"""Collect an ablation (one `prag eval` directory per variant and dataset) into a markdown table and a plot.

Layout: RUNS/<variant>/<dataset>/metrics.json. Variants that only re-evaluate `prag` and `combine`
take `closed` and `rag` from the reference run (`--reference`, a pattern with {dataset}); a variant
`<name>_base` holding `closed`/`rag` supplies them for `<name>` instead (e.g. a warm-up adapter that
is also injected in the baseline modes).

python scripts/ablation.py runs/abl --reference 'runs/{dataset}50' --datasets hotpotqa popqa 2wikimultihopqa \
    --plot docs/ablation.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MODES = ("closed", "rag", "prag", "combine")


def load(path: Path) -> dict | None:
    file = path / "metrics.json"
    return json.loads(file.read_text()) if file.exists() else None


def collect(runs: Path, reference: str, datasets: list[str]) -> dict[str, dict[str, dict]]:
    """variant -> dataset -> {"f1": {mode: f1}, "s_per_doc": float | None, "n": int, "baseline_from": str}"""
    table: dict[str, dict[str, dict]] = {}
    variants = ["reference"] + sorted(p.name for p in runs.iterdir() if p.is_dir() and not p.name.endswith("_base"))
    for variant in variants:
        for dataset in datasets:
            if variant == "reference":
                m = load(Path(reference.format(dataset=dataset)))
            else:
                m = load(runs / variant / dataset)
            if m is None:
                continue
            f1 = {mode: r["f1"] for mode, r in m["modes"].items()}
            base = load(runs / f"{variant}_base" / dataset)
            base_from = "own" if base else "reference"
            source = base or load(Path(reference.format(dataset=dataset)))
            for mode in ("closed", "rag"):
                if mode not in f1 or base:
                    f1[mode] = source["modes"][mode]["f1"]
            row = {"f1": f1, "n": m["n"], "baseline_from": base_from}
            row["s_per_doc"] = m.get("offline", {}).get("parameterize_s_per_doc")
            table.setdefault(variant, {})[dataset] = row
    return table


def markdown(table: dict[str, dict[str, dict]], datasets: list[str]) -> str:
    lines = [
        "| variant | dataset | n | closed F1 | rag F1 | prag F1 | combine F1 | offline s/doc built |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, rows in table.items():
        for dataset in datasets:
            if dataset not in rows:
                continue
            r = rows[dataset]
            best = max(r["f1"].values())
            cells = [f"**{r['f1'][m]:.3f}**" if r["f1"][m] == best else f"{r['f1'][m]:.3f}" for m in MODES]
            closed, rag = cells[0], cells[1]
            if r["baseline_from"] == "own":
                closed, rag = closed + " (w)", rag + " (w)"
            cost = "" if r["s_per_doc"] is None else f"{r['s_per_doc']:.1f}"
            lines.append(f"| {variant} | {dataset} | {r['n']} | {closed} | {rag} | {cells[2]} | {cells[3]} | {cost} |")
    return "\n".join(lines)


def plot(table: dict[str, dict[str, dict]], datasets: list[str], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * len(datasets), 3.8))
    FigureCanvasAgg(fig)
    variants = list(table)
    for i, dataset in enumerate(datasets):
        ax = fig.add_subplot(1, len(datasets), i + 1)
        rows = [table[v].get(dataset) for v in variants]
        xs = range(len(variants))
        for offset, mode in ((-0.2, "prag"), (0.2, "combine")):
            ax.bar([x + offset for x in xs], [r["f1"][mode] if r else 0 for r in rows], 0.4, label=mode)
        ref = table["reference"].get(dataset)
        if ref:
            ax.axhline(ref["f1"]["closed"], color="k", ls=":", label="closed")
            ax.axhline(ref["f1"]["rag"], color="r", ls="--", label="rag")
        ax.set_xticks(list(xs), variants, rotation=45, ha="right", fontsize=8)
        ax.set_title(dataset)
        ax.set_ylabel("token F1")
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, help="directory of <variant>/<dataset>/metrics.json")
    parser.add_argument("--reference", required=True, help="the reference run per dataset, e.g. 'runs/{dataset}50'")
    parser.add_argument("--datasets", nargs="+", required=True)
    parser.add_argument("--plot", help="write prag/combine F1 per variant and dataset here (PNG)")
    args = parser.parse_args()
    table = collect(args.runs, args.reference, args.datasets)
    print(markdown(table, args.datasets))
    if args.plot:
        plot(table, args.datasets, args.plot)


if __name__ == "__main__":
    main()
