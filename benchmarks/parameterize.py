"""Offline parameterization and online injection: ours vs the reference approach, in one process.

Three ways to turn the same documents (same model, augmentations, initialization
and seeds) into LoRAs:

1. reference-style: PEFT, one document at a time, batch 1, every sequence padded to
   3000 tokens, fp32 (as the public PRAG scripts do);
2. per-document PEFT loop: the same, without padding, in our dtype;
3. ours: many documents per forward/backward pass with per-example LoRAs, eager and
   with the decoder layers compiled (`train.compile`; the one-off compile timed apart).

It also times per-question load+merge at top-k (PEFT load_adapter x k +
add_weighted_adapter(combination_type="cat") + unload, vs our memory-mapped
store + concatenation + tensor injection), and question latency of `prag` vs
`rag` mode. Prints a table of ratios and writes it as JSON.

    python benchmarks/parameterize.py --home runs/bench --corpus ../shared/data/corpus.jsonl \
        --questions ../shared/data/qa/popqa/dev.jsonl --docs 16 --peft-docs 4 --reference-docs 1

On a machine the model file and corpus cannot reach (the GPU machine: nothing outside it can be
reached), save the training sequences here with `--save-documents F` and run the training part
there from F and a model directory of config and tokenizer files, with `--documents F --model-dir D
--random-weights` (benchmarks/gpu_run.sh does this).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from prag import Config, Pipeline, lora
from prag.augment import augment
from prag.evaluate import load_questions
from prag.llm import LLM, pick_device_dtype
from prag.parameterize import IGNORE, Sequence, compiled_decoder, train_adapters, training_sequences
from prag.store import export_peft


def max_abs_difference(adapters: list[lora.Adapter], others: list[lora.Adapter]) -> float:
    """The largest elementwise difference between paired adapters (the first ones of the longer list)."""
    return max((a[k] - b[k]).abs().max().item() for a, b in zip(adapters, others, strict=False) for k in a)


def time_compiled(
    llm, lm, documents, config: Config, init, eager: list, train_tokens: float, train_flops: float, peak: float
) -> dict:
    """Our path with train.compile: the one-off compile (on 3 documents) timed apart from the run."""
    with compiled_decoder(llm.model):
        t = time.perf_counter()
        train_adapters(llm, lm, documents[:3], config.lora, config.train, initial=init, show_progress=False)
        warm_s = time.perf_counter() - t
        t = time.perf_counter()
        compiled = train_adapters(llm, lm, documents, config.lora, config.train, initial=init, show_progress=True)
        seconds = time.perf_counter() - t
    return {
        "docs_per_min": 60 * len(documents) / seconds,
        "tokens_per_s": train_tokens / seconds,
        "flops_fraction": train_flops / seconds / peak,
        "compile_warmup_s": warm_s,
        "max_abs_diff_vs_eager": max_abs_difference(compiled, eager),
    }


def save_documents(documents: list[list[Sequence]], path: Path) -> None:
    rows = [[{"input_ids": s.input_ids, "labels": s.labels} for s in seqs] for seqs in documents]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"documents": rows}))


def load_documents(path: Path) -> list[list[Sequence]]:
    return [[Sequence(s["input_ids"], s["labels"]) for s in seqs] for seqs in json.loads(path.read_text())["documents"]]


def load_model_dir(model_dir: Path, config: Config, random_weights: bool) -> LLM:
    """The model to time: a Hugging Face directory's weights, or its architecture randomly initialised
    (what a machine gets that the model file cannot be copied to)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config.model.name = str(model_dir)
    if not random_weights:
        return LLM.load(config.model)
    device, dtype = pick_device_dtype(config.model)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
    model = model.to(device).eval()
    model.requires_grad_(False)
    return LLM(model, AutoTokenizer.from_pretrained(model_dir), f"{model_dir.name} (random weights)")


