"""Concurrent questions gathered into one batched generation, each row with its own merged adapter.

Requests arrive prepared (`Pipeline.prepare`: retrieval, the merged adapter of the documents whose
LoRAs are stored, the prompt). One thread owns the model: it takes every request waiting (up to
`max_batch`; when only one is there it waits `gather_s` for company), and runs `Pipeline.generate`
on them at once, rows of different modes, prompt lengths and adapter ranks side by side.

A question whose documents have no adapter yet is parked, not batched: its documents go to the
front of the builder's queue and the question waits for them (up to `wait_documents_s`) while the
questions behind it are answered. When its documents are ready, failed, or the wait ran out, it is
answered with the adapters that are stored, and the answer lists the others in `missing`.
A batch runs to its longest row: a request arriving meanwhile waits for the next batch.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from .. import machine
from ..corpus import Passage
from ..pipeline import Answer, Pipeline, Prepared

_WAKE = object()
_STOP = object()


@dataclass
class Job:
    prepared: Prepared
    future: Future
    submitted: float = field(default_factory=time.perf_counter)
    parked: float | None = None  # when it started waiting for documents


class Batcher:
    def __init__(
        self,
        pipeline: Pipeline,
        max_batch: int = 16,
        gather_s: float = 0.02,
        wait_documents_s: float = 120.0,
        settled: Callable[[Passage], bool] | None = None,
        on_batch: Callable[[int, float], None] = lambda size, seconds: None,
        threads: Callable[[], int] | None = None,
    ):
        self.pipeline, self.max_batch, self.gather_s, self.wait_documents_s = (
            pipeline,
            max_batch,
            gather_s,
            wait_documents_s,
        )
        # whether a missing document will not become ready (its build failed): nothing to wait for
        self.settled = settled or (lambda p: pipeline.adapters.has(p.id))
        self.on_batch = on_batch
        # torch threads for the next batch: a deliberate split (machine.using_threads), set in this thread
        # (OpenMP's thread count is per calling thread)
        self.threads = threads
        self._queue: queue.Queue = queue.Queue()
        self._parked: list[Job] = []
        self._ready: list[Job] = []
        self._thread = threading.Thread(target=self._run, name="prag-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=30)

    def submit(self, prepared: Prepared) -> Future:
        job = Job(prepared, Future())
        self._queue.put(job)
        return job.future

    def documents_changed(self) -> None:
        """Some adapters became ready, or builds failed: parked questions may go now."""
        self._queue.put(_WAKE)

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def waiting_for_documents(self) -> int:
        return len(self._parked)

    # -- the model's thread --------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                break
            for job in jobs:
                if self._unsettled(job.prepared) and self.wait_documents_s > 0:
                    job.parked = time.perf_counter()
                    self._parked.append(job)
                else:
                    self._ready.append(job)
            now = time.perf_counter()
            for job in list(self._parked):
                if not self._unsettled(job.prepared) or now - job.parked >= self.wait_documents_s:
                    self._parked.remove(job)
                    job.prepared.timings["wait_documents"] = now - job.parked
                    try:
                        self.pipeline.merge_adapters(job.prepared)
                    except Exception as error:  # noqa: BLE001  (an unreadable adapter fails its question only)
                        if job.future.set_running_or_notify_cancel():
                            job.future.set_exception(error)
                        continue
                    self._ready.append(job)
            while self._ready:
                batch, self._ready = self._ready[: self.max_batch], self._ready[self.max_batch :]
                self._generate(batch)
        for job in self._parked + self._ready:
            job.future.cancel()

    def _take(self) -> list[Job] | None:
        """Block until there is work, then take what is queued (waiting `gather_s` for company if
        little is); None when stopping."""
        timeout = None
        if self._parked:
            soonest = min(job.parked for job in self._parked) + self.wait_documents_s
            timeout = max(0.0, soonest - time.perf_counter()) + 0.01
        jobs: list[Job] = []
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return jobs
        deadline = time.perf_counter() + self.gather_s
        while True:
            if item is _STOP:
                return None
            if item is not _WAKE:
                jobs.append(item)
            if len(jobs) >= self.max_batch:
                break
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.perf_counter()
                if not jobs or remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
        return jobs

    def _unsettled(self, prepared: Prepared) -> bool:
        return any(not self.settled(p) for p in prepared.missing)

    def _generate(self, batch: list[Job]) -> None:
        batch = [job for job in batch if job.future.set_running_or_notify_cancel()]  # not the abandoned ones
        if not batch:
            return
        threads = machine.using_threads(self.threads()) if self.threads is not None else contextlib.nullcontext()
        start = time.perf_counter()
        for job in batch:
            job.prepared.timings["queue"] = start - job.submitted - job.prepared.timings.get("wait_documents", 0.0)
        try:
            with threads:
                answers: list[Answer] = self.pipeline.generate([job.prepared for job in batch])
        except Exception as error:  # noqa: BLE001  (handed to every request of the batch)
            for job in batch:
                job.future.set_exception(error)
            return
        self.on_batch(len(batch), time.perf_counter() - start)
        for job, answer in zip(batch, answers, strict=True):
            answer.timings["batch_size"] = len(batch)
            job.future.set_result(answer)
