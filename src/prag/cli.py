"""The `prag` command: thin argument parsing over the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .config import Config
from .pipeline import MODES, Pipeline


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--home",
        default=os.environ.get("PRAG_HOME", ".prag"),
        help="workspace directory for the index, augmentations and adapters (default: $PRAG_HOME or ./.prag)",
    )
    parser.add_argument(
        "--store",
        default=os.environ.get("PRAG_STORE") or None,
        help="where augmentations and adapters live: a directory (shared by a cluster's machines) or an fsspec URL "
        "such as s3://bucket/prefix (default: $PRAG_STORE or the --home directory)",
    )
    parser.add_argument("--config", help="JSON config file (sections: model, lora, train, augment, answer)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field, e.g. --set train.lr=1e-3 (repeatable)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prag", description="Parametric RAG: documents as LoRAs merged at question time."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("index", help="index a corpus (JSONL, FlashRAG JSONL, DPR TSV, or a folder of .txt/.md)")
    _common(p)
    p.add_argument("corpus")

    p = commands.add_parser("ask", help="answer one question")
    _common(p)
    p.add_argument("question")
    p.add_argument("--mode", choices=MODES, default="prag")
    p.add_argument("--top-k", type=int, default=None)

    p = commands.add_parser(
        "parameterize", help="augment and train LoRAs ahead of time (default: every indexed passage)"
    )
    _common(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--questions", help="only the passages retrieved for these questions (FlashRAG JSONL)")
    which.add_argument("--ids", help="only these passages: a file of document ids, one per line")
    p.add_argument("--limit", type=int, default=None, help="the first N questions, ids or indexed passages")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument(
        "--ray",
        metavar="auto|local|ADDRESS",
        help="run on a Ray cluster: auto (the cluster this machine belongs to), local (a Ray instance started "
        "for this run) or the head's HOST:PORT; without it, in this process",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="Ray workers on CPUs (default: one per node; one per GPU on GPUs)"
    )
    p.add_argument(
        "--cpus-per-worker", type=int, default=None, help="CPUs and torch threads per Ray worker (default: shared out)"
    )
    p.add_argument(
        "--shard-size",
        type=int,
        default=None,
        help="documents augmented together, the unit of work of a Ray task (default: 4 x augment.batch_size; the "
        "same shards give the same adapters in-process and on Ray)",
    )

    p = commands.add_parser(
        "warmup",
        help="train the shared LoRA initialization on held-in QA (questions with their gold passages)",
        description="Train one LoRA on held-in questions (FlashRAG JSONL with supporting_titles naming indexed "
        "passages), to start every document's LoRA from with --set lora.init=OUT. Use questions OUTSIDE the "
        "range you evaluate on.",
    )
    _common(p)
    p.add_argument("--dataset", required=True, help="held-in questions, FlashRAG JSONL")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", required=True, help="the warm-up adapter to write (.safetensors)")

    p = commands.add_parser("eval", help="evaluate modes on a FlashRAG-format question set")
    _common(p)
    p.add_argument("--dataset", required=True, help="questions, FlashRAG JSONL")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, from " + ",".join(MODES))
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--out", required=True, help="output directory for metrics.json, predictions.jsonl, report.md")
    p.add_argument("--show-answers", action="store_true", help="print every answer per mode")

    p = commands.add_parser("export", help="write documents' LoRA (merged if several) as a PEFT adapter directory")
    _common(p)
    p.add_argument("doc_ids", nargs="+")
    p.add_argument("--out", required=True)

    p = commands.add_parser("stats", help="what the workspace holds, and augmentation rejection counts")
    _common(p)
    return parser


def load_config(args: argparse.Namespace) -> Config:
    saved = Path(args.home) / "config.json"
    config = Config.load(args.config) if args.config else Config.load(saved) if saved.exists() else Config()
    for assignment in args.set:
        key, sep, value = assignment.partition("=")
        if not sep:
            raise SystemExit(f"prag: --set expects SECTION.FIELD=VALUE, got {assignment!r}")
        config.set(key.strip(), value.strip())
    return config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args)
        pipeline = Pipeline(args.home, config, store=args.store)
        return COMMANDS[args.command](pipeline, args)
    except (ValueError, FileNotFoundError, KeyError, ModuleNotFoundError, ConnectionError) as error:
        print(f"prag: error: {error}", file=sys.stderr)
        return 2


def cmd_index(pipeline: Pipeline, args) -> int:
    t = time.perf_counter()
    n = pipeline.index(args.corpus, show_progress=not args.quiet)
    print(f"indexed {n} passages from {args.corpus} into {pipeline.home / 'index'} in {time.perf_counter() - t:.1f}s")
    return 0


def cmd_ask(pipeline: Pipeline, args) -> int:
    answer = pipeline.answer(args.question, args.mode, args.top_k, show_progress=not args.quiet)
    print(f"answer: {answer.short_answer}")
    print(f"generation: {pipeline.config.answer.lead_in} {answer.text}")
    for i, p in enumerate(answer.passages, 1):
        print(f"passage {i}: {p.id}  {p.title}")
    print("timings: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in answer.timings.items()))
    return 0


def cmd_parameterize(pipeline: Pipeline, args) -> int:
    if args.questions:
        from .evaluate import load_questions

        questions = load_questions(args.questions, limit=args.limit)
        passages = list({p.id: p for q in questions for p in pipeline.retrieve(q.question, args.top_k)}.values())
    elif args.ids:
        passages = read_ids(pipeline, args.ids)[: args.limit]
    else:
        retriever = pipeline.retriever
        passages = list(retriever.passages)[: args.limit]
    t = time.perf_counter()
    if args.ray:
        from .distributed import parameterize_on_ray

        built = parameterize_on_ray(
            pipeline, passages, args.ray, args.workers, args.cpus_per_worker, not args.quiet, args.shard_size
        )
    else:
        built = pipeline.parameterize(passages, show_progress=not args.quiet, shard_size=args.shard_size)
    elapsed = time.perf_counter() - t
    print(
        f"{len(passages)} passages: {built} parameterized now ({elapsed:.1f}s), {len(passages) - built} already stored"
    )
    return 0


def read_ids(pipeline: Pipeline, path: str) -> list:
    """The indexed passages named in `path`, one id per line (blank lines skipped)."""
    passages = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            doc_id = line.strip()
            if not doc_id:
                continue
            try:
                passages.append(pipeline.retriever.passage(doc_id))
            except KeyError:
                raise ValueError(f"{path}:{line_number}: no passage with id {doc_id!r} in the index") from None
    return passages


def cmd_warmup(pipeline: Pipeline, args) -> int:
    from .evaluate import load_questions

    questions = load_questions(args.dataset, limit=args.limit, offset=args.offset)
    t = time.perf_counter()
    n = pipeline.warmup(questions, args.out, show_progress=not args.quiet)
    print(
        f"warm-up adapter from {len(questions)} questions ({n} sequences) written to {args.out} "
        f"in {time.perf_counter() - t:.1f}s; use it with --set lora.init={args.out}"
    )
    return 0


def cmd_eval(pipeline: Pipeline, args) -> int:
    from .evaluate import load_questions, run, write_results

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    top_k = args.top_k or pipeline.config.answer.top_k
    questions = load_questions(args.dataset, limit=args.limit, offset=args.offset)
    evaluation, offline = run(pipeline, questions, modes, top_k, show_progress=not args.quiet)
    metrics = evaluation.metrics(
        Path(args.dataset).parent.name or Path(args.dataset).stem,
        top_k,
        pipeline.config.model.name,
        extra={"offline": offline, "config": pipeline.config.to_dict()},
    )
    write_results(args.out, metrics, evaluation.records, notes=f"Command: `prag {' '.join(sys.argv[1:])}`")
    if args.show_answers:
        print(answers_table(evaluation.records, modes))
    print(summary_table(metrics))
    print(f"wrote {args.out}/metrics.json, predictions.jsonl, report.md")
    return 0


def answers_table(records: list[dict], modes: list[str]) -> str:
    by_question: dict[str, dict[str, dict]] = {}
    for r in records:
        by_question.setdefault(r["id"], {})[r["mode"]] = r
    lines = []
    for rows in by_question.values():
        first = next(iter(rows.values()))
        lines.append(f"\nQ: {first['question']}\n   gold: {' | '.join(first['golden_answers'][:3])}")
        for mode in modes:
            r = rows[mode]
            lines.append(f"   {mode:8s} F1 {r['f1']:.2f}  {r['prediction']!r}")
    return "\n".join(lines)


def summary_table(metrics: dict) -> str:
    recall = metrics["retrieval"]["recall@k"]
    head = f"\n{metrics['dataset']}: n={metrics['n']}, top-k={metrics['top_k']}, recall@k="
    head += "n/a" if recall is None else f"{recall:.3f}"
    lines = [
        head,
        f"{'mode':8s} {'EM':>6s} {'F1':>6s} {'p50 ms':>8s} {'p95 ms':>8s} {'load+merge':>10s} {'generate':>9s}",
    ]
    for mode, m in metrics["modes"].items():
        lat = m["latency_ms"]
        lines.append(
            f"{mode:8s} {m['em']:6.3f} {m['f1']:6.3f} {lat['p50']:8.1f} {lat['p95']:8.1f} "
            f"{lat['parts']['load_merge']['mean']:10.1f} {lat['parts']['generation']['mean']:9.1f}"
        )
    return "\n".join(lines)


def cmd_export(pipeline: Pipeline, args) -> int:
    from .llm import resolve_model_dir
    from .lora import merge
    from .store import export_peft

    adapters = [pipeline.adapters.get(doc_id) for doc_id in args.doc_ids]
    out = export_peft(
        merge(adapters), args.out, pipeline.adapters.meta, str(resolve_model_dir(pipeline.config.model.name))
    )
    print(f"wrote PEFT adapter ({len(adapters)} document(s)) to {out}")
    return 0


def cmd_stats(pipeline: Pipeline, args) -> int:
    stats = {
        "home": str(pipeline.home),
        "adapters": pipeline.adapters.count(),
        "adapter_store": str(pipeline.adapters.root),
    }
    if (pipeline.home / "index" / "retriever.json").exists():
        stats["passages"] = len(pipeline.retriever)
    rejected: dict[str, int] = {}
    augmented = qa = rewrites = 0
    for augmentation in pipeline.augmentations:
        augmented += 1
        qa += len(augmentation.qa)
        rewrites += len(augmentation.rewrites)
        for reason, n in augmentation.rejected.items():
            rejected[reason] = rejected.get(reason, 0) + n
    stats.update(augmented=augmented, qa_pairs=qa, rewrites=rewrites, rejected=rejected)
    print(json.dumps(stats, indent=2))
    return 0


COMMANDS = {
    "index": cmd_index,
    "ask": cmd_ask,
    "parameterize": cmd_parameterize,
    "warmup": cmd_warmup,
    "eval": cmd_eval,
    "export": cmd_export,
    "stats": cmd_stats,
}

if __name__ == "__main__":
    sys.exit(main())
