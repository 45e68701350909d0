"""The method, step by step: retrieve, parameterize (offline, once per document), merge, inject, generate.

Four answer modes share one prompt template and differ only in where the
retrieved knowledge goes:

    closed    no retrieval
    rag       passages in the prompt
    prag      the passages' LoRAs merged into the model, no passages in the prompt
    combine   merged LoRAs AND passages in the prompt
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from . import lora
from .atomic import atomic_write_text
from .augment import augment
from .config import Config
from .corpus import Passage, read_corpus
from .llm import LLM
from .parameterize import train_adapters, training_sequences
from .prompt import answer_done, question_prompt, short_answer
from .retrieval import BM25Retriever, Retriever, load_retriever
from .store import AdapterStore, AugmentationStore

MODES = ("closed", "rag", "prag", "combine")


@dataclass
class Answer:
    question: str
    mode: str
    text: str  # the full generation after the lead-in
    short_answer: str
    passages: list[Passage]
    timings: dict[str, float] = field(default_factory=dict)  # seconds: retrieval, parameterize, load_merge, generation


class Pipeline:
    """A workspace (index, augmentations, adapters) plus the model, ready to answer questions."""

    def __init__(self, home: str | Path, config: Config | None = None, llm: LLM | None = None):
        self.home = Path(home)
        self.config = config or Config()
        self._llm = llm
        self._lora_model: lora.LoRAModel | None = None
        self._retriever: Retriever | None = None
        cfg = self.config
        model_key = cfg.model.name.replace("/", "_").strip("_.") or "model"
        self.augmentations = AugmentationStore(self.home / "augment" / f"{model_key}-{cfg.key('model', 'augment')}")
        adapter_key = f"{model_key}-{cfg.key('model', 'augment', 'lora', 'train', 'answer')}"
        self.adapters = AdapterStore(self.home / "adapters" / adapter_key, cfg.train.store_dtype)

    # -- parts, loaded on first use -------------------------------------------------------------
    @property
    def llm(self) -> LLM:
        if self._llm is None:
            self._llm = LLM.load(self.config.model)
        return self._llm

    @property
    def lora_model(self) -> lora.LoRAModel:
        if self._lora_model is None:
            self._lora_model = lora.LoRAModel(self.llm.model, self.config.lora.target_modules)
        return self._lora_model

    @property
    def retriever(self) -> Retriever:
        if self._retriever is None:
            index = self.home / "index"
            if not (index / "retriever.json").exists():
                raise FileNotFoundError(f"no index in {self.home}: run `prag index CORPUS` first")
            self._retriever = load_retriever(index)
        return self._retriever

    # -- offline ----------------------------------------------------------------------------------
    def index(self, corpus: str | Path, show_progress: bool = True) -> int:
        passages = read_corpus(corpus)
        retriever = BM25Retriever.build(passages, show_progress=show_progress)
        retriever.save(self.home / "index")
        self._retriever = retriever
        atomic_write_text(self.home / "config.json", json.dumps(self.config.to_dict(), indent=2))
        return len(passages)

    def parameterize(self, passages: list[Passage], show_progress: bool = True) -> int:
        """Augment and train every passage that has no stored adapter yet; returns how many were built.

        Each finished document is stored at once, so an interrupted run resumes where it stopped.
        """
        todo = list({p.id: p for p in passages if not self.adapters.has(p.id)}.values())
        todo.sort(key=lambda p: len(p.contents))  # similar lengths train together: less padding
        if not todo:
            return 0
        cfg = self.config
        self._meta_once()
        self.augment_missing(todo, show_progress)
        bar = tqdm(total=len(todo), desc="parameterize", unit="doc", disable=not show_progress)
        for start in range(0, len(todo), cfg.train.docs_per_batch):
            group = todo[start : start + cfg.train.docs_per_batch]
            sequences = [
                training_sequences(self.llm, p, self.augmentations.get(p.id), cfg.train, cfg.answer) for p in group
            ]
            adapters = train_adapters(self.llm, self.lora_model, sequences, cfg.lora, cfg.train, show_progress=False)
            for passage, adapter in zip(group, adapters, strict=True):
                self.adapters.put(passage.id, adapter)
            bar.update(len(group))
        bar.close()
        return len(todo)

    def augment_missing(self, passages: list[Passage], show_progress: bool = True) -> None:
        """Generate and store augmentations for the passages that have none, in chunks (so a crash keeps most)."""
        fresh = [p for p in passages if not self.augmentations.has(p.id)]
        chunk = 4 * self.config.augment.batch_size
        for start in range(0, len(fresh), chunk):
            for aug in augment(self.llm, fresh[start : start + chunk], self.config.augment, show_progress):
                self.augmentations.put(aug)

    def _meta_once(self) -> None:
        meta = self.adapters.root / "meta.json"
        if not meta.exists():
            c = self.config.to_dict()
            payload = {"model": c["model"], "lora": c["lora"], "train": c["train"], "augment": c["augment"]}
            atomic_write_text(meta, json.dumps(payload, indent=2))

    # -- online -----------------------------------------------------------------------------------
    def retrieve(self, question: str, top_k: int | None = None) -> list[Passage]:
        k = top_k or self.config.answer.top_k
        return [hit.passage for hit in self.retriever.search(question, k)]

    def answer(
        self, question: str, mode: str = "prag", top_k: int | None = None, show_progress: bool = False
    ) -> Answer:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        timings: dict[str, float] = {}
        passages: list[Passage] = []
        if mode != "closed":
            t = time.perf_counter()
            passages = self.retrieve(question, top_k)
            timings["retrieval"] = time.perf_counter() - t

        parametric = mode in ("prag", "combine") and passages
        if parametric:
            t = time.perf_counter()
            self.parameterize(passages, show_progress)  # a no-op once the documents are stored
            timings["parameterize"] = time.perf_counter() - t
            t = time.perf_counter()
            merged = lora.merge([self.adapters.get(p.id) for p in passages])
            self.lora_model.inject(merged, self.config.lora.scale)
            timings["load_merge"] = time.perf_counter() - t

        in_prompt = [p.contents for p in passages] if mode in ("rag", "combine") else []
        prompt = self.llm.chat(question_prompt(question, in_prompt), self.config.answer.lead_in)
        t = time.perf_counter()
        try:
            text = self.llm.generate([prompt], self.config.answer.max_new_tokens, stop=answer_done)[0]
        finally:
            if parametric:
                self.lora_model.clear()
        timings["generation"] = time.perf_counter() - t
        return Answer(question, mode, text.strip(), short_answer(text), passages, timings)
