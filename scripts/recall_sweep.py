"""Table and plot of `prag recall` runs: per recipe, F1 on each document's own training questions with its
own LoRA and with another document's LoRA, and own minus other with its 95% paired-bootstrap interval.

python scripts/recall_sweep.py reference=runs/s21/recall-default.json \
    none-e3-lr1e-3=runs/s21/recall-ctxnone-e3-lr1e-3.json --plot docs/recall_sweep.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows(runs: list[tuple[str, Path]]) -> list[dict]:
    out = []
    for label, path in runs:
        record = json.loads(path.read_text())
        train = record["config"]["train"]
        for group, e in record["summary"].items():
            if group != "all" and e["pairs"] == record["summary"]["all"]["pairs"]:
                continue  # every pair was trained the same way: the split repeats "all"
            out.append(
                {
                    "recipe": label,
                    "pairs": group,
                    "n": e["pairs"],
                    "own": e["own"]["f1"],
                    "other": e["other"]["f1"],
                    "diff": e["own - other"],
                    "train": f"{train['qa_context']}, {train['epochs']} ep, lr {train['lr']:g}"
                    + (", document LM" if train["document_lm"] else ""),
                }
            )
    return out


def markdown(table: list[dict]) -> str:
    lines = [
        "| recipe | training | pairs | n | own LoRA | other LoRA | own - other [95%] |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        d = r["diff"]
        lines.append(
            f"| {r['recipe']} | {r['train']} | {r['pairs']} | {r['n']} | {r['own']:.3f} | {r['other']:.3f} | "
            f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] |"
        )
    return "\n".join(lines)


def plot(table: list[dict], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = [r for r in table if r["pairs"] == "all"]
    fig = Figure(figsize=(max(5, 1.6 * len(shown)), 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = range(len(shown))
    ax.bar([i - 0.2 for i in x], [r["own"] for r in shown], 0.4, label="own LoRA", color="C1", edgecolor="0.2")
    ax.bar(
        [i + 0.2 for i in x],
        [r["other"] for r in shown],
        0.4,
        label="another document's LoRA",
        color="white",
        edgecolor="0.2",
        hatch="///",
    )
    ax.set_xticks(list(x), [r["recipe"] for r in shown], fontsize=7)
    ax.set_ylabel("F1 on the document's own questions")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=RECALL.json")
    parser.add_argument("--plot", help="write own vs other LoRA per recipe here (PNG)")
    args = parser.parse_args()
    runs = [(label, Path(path)) for label, _, path in (r.partition("=") for r in args.runs)]
    table = rows(runs)
    print(markdown(table))
    if args.plot:
        plot(table, args.plot)


if __name__ == "__main__":
    main()
