"""End-to-end offline cost per document: augmentation + training, this code against a baseline commit
and a reference-style pipeline, on the same documents, in one process.

Three pipelines turn the same documents (the top-k BM25 passages of questions from the tune slice)
into stored LoRAs:

1. this code's default: `Pipeline.augment_missing`, then `Pipeline.parameterize` (training and storing);
2. the same at a baseline commit (default: main before the offline-cost work was merged: Hugging
   Face's generate, sampling over the whole vocabulary, no shared prefix, dtype from CPU flags, every
   core), extracted from git as the package `prag_base` and run in the same process, chunk by chunk
   alternating with (1), so that a change in the machine's load hits both alike;
3. reference-style, one document at a time at batch 1: the baseline's augmentation called per
   document, and the PEFT training loop of the public PRAG scripts (batch 1, every sequence padded to
   3000 tokens, fp32; `benchmarks/parameterize.py`), whose steps all cost the same, so it is timed on
   a few steps and extrapolated to the documents' number of steps.

With `--compete`, a second process does fp32 matmuls on all cores for the whole run (the busy-machine
case). Prints seconds per document and documents per minute per phase, and writes them as JSON. Run from
the repository root (it reads git and ../shared/data); time it on a quiet machine:

    /work/tools/quiet python benchmarks/offline.py --docs 64 --reference-docs 4 --out runs/offline/idle.json
    /work/tools/quiet python benchmarks/offline.py --docs 32 --reference-docs 0 --compete \
        --out runs/offline/busy.json

`--set section.field=value` applies to both pipelines (e.g. a smoke run on a small model directory);
`--ours-set` to this code's only, so that `--baseline HEAD --ours-set augment.qa_style=answer_first` times
a setting against the default, both from this commit.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from prag import Config, Pipeline, machine
from prag.evaluate import load_questions

BASELINE = "07a3a4d"  # main before the offline-cost work (issue 15) was merged


def baseline_package(commit: str, root: Path):
    """The package `prag` as of `commit`, importable as `prag_base` (its absolute imports rewritten)."""
    commit = subprocess.run(["git", "rev-parse", "--short", commit], capture_output=True, check=True, text=True)
    commit = commit.stdout.strip()  # a hash, so that a moving name (HEAD) never reuses a stale extraction
    target = root / f"baseline-{commit}"
    if not (target / "prag_base" / "__init__.py").exists():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", commit, "src/prag"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
        (target / "src" / "prag").rename(target / "prag_base")
        for path in (target / "prag_base").rglob("*.py"):
            path.write_text(re.sub(r"\bfrom prag([. ])", r"from prag_base\1", path.read_text()))
    sys.path.insert(0, str(target))
    return importlib.import_module("prag_base")


def rejected(pipeline, passages) -> dict[str, int]:
    counts = Counter()
    for p in passages:
        counts.update(pipeline.augmentations.get(p.id).rejected)
    return dict(counts)


def run_pipeline(pipeline, passages) -> dict[str, float]:
    """Seconds to augment, then to train and store, these passages."""
    t = time.perf_counter()
    pipeline.augment_missing(passages, show_progress=False)
    augment_s = time.perf_counter() - t
    t = time.perf_counter()
    pipeline.parameterize(passages, show_progress=False)
    return {"augment_s": augment_s, "train_s": time.perf_counter() - t}


def reference_style(base, passages, steps_timed: int, sets: list[str]) -> dict[str, float]:
    """Augmentation one document per call (the baseline's code), and PEFT training at batch 1 padded to
    3000 tokens, timed on `steps_timed` steps and extrapolated by the documents' number of steps."""
    from parameterize import peft_train  # benchmarks/parameterize.py

    config = base_config(base, sets)
    llm = base.llm.LLM.load(config.model)  # its own copy: PEFT wraps the layers itself
    t = time.perf_counter()
    augmentations = [base.augment.augment(llm, [p], config.augment, show_progress=False)[0] for p in passages]
    augment_s = time.perf_counter() - t
    answer_format = base.prompt.AnswerFormat.from_config(config.answer)
    sequences = [
        s
        for p, a in zip(passages, augmentations, strict=True)
        for s in base.parameterize.training_sequences(llm, p, a, config.train, answer_format)
    ]
    shapes = base.lora.LoRAModel(llm.model, config.lora.target_modules).shapes(config.lora.rank)
    _unwrap(llm.model)
    init = base.lora.init_adapter(shapes, config.lora.init_seed)
    init_dir = base.store.export_peft(
        init, Path(tempfile.mkdtemp(prefix="init-")), {"lora": config.to_dict()["lora"]}, str(llm.model.name_or_path)
    )
    timed = sequences[:steps_timed]
    if not timed:
        raise SystemExit(f"reference-style: the {len(passages)} documents got no training sequences; use more")
    t = time.perf_counter()
    peft_train(llm.model.float(), init_dir, [timed], config.train.lr, config.train.weight_decay, 3000, llm.pad_id)
    per_step = (time.perf_counter() - t) / len(timed)
    steps = len(sequences) * config.train.epochs
    return {"augment_s": augment_s, "train_s": per_step * steps, "train_s_per_step": per_step, "steps": steps}


def _unwrap(model) -> None:
    """Put back the plain linear layers that LoRAModel wrapped (PEFT wraps them its own way)."""
    for layer in model.model.layers:
        for block in (layer.mlp, layer.self_attn):
            for name, module in list(block.named_children()):
                if hasattr(module, "base"):
                    setattr(block, name, module.base)


def with_sets(config, sets: list[str]):
    for assignment in sets:
        key, _, value = assignment.partition("=")
        config.set(key, value)
    return config


def base_config(base, sets: list[str]):
    return with_sets(base.Config(), sets)


def per_doc(seconds: dict[str, float], docs: int) -> dict[str, float]:
    out = {f"{k[:-2]}_s_per_doc": v / docs for k, v in seconds.items() if k in ("augment_s", "train_s")}
    out["total_s_per_doc"] = out["augment_s_per_doc"] + out["train_s_per_doc"]
    out["docs_per_min"] = 60 / out["total_s_per_doc"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--home", default="runs/offline", help="workspaces (index, one store per pipeline and run)")
    parser.add_argument("--corpus", default="../shared/data/corpus.jsonl")
    parser.add_argument("--questions", default="../shared/data/qa/popqa/dev.jsonl")
    parser.add_argument("--offset", type=int, default=100, help="questions from here on (the tune slice)")
    parser.add_argument("--docs", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=32, help="documents per alternation of baseline and this code")
    parser.add_argument("--reference-docs", type=int, default=4, help="documents run reference-style (0: skip)")
    parser.add_argument("--reference-steps", type=int, default=2, help="padded PEFT steps timed")
    parser.add_argument("--baseline", default=BASELINE, help="git commit of the baseline")
    parser.add_argument("--compete", action="store_true", help="a competing process does matmuls on all cores")
    parser.add_argument("--out", default="runs/offline/result.json")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="config override")
    parser.add_argument(
        "--ours-set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override for this code's pipeline only: with --baseline HEAD, a setting against the default",
    )
    args = parser.parse_args()

    root = Path(args.home)
    root.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=root))  # empty stores: every document is built afresh
    config = with_sets(Config(), args.set + args.ours_set)
    index = Pipeline(root / "index-home", config)
    if not (index.home / "index" / "retriever.json").exists():
        index.index(args.corpus, show_progress=False)
    questions = load_questions(args.questions, offset=args.offset, limit=args.docs)
    passages = list({p.id: p for q in questions for p in index.retrieve(q.question, 3)}.values())[: args.docs]

    base = baseline_package(args.baseline, root)
    ours, theirs = Pipeline(run_dir / "ours", config), base.Pipeline(run_dir / "baseline", base_config(base, args.set))
    _ = ours.llm, theirs.llm  # load both models (and measure this machine's dtypes) before timing
    results: dict = {
        "docs": len(passages),
        "compete": args.compete,
        "avx512_bf16": "avx512_bf16" in Path("/proc/cpuinfo").read_text(),
        "cpus": machine.available_cpus(),
        "baseline_commit": args.baseline,
        "ours_set": args.ours_set,
        "ours_dtypes": {k: str(v) for k, v in ours.llm.phase_dtypes.items()} or str(ours.llm.model.dtype),
        "baseline_dtype": str(theirs.llm.model.dtype),
        "loadavg_before": Path("/proc/loadavg").read_text().split()[:3],
    }
    print(json.dumps(results))
    totals = {"baseline": Counter(), "ours": Counter()}
    with machine.competing_process(machine.available_cpus()) if args.compete else contextlib.nullcontext():
        for start in range(0, len(passages), args.chunk):
            chunk = passages[start : start + args.chunk]
            for name, pipeline in (("baseline", theirs), ("ours", ours)):
                seconds = run_pipeline(pipeline, chunk)
                totals[name].update(seconds)
                print(f"{name} docs {start}-{start + len(chunk)}: {seconds}", flush=True)
        for name, pipeline in (("baseline", theirs), ("ours", ours)):
            results[name] = per_doc(totals[name], len(passages)) | {"rejected": rejected(pipeline, passages)}
        if args.reference_docs:
            chosen = passages[: args.reference_docs]
            reference = reference_style(base, chosen, args.reference_steps, args.set)
            results["reference"] = per_doc(reference, len(chosen)) | {
                "docs": len(chosen),
                "train_s_per_step": reference["train_s_per_step"],
            }
    results["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    results["ours_threads"] = machine.forced_threads(config.model.threads) or "chosen per phase"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    report(results)


def report(r: dict) -> None:
    print(f"\n{r['docs']} documents, {'with' if r['compete'] else 'without'} a competing process")
    print(f"{'pipeline':<34} {'augment s/doc':>14} {'train s/doc':>12} {'total s/doc':>12} {'docs/min':>9}")
    baseline = f"default at {r['baseline_commit']}"
    rows = [("reference-style (batch 1)", "reference"), (baseline, "baseline"), ("ours", "ours")]
    for label, key in rows:
        if key in r:
            x = r[key]
            print(
                f"{label:<34} {x['augment_s_per_doc']:>14.2f} {x['train_s_per_doc']:>12.2f} "
                f"{x['total_s_per_doc']:>12.2f} {x['docs_per_min']:>9.2f}"
            )
    ours = r["ours"]["total_s_per_doc"]
    print(f"ours vs baseline default: {r['baseline']['total_s_per_doc'] / ours:.2f}x fewer seconds per document")
    if "reference" in r:
        print(f"ours vs reference-style: {r['reference']['total_s_per_doc'] / ours:.1f}x")
    print("rejected (baseline):", r["baseline"]["rejected"])
    print("rejected (ours):", r["ours"]["rejected"])


if __name__ == "__main__":
    main()
