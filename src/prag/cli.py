"""The `prag` command: thin argument parsing over the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .config import Config
from .evaluate import SLICES
from .pipeline import ALL_MODES, Pipeline
from .protocols import PROFILES, apply_protocol, dataset_name, protocol_settings


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
    parser.add_argument("--config", help="JSON config file (sections: model, lora, train, augment, answer, translator)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field, e.g. --set train.lr=1e-3 (repeatable)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--protocol",
        default="auto",
        help="the dataset protocol to answer and train with (popqa, hotpotqa, 2wikimultihopqa, complexwebquestions, "
        "or none); auto: from --dataset's name where there is one, else none",
    )
    parser.add_argument(
        "--profile", default="default", choices=PROFILES, help="the protocols' profile: ours, or the reference's"
    )


def _retrieved_for(parser: argparse.ArgumentParser) -> None:
    """The documents a command works on: the top-k passages retrieved for some questions of the tune slice."""
    parser.add_argument("--dataset", required=True, help="questions, FlashRAG JSONL")
    parser.add_argument(
        "--slice", default="tune", choices=SLICES, help="tune (default): questions 100 on; all: the whole file"
    )
    parser.add_argument("--offset", type=int, default=0, help="questions skipped, counted within the slice")
    parser.add_argument("--limit", type=int, default=None, help="questions, counted within the slice")
    parser.add_argument("--top-k", type=int, default=None, help="passages per question (default: answer.top_k)")


def retrieved_passages(pipeline: Pipeline, args: argparse.Namespace) -> tuple[list, list]:
    """The questions `_retrieved_for` selects, and their retrieved passages (each once, in order)."""
    from .evaluate import load_questions

    questions = load_questions(args.dataset, limit=args.limit, offset=args.offset, slice=args.slice)
    if not questions:
        raise ValueError(f"{args.dataset}: no questions in slice {args.slice!r} at offset {args.offset}")
    passages = list({p.id: p for q in questions for p in pipeline.retrieve(q.question, args.top_k)}.values())
    return questions, passages


def _check_batch_size(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: {args.batch_size} is out of range, expected 1 or more")


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
    p.add_argument("--mode", choices=ALL_MODES, default="prag")
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
        help="train a warm-up or format adapter on held-in QA (questions with their gold passages)",
        description="Train one LoRA on held-in questions (FlashRAG JSONL with supporting_titles naming indexed "
        "passages): a warm-up to start every document's LoRA from (--set lora.init=OUT), or a format adapter "
        "injected in every mode, `closed` and `rag` included (--set lora.base=OUT). Only the TUNE slice of each "
        "file is read (questions 100 on): the report slice never trains a warm-up, and `prag eval` refuses to "
        "evaluate a question the warm-up was trained on.",
    )
    _common(p)
    p.add_argument(
        "--dataset", required=True, action="append", help="held-in questions, FlashRAG JSONL (repeatable: mixed)"
    )
    p.add_argument("--offset", type=int, default=0, help="questions skipped in each file's tune slice")
    p.add_argument("--limit", type=int, default=None, help="questions taken from each file's tune slice")
    p.add_argument("--out", required=True, help="the warm-up adapter to write (.safetensors)")

    p = commands.add_parser("translator", help="DyPRAG's parameter translator: documents to LoRAs in one forward pass")
    translator_commands = p.add_subparsers(dest="translator_command", required=True)
    p = translator_commands.add_parser(
        "train",
        help="train the translator on the trained LoRAs of the documents retrieved for some questions",
        description="Train the parameter translator that the dyprag modes use, on (document, trained LoRA) pairs: "
        "the top-k passages retrieved for the questions, parameterized first where they have no stored LoRA. "
        "It is stored in the workspace under the model and config that built the LoRAs; the questions' ids are "
        "recorded and `prag eval` refuses to evaluate them in the dyprag modes. Reads the TUNE slice by default.",
    )
    _common(p)
    _retrieved_for(p)
    p.add_argument("--restart", action="store_true", help="start over: drop a checkpoint, replace a stored translator")

    p = commands.add_parser("eval", help="evaluate modes on a FlashRAG-format question set")
    _common(p)
    p.add_argument("--dataset", required=True, help="questions, FlashRAG JSONL")
    p.add_argument("--modes", default="closed,rag,prag,combine", help="comma-separated, from " + ",".join(ALL_MODES))
    p.add_argument(
        "--slice",
        default="all",
        choices=SLICES,
        help="report: the first 100 questions (for reporting); tune: the rest (for choosing); all: the file",
    )
    p.add_argument("--limit", type=int, default=None, help="questions, counted within the slice")
    p.add_argument("--offset", type=int, default=0, help="questions skipped, counted within the slice")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--out", required=True, help="output directory for metrics.json, predictions.jsonl, report.md")
    p.add_argument("--show-answers", action="store_true", help="print every answer per mode")
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="questions of a mode answered in one batched generation (faster; latencies are then per batch)",
    )

    p = commands.add_parser(
        "pool",
        help="pool chunks of one `prag eval` (disjoint questions: --offset/--limit) into one run",
        description="Join the per-question records of chunked `prag eval` runs and recompute the metrics, paired "
        "intervals, report and plots, as if the slice had been evaluated in one run; the offline costs are summed. "
        "The chunks must share dataset, model, top-k, config, protocol and modes.",
    )
    p.add_argument("runs", nargs="+", help="prag eval output directories")
    p.add_argument("--out", required=True, help="output directory for the pooled run")

    p = commands.add_parser(
        "recall",
        help="does each document's LoRA answer the questions it was trained on? (own vs another's LoRA)",
        description="Ask every document's own generated questions without the passage, with its own LoRA, another "
        "document's LoRA, no LoRA, and with the passage in the prompt instead; the documents are the top-k "
        "retrieved for some questions (parameterized first where missing). Own minus other is what a LoRA stores "
        "about its document. Reads the TUNE slice by default.",
    )
    _common(p)
    _retrieved_for(p)
    p.add_argument("--batch-size", type=int, default=8, help="questions answered in one batched generation")
    p.add_argument(
        "--conditions",
        default="own,other,none,passage",
        help="what to ask with, comma-separated: own (its LoRA), other (another document's LoRA), none (no LoRA), "
        "passage (no LoRA, the passage in the prompt); own is always asked",
    )
    p.add_argument("--out", help="write the summary and every answer to this JSON file")

    p = commands.add_parser("export", help="write documents' LoRA (merged if several) as a PEFT adapter directory")
    _common(p)
    p.add_argument("doc_ids", nargs="+")
    p.add_argument("--out", required=True)

    p = commands.add_parser("stats", help="what the workspace holds, and augmentation rejection counts")
    _common(p)

    p = commands.add_parser(
        "serve",
        help="serve the workspace over HTTP: batched answering, live document ingestion, a page",
        description="An HTTP service over the workspace (see README: endpoints, curl and OpenAI-client examples).",
    )
    _common(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("PRAG_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every endpoint but /healthz and the page "
        "(default: $PRAG_API_KEY; none: open)",
    )
    p.add_argument("--max-batch", type=int, default=16, help="questions per batched generation")
    p.add_argument("--gather-ms", type=float, default=20.0, help="how long a lone question waits for company")
    p.add_argument(
        "--wait-documents",
        type=float,
        default=120.0,
        help="seconds a question waits for its retrieved documents' adapters to be built, before it is "
        "answered with the ready ones (the response lists the others)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads answering (default: the cores left free)")
    p.add_argument("--build-threads", type=int, default=1, help="torch threads of the background builder")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def protocol_name(args: argparse.Namespace) -> str:
    """The protocol a command runs under: named, or implied by its (first) dataset file, or none."""
    if args.protocol != "auto":
        return args.protocol
    dataset = getattr(args, "dataset", None)
    if isinstance(dataset, list):
        names = {dataset_name(d) for d in dataset}
        return names.pop() if len(names) == 1 else "none"  # a mixed warm-up: the defaults
    return dataset_name(dataset) if dataset else "none"


def load_config(args: argparse.Namespace) -> Config:
    """The defaults, then the dataset's protocol, the workspace's own settings, --config, and --set."""
    config = Config()
    apply_protocol(config, protocol_settings(protocol_name(args), args.profile))
    saved = Path(args.home) / "config.json"
    if saved.exists():
        try:
            recorded = json.loads(saved.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{saved}:{error.lineno}: invalid JSON: {error.msg}") from None
        if "overrides" in recorded:
            for key, value in recorded["overrides"].items():
                config.set(key, value)
        else:  # written before workspaces recorded only their overrides: its defaults may be stale
            print(f"prag: note: {saved} holds a full config of an older version; ignored", file=sys.stderr)
    if args.config:
        for key, value in Config.load(args.config).overrides().items():
            config.set(key, value)
    for assignment in args.set:
        key, sep, value = assignment.partition("=")
        if not sep:
            raise ValueError(f"--set expects SECTION.FIELD=VALUE, got {assignment!r}")
        config.set(key.strip(), value.strip())
    return config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "pool":  # reads result files only: no workspace, no model
            return cmd_pool(args)
        config = load_config(args)
        pipeline = Pipeline(args.home, config, store=args.store)
        return COMMANDS[args.command](pipeline, args)
    except (ValueError, FileNotFoundError, KeyError, ModuleNotFoundError, ConnectionError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"prag: error: {message}", file=sys.stderr)
        return 2


def cmd_index(pipeline: Pipeline, args) -> int:
    t = time.perf_counter()
    n = pipeline.index(args.corpus, show_progress=not args.quiet)
    print(f"indexed {n} passages from {args.corpus} into {pipeline.home / 'index'} in {time.perf_counter() - t:.1f}s")
    return 0


def cmd_ask(pipeline: Pipeline, args) -> int:
    answer = pipeline.answer(args.question, args.mode, args.top_k, show_progress=not args.quiet)
    print(f"answer: {answer.short_answer}")
    print(f"generation: {pipeline.format.prefix} {answer.text}")
    for i, p in enumerate(answer.passages, 1):
        print(f"passage {i}: {p.id}  {p.title}")
    if args.mode.endswith("-unrelated"):
        print("LoRAs merged (unrelated): " + ", ".join(p.title for p in answer.lora_passages))
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

    questions = [q for d in args.dataset for q in load_questions(d, args.limit, args.offset, slice="tune")]
    t = time.perf_counter()
    n = pipeline.warmup(questions, args.out, show_progress=not args.quiet)
    print(
        f"warm-up adapter from {len(questions)} questions ({n} sequences) written to {args.out} "
        f"in {time.perf_counter() - t:.1f}s; use it with --set lora.init={args.out} (a warm-up start) or "
        f"--set lora.base={args.out} (a format adapter in every mode)"
    )
    return 0


def cmd_translator(pipeline: Pipeline, args) -> int:
    questions, passages = retrieved_passages(pipeline, args)
    record = pipeline.train_translator(passages, [q.id for q in questions], not args.quiet, args.restart)
    losses = record["losses"]
    window = max(1, len(losses["mse"]) // 10)

    def mean(values: list[float]) -> str:
        return f"{sum(values) / len(values):.4g}"

    print(
        f"translator trained on {record['documents']} documents from {len(questions)} questions "
        f"({record['parameterized_first']} parameterized first, {record['parameterize_s']:.1f}s): {record['steps']} "
        f"steps in {record['seconds']:.1f}s ({record['seconds'] / record['steps']:.2f}s per document)"
    )
    for name in losses:
        print(f"  {name} loss: {mean(losses[name][:window])} (first {window} steps) -> {mean(losses[name][-window:])}")
    print(f"stored in {pipeline.translator_path}; answer with --mode dyprag or dyprag-combine")
    return 0


def cmd_eval(pipeline: Pipeline, args) -> int:
    from .evaluate import load_questions, run, write_results

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown or not modes:
        raise ValueError(f"unknown mode(s) {unknown}; choose from {', '.join(ALL_MODES)}")
    top_k = args.top_k or pipeline.config.answer.top_k
    questions = load_questions(args.dataset, limit=args.limit, offset=args.offset, slice=args.slice)
    if not questions:
        raise ValueError(f"{args.dataset}: no questions in slice {args.slice!r} at offset {args.offset}")
    _check_batch_size(args)
    evaluation, offline = run(pipeline, questions, modes, top_k, not args.quiet, args.batch_size)
    name = protocol_name(args)
    protocol = {"name": name, "profile": args.profile, "settings": protocol_settings(name, args.profile)}
    metrics = evaluation.metrics(
        dataset_name(args.dataset),
        top_k,
        pipeline.config.model.name,
        extra={
            "slice": {"name": args.slice, "offset": args.offset, "ids": [q.id for q in questions]},
            "batch_size": args.batch_size,
            "protocol": protocol,
            "offline": offline,
            "config": pipeline.config.to_dict(),
        },
    )
    write_results(args.out, metrics, evaluation.records, notes=f"Command: `prag {' '.join(sys.argv[1:])}`")
    if args.show_answers:
        print(answers_table(evaluation.records, modes))
    print(summary_table(metrics))
    print(f"wrote {args.out}/metrics.json, predictions.jsonl, report.md")
    return 0


def cmd_pool(args) -> int:
    from .evaluate import pool_runs, write_results

    metrics, records = pool_runs(args.runs)
    write_results(args.out, metrics, records, notes="Pooled by `prag pool` from: " + ", ".join(args.runs))
    print(summary_table(metrics))
    print(f"pooled {len(args.runs)} runs, {metrics['n']} questions: wrote {args.out}/metrics.json, report.md")
    return 0


def cmd_recall(pipeline: Pipeline, args) -> int:
    from .atomic import atomic_write_text
    from .recall import recall_rows, summarize, summary_table

    _check_batch_size(args)
    questions, passages = retrieved_passages(pipeline, args)
    conditions = tuple(c.strip() for c in args.conditions.split(",") if c.strip())
    rows = recall_rows(pipeline, passages, args.batch_size, not args.quiet, conditions)
    summary = summarize(rows)
    print(f"F1 against each document's generated answers, {len(passages)} documents of {len(questions)} questions:")
    print(summary_table(summary))
    if args.out:
        record = {"dataset": args.dataset, "question_ids": [q.id for q in questions], "summary": summary}
        record.update(config=pipeline.config.to_dict(), rows=rows)
        atomic_write_text(Path(args.out), json.dumps(record, indent=1))
        print(f"wrote {args.out}")
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
            lines.append(f"   {mode:17s} F1 {r['f1']:.2f}  {r['prediction']!r}")
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
    trained = pipeline.translator_record()
    if trained:
        stats["translator"] = {
            "path": str(pipeline.translator_path),
            "documents": trained["documents"],
            "questions": len(trained["question_ids"]),
            "train_s": trained["seconds"],
        }
    print(json.dumps(stats, indent=2))
    return 0


def cmd_serve(pipeline: Pipeline, args) -> int:
    from .serve.app import run
    from .serve.service import Service, Settings

    for name in ("max_batch", "port"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")
    settings = Settings(
        home=pipeline.home,
        config=pipeline.config,
        api_key=args.api_key or None,
        max_batch=args.max_batch,
        gather_ms=args.gather_ms,
        wait_documents_s=args.wait_documents,
        threads=args.threads,
        build_threads=args.build_threads,
    )
    run(Service(settings, pipeline), args.host, args.port, args.log_level)
    return 0


COMMANDS = {
    "index": cmd_index,
    "ask": cmd_ask,
    "parameterize": cmd_parameterize,
    "warmup": cmd_warmup,
    "translator": cmd_translator,
    "eval": cmd_eval,
    "recall": cmd_recall,
    "export": cmd_export,
    "stats": cmd_stats,
    "serve": cmd_serve,
}

if __name__ == "__main__":
    sys.exit(main())