def matmul_flops(dtype: torch.dtype, device: torch.device, n: int = 2048, repeats: int = 20) -> float:
    """This machine's dense matmul throughput (FLOP/s), the ceiling training is compared with."""
    n = n * 4 if device.type == "cuda" else n
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    for _ in range(3):  # warm up: thread pool, caches, clocks
        a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn) -> float:
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


def peft_train(model, init_dir: Path, documents, lr: float, weight_decay: float, pad_to: int | None, pad_id: int):
    """The reference loop: per document load the shared init adapter, AdamW at batch 1, save, unload."""
    from peft import PeftModel

    adapters, out_root = [], Path(tempfile.mkdtemp(prefix="peft-bench-"))
    for d, sequences in enumerate(documents):
        peft_model = PeftModel.from_pretrained(model, init_dir, is_trainable=True)
        optimizer = torch.optim.AdamW(
            [p for p in peft_model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
        )
        for seq in sequences:
            ids, labels = list(seq.input_ids), list(seq.labels)
            mask = [1] * len(ids)
            if pad_to:
                extra = pad_to - len(ids)
                ids, labels, mask = ids + [pad_id] * extra, labels + [IGNORE] * extra, mask + [0] * extra
            optimizer.zero_grad()
            device = peft_model.device
            loss = peft_model(
                input_ids=torch.tensor([ids], device=device),
                attention_mask=torch.tensor([mask], device=device),
                labels=torch.tensor([labels], device=device),
            ).loss
            loss.backward()
            optimizer.step()
        peft_model.save_pretrained(out_root / f"doc{d}")
        adapters.append(out_root / f"doc{d}")
        model = peft_model.unload()
    return model, adapters


def peft_to_ours(adapter_dir: Path, targets, num_layers: int) -> lora.Adapter:
    from safetensors.torch import load_file

    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out = {}
    for name in targets:
        out[f"{name}.A"] = torch.stack(
            [tensors[f"base_model.model.model.layers.{i}.mlp.{name}.lora_A.weight"] for i in range(num_layers)]
        )
        out[f"{name}.B"] = torch.stack(
            [tensors[f"base_model.model.model.layers.{i}.mlp.{name}.lora_B.weight"] for i in range(num_layers)]
        )
    return out


def peft_load_merge(model, dirs: list[Path]) -> float:
    """Seconds for the reference's per-question PEFT path: load k adapters, cat-merge, activate, unload."""
    from peft import PeftModel

    t = time.perf_counter()
    peft_model = PeftModel.from_pretrained(model, dirs[0], adapter_name="d0")
    for i, d in enumerate(dirs[1:], 1):
        peft_model.load_adapter(d, adapter_name=f"d{i}")
    names = [f"d{i}" for i in range(len(dirs))]
    peft_model.add_weighted_adapter(names, [1.0] * len(dirs), "merged", combination_type="cat")
    peft_model.set_adapter("merged")
    elapsed = time.perf_counter() - t
    peft_model.unload()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--home", default="runs/bench")
    parser.add_argument("--corpus", default="../shared/data/corpus.jsonl")
    parser.add_argument("--questions", default="../shared/data/qa/popqa/dev.jsonl")
    parser.add_argument("--docs", type=int, default=16, help="documents trained by our batched path")
    parser.add_argument("--peft-docs", type=int, default=16, help="documents trained by the per-document PEFT loop")
    parser.add_argument(
        "--reference-docs", type=int, default=1, help="documents trained reference-style (extrapolated to all)"
    )
    parser.add_argument("--augment-docs", type=int, default=6, help="documents augmented batched and one by one")
    parser.add_argument("--latency-questions", type=int, default=20)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled path")
    parser.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train 2 documents by ours and 1 by the PEFT loop, untimed, before timing (default: on a GPU, where "
        "the first kernels of each shape pay for their setup)",
    )
    parser.add_argument(
        "--batch-sizes",
        default="",
        help="also time ours (eager) at these documents per pass, e.g. 8,16,32,64 (train.docs_per_batch)",
    )
    parser.add_argument("--save-documents", help="also write the training sequences here (JSON), for --documents")
    parser.add_argument(
        "--documents",
        help="train on sequences saved by --save-documents instead of a workspace (no augmentation "
        "or question latency then): the machine needs no corpus, index or model file, see --model-dir",
    )
    parser.add_argument("--model-dir", help="with --documents: a Hugging Face model directory (config, tokenizer)")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="with --model-dir: a randomly initialised model of its "
        "architecture (training speed does not depend on the weights' values)",
    )
    parser.add_argument("--out", default="runs/bench/parameterize.json")
    args = parser.parse_args()

    config = Config()
    # the PEFT paths train the LoRA on every token, as the reference does: so does ours here, so that the
    # adapters can be compared (max_abs_diff_vs_ours) and the same work timed
    config.set("train.prefix", "lora")
    if args.documents:  # training sequences saved by an earlier run: no corpus, index or augmentation needed
        llm = load_model_dir(Path(args.model_dir), config, args.random_weights)
        pipeline = Pipeline(tempfile.mkdtemp(prefix="bench-home-"), config, llm=llm)
        documents = load_documents(Path(args.documents))[: args.docs]
        doc_ids, passages, questions = [f"doc{i}" for i in range(len(documents))], [], []
    else:
        pipeline = Pipeline(args.home, config)
        if not (Path(args.home) / "index" / "retriever.json").exists():
            pipeline.index(args.corpus, show_progress=False)
        llm = pipeline.llm
        questions = load_questions(args.questions, limit=max(args.latency_questions, args.docs))
        passages = list({p.id: p for q in questions for p in pipeline.retrieve(q.question, args.top_k)}.values())
        passages = passages[: args.docs]
        print(f"augmenting {len(passages)} documents (stored and reused across paths and runs)...")
        pipeline.augment_missing(passages)
        documents = [
            training_sequences(llm, p, pipeline.augmentations.get(p.id), config.train, pipeline.format)
            for p in passages
        ]
        doc_ids = [p.id for p in passages]
        if args.save_documents:
            save_documents(documents, Path(args.save_documents))
    # every path trains in the dtype our training phase uses here (machine.py): one copy of the weights
    llm.set_phase_dtypes(dict.fromkeys(("generate", "train"), llm.phase_dtypes.get("train", llm.model.dtype)))
    lm = pipeline.lora_model
    tokens_per_doc = statistics.mean(sum(len(s.input_ids) for s in seqs) for seqs in documents)
    # Matmul FLOPs per token: every weight of the decoder layers, plus the vocabulary projection only at
    # positions that carry a label (our trainer computes logits there only). Embedding lookups are free.
    n_params = sum(p.numel() for p in llm.model.parameters())
    embed, head = llm.model.get_input_embeddings().weight, llm.model.get_output_embeddings().weight
    body_params = n_params - embed.numel() - (0 if head is embed else head.numel())
    labelled_per_doc = statistics.mean(sum(sum(1 for x in s.labels if x != IGNORE) for s in seqs) for seqs in documents)
    dtype = llm.model.dtype
    peak = matmul_flops(dtype, torch.device(llm.device))
    results: dict = {
        "model": config.model.name,
        "dtype": str(dtype),
        "docs": len(documents),
        "tokens_per_doc": round(tokens_per_doc, 1),
        "matmul_flops_peak": peak,
    }

    def checkpoint() -> None:
        """Write what is measured so far: a run cut short (a time limit on a lent GPU) still reports it."""
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))

    # augmentation: one batched call across documents vs one call per document (same seeds)
    a = min(args.augment_docs, len(passages))
    if a:
        t = time.perf_counter()
        augment(llm, passages[:a], config.augment, show_progress=False)
        batched_s = time.perf_counter() - t
        t = time.perf_counter()
        for p in passages[:a]:
            augment(llm, [p], config.augment, show_progress=False)
        single_s = time.perf_counter() - t
        results["augment"] = {
            "docs": a,
            "batched_docs_per_min": 60 * a / batched_s,
            "single_docs_per_min": 60 * a / single_s,
        }

    # 3. ours
    init = lora.init_adapter(lm.shapes(config.lora.rank), config.lora.init_seed)
    warmup = args.warmup if args.warmup is not None else llm.device.type == "cuda"
    if warmup:
        train_adapters(llm, lm, documents[:2], config.lora, config.train, initial=init, show_progress=False)
    results["warmup"] = warmup
    t = time.perf_counter()
    ours = train_adapters(llm, lm, documents, config.lora, config.train, initial=init, show_progress=True)
    ours_s = time.perf_counter() - t
    train_tokens = tokens_per_doc * len(documents) * config.train.epochs
    labelled_tokens = labelled_per_doc * len(documents) * config.train.epochs
    # forward 2*P*T plus backward to the activations 2*P*T (the frozen weights need no gradient)
    train_flops = 4 * (body_params * train_tokens + head.numel() * labelled_tokens)
    results["ours"] = {
        "docs_per_min": 60 * len(documents) / ours_s,
        "tokens_per_s": train_tokens / ours_s,
        "flops_fraction": train_flops / ours_s / peak,
    }
    checkpoint()
    # 3a. ours at other numbers of documents per forward/backward pass
    for size in [int(b) for b in args.batch_sizes.split(",") if b]:
        sized = Config.from_dict(config.to_dict())
        sized.train.docs_per_batch = size
        try:
            _sync()
            t = time.perf_counter()
            train_adapters(llm, lm, documents, sized.lora, sized.train, initial=init, show_progress=False)
            _sync()
            seconds = time.perf_counter() - t
        except Exception as error:  # e.g. out of memory at a large batch: the other measurements still run
            print(f"{size} documents per pass failed: {error!r}")
            continue
        results.setdefault("ours_by_batch", {})[str(size)] = {
            "docs_per_min": 60 * len(documents) / seconds,
            "tokens_per_s": train_tokens / seconds,
            "flops_fraction": train_flops / seconds / peak,
        }
    checkpoint()
    # The same fixed initialization, as a PEFT adapter directory for the PEFT paths.
    init_dir = export_peft(
        init, Path(tempfile.mkdtemp(prefix="init-")), {"lora": config.to_dict()["lora"]}, str(llm.model.name_or_path)
    )

    # 2. per-document PEFT loop: batch 1, no padding, our dtype
    base = llm.model
    lm.clear()
    _unwrap(base)
    k = min(args.peft_docs, len(documents))
    if warmup:
        lr, decay = config.train.lr, config.train.weight_decay
        base, _ = peft_train(base, init_dir, documents[:1], lr, decay, None, llm.pad_id)
    _sync()
    t = time.perf_counter()
    base, peft_dirs = peft_train(
        base, init_dir, documents[:k], config.train.lr, config.train.weight_decay, None, llm.pad_id
    )
    _sync()
    peft_s = time.perf_counter() - t
    loop_tokens = sum(len(s.input_ids) for seqs in documents[:k] for s in seqs) * config.train.epochs
    # Hugging Face's forward with labels projects every position onto the vocabulary
    loop_flops = 4 * (body_params + head.numel()) * loop_tokens
    results["peft_loop"] = {
        "docs": k,
        "docs_per_min": 60 * k / peft_s,
        "tokens_per_s": loop_tokens / peft_s,
        "flops_fraction": loop_flops / peft_s / peak,
    }
    peft_adapters = [peft_to_ours(d, config.lora.target_modules, lm.num_layers) for d in peft_dirs]
    results["peft_loop"]["max_abs_diff_vs_ours"] = max_abs_difference(peft_adapters, ours)
    checkpoint()

    # 1. reference-style: PEFT, batch 1, padded to 3000 tokens, fp32
    r = min(args.reference_docs, len(documents))
    if r:
        base32 = base.float()
        t = time.perf_counter()
        base32, _ = peft_train(
            base32, init_dir, documents[:r], config.train.lr, config.train.weight_decay, 3000, llm.pad_id
        )
        ref_s = time.perf_counter() - t
        # Every padded step costs the same (3000 tokens), so the time per step measured on r documents
        # gives the time for all documents from their number of sequences.
        steps = sum(len(seqs) for seqs in documents[:r]) * config.train.epochs
        all_steps = sum(len(seqs) for seqs in documents) * config.train.epochs
        per_step = ref_s / max(steps, 1)
        results["reference"] = {
            "docs": r,
            "seconds_per_step": per_step,
            "docs_per_min": 60 * len(documents) / (per_step * all_steps),
            "tokens_per_s": train_tokens / (per_step * all_steps),
        }
        base = base32.to(dtype)

    # adapter bytes per document, then per-question load+merge at top-k from the store
    for doc_id, adapter in zip(doc_ids, ours, strict=True):
        if not pipeline.adapters.has(doc_id):
            pipeline.adapters.put(doc_id, adapter)
    results["adapter_bytes"] = {
        "ours": pipeline.adapters.path(doc_ids[0]).stat().st_size,
        "peft_fp32": (peft_dirs[0] / "adapter_model.safetensors").stat().st_size,
    }
    groups = [peft_dirs[i : i + args.top_k] for i in range(0, len(peft_dirs) - args.top_k + 1)] or [peft_dirs]
    peft_times = [peft_load_merge(base, groups[i % len(groups)]) for i in range(5)]
    lm = lora.LoRAModel(base, config.lora.target_modules)
    pipeline._lora_model = lm

    def ours_load_merge(i):
        chosen = [doc_ids[(i + j) % len(doc_ids)] for j in range(args.top_k)]
        t = time.perf_counter()
        lm.inject(lora.merge([pipeline.adapters.get(d) for d in chosen]), config.lora.scale)
        elapsed = time.perf_counter() - t
        lm.clear()
        return elapsed

    ours_times = [ours_load_merge(i) for i in range(50)]
    results["load_merge_ms"] = {
        "peft": 1000 * statistics.median(peft_times),
        "ours": 1000 * statistics.median(ours_times),
    }

    # 3b. ours with the decoder layers compiled (train.compile), last: a compiler that fails or hangs on a
    # new machine costs no other measurement; the one-off compile is timed apart
    if args.compile:
        try:
            results["ours_compiled"] = time_compiled(
                llm, lm, documents, config, init, ours, train_tokens, train_flops, peak
            )
        except Exception as error:  # a compiler missing or failing must not cost the other measurements
            print(f"compiled path failed: {error!r}")
            results["ours_compiled"] = {"error": repr(error)}

    checkpoint()
    # question latency, prag vs rag, on questions whose documents are parameterized
    latency = {"prag": [], "rag": []}
    asked = 0
    for q in questions:
        if asked == args.latency_questions:
            break
        if not all(pipeline.adapters.has(p.id) for p in pipeline.retrieve(q.question, args.top_k)):
            continue
        asked += 1
        for mode in latency:
            answer = pipeline.answer(q.question, mode, args.top_k)
            latency[mode].append(sum(answer.timings.values()) - answer.timings.get("parameterize", 0))
    results["question_latency_ms"] = {m: 1000 * statistics.median(v) for m, v in latency.items() if v}
    results["question_latency_ms"]["questions"] = asked

    checkpoint()
    report(results)


