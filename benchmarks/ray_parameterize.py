"""Offline parameterization in one process and through Ray with 1 and 2 workers on this machine.

    python benchmarks/ray_parameterize.py --corpus ../shared/data/corpus.jsonl --docs 24 --shard-size 12 \
        --out runs/ray-bench/result.json

The same documents (a seeded sample of the corpus) in the same shards are built three times, each time into
an empty store, with the default model and config (augmentation and training): in this process with every
core, then on a Ray instance started on this machine with 1 worker of every CPU and with 2 workers of
half the CPUs each (torch threads = a worker's CPUs). Every timing includes one model load per process
(the Ray workers load theirs side by side); the start of the Ray instance itself is timed apart, as it is
paid once per cluster, not per job. Prints documents per minute, Ray's overhead per document, and how
many workers of the measured speed would build the benchmark corpus in an hour and Wikipedia in a day.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import torch

from prag import Config, Pipeline
from prag.corpus import read_corpus
from prag.distributed import parameterize_on_ray
from prag.llm import resolve_model_dir

BENCHMARK_CORPUS = 23_772  # passages in ../shared/data/corpus.jsonl
WIKIPEDIA = 21_000_000  # passages in the paper's Wikipedia corpus (DPR's 100-word split)


def largest_difference(pipeline: Pipeline, reference: Pipeline, doc_ids: list[str]) -> float:
    return max(
        (pipeline.adapters.get(d)[k].float() - reference.adapters.get(d)[k].float()).abs().max().item()
        for d in doc_ids
        for k in reference.adapters.get(d)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default="../shared/data/corpus.jsonl")
    parser.add_argument("--docs", type=int, default=24)
    parser.add_argument("--shard-size", type=int, default=12, help="documents per task (one augmentation call)")
    parser.add_argument("--seed", type=int, default=0, help="which documents: a seeded sample of the corpus")
    parser.add_argument("--home", default="runs/ray-bench", help="workspace; its stores are emptied first")
    parser.add_argument("--out", default="runs/ray-bench/result.json")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="config override")
    args = parser.parse_args()

    def config() -> Config:
        config = Config()
        for assignment in args.set:
            key, _, value = assignment.partition("=")
            config.set(key, value)
        return config

    passages = random.Random(args.seed).sample(read_corpus(args.corpus), args.docs)
    doc_ids = [p.id for p in passages]
    resolve_model_dir(config().model.name)  # the one-off dequantization of the bundled model, untimed
    home = Path(args.home)
    cpus = os.cpu_count() or 1
    # another heavy process on the same cores would distort every number: record the load around the runs
    results: dict = {"docs": args.docs, "shard_size": args.shard_size, "cpus": cpus, "config": config().to_dict()}
    results["load_before"] = os.getloadavg()
    results["runs"] = {}

    def store(name: str) -> Path:
        path = home / name
        if path.exists():
            import shutil

            shutil.rmtree(path)
        return path

    t = time.perf_counter()
    reference = Pipeline(home, config(), store=store("in-process"))
    reference.llm  # noqa: B018 (loads the model, timed with the run as in a worker)
    load_s = time.perf_counter() - t
    built = reference.parameterize(passages, shard_size=args.shard_size)
    seconds = time.perf_counter() - t
    assert built == args.docs
    results["runs"]["in-process"] = {"seconds": seconds, "model_load_s": load_s, "threads": torch.get_num_threads()}
    print(f"in-process: {seconds:.1f} s (model load {load_s:.1f} s)", flush=True)

    import ray

    t = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False)
    results["ray_start_s"] = time.perf_counter() - t
    try:
        for workers in (1, 2):
            pipeline = Pipeline(home, config(), store=store(f"ray-{workers}"))
            t = time.perf_counter()
            built = parameterize_on_ray(
                pipeline, passages, workers=workers, cpus_per_worker=cpus // workers, shard_size=args.shard_size
            )
            seconds = time.perf_counter() - t
            assert built == args.docs
            same_text = sum(pipeline.augmentations.get(d) == reference.augmentations.get(d) for d in doc_ids)
            results["runs"][f"ray-{workers}"] = {
                "seconds": seconds,
                "threads_per_worker": cpus // workers,
                "augmentations_equal_in_process": same_text,
                "max_abs_adapter_diff_vs_in_process": largest_difference(pipeline, reference, doc_ids),
            }
            print(f"ray, {workers} worker(s): {seconds:.1f} s", flush=True)
    finally:
        ray.shutdown()

    results["load_after"] = os.getloadavg()
    for run in results["runs"].values():
        run["docs_per_min"] = 60 * args.docs / run["seconds"]
    inproc, one, two = (results["runs"][k] for k in ("in-process", "ray-1", "ray-2"))
    results["ray_overhead_s_per_doc"] = (one["seconds"] - inproc["seconds"]) / args.docs
    per_worker = one["docs_per_min"]  # one worker with this machine's cores: a machine like this one
    results["projection"] = {
        "docs_per_min_per_worker": per_worker,
        "workers_for_benchmark_corpus_in_1h": math.ceil(BENCHMARK_CORPUS / (per_worker * 60)),
        "workers_for_wikipedia_in_1d": math.ceil(WIKIPEDIA / (per_worker * 60 * 24)),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))

    start = results["ray_start_s"]
    print(f"\n{args.docs} documents, shards of {args.shard_size}, {cpus} CPUs; Ray start {start:.1f} s")
    print(f"load average (1, 5, 15 min) before {results['load_before']}, after {results['load_after']}")
    print(f"{'run':34s} {'seconds':>8s} {'docs/min':>9s}")
    for name, label in (("in-process", "in-process"), ("ray-1", "Ray, 1 worker"), ("ray-2", "Ray, 2 workers")):
        run = results["runs"][name]
        threads = f"{run['threads_per_worker']} threads each" if name != "in-process" else f"{run['threads']} threads"
        print(f"{label + f' ({threads})':34s} {run['seconds']:8.1f} {run['docs_per_min']:9.2f}")
    print(f"Ray overhead per document (1 worker vs in-process): {results['ray_overhead_s_per_doc']:+.2f} s")
    for name in ("ray-1", "ray-2"):
        run = results["runs"][name]
        print(
            f"{name}: augmentations equal to in-process {run['augmentations_equal_in_process']}/{args.docs}, "
            f"largest adapter difference {run['max_abs_adapter_diff_vs_in_process']:.2e}"
        )
    p = results["projection"]
    print(
        f"at {per_worker:.2f} documents/min per worker: {p['workers_for_benchmark_corpus_in_1h']} workers for "
        f"{BENCHMARK_CORPUS:,} passages in an hour, {p['workers_for_wikipedia_in_1d']:,} for Wikipedia in a day"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
