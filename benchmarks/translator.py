"""Offline cost per document: standard parameterization (augmentation + LoRA training) against DyPRAG's
translator (one forward pass of the model over the passage, then the MLPs), on the same documents, in one
process; seconds and bytes.

The documents are the top-3 BM25 passages of tune-slice questions (offset 100 on) of a question file, under
that dataset's protocol (as `prag eval` would build them). The translator is a freshly initialised one of the
paper's size for this model (its cost does not depend on its weights; `--translator PATH` times a trained
one). The translation is timed before and after the parameterization, and the two means averaged, so that a
change in the machine's load hits both sides. Then the translator's training step on those documents (against
their fresh LoRAs), reading the sequences' fixed start with the LoRAs (`prefix lora`, the reference) and frozen
(`prefix frozen`, the default under `train.prefix = "frozen"`), in the order lora, frozen, frozen, lora.
Writes nothing into an existing store: the LoRAs are built in a temporary directory, the index is reused
from `--home` (built there if missing).

    python benchmarks/translator.py --questions ../shared/data/qa/hotpotqa/dev.jsonl --docs 16 \
        --out runs/translator/hotpotqa.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from offline import with_sets  # benchmarks/offline.py

from prag import Config, Pipeline, machine
from prag import translator as dyprag
from prag.evaluate import load_questions
from prag.protocols import apply_protocol, dataset_name, protocol_settings


def translate_seconds(pipeline: Pipeline, translator: dyprag.Translator, passages: list, batch: int) -> float:
    """Seconds per document to generate the passages' LoRAs, `batch` documents per call (no cache)."""
    t = time.perf_counter()
    for start in range(0, len(passages), batch):
        translator.adapters(pipeline.llm, passages[start : start + batch], pipeline.config.train.max_length)
    return (time.perf_counter() - t) / len(passages)


def train_seconds(pipeline: Pipeline, passages: list, prefix: str) -> float:
    """Seconds per document of the translator's training (one epoch, a fresh translator), as
    `prag translator train` runs it, reading the prompt's fixed start as `prefix` says."""
    config = pipeline.config
    record = dyprag.train(
        pipeline.llm,
        pipeline.lora_model,
        pipeline.new_translator(),
        pipeline.translator_examples(passages),
        pipeline.adapters.get,
        config.translator,
        config.lora.scale,
        pipeline.base_adapter,
        max_length=config.train.max_length,
        show_progress=False,
        prefix=prefix,
    )
    return record["seconds"] / len(passages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--home", default="runs/translator", help="workspace holding (or given) the index")
    parser.add_argument("--corpus", default="../shared/data/corpus.jsonl")
    parser.add_argument("--questions", default="../shared/data/qa/hotpotqa/dev.jsonl")
    parser.add_argument("--offset", type=int, default=100, help="questions from here on (the tune slice)")
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--translator", help="a trained translator.safetensors (default: a fresh one)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="config override")
    parser.add_argument("--out", default="runs/translator/result.json")
    args = parser.parse_args()

    config = with_sets(apply_protocol(Config(), protocol_settings(dataset_name(args.questions))), args.set)
    home = Path(args.home)
    store = Path(tempfile.mkdtemp(prefix="prag-translator-benchmark-"))
    pipeline = Pipeline(home, config, store=store)  # an empty store: every document is built afresh
    if not (home / "index" / "retriever.json").exists():
        pipeline.index(args.corpus, show_progress=False)
    questions = load_questions(args.questions, offset=args.offset, limit=args.docs)
    passages = list({p.id: p for q in questions for p in pipeline.retrieve(q.question, 3)}.values())[: args.docs]
    if args.translator:
        translator, _ = dyprag.load(Path(args.translator), pipeline.llm.device)
    else:
        translator = pipeline.new_translator()
    batches = (1, 8, 24)  # 24: a batch of 8 questions' top-3, as in `prag eval --batch-size 8`
    for b in batches:  # warm-up: first-call allocations
        translate_seconds(pipeline, translator, passages[:8], b)
    before = {b: translate_seconds(pipeline, translator, passages, b) for b in batches}
    start = dict(pipeline.offline_seconds)
    t = time.perf_counter()
    pipeline.parameterize(passages, show_progress=True)
    parameterize_s = (time.perf_counter() - t) / len(passages)
    after = {b: translate_seconds(pipeline, translator, passages, b) for b in batches}

    train = {prefix: [] for prefix in ("lora", "frozen")}
    for prefix in ("lora", "frozen", "frozen", "lora"):
        train[prefix].append(train_seconds(pipeline, passages, prefix))
    train_s = {prefix: sum(s) / len(s) for prefix, s in train.items()}

    adapter_bytes = sum(Path(pipeline.adapters.path(p.id)).stat().st_size for p in passages) / len(passages)
    generated = translator.adapters(pipeline.llm, passages[:1], config.train.max_length)[0]
    with tempfile.TemporaryDirectory() as tmp:
        dyprag.save(translator, Path(tmp) / "t.safetensors", {})
        translator_bytes = (Path(tmp) / "t.safetensors").stat().st_size
    translate = {b: (before[b] + after[b]) / 2 for b in batches}
    results = {
        "questions": args.questions,
        "docs": len(passages),
        "model": config.model.name,
        "cpus": machine.available_cpus(),
        "avx512_bf16": "avx512_bf16" in Path("/proc/cpuinfo").read_text(),
        "parameterize_s_per_doc": round(parameterize_s, 3),
        "augment_s_per_doc": round((pipeline.offline_seconds["augment_s"] - start["augment_s"]) / len(passages), 3),
        "train_s_per_doc": round((pipeline.offline_seconds["train_s"] - start["train_s"]) / len(passages), 3),
        "translate_s_per_doc": {f"batch {b}": round(s, 4) for b, s in translate.items()},
        "translate_s_per_doc_before_after": {f"batch {b}": [round(before[b], 4), round(after[b], 4)] for b in batches},
        "speedup": {f"batch {b}": round(parameterize_s / s, 1) for b, s in translate.items()},
        "translator_train_s_per_doc": {f"prefix {p}": round(s, 3) for p, s in train_s.items()},
        "translator_train_s_per_doc_runs": {f"prefix {p}": [round(x, 3) for x in s] for p, s in train.items()},
        "translator_train_speedup_frozen": round(train_s["lora"] / train_s["frozen"], 2),
        "stored_adapter_bytes_per_doc": adapter_bytes,
        "generated_adapter_bytes_in_memory": dyprag.nbytes(generated),
        "translator_file_bytes": translator_bytes,
        "torch_threads": torch.get_num_threads(),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
