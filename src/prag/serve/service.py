"""The parts the routes share: the pipeline, the live index, the document log, the builder and the batcher."""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from .. import machine
from ..config import Config
from ..corpus import Passage
from ..pipeline import Answer, Pipeline
from ..retrieval import load_retriever
from ..retrieval.bm25 import BM25Retriever
from ..retrieval.live import LiveRetriever
from .batcher import Batcher
from .ingest import Builder, DocumentLog, check_documents


@dataclass
class Settings:
    home: Path
    config: Config = field(default_factory=Config)
    api_key: str | None = None
    max_batch: int = 16  # questions per batched generation
    gather_ms: float = 20.0  # how long a lone question waits for others to share its batch
    wait_documents_s: float = 120.0  # how long a question waits for its documents' adapters
    threads: int = 0  # torch threads answering (0: the cores other processes leave free, per batch)
    build_threads: int = 1  # torch threads of the builder process
    build_group: int = 4  # documents the builder parameterizes together (small: waiting questions go first)
    max_body_bytes: int = 1 << 20


class Service:
    def __init__(self, settings: Settings, pipeline: Pipeline | None = None):
        self.settings = settings
        self.pipeline = pipeline or Pipeline(settings.home, settings.config)
        self.log = DocumentLog(Path(settings.home) / "ingest")
        self.failed: dict[str, str] = dict(self.log.failed)  # ingested and corpus documents whose build failed
        self.live: LiveRetriever | None = None
        self.builder = Builder(
            Path(settings.home),
            settings.config.overrides(),
            threads=settings.build_threads,
            group_size=settings.build_group,
            on_ready=self._on_ready,
            on_failed=self._on_failed,
            on_indexed=self._on_indexed,
        )
        self.batcher = Batcher(
            self.pipeline,
            max_batch=settings.max_batch,
            gather_s=settings.gather_ms / 1000,
            wait_documents_s=settings.wait_documents_s,
            settled=self.settled,
            on_batch=self._on_batch,
            threads=self.answer_threads,
        )
        self._prepare = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prag-prepare")
        self._ingest_lock = threading.Lock()
        self.batch_hooks: list = []  # called with (size, seconds) after each batch (metrics)
        self.built_hooks: list = []  # called with (ready, failed) counts

    def start(self) -> None:
        """Load the model and the index, replay the document log, start the builder and the batcher.
        Call from the main thread (the builder process is tied to the thread that starts it)."""
        import torch

        torch.set_num_threads(self.settings.threads or os.cpu_count() or 1)
        main = load_retriever(Path(self.settings.home) / "index")
        if not isinstance(main, BM25Retriever):
            raise ValueError(f"the live index needs a BM25 index, not {type(main).__name__}")
        self.live = LiveRetriever(main)
        self.pipeline.retriever = self.live
        self.pipeline.lora_model  # noqa: B018  (loads the model now, not at the first question)
        logged = list(self.log.documents.values())
        self.live.add(logged)
        self.builder.start()
        unbuilt = [p for p in logged if not self.pipeline.adapters.has(p.id) and p.id not in self.failed]
        if unbuilt:  # accepted before a crash or restart: resume
            self.builder.build(unbuilt)
        if self.live.added:
            self.builder.index(self.live.added)
        self.batcher.start()

    def stop(self) -> None:
        self.batcher.stop()
        self.builder.stop()
        self._prepare.shutdown(wait=False, cancel_futures=True)

    # -- answering ----------------------------------------------------------------------------------
    async def answer(self, question: str, mode: str, top_k: int | None) -> Answer:
        loop = asyncio.get_running_loop()
        prepare = partial(self.pipeline.prepare, question, mode, top_k, build=False)
        prepared = await loop.run_in_executor(self._prepare, prepare)
        unsettled = [p for p in prepared.missing if not self.settled(p)]
        if unsettled:
            self.builder.build(unsettled, priority=True)
        return await asyncio.wrap_future(self.batcher.submit(prepared))

    def answer_threads(self) -> int:
        """`--threads` if given; else the cores other processes leave free (`machine.choose_threads`), and
        while the builder works, at most the cores it does not use: an oversubscribed core stalls each of
        torch's parallel sections on its slowest thread."""
        if self.settings.threads:
            return self.settings.threads
        cores = machine.choose_threads(self.pipeline.config.model.threads)
        if self.builder.busy:
            return max(1, min(cores, machine.available_cpus() - self.settings.build_threads))
        return cores

    def settled(self, passage: Passage) -> bool:
        """Nothing more to wait for: the adapter is stored, or its build failed."""
        return passage.id in self.failed or self.pipeline.adapters.has(passage.id)

    # -- documents ----------------------------------------------------------------------------------
    def known(self, doc_id: str) -> Passage | None:
        if doc_id in self.log.documents:
            return self.log.documents[doc_id]
        return self.live.passage(doc_id) if doc_id in self.live else None

    def add_documents(self, documents: list[dict]) -> list[Passage]:
        """Validate, log durably, make searchable, queue for parameterization; returns the passages."""
        with self._ingest_lock:  # concurrent requests must not both claim one id
            passages = check_documents(documents, self.known)
            fresh = self.log.add(passages)
            self.live.add(fresh)
        todo = [p for p in fresh if not self.pipeline.adapters.has(p.id)]
        if todo:
            self.builder.build(todo)
        if fresh:
            self.builder.index(fresh)
        return passages

    def document_status(self, doc_id: str) -> dict | None:
        passage = self.known(doc_id)
        if passage is None:
            return None
        ingested = doc_id in self.log.documents
        if self.pipeline.adapters.has(doc_id):
            status = "ready"
        elif doc_id in self.failed:
            status = "failed"
        elif doc_id in self.builder.status:
            status = self.builder.status[doc_id]
        else:  # a corpus passage: parameterized the first time a question retrieves it
            status = "queued" if ingested else "not_built"
        row = {"id": doc_id, "title": passage.title, "status": status, "source": "ingested" if ingested else "corpus"}
        row["index"] = "main" if doc_id in self.live.main.by_id else "delta"
        if status == "failed":
            row["error"] = self.failed[doc_id]
        return row

    # -- builder reports (its reader thread) ------------------------------------------------------------
    def _on_ready(self, ids: list[str]) -> None:
        for hook in self.built_hooks:
            hook(len(ids), 0)
        self.batcher.documents_changed()

    def _on_failed(self, errors: dict[str, str]) -> None:
        for doc_id, error in errors.items():
            self.failed[doc_id] = error
            if doc_id in self.log.documents:
                self.log.mark_failed(doc_id, error)
        for hook in self.built_hooks:
            hook(0, len(errors))
        self.batcher.documents_changed()

    def _on_indexed(self, ids: list[str]) -> None:
        self.live.replace_main(load_retriever(Path(self.settings.home) / "index"))

    def _on_batch(self, size: int, seconds: float) -> None:
        for hook in self.batch_hooks:
            hook(size, seconds)
