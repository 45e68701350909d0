"""Generated LoRAs (DyPRAG) beside trained ones on the same questions: F1 and EM per mode, the controls with
unrelated documents' LoRAs, paired differences with 95% bootstrap intervals, the offline cost, and a plot.

Each argument is a `prag eval` directory (several joined by commas are pooled, as chunks of one evaluation
on disjoint questions); together they must answer the same questions in every mode they hold. Modes used
where present: closed, rag, prag, combine, prag-unrelated, combine-unrelated, dyprag, dyprag-combine,
dyprag-unrelated, dyprag-combine-unrelated.

python scripts/dyprag_table.py runs/s26/report-popqa runs/s26/report-dyprag --plot docs/dyprag_popqa.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from compare import by_mode, fmt, load_run, mean, paired

MODES = (
    "closed",
    "rag",
    "prag",
    "prag-unrelated",
    "combine",
    "combine-unrelated",
    "dyprag",
    "dyprag-unrelated",
    "dyprag-combine",
    "dyprag-combine-unrelated",
)
# (candidate, against): what each difference says
DIFFERENCES = (
    ("dyprag", "dyprag-unrelated"),  # do generated parameters carry the document?
    ("dyprag-combine", "dyprag-combine-unrelated"),  # and beside the passages?
    ("prag", "prag-unrelated"),  # do trained ones?
    ("combine", "combine-unrelated"),
    ("dyprag", "closed"),
    ("dyprag", "prag"),
    ("dyprag-combine", "rag"),
    ("dyprag-combine", "combine"),
    ("combine", "rag"),
)


def load(runs: list[str]) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], list[dict]]:
    """F1 and EM (mode -> question id -> score) of runs that answered different modes of the same questions,
    each a `prag eval` directory or comma-joined chunks of one (see `compare.load_run`), and their metrics."""
    f1: dict[str, dict[str, float]] = {}
    em: dict[str, dict[str, float]] = {}
    metrics = []
    for run in runs:
        records, m = load_run(run)
        run_em = by_mode(records, "em")
        for mode, by_id in by_mode(records).items():
            if mode in f1:
                raise ValueError(f"{run}: answers mode {mode} that another run answered too")
            f1[mode], em[mode] = by_id, run_em[mode]
        metrics.append(m)
    return f1, em, metrics


def offline(metrics: list[dict]) -> dict:
    """Seconds per document to augment and train (summed over the runs), and the translator's record."""
    built = sum(m["offline"].get("documents_parameterized") or 0 for m in metrics)
    out = {"documents_parameterized": built}
    if built:
        for phase in ("augment_s", "train_s"):
            out[phase + "_per_doc"] = sum(m["offline"].get(phase) or 0 for m in metrics) / built
    for m in metrics:
        if "translator" in m["offline"]:
            out["translator"] = m["offline"]["translator"]
    return out


def translation(runs: list[str]) -> dict:
    """Seconds per document of the translator's passes at question time, from the `dyprag` rows of each eval
    process's directory (a pooled run's chunks; the mode comes first in each): each batch's load_merge is one
    pass over the batch's documents not met before in that directory (cached since session 31; earlier runs
    translated them again, so for those this overestimates the cost a little)."""
    seconds, documents = 0.0, 0
    dirs = [Path(d) for group in runs for d in group.split(",")]
    pooled_from = [json.loads((d / "metrics.json").read_text()).get("pooled_from", [d]) for d in dirs]
    dirs = [Path(c) for chunks in pooled_from for c in chunks]  # `prag pool`: its chunks
    for run in dirs:
        records, metrics = load_run(run)
        rows = [r for r in records if r["mode"] == "dyprag"]
        size, seen = metrics.get("batch_size") or 1, set()
        for start in range(0, len(rows), size):
            batch = rows[start : start + size]
            met = {p for r in batch for p in r["lora_passages"]} - seen
            if met:
                seconds += batch[0]["timings_ms"]["load_merge"] / 1000
                documents += len(met)
                seen |= met
    return (
        {"translate_s": round(seconds, 2), "documents": documents, "s_per_doc": round(seconds / documents, 3)}
        if documents
        else {}
    )


def markdown(f1: dict, em: dict) -> str:
    present = [m for m in MODES if m in f1]
    lines = ["| mode | n | EM | F1 |", "|---|---|---|---|"]
    lines += [f"| {m} | {len(f1[m])} | {mean(em[m]):.3f} | {mean(f1[m]):.3f} |" for m in present]
    lines += ["", "| F1 difference | mean [95% interval] |", "|---|---|"]
    lines += [f"| {a} - {b} | {fmt(paired(f1[b], f1[a]))} |" for a, b in DIFFERENCES if a in f1 and b in f1]
    return "\n".join(lines)


def plot(f1: dict, path: str, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    present = [m for m in MODES if m in f1]
    fig = Figure(figsize=(1.0 * len(present) + 1, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)

    def color(mode: str) -> str:
        if mode.endswith("unrelated"):
            return "white"
        return "C1" if mode.startswith("dyprag") else "C0" if mode in ("prag", "combine") else "0.5"

    colors = [color(m) for m in present]
    bars = ax.bar(range(len(present)), [mean(f1[m]) for m in present], color=colors, edgecolor="0.2")
    for bar, mode in zip(bars, present, strict=True):
        bar.set_hatch("///" if mode.endswith("unrelated") else "")
    ax.set_xticks(range(len(present)), [m.replace("-", "\n") for m in present], fontsize=7)
    ax.set_ylabel("token F1")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="prag eval directories (comma-joined chunks are pooled)")
    parser.add_argument("--plot", help="write a bar chart of F1 per mode here (PNG)")
    args = parser.parse_args()
    f1, em, metrics = load(args.runs)
    print(markdown(f1, em))
    cost = offline(metrics)
    if "translator" in cost:  # what trained it; not the ids
        record = cost["translator"]
        cost["translator"] = {
            k: v for k, v in record.items() if k in ("documents", "steps", "seconds", "parameterize_s")
        }
    print(json.dumps({**cost, "translation_at_question_time": translation(args.runs)}, indent=1))
    if args.plot:
        dataset = metrics[0]["dataset"]
        plot(f1, args.plot, f"{dataset}, {metrics[0]['slice']['name']} slice, n={len(next(iter(f1.values())))}")


if __name__ == "__main__":
    main()
