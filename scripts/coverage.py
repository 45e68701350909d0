"""Coverage for `prag eval` runs made before eval recorded it: whether the QA pairs stored for each question's
own documents hold its gold answer, and each mode's F1 on the covered and the uncovered questions
(`prag.evaluate.coverage_summary`, what `metrics.json` now holds under `coverage`).

Each run is LABEL=RUN_DIR:AUGMENT_DIR, AUGMENT_DIR being the store's augmentation directory the run trained
from (`<store>/augment/<model>-<key>-s2`; `prag stats` names it).

python scripts/coverage.py \
    "default=runs/s21/default-popqa:runs/f1/store-popqa-free/augment/SmolLM2-135M-Instruct-a44bc0d6643a-s2"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prag.evaluate import coverage_summary, stored_answer_f1, stored_answers
from prag.store import AugmentationStore


def covered_records(run: Path, augmentations: AugmentationStore) -> list[dict]:
    """The run's records, each with the stored_answer_f1 of its question's own documents (the passages a
    retrieving mode that is not a control answered with)."""
    records = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    own: dict[str, list[str]] = {}
    for r in records:
        if r["passages"] and not r["mode"].endswith("-unrelated"):
            own.setdefault(r["id"], [p["id"] for p in r["passages"]])
    stored = {}
    for qid, doc_ids in own.items():
        golds = next(r["golden_answers"] for r in records if r["id"] == qid)
        stored[qid] = stored_answer_f1(golds, stored_answers(augmentations, doc_ids))
    return [{**r, "stored_answer_f1": stored.get(r["id"])} for r in records]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR:AUGMENT_DIR")
    args = parser.parse_args()
    print("| run | questions | covered | mode | F1 covered | F1 uncovered |")
    print("|---|---|---|---|---|---|")
    for spec in args.runs:
        label, _, paths = spec.partition("=")
        run, _, augment = paths.partition(":")
        if not augment:
            parser.error(f"{spec!r}: give LABEL=RUN_DIR:AUGMENT_DIR")
        summary = coverage_summary(covered_records(Path(run), AugmentationStore(augment)))
        if summary is None:
            print(f"| {label} | 0 | - | - | - | - |")
            continue
        for mode, parts in summary["f1_by_mode"].items():
            cells = [f"{parts[p]['f1']:.3f} (n={parts[p]['n']})" for p in ("covered", "uncovered")]
            print(f"| {label} | {summary['questions']} | {summary['covered']} | {mode} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
