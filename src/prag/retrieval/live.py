"""An index that takes new passages while it serves: the main BM25 index plus a small delta beside it.

Re-indexing the corpus for every added document would cost seconds each; instead added passages
are scored at question time with the main index's statistics (its document count, document
frequencies and average length, updated by the additions), so their scores compare with the main
index's: a passage added a second ago ranks about where a full re-index would put it (the main
passages' own scores do not see the additions until the next merge). A background job rebuilds the
main index with the additions and hands it over with `replace_main`, which empties the delta.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from dataclasses import dataclass

from prag.corpus import Passage
from prag.retrieval import Hit
from prag.retrieval.bm25 import BM25Retriever


@dataclass(frozen=True)
class _Added:
    passage: Passage
    terms: Counter  # term -> frequency in the passage
    length: int


class LiveRetriever:
    """A `Retriever` over a main BM25 index and the passages added since it was built."""

    def __init__(self, main: BM25Retriever):
        self._lock = threading.Lock()
        self.main = main
        self._added: dict[str, _Added] = {}
        self._df: Counter = Counter()  # document frequencies among the added passages

    # -- changes ----------------------------------------------------------------------------------
    def add(self, passages: list[Passage]) -> None:
        """Make passages searchable now; ones the main index (or the delta) holds already are skipped."""
        fresh = [p for p in passages if p.id not in self.main.by_id and p.id not in self._added]
        if not fresh:
            return
        tokens = self.main.tokenize([p.contents for p in fresh])
        self.main.avg_doc_len  # noqa: B018  (computed outside the lock if the index did not record it)
        with self._lock:
            added = dict(self._added)
            for passage, terms in zip(fresh, tokens, strict=True):
                added[passage.id] = _Added(passage, Counter(terms), len(terms))
            self._added = added
            self._df = Counter(t for a in added.values() for t in a.terms)

    def replace_main(self, main: BM25Retriever) -> None:
        """Swap in a rebuilt main index; added passages it now holds leave the delta."""
        main.avg_doc_len  # noqa: B018
        with self._lock:
            self.main = main
            self._added = {i: a for i, a in self._added.items() if i not in main.by_id}
            self._df = Counter(t for a in self._added.values() for t in a.terms)

    @property
    def added(self) -> list[Passage]:
        return [a.passage for a in self._added.values()]

    # -- the Retriever protocol ---------------------------------------------------------------------
    @property
    def passages(self) -> list[Passage]:
        main, added = self.main, self._added
        return main.passages + [a.passage for a in added.values()]

    def passage(self, doc_id: str) -> Passage:
        added = self._added.get(doc_id)
        return added.passage if added is not None else self.main.passage(doc_id)

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self._added or doc_id in self.main.by_id

    def __len__(self) -> int:
        return len(self.main) + len(self._added)

    def search(self, query: str, k: int) -> list[Hit]:
        return self.search_batch([query], k)[0]

    def search_batch(self, queries: list[str], k: int) -> list[list[Hit]]:
        with self._lock:  # one consistent view: the main index and the delta that goes with it
            main, added, df = self.main, self._added, self._df
        results = main.search_batch(queries, k)
        if not added:
            return results
        n = len(main) + len(added)
        avg = (main.avg_doc_len * len(main) + sum(a.length for a in added.values())) / n
        k1, b = main.index.k1, main.index.b
        merged = []
        for hits, terms in zip(results, main.tokenize(queries), strict=True):
            idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t in set(terms) for f in [main.doc_freq(t) + df[t]]}
            extra = []
            for a in added.values():
                norm = k1 * (1 - b + b * a.length / avg)
                score = sum(idf[t] * a.terms[t] / (a.terms[t] + norm) for t in terms if t in a.terms)
                if score > 0:
                    extra.append(Hit(a.passage, score))
            merged.append(sorted(hits + extra, key=lambda h: -h.score)[:k])
        return merged

    def save(self, directory) -> None:
        """The merged index: main and added passages re-indexed together."""
        BM25Retriever.build(self.passages, show_progress=False).save(directory)
