"""Collect `prag eval` output directories (one per dataset) into the results tables and one F1 plot.

Prints markdown: EM/F1 per mode beside the paper's LLaMA-3.2-1B numbers, the paired F1 differences
(with the unrelated-LoRA controls), F1 per question type, latency, and offline cost.

python scripts/summarize.py runs/report/{popqa,complexwebquestions,hotpotqa,2wikimultihopqa} \
    --plot docs/f1_by_dataset.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# every mode a table can show, in column order; a table shows those that some run evaluated
MODES = (
    "closed",
    "rag",
    "prag",
    "combine",
    "prag-unrelated",
    "combine-unrelated",
    "dyprag",
    "dyprag-combine",
    "dyprag-unrelated",
)
# Table 1 of the paper (arXiv 2501.15915v1), LLaMA-3.2-1B, F1, BM25 top-3 ("Total" columns for the
# multi-hop sets): Standard RAG, P-RAG and "Combine Both". v1 has no closed-book row; the closed-book
# numbers are DyPRAG's re-run of the same setting (arXiv 2503.23895, github Trae1ounG/DyPRAG, "Vanilla").
PAPER = {
    "2wikimultihopqa": {"closed": 0.2252, "rag": 0.2520, "prag": 0.2764, "combine": 0.3237},
    "hotpotqa": {"closed": 0.1879, "rag": 0.2671, "prag": 0.1999, "combine": 0.2689},
    "popqa": {"closed": 0.0226, "rag": 0.1839, "prag": 0.2205, "combine": 0.2961},
    "complexwebquestions": {"closed": 0.3494, "rag": 0.3726, "prag": 0.3482, "combine": 0.4101},
}

# the same table's per-type columns (rag, prag, combine F1); 2WikiMultihopQA's "Bridge" is its bridge_comparison type
PAPER_BY_TYPE = {
    "2wikimultihopqa": {
        "comparison": (0.4298, 0.4920, 0.5046),
        "bridge_comparison": (0.3032, 0.3994, 0.4595),
        "inference": (0.2263, 0.2185, 0.2399),
        "compositional": (0.1064, 0.1334, 0.1357),
    },
    "hotpotqa": {"bridge": (0.2110, 0.1602, 0.2282), "comparison": (0.4083, 0.4493, 0.4217)},
}


def evaluated(runs: list[dict]) -> list[str]:
    return [m for m in MODES if any(m in run["modes"] for run in runs)]


def main_table(runs: list[dict]) -> list[str]:
    modes = evaluated(runs)
    lines = [
        "| dataset | n | recall@k | "
        + " | ".join(f"{m} EM / F1" for m in modes)
        + " | paper (LLaMA-3.2-1B) closed / rag / prag / combine F1 |",
        "|---|---|---|" + "---|" * len(modes) + "---|",
    ]
    for m in runs:
        recall = m["retrieval"]["recall@k"]
        cells = [m["dataset"], str(m["n"]), "n/a" if recall is None else f"{recall:.3f}"]
        for mode in modes:
            r = m["modes"].get(mode)
            cells.append("-" if r is None else f"{r['em']:.3f} / **{r['f1']:.3f}**")
        paper = PAPER.get(m["dataset"])
        cells.append(" / ".join(f"{paper[k]:.3f}" for k in ("closed", "rag", "prag", "combine")) if paper else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def comparisons(runs: list[dict]) -> list[str]:
    names = list(dict.fromkeys(name for m in runs for name in m.get("comparisons", {})))
    if not names:
        return ["(none: these runs lack the modes that are compared)"]
    lines = ["| dataset | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for m in runs:
        cells = []
        for name in names:
            c = m.get("comparisons", {}).get(name)
            cells.append("-" if c is None else f"{c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]")
        lines.append(f"| {m['dataset']} | " + " | ".join(cells) + " |")
    return lines


def by_type(runs: list[dict]) -> list[str]:
    modes = evaluated(runs)
    lines = [
        "| dataset | type | n | " + " | ".join(modes) + " | paper (LLaMA-3.2-1B) rag / prag / combine |",
        "|---|---|---|" + "---|" * len(modes) + "---|",
    ]
    for m in runs:
        types = sorted({t for r in m["modes"].values() for t in r["by_type"]})
        if types == ["unknown"]:
            continue
        for t in types:
            cells = [m["modes"][mode]["by_type"].get(t) if mode in m["modes"] else None for mode in modes]
            n = next(c["n"] for c in cells if c)
            paper = PAPER_BY_TYPE.get(m["dataset"], {}).get(t)
            lines.append(
                f"| {m['dataset']} | {t} | {n} | "
                + " | ".join("-" if c is None else f"{c['f1']:.3f}" for c in cells)
                + f" | {' / '.join(f'{v:.3f}' for v in paper) if paper else '-'} |"
            )
    return lines if len(lines) > 2 else ["(none: these sets have no question types)"]


def latency(runs: list[dict]) -> list[str]:
    lines = [
        "| dataset | mode | p50 ms | p95 ms | retrieval | load+merge | first token p50 | ms per token | new tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in runs:
        for mode in evaluated([m]):
            r = m["modes"][mode]
            lat, parts = r["latency_ms"], r["latency_ms"]["parts"]
            lines.append(
                f"| {m['dataset']} | {mode} | {lat['p50']:.0f} | {lat['p95']:.0f} | {parts['retrieval']['mean']:.1f} | "
                f"{parts['load_merge']['mean']:.1f} | {lat['first_token']['p50']:.0f} | "
                f"{lat['per_token']['mean']:.1f} | {r['new_tokens']:.1f} |"
            )
    return lines


def offline(runs: list[dict]) -> list[str]:
    lines = [
        "| dataset | documents built | augmentation s | training s | seconds per document |",
        "|---|---|---|---|---|",
    ]
    for m in runs:
        off = m.get("offline", {})
        lines.append(
            f"| {m['dataset']} | {off.get('documents_parameterized')} | {off.get('augment_s', '-')} | "
            f"{off.get('train_s', '-')} | {off.get('parameterize_s_per_doc')} |"
        )
    return lines


def plot(runs: list[dict], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    modes = evaluated(runs)
    width = 0.8 / len(modes)
    colors = {"closed": "0.75", "rag": "0.45", "prag": "C0", "combine": "C1", "dyprag": "C2", "dyprag-combine": "C3"}
    for i, mode in enumerate(modes):
        xs = [j + i * width for j in range(len(runs))]
        values = [m["modes"][mode]["f1"] if mode in m["modes"] else 0 for m in runs]
        hatch = "//" if mode.endswith("unrelated") else None
        color = colors[mode.removesuffix("-unrelated")]  # a control has its mode's color, hatched
        ax.bar(xs, values, width, label=mode, color=color, hatch=hatch, edgecolor="white" if hatch else None)
        for x, m in zip(xs, runs, strict=True):  # the paper's number, for orientation
            paper = PAPER.get(m["dataset"], {}).get(mode)
            if paper is not None:
                ax.plot([x - width / 2, x + width / 2], [paper, paper], color="k", lw=1.5)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(runs))], [m["dataset"] for m in runs])
    ax.set_ylabel("token F1")
    ax.set_title(f"F1 per mode ({runs[0]['model']}, top-{runs[0]['top_k']}); black ticks: the paper's LLaMA-3.2-1B")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="directories holding metrics.json")
    parser.add_argument("--plot", help="write a grouped bar chart of F1 per mode and dataset here")
    args = parser.parse_args()
    runs = [json.loads((Path(run) / "metrics.json").read_text()) for run in args.runs]
    sections = [
        ("EM / F1 per mode", main_table(runs)),
        ("F1 differences, paired over questions (95% bootstrap interval)", comparisons(runs)),
        ("F1 per question type", by_type(runs)),
        ("Latency per question (ms; retrieval and load+merge are means)", latency(runs)),
        ("Offline cost (augmentation + LoRA training of the documents first retrieved here)", offline(runs)),
    ]
    for title, lines in sections:
        print(f"\n### {title}\n")
        print("\n".join(lines))
    if args.plot:
        plot(runs, args.plot)


if __name__ == "__main__":
    main()
