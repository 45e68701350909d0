"""Does a document's LoRA hold what it was trained on?

Each document's own generated questions are asked as `prag` asks (no passage in the prompt) with the
document's own LoRA, with another document's LoRA, with none, and with the passage in the prompt instead
(what reading gets). Own minus other is what the LoRA stores about its document; if it is near zero,
training taught a format, not the document. If it is high while `prag` fails on a dataset's questions, the
facts are stored but not reached by the way users ask. Pairs are split by how they were trained (alone, or
only with the passage in the prompt: `train.qa_context`), since only the first kind asks the parameters.
"""

from __future__ import annotations

from tqdm.auto import tqdm

from .corpus import Passage
from .evaluate import exact_match, paired_bootstrap, token_f1
from .parameterize import qa_layout
from .pipeline import Pipeline

# condition -> (mode, whose passage or LoRA): "doc" is the document itself, "other" the next document's
CONDITIONS = {"own": ("prag", "doc"), "other": ("prag", "other"), "none": ("closed", None), "passage": ("rag", "doc")}


def recall_rows(
    pipeline: Pipeline,
    passages: list[Passage],
    batch_size: int = 8,
    show_progress: bool = True,
    conditions: tuple[str, ...] = tuple(CONDITIONS),
) -> list[dict]:
    """One row per (document, generated QA pair, condition), scored against the generated answer.
    Documents without a stored LoRA are parameterized first. "own" is always asked: the others are its controls."""
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        raise ValueError(f"recall conditions: unknown {unknown}; choose from {', '.join(CONDITIONS)}")
    conditions = ("own", *[c for c in CONDITIONS if c in conditions and c != "own"])
    pipeline.parameterize(passages, show_progress)
    docs = sorted({p.id: p for p in passages}.values(), key=lambda p: p.id)
    if len(docs) < 2:
        raise ValueError(f"recall needs at least two documents (one's LoRA is the other's control), got {len(docs)}")
    jobs = []
    for i, doc in enumerate(docs):
        other = docs[(i + 1) % len(docs)]
        pairs = pipeline.augmentations.get(doc.id).qa
        for j, qa in enumerate(pairs):
            alone = qa_layout(j, len(pairs), pipeline.config.train)[1]
            for condition in conditions:
                mode, whose = CONDITIONS[condition]
                given = None if whose is None else [doc if whose == "doc" else other]
                jobs.append((doc, qa, alone, condition, mode, given))
    rows = []
    bar = tqdm(total=len(jobs), desc="recall", unit="q", disable=not show_progress)
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        prepared = [
            pipeline.prepare(qa["question"], mode, passages=given, build=False) for _, qa, _, _, mode, given in batch
        ]
        for (doc, qa, alone, condition, _, given), answer in zip(batch, pipeline.generate(prepared), strict=True):
            rows.append(
                {
                    "doc_id": doc.id,
                    "question": qa["question"],
                    "answer": qa["answer"],
                    "trained_alone": alone,
                    "condition": condition,
                    "lora_doc": given[0].id if given and condition != "passage" else None,
                    "prediction": answer.short_answer,
                    "em": exact_match(answer.short_answer, [qa["answer"]]),
                    "f1": token_f1(answer.short_answer, [qa["answer"]]),
                }
            )
        bar.update(len(batch))
    bar.close()
    return rows


def summarize(rows: list[dict]) -> dict:
    """Mean F1/EM per condition, for all pairs and split by how they were trained; own minus other and own
    minus none with 95% paired-bootstrap intervals over the pairs."""
    groups = {
        "all": rows,
        "trained alone": [r for r in rows if r["trained_alone"]],
        "trained with the passage only": [r for r in rows if not r["trained_alone"]],
    }
    summary = {}
    for name, group in groups.items():
        by = {c: {(r["doc_id"], r["question"]): r for r in group if r["condition"] == c} for c in CONDITIONS}
        pairs = sorted(by["own"])
        if not pairs:
            continue
        entry: dict = {"pairs": len(pairs)}
        for condition, scored in by.items():
            if scored:
                entry[condition] = {m: sum(scored[p][m] for p in pairs) / len(pairs) for m in ("f1", "em")}
        for control in ("other", "none"):
            if not by[control]:
                continue
            own, base = [by["own"][p]["f1"] for p in pairs], [by[control][p]["f1"] for p in pairs]
            entry[f"own - {control}"] = paired_bootstrap(own, base)
        summary[name] = entry
    return summary


def summary_table(summary: dict) -> str:
    lines = [
        "| pairs | n | own LoRA | other LoRA | no LoRA | passage in prompt | own - other [95%] | own - none [95%] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in summary.items():
        scores = [f"{e[c]['f1']:.3f}" if c in e else "" for c in CONDITIONS]
        diffs = [e.get(f"own - {c}") for c in ("other", "none")]
        shown = [f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" if d else "" for d in diffs]
        lines.append(f"| {name} | {e['pairs']} | " + " | ".join(scores + shown) + " |")
    return "\n".join(lines)
