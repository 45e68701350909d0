"""Cut the small bundled demo/test fixture in data/demo/ out of the full benchmark data, reproducibly.

Rule: per dataset, in file order, take the first questions whose every supporting title is a corpus title
and one of whose golden answers occurs (case-insensitively, as whole words) in the text of a supporting
passage: 4 from PopQA, 2 from HotpotQA, 2 from 2WikiMultihopQA. The corpus is every passage whose title is
a supporting title of those questions, plus 200 other passages drawn with random.Random(0) as distractors.
Rows are copied verbatim, in their original order.

    python scripts/make_demo_data.py [SRC=../shared/data] [DST=data/demo]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

PICKS = {"popqa": 4, "hotpotqa": 2, "2wikimultihopqa": 2}
DISTRACTORS = 200


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", nargs="?", default="../shared/data", type=Path)
    parser.add_argument("dst", nargs="?", default="data/demo", type=Path)
    args = parser.parse_args()

    corpus_lines = (args.src / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    corpus = [json.loads(line) for line in corpus_lines]
    texts_by_title: dict[str, list[str]] = {}
    for row in corpus:
        texts_by_title.setdefault(row["title"], []).append(row["text"].lower())

    def usable(q: dict) -> bool:
        titles = q["metadata"]["supporting_titles"]
        if not titles or any(t not in texts_by_title for t in titles):
            return False
        texts = [text for t in titles for text in texts_by_title[t]]
        answers = [re.compile(rf"\b{re.escape(a.lower())}\b") for a in q["golden_answers"]]
        return any(a.search(text) for a in answers for text in texts)

    questions: list[str] = []
    for dataset, n in PICKS.items():
        lines = (args.src / "qa" / dataset / "dev.jsonl").read_text(encoding="utf-8").splitlines()
        questions += [line for line in lines if usable(json.loads(line))][:n]
    titles = {t for line in questions for t in json.loads(line)["metadata"]["supporting_titles"]}

    gold = [i for i, row in enumerate(corpus) if row["title"] in titles]
    others = [i for i, row in enumerate(corpus) if row["title"] not in titles]
    keep = sorted(gold + random.Random(0).sample(others, DISTRACTORS))

    args.dst.mkdir(parents=True, exist_ok=True)
    (args.dst / "questions.jsonl").write_text("".join(line + "\n" for line in questions), encoding="utf-8")
    (args.dst / "corpus.jsonl").write_text("".join(corpus_lines[i] + "\n" for i in keep), encoding="utf-8")
    print(f"{len(questions)} questions, {len(gold)} gold + {DISTRACTORS} distractor passages -> {args.dst}")


if __name__ == "__main__":
    main()
