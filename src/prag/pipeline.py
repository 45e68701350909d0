"""The method, step by step: retrieve, parameterize (offline, once per document), merge, inject, generate.

Four answer modes share one prompt template and differ only in where the
retrieved knowledge goes:

    closed    no retrieval
    rag       passages in the prompt
    prag      the passages' LoRAs merged into the model, no passages in the prompt
    combine   merged LoRAs AND passages in the prompt
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import lora
from .atomic import atomic_write, atomic_write_text
from .augment import augment
from .config import Config
from .corpus import Passage, read_corpus
from .llm import LLM
from .parameterize import compiled_decoder, should_compile, train_adapters, training_sequences, warmup_sequences
from .prompt import answer_done, question_prompt, short_answer
from .retrieval import BM25Retriever, Retriever, load_retriever
from .store import AdapterStore, AugmentationStore, join

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
    """A workspace (index, augmentations, adapters) plus the model, ready to answer questions.

    Augmentations and adapters live in `store` (default: `home`): a local or shared directory, or an
    fsspec URL such as s3://bucket/prefix (see store.py), so that many machines can fill one store.
    """

    def __init__(
        self, home: str | Path, config: Config | None = None, llm: LLM | None = None, store: str | Path | None = None
    ):
        self.home = Path(home)
        self.store = store or self.home
        self.config = (config or Config()).validate()
        self._llm = llm
        self._lora_model: lora.LoRAModel | None = None
        self._retriever: Retriever | None = None
        cfg = self.config
        model_key = cfg.model.name.replace("/", "_").strip("_.") or "model"
        augment_key = f"{model_key}-{cfg.key('model', 'augment')}"
        self.augmentations = AugmentationStore(join(self.store, "augment", augment_key))
        adapter_key = f"{model_key}-{cfg.key('model', 'augment', 'lora', 'train', 'answer')}"
        if cfg.lora.init:  # the warm-up adapter's contents, not just its path, decide what is trained
            adapter_key += "-init" + hashlib.sha1(Path(cfg.lora.init).read_bytes()).hexdigest()[:8]
        self.adapters = AdapterStore(join(self.store, "adapters", adapter_key), cfg.train.store_dtype)
        self._initial: lora.Adapter | None = None

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

    def parameterize(self, passages: list[Passage], show_progress: bool = True, shard_size: int | None = None) -> int:
        """Augment and train every passage that has no stored adapter yet; returns how many were built.

        Each finished group of documents is stored at once, so an interrupted run resumes where it stopped.
        `distributed.parameterize_on_ray` does the same on a Ray cluster, one shard per task.
        """
        todo = self.unstored(passages)
        if not todo:
            return 0
        bar = tqdm(total=len(todo), desc="parameterize", unit="doc", disable=not show_progress)
        compile_layers = should_compile(self.config.train, len(todo), self.llm.device)
        for shard in self.shards(todo, shard_size):
            for stored in self.build(shard, compile_layers, show_progress):
                bar.update(len(stored))
        bar.close()
        return len(todo)

    def unstored(self, passages: list[Passage]) -> list[Passage]:
        """The passages without a stored adapter, each once, shortest first (similar lengths batch together)."""
        unique = {p.id: p for p in passages}
        todo = [unique[doc_id] for doc_id in self.adapters.missing(list(unique))]
        return sorted(todo, key=lambda p: len(p.contents))

    def shards(self, todo: list[Passage], size: int | None = None) -> list[list[Passage]]:
        """Consecutive slices of `todo` (default: 4 x augment.batch_size documents), each augmented in one call:
        the documents generated together (which decides the sampled text) are then the same in-process, on any
        Ray worker and in a retried shard, for the same shard size."""
        size = size or 4 * self.config.augment.batch_size
        return [todo[start : start + size] for start in range(0, len(todo), size)]

    def build(
        self, shard: list[Passage], compile_layers: bool = False, show_progress: bool = False
    ) -> Iterator[list[str]]:
        """Augment and train one shard, storing each training group's adapters; yields each group's ids once stored.

        Documents of the shard that are already stored are skipped, so a retried shard redoes only the rest.
        """
        cfg = self.config
        self._meta_once()
        todo = self.unstored(shard)
        if any(not self.augmentations.has(p.id) for p in todo):
            # all of them in one call, even those an interrupted attempt stored: the same call as the first
            # attempt's, so the text sampled for the others is the same too (stored ones are kept)
            for aug in augment(self.llm, todo, cfg.augment, show_progress):
                self.augmentations.put(aug)
        with compiled_decoder(self.llm.model, compile_layers):
            for start in range(0, len(todo), cfg.train.docs_per_batch):
                group = todo[start : start + cfg.train.docs_per_batch]
                sequences = [
                    training_sequences(self.llm, p, self.augmentations.get(p.id), cfg.train, cfg.answer) for p in group
                ]
                adapters = train_adapters(
                    self.llm, self.lora_model, sequences, cfg.lora, cfg.train, self.initial_adapter, show_progress=False
                )
                for passage, adapter in zip(group, adapters, strict=True):
                    self.adapters.put(passage.id, adapter)
                yield [p.id for p in group]

    @property
    def initial_adapter(self) -> lora.Adapter | None:
        """The warm-up adapter every document starts from (`lora.init`), or None for the random init."""
        if self._initial is None and self.config.lora.init:
            self._initial = {k: v.float() for k, v in load_file(self.config.lora.init).items()}
        return self._initial

    def warmup(self, questions: list, out: str | Path, show_progress: bool = True) -> int:
        """Train the shared initialization on held-in QA: each question with its gold passages, and alone.

        `questions` are `evaluate.Question`s whose `supporting_titles` name corpus passages. Use dev
        questions OUTSIDE the evaluated range: the warm-up must teach the task, not the test's facts.
        Returns the number of training sequences.
        """
        by_title: dict[str, list[Passage]] = {}
        for p in self.retriever.passages:
            by_title.setdefault(p.title.lower(), []).append(p)
        sequences = []
        for q in questions:
            gold = [p for t in q.supporting_titles for p in by_title.get(t.lower(), [])[:1]]
            sequences += warmup_sequences(
                self.llm, q.question, q.golden_answers[0], gold, self.config.train, self.config.answer
            )
        if not sequences:
            raise ValueError("no warm-up sequences: the questions have no answers")
        random.Random(self.config.lora.init_seed).shuffle(sequences)
        cfg = self.config
        [adapter] = train_adapters(self.llm, self.lora_model, [sequences], cfg.lora, cfg.train, None, show_progress)
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.float().contiguous() for k, v in adapter.items()}
        atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata={"questions": str(len(questions))}))
        return len(sequences)

    def augment_missing(self, passages: list[Passage], show_progress: bool = True) -> None:
        """Generate and store augmentations for the passages that have none, in chunks (so a crash keeps most)."""
        fresh = [p for p in passages if not self.augmentations.has(p.id)]
        chunk = 4 * self.config.augment.batch_size
        for start in range(0, len(fresh), chunk):
            for aug in augment(self.llm, fresh[start : start + chunk], self.config.augment, show_progress):
                self.augmentations.put(aug)

    def _meta_once(self) -> None:
        c = self.config.to_dict()
        self.adapters.put_meta({"model": c["model"], "lora": c["lora"], "train": c["train"], "augment": c["augment"]})

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
        warm_only = not parametric and self.config.answer.init_in_all_modes and self.initial_adapter is not None
        if warm_only:  # the warmed-up model as the baseline: its initialization without any document
            self.lora_model.inject(self.initial_adapter, self.config.lora.scale)
        if parametric:
            t = time.perf_counter()
            self.parameterize(passages, show_progress)  # a no-op once the documents are stored
            timings["parameterize"] = time.perf_counter() - t
            t = time.perf_counter()
            adapters = [self.adapters.get(p.id) for p in passages]
            weights = None if self.config.answer.merge == "sum" else [1 / len(adapters)] * len(adapters)
            merged = lora.merge(adapters, weights)
            self.lora_model.inject(merged, self.config.lora.scale)
            timings["load_merge"] = time.perf_counter() - t

        in_prompt = [p.contents for p in passages] if mode in ("rag", "combine") else []
        prompt = self.llm.chat(question_prompt(question, in_prompt), self.config.answer.lead_in)
        t = time.perf_counter()
        try:
            text = self.llm.generate([prompt], self.config.answer.max_new_tokens, stop=answer_done)[0]
        finally:
            if parametric or warm_only:
                self.lora_model.clear()
        timings["generation"] = time.perf_counter() - t
        return Answer(question, mode, text.strip(), short_answer(text), passages, timings)