def _unwrap(model) -> None:
    """Put the plain nn.Linear layers back, so PEFT sees the model as it ships."""
    for layer in lora.find_decoder_layers(model):
        for name, module in list(layer.mlp.named_children()):
            if isinstance(module, lora.LoRALinear):
                setattr(layer.mlp, name, module.base)


def report(r: dict) -> None:
    ours, loop, ref = r["ours"], r["peft_loop"], r.get("reference")
    print(f"\nmodel {r['model']} ({r['dtype']}), {r['docs']} documents, {r['tokens_per_doc']} training tokens/doc")
    print(f"matmul peak {r['matmul_flops_peak'] / 1e9:.1f} GFLOP/s")
    print(f"{'path':28s} {'docs/min':>9s} {'tokens/s':>9s}")
    if ref:
        print(
            f"{'reference (pad 3000, fp32)':28s} {ref['docs_per_min']:9.2f} {ref['tokens_per_s']:9.1f}"
            f"   ({ref['seconds_per_step']:.1f} s per padded step, measured on {ref['docs']} document(s))"
        )
    print(
        f"{'PEFT loop (no pad)':28s} {loop['docs_per_min']:9.2f} {loop['tokens_per_s']:9.1f}"
        f"   {100 * loop['flops_fraction']:.0f}% of matmul peak ({loop['docs']} docs)"
    )
    print(
        f"{'ours (batched)':28s} {ours['docs_per_min']:9.2f} {ours['tokens_per_s']:9.1f}"
        f"   {100 * ours['flops_fraction']:.0f}% of matmul peak"
    )
    fast = r.get("ours_compiled")
    if fast and "error" in fast:
        print(f"{'ours (batched, compiled)':28s} failed: {fast['error']}")
        fast = None
    if fast:
        print(
            f"{'ours (batched, compiled)':28s} {fast['docs_per_min']:9.2f} {fast['tokens_per_s']:9.1f}"
            f"   {100 * fast['flops_fraction']:.0f}% of matmul peak (compile warm-up {fast['compile_warmup_s']:.0f} s"
            f" apart; max |difference| to eager {fast['max_abs_diff_vs_eager']:.1e})"
        )
    for name, path in (("ours", ours), ("ours compiled", fast)):
        if not path:
            continue
        if ref:
            print(f"{name} / reference (docs/min): {path['docs_per_min'] / ref['docs_per_min']:.1f}x")
        print(f"{name} / PEFT loop (tokens/s): {path['tokens_per_s'] / loop['tokens_per_s']:.2f}x")
    for size, row in r.get("ours_by_batch", {}).items():
        print(
            f"ours, {size:>3s} docs per pass: {row['docs_per_min']:9.2f} docs/min {row['tokens_per_s']:9.1f} tokens/s"
            f"   {row['tokens_per_s'] / loop['tokens_per_s']:.2f}x the PEFT loop,"
            f" {100 * row['flops_fraction']:.0f}% of matmul peak"
        )
    print(f"max |adapter difference| ours vs PEFT loop: {loop['max_abs_diff_vs_ours']:.2e}")
    if "augment" in r:
        a = r["augment"]
        print(
            f"augmentation docs/min ({a['docs']} docs): batched {a['batched_docs_per_min']:.2f}, "
            f"one by one {a['single_docs_per_min']:.2f} ({a['batched_docs_per_min'] / a['single_docs_per_min']:.2f}x)"
        )
    b = r["adapter_bytes"]
    print(f"adapter bytes/doc: ours {b['ours']}, PEFT fp32 {b['peft_fp32']} ({b['peft_fp32'] / b['ours']:.2f}x)")
    lm = r["load_merge_ms"]
    print(f"load+merge top-3: PEFT {lm['peft']:.1f} ms, ours {lm['ours']:.2f} ms ({lm['peft'] / lm['ours']:.0f}x)")
    q = r["question_latency_ms"]
    if "prag" in q:
        print(
            f"question latency (median of {q['questions']}): prag {q['prag']:.0f} ms, rag {q['rag']:.0f} ms "
            f"(prag/rag {q['prag'] / q['rag']:.2f})"
        )


if __name__ == "__main__":
    main()
