"""Retrievers find the passages that a question's LoRAs are built from; all backends share one protocol."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from prag.corpus import Passage


@dataclass(frozen=True)
class Hit:
    passage: Passage
    score: float


@runtime_checkable
class Retriever(Protocol):
    """What the pipeline needs from a retriever, so BM25 and later backends (Elasticsearch) swap freely."""

    passages: list[Passage]  # the indexed corpus, in index order

    def search(self, query: str, k: int) -> list[Hit]: ...

    def search_batch(self, queries: list[str], k: int) -> list[list[Hit]]: ...

    def passage(self, doc_id: str) -> Passage: ...

    def save(self, directory: Path) -> None: ...

    def __len__(self) -> int: ...


def load_retriever(directory: str | Path) -> Retriever:
    """Open a saved index, picking the backend named in its `retriever.json`."""
    directory = Path(directory)
    config_path = directory / "retriever.json"
    if not config_path.is_file():
        _recover_interrupted_save(directory)
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: {directory} is not a saved retriever index")
    backend = json.loads(config_path.read_text(encoding="utf-8")).get("backend")
    if backend == "bm25":
        return BM25Retriever.load(directory)
    raise ValueError(f"{config_path}: unknown retriever backend {backend!r} (known: 'bm25')")


def _recover_interrupted_save(directory: Path) -> None:
    """A save moves the old index aside, then the new one in: a crash between the two renames leaves
    only the old one, under `.NAME.*.old`; put it back (the new one is rebuilt by whoever wrote it)."""
    for old in sorted(directory.parent.glob(f".{directory.name}.*.old")):
        if (old / "retriever.json").is_file() and not directory.exists():
            old.rename(directory)


from prag.retrieval.bm25 import BM25Retriever  # noqa: E402  (bm25 imports Hit from this module)

__all__ = ["BM25Retriever", "Hit", "Retriever", "load_retriever"]
