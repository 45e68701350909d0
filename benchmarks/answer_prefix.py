"""Question time with `answer.prefix=frozen` against `lora`, side by side in one process.

With `lora` (the default) every row of a `prag` batch reads the whole prompt under its own merged LoRA, so
the prompt format's fixed start (chat header, instruction: ~70 of ~87 tokens on PopQA's protocol) is
computed once per row. With `frozen` it is read once without the LoRAs, as training on a frozen prefix
saw it, and shared by every row of every batch. Same pipeline, same prepared batches (stored LoRAs only,
nothing trained here), the two settings alternated per round; reported: median seconds per batch to the
first token and in all, their ratios, and how many answers the two settings share.

    python benchmarks/answer_prefix.py --home runs/home --store runs/store \
        --dataset ../shared/data/qa/popqa/dev.jsonl --slice tune --limit 48 --batch-size 8 --rounds 3 \
        --out runs/answer_prefix.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from prag import Config, Pipeline  # noqa: E402
from prag.evaluate import load_questions  # noqa: E402
from prag.protocols import apply_protocol, dataset_name, protocol_settings  # noqa: E402

SETTINGS = ("lora", "frozen")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True)
    parser.add_argument("--store", default=None)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--slice", default="tune", choices=("report", "tune", "all"))
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--limit", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mode", default="prag", choices=("prag", "combine"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    config = apply_protocol(Config(), protocol_settings(dataset_name(args.dataset)))
    pipeline = Pipeline(args.home, config, store=args.store)
    questions = load_questions(args.dataset, args.limit, args.offset, args.slice)
    prepared = [pipeline.prepare(q.question, args.mode, build=False) for q in questions]
    prepared = [p for p in prepared if not p.missing and p.adapter is not None]  # stored LoRAs only
    if len(prepared) < args.batch_size:
        raise SystemExit(f"only {len(prepared)} questions have all their LoRAs stored; parameterize them first")
    batches = [prepared[i : i + args.batch_size] for i in range(0, len(prepared), args.batch_size)]
    print(f"{len(prepared)} {args.mode} questions in {len(batches)} batches of up to {args.batch_size}", flush=True)

    times: dict[str, dict[str, list[float]]] = {s: {"first_token": [], "total": []} for s in SETTINGS}
    texts: dict[str, list[str]] = {}
    for setting in SETTINGS:  # untimed: warms up both paths (and computes the frozen start once)
        pipeline.config.answer.prefix = setting
        texts[setting] = [a.text for batch in batches for a in pipeline.generate(batch)]
    for round_ in range(args.rounds):
        for setting in SETTINGS if round_ % 2 == 0 else SETTINGS[::-1]:
            pipeline.config.answer.prefix = setting
            for batch in batches:
                t = time.perf_counter()
                answers = pipeline.generate(batch)
                times[setting]["total"].append(time.perf_counter() - t)
                times[setting]["first_token"].append(answers[0].timings["first_token"])
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)

    median = {s: {k: statistics.median(v) for k, v in times[s].items()} for s in SETTINGS}
    frozen_start = pipeline.frozen_prefix()
    same = sum(a == b for a, b in zip(texts["lora"], texts["frozen"], strict=True))
    result = {
        "command": " ".join(sys.argv),
        "questions": len(prepared),
        "batches": len(batches),
        "rounds": args.rounds,
        "median_seconds_per_batch": median,
        "frozen_over_lora": {k: median["frozen"][k] / median["lora"][k] for k in ("first_token", "total")},
        "same_answers": same,
        "prefix_tokens": len(frozen_start.ids) if frozen_start else 0,
        "prompt_tokens_mean": statistics.mean(len(p.prompt) for p in prepared),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
