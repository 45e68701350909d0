"""Sparse BM25 retrieval on bm25s: indexes ~25k passages in seconds and answers a batch in one call."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import bm25s
import Stemmer

from prag.corpus import Passage, read_corpus
from prag.retrieval import Hit

_STOPWORDS = "en"
_STEMMER = "english"


class BM25Retriever:
    """BM25 over each passage's title and text, with English stopwords removed and words stemmed."""

    def __init__(self, index: bm25s.BM25, passages: list[Passage]):
        self.index = index
        self.passages = passages
        self.by_id = {p.id: p for p in passages}
        self.stemmer = Stemmer.Stemmer(_STEMMER)
        self._avg_doc_len: float | None = None  # recorded at build; what scoring added passages needs

    @classmethod
    def build(cls, passages: list[Passage], show_progress: bool = True) -> BM25Retriever:
        if not passages:
            raise ValueError("cannot build a BM25 index on an empty corpus")
        if len({p.id for p in passages}) != len(passages):
            raise ValueError("passage ids must be unique")
        stemmer = Stemmer.Stemmer(_STEMMER)
        tokens = bm25s.tokenize(
            [p.contents for p in passages], stopwords=_STOPWORDS, stemmer=stemmer, show_progress=show_progress
        )
        if not tokens.vocab:
            raise ValueError("the corpus has no indexable words (only stopwords, numbers or punctuation)")
        index = bm25s.BM25()
        index.index(tokens, show_progress=show_progress)
        retriever = cls(index, list(passages))
        retriever._avg_doc_len = sum(map(len, tokens.ids)) / len(passages)
        return retriever

    def save(self, directory: Path) -> None:
        """Write into a temporary sibling, then swap it in, so a crash never leaves a half-written index."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            self.index.save(tmp, show_progress=False)
            with open(tmp / "passages.jsonl", "w", encoding="utf-8") as f:
                for p in self.passages:
                    row = {"id": p.id, "title": p.title, "text": p.text}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            config = {
                "backend": "bm25",
                "stopwords": _STOPWORDS,
                "stemmer": _STEMMER,
                "passages": len(self),
                "avg_doc_len": self.avg_doc_len,
            }
            (tmp / "retriever.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            old = directory.with_name(tmp.name + ".old")
            if directory.exists():
                os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = True) -> BM25Retriever:
        """Open a saved index; `mmap` keeps the score matrix on disk until pages are touched."""
        directory = Path(directory)
        index = bm25s.BM25.load(directory, mmap=mmap, show_progress=False)
        retriever = cls(index, read_corpus(directory / "passages.jsonl"))
        retriever._avg_doc_len = json.loads((directory / "retriever.json").read_text()).get("avg_doc_len")
        return retriever

    # -- what scoring passages outside the index with this index's statistics needs (retrieval/live.py) --
    def tokenize(self, texts: list[str]) -> list[list[str]]:
        """Stemmed terms without stopwords, as the index holds them."""
        return bm25s.tokenize(texts, stopwords=_STOPWORDS, stemmer=self.stemmer, return_ids=False, show_progress=False)

    @property
    def avg_doc_len(self) -> float:
        if self._avg_doc_len is None:  # an index saved before this was recorded
            self._avg_doc_len = sum(map(len, self.tokenize([p.contents for p in self.passages]))) / len(self)
        return self._avg_doc_len

    def doc_freq(self, term: str) -> int:
        """How many indexed passages contain `term` (its column's entries in the score matrix)."""
        column = self.index.vocab_dict.get(term)
        if column is None:
            return 0
        indptr = self.index.scores["indptr"]
        return int(indptr[column + 1] - indptr[column])

    def search(self, query: str, k: int) -> list[Hit]:
        return self.search_batch([query], k)[0]

    def search_batch(self, queries: list[str], k: int) -> list[list[Hit]]:
        """Top-k per query (k clamped to the corpus); passages sharing no term with the query are left out."""
        k = min(k, len(self))
        if not queries or k <= 0:
            return [[] for _ in queries]
        tokens = bm25s.tokenize(
            queries, stopwords=_STOPWORDS, stemmer=self.stemmer, return_ids=False, show_progress=False
        )
        docs, scores = self.index.retrieve(tokens, k=k, show_progress=False)
        return [
            [Hit(self.passages[d], float(s)) for d, s in zip(row_docs, row_scores, strict=True) if s > 0]
            for row_docs, row_scores in zip(docs.tolist(), scores.tolist(), strict=True)
        ]

    def passage(self, doc_id: str) -> Passage:
        return self.by_id[doc_id]

    def __len__(self) -> int:
        return len(self.passages)
