"""The method, step by step: retrieve, parameterize (offline, once per document), merge, inject, generate.

The answer modes share one prompt template and differ only in where the retrieved
knowledge goes:

    closed          no retrieval
    rag             passages in the prompt
    prag            the passages' LoRAs merged into the model, no passages in the prompt
    combine         merged LoRAs AND passages in the prompt
    dyprag          like prag, with LoRAs the translator generates (DyPRAG, translator.py): no augmentation,
                    no training, one forward pass over the passages per question
    dyprag-combine  generated LoRAs AND passages in the prompt

Four controls measure what the LoRAs carry beyond an answer format: they merge the LoRAs of
UNRELATED documents (in `prag eval`, another question's top-k; otherwise k random passages):

    prag-unrelated      unrelated LoRAs, no passages
    combine-unrelated   unrelated LoRAs, the question's own passages in the prompt
    dyprag-unrelated    unrelated documents' generated LoRAs, no passages
    dyprag-combine-unrelated  unrelated documents' generated LoRAs, the question's own passages in the prompt
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import Stemmer
import torch
from bm25s.stopwords import STOPWORDS_EN_PLUS
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import locality, lora
from . import translator as dyprag
from .atomic import atomic_write, atomic_write_text
from .augment import ANSWER_FIRST_VERSION, augment
from .config import Config, LoRAConfig
from .corpus import Passage, read_corpus
from .llm import LLM, MIN_SHARED_PREFIX, SAMPLER_VERSION, PrefixCache
from .parameterize import (
    compiled_decoder,
    prompt_start,
    reads_passages,
    should_compile,
    train_adapters,
    training_sequences,
    warmup_sequences,
)
from .prompt import AnswerFormat
from .retrieval import BM25Retriever, Retriever, load_retriever
from .store import AdapterStore, AugmentationStore, join

MODES = ("closed", "rag", "prag", "combine", "dyprag", "dyprag-combine")
CONTROLS = ("prag-unrelated", "combine-unrelated", "dyprag-unrelated", "dyprag-combine-unrelated")
ALL_MODES = MODES + CONTROLS
PASSAGES_IN_PROMPT = {"rag", "combine", "combine-unrelated", "dyprag-combine", "dyprag-combine-unrelated"}
TRAINED_LORAS = {"prag", "combine", "prag-unrelated", "combine-unrelated"}  # merge the documents' stored LoRAs
# merge the LoRAs the translator generates
GENERATED_LORAS = {"dyprag", "dyprag-combine", "dyprag-unrelated", "dyprag-combine-unrelated"}
MAX_QUESTION_CHARS = 2000
MAX_TOP_K = 50
_STEMMER = Stemmer.Stemmer("english")


@dataclass
class Answer:
    question: str
    mode: str
    text: str  # the full generation after the lead-in
    short_answer: str
    passages: list[Passage]  # retrieved for the question (listed in the prompt in rag/combine modes)
    # seconds: retrieval, parameterize, load_merge, generation (first_token is part of generation)
    timings: dict[str, float] = field(default_factory=dict)
    lora_passages: list[Passage] = field(default_factory=list)  # whose LoRAs were merged into the model
    new_tokens: int = 0
    missing: list[Passage] = field(default_factory=list)  # of lora_passages: not parameterized yet, not merged
    scores: list[float] = field(default_factory=list)  # the passages' retrieval scores
    prompt_tokens: int = 0


@dataclass
class Prepared:
    """A question made ready to generate: what `Pipeline.prepare` hands to `Pipeline.generate`."""

    question: str
    mode: str
    top_k: int
    passages: list[Passage]  # retrieved
    lora_passages: list[Passage]  # whose LoRAs are to be merged
    prompt: list[int]  # token ids
    adapter: lora.Adapter | None = None  # the merged adapter of the stored ones among lora_passages
    missing: list[Passage] = field(default_factory=list)  # lora_passages without a stored adapter
    # dyprag modes: the lora_passages whose LoRAs the translator generates, in `generate` (the model's thread)
    translate: list[Passage] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    scores: list[float] = field(default_factory=list)  # the passages' retrieval scores


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
        self._frozen_prefix: PrefixCache | None = None
        cfg = self.config
        self.format = AnswerFormat.from_config(cfg.answer)
        model_key = cfg.model.name.replace("/", "_").strip("_.") or "model"
        # a seed's augmentations depend on the code that drew them, not on the config alone: the sampler's
        # version, and for answer-first the version of its prompt and span choice
        drawn = f"s{SAMPLER_VERSION}" + (f"a{ANSWER_FIRST_VERSION}" if cfg.augment.qa_style == "answer_first" else "")
        augment_key = f"{model_key}-{cfg.key('model', 'augment')}-{drawn}"
        self.augmentations = AugmentationStore(join(self.store, "augment", augment_key))
        keyed = Config.from_dict(cfg.to_dict())
        if keyed.answer.style == "direct":  # few-shot examples only shape chain-of-thought training sequences
            keyed.answer.fewshot = ""
        adapter_key = f"{model_key}-{keyed.key('model', 'augment', 'lora', 'train', 'answer')}-{drawn}"
        if cfg.train.locality:
            adapter_key += f"p{locality.VERSION}"  # the probe set trained on
        for kind in ("init", "base"):  # the warm-up/format adapter's contents, not just its path, decide training
            path = getattr(cfg.lora, kind)
            if path:
                if not Path(path).is_file():
                    raise FileNotFoundError(f"lora.{kind}={path!r}: no such adapter file (`prag warmup` writes one)")
                adapter_key += f"-{kind}" + hashlib.sha1(Path(path).read_bytes()).hexdigest()[:8]
        self.adapters = AdapterStore(join(self.store, "adapters", adapter_key), cfg.train.store_dtype)
        # the translator learns this adapter store's LoRAs: keyed by it, and by its own options
        self.translator_dir = self.home / "translators" / f"{adapter_key}-{cfg.key('translator')}"
        self._translator: dyprag.Translator | None = None
        self.generated = dyprag.GeneratedCache(cfg.translator.cache_mb * 2**20)
        self._initial: lora.Adapter | None = None
        self._base: lora.Adapter | None = None
        # offline work done by this pipeline, cumulative: seconds augmenting and training, documents built
        self.offline_seconds = {"augment_s": 0.0, "train_s": 0.0}

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
            try:
                self._retriever = load_retriever(self.home / "index")
            except FileNotFoundError:
                raise FileNotFoundError(f"no index in {self.home}: run `prag index CORPUS` first") from None
        return self._retriever

    @retriever.setter
    def retriever(self, retriever: Retriever) -> None:
        self._retriever = retriever

    # -- offline ----------------------------------------------------------------------------------
    def index(self, corpus: str | Path, show_progress: bool = True) -> int:
        passages = read_corpus(corpus)
        retriever = BM25Retriever.build(passages, show_progress=show_progress)
        retriever.save(self.home / "index")
        self._retriever = retriever
        # only what differs from the defaults: a later change of a default reaches this workspace
        atomic_write_text(self.home / "config.json", json.dumps({"overrides": self.config.overrides()}, indent=2))
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
            t = time.perf_counter()
            for aug in augment(self.llm, todo, cfg.augment, show_progress):
                self.augmentations.put(aug)
            self.offline_seconds["augment_s"] += time.perf_counter() - t
        with compiled_decoder(self.llm.model, compile_layers):
            for start in range(0, len(todo), cfg.train.docs_per_batch):
                t = time.perf_counter()
                group = todo[start : start + cfg.train.docs_per_batch]
                sequences = [self.training_sequences(p) for p in group]
                adapters = train_adapters(
                    self.llm,
                    self.lora_model,
                    sequences,
                    cfg.lora,
                    cfg.train,
                    self.initial_adapter,
                    show_progress=False,
                    base=self.base_adapter,
                )
                for passage, adapter in zip(group, adapters, strict=True):
                    self.adapters.put(passage.id, adapter)
                self.offline_seconds["train_s"] += time.perf_counter() - t
                yield [p.id for p in group]

    def training_sequences(self, passage: Passage) -> list:
        cfg = self.config
        return training_sequences(self.llm, passage, self.augmentations.get(passage.id), cfg.train, self.format)

    @property
    def initial_adapter(self) -> lora.Adapter | None:
        """The warm-up adapter every document starts from (`lora.init`), or None for the random init."""
        if self._initial is None and self.config.lora.init:
            shapes = self.lora_model.shapes(self.config.lora.rank)
            self._initial = load_warmup_adapter(self.config.lora.init, "init", self.config.lora, shapes)
        return self._initial

    @property
    def base_adapter(self) -> lora.Adapter | None:
        """The format adapter (`lora.base`) injected in every mode, or None."""
        if self._base is None and self.config.lora.base:
            shapes = self.lora_model.shapes(self.config.lora.rank)
            self._base = load_warmup_adapter(self.config.lora.base, "base", self.config.lora, shapes)
        return self._base

    def warmup(self, questions: list, out: str | Path, show_progress: bool = True) -> int:
        """Train the shared initialization on held-in QA: each question with its gold passages, and alone.

        `questions` are `evaluate.Question`s whose `supporting_titles` name corpus passages. Use dev
        questions OUTSIDE the evaluated range (the tune slice): the warm-up must teach the task, not the
        test's facts. Their ids are recorded in the adapter, and `prag eval` refuses to evaluate them with it.
        Returns the number of training sequences.
        """
        by_title: dict[str, list[Passage]] = {}
        for p in self.retriever.passages:
            by_title.setdefault(p.title.lower(), []).append(p)
        sequences = []
        for q in questions:
            gold = [p for t in q.supporting_titles for p in by_title.get(t.lower(), [])[:1]]
            answer = q.golden_answers[0]
            sequences += warmup_sequences(self.llm, q.question, answer, gold, self.config.train, self.format)
        if not sequences:
            raise ValueError("no warm-up sequences: the questions have no answers")
        random.Random(self.config.lora.init_seed).shuffle(sequences)
        cfg = self.config
        [adapter] = train_adapters(self.llm, self.lora_model, [sequences], cfg.lora, cfg.train, None, show_progress)
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.float().contiguous() for k, v in adapter.items()}
        metadata = {
            "questions": str(len(questions)),
            "question_ids": json.dumps([q.id for q in questions]),
            # what it was trained at, so that it keeps its delta under other LoRA settings (load_warmup_adapter;
            # its rank and projections are the tensors' own)
            "scale": repr(cfg.lora.scale),
        }
        atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        return len(sequences)

    @property
    def warmup_adapter_paths(self) -> list[str]:
        """The adapters `prag warmup` wrote that this configuration uses: the warm-up start (`lora.init`) and the
        format adapter (`lora.base`), each once."""
        return list(dict.fromkeys(path for path in (self.config.lora.init, self.config.lora.base) if path))

    def warmup_question_ids(self) -> set[str]:
        """The ids of the questions that trained the warm-up or format adapter (`warmup_adapter_paths`); empty
        without either."""
        ids: set[str] = set()
        for path in self.warmup_adapter_paths:
            with safe_open(path, framework="pt") as f:
                ids |= set(json.loads((f.metadata() or {}).get("question_ids", "[]")))
        return ids

    # -- the translator (DyPRAG) ----------------------------------------------------------------------
    @property
    def translator_path(self) -> Path:
        return self.translator_dir / "translator.safetensors"

    @property
    def translator(self) -> dyprag.Translator:
        """The trained translator of this model and LoRA config, loaded on first use."""
        if self._translator is None:
            if not self.translator_path.exists():
                raise ValueError(
                    f"mode: the dyprag modes need a trained translator, and none is stored for this model and "
                    f"config ({self.translator_path}): train one with `prag translator train --dataset Q.jsonl`"
                )
            device = self._llm.device if self._llm is not None else "cpu"
            self._translator, _ = dyprag.load(self.translator_path, device)
        return self._translator

    def train_translator(
        self, passages: list[Passage], question_ids: list[str], show_progress: bool = True, restart: bool = False
    ) -> dict:
        """Train and store the translator on these documents' (passage, trained LoRA) pairs.

        Documents without a stored LoRA are parameterized first, the standard way. `question_ids`, the questions
        whose retrieved documents these are, are recorded: `prag eval` refuses to evaluate them in dyprag modes.
        An interrupted run of the same documents resumes from its checkpoint; `restart` starts over (and
        replaces a stored translator). Returns the training record.
        """
        if self.translator_path.exists() and not restart:
            raise ValueError(
                f"a translator is stored already ({self.translator_path}): pass --restart to train a new one"
            )
        checkpoint = self.translator_dir / "checkpoint.pt"
        if restart:
            checkpoint.unlink(missing_ok=True)
        passages = list({p.id: p for p in passages}.values())
        t = time.perf_counter()
        built = self.parameterize(passages, show_progress)
        parameterize_s = time.perf_counter() - t
        cfg = self.config
        translator = self.new_translator()
        self.translator_dir.mkdir(parents=True, exist_ok=True)
        record = dyprag.train(
            self.llm,
            self.lora_model,
            translator,
            self.translator_examples(passages),
            self.adapters.get,
            cfg.translator,
            cfg.lora.scale,
            self.base_adapter,
            checkpoint,
            cfg.train.max_length,
            show_progress,
            cfg.train.prefix,
        )
        record.update(
            config=cfg.to_dict()["translator"],
            question_ids=list(question_ids),
            document_ids=[p.id for p in passages],
            parameterized_first=built,
            parameterize_s=round(parameterize_s, 2),
        )
        dyprag.save(translator, self.translator_path, record)
        checkpoint.unlink(missing_ok=True)
        self._translator = translator
        self.generated.clear()  # LoRAs of the translator it replaces
        return record

    def translator_record(self) -> dict:
        """What trained the stored translator (documents, question ids, seconds, losses); empty without one."""
        if not self.translator_path.exists():
            return {}
        with safe_open(str(self.translator_path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("training", "{}"))

    def augment_missing(self, passages: list[Passage], show_progress: bool = True) -> None:
        """Generate and store augmentations for the passages that have none, in chunks (so a crash keeps most)."""
        fresh = [p for p in passages if not self.augmentations.has(p.id)]
        for shard in self.shards(fresh):
            for aug in augment(self.llm, shard, self.config.augment, show_progress):
                self.augmentations.put(aug)

    def _meta_once(self) -> None:
        c = self.config.to_dict()
        self.adapters.put_meta({"model": c["model"], "lora": c["lora"], "train": c["train"], "augment": c["augment"]})

    # -- online -----------------------------------------------------------------------------------
    def retrieve(self, question: str, top_k: int | None = None) -> list[Passage]:
        k = check_question(question, top_k, self.config.answer.top_k)
        return [hit.passage for hit in self.retriever.search(question, k)]

    def unrelated_passages(self, question: str, exclude: list[Passage], k: int) -> list[Passage]:
        """k passages chosen at random (seeded by the question) among those not retrieved for it."""
        rng = random.Random(hashlib.sha1(question.encode()).hexdigest())
        taken, pool = {p.id for p in exclude}, self.retriever.passages
        chosen: list[Passage] = []
        for i in rng.sample(range(len(pool)), min(len(pool), k + len(taken))):
            if pool[i].id not in taken and len(chosen) < k:
                chosen.append(pool[i])
        return chosen

    def answer(
        self,
        question: str,
        mode: str = "prag",
        top_k: int | None = None,
        show_progress: bool = False,
        lora_passages: list[Passage] | None = None,
    ) -> Answer:
        """Answer in one mode. `lora_passages` names the unrelated documents of a control mode."""
        prepared = self.prepare(question, mode, top_k, lora_passages, show_progress=show_progress)
        return self.generate([prepared])[0]

    def prepare(
        self,
        question: str,
        mode: str = "prag",
        top_k: int | None = None,
        lora_passages: list[Passage] | None = None,
        build: bool = True,
        show_progress: bool = False,
        passages: list[Passage] | None = None,
    ) -> Prepared:
        """Everything before generation: retrieval, the documents whose LoRAs to merge, their merged
        adapter, and the prompt. `build=False` parameterizes nothing: documents without a stored
        adapter are left out of the merge and listed in `missing` (a service builds them elsewhere).
        `passages` answers with these documents instead of retrieving (`prag recall` asks a document's
        own questions with its own passage or LoRA)."""
        k = check_question(question, top_k, self.config.answer.top_k)
        if mode not in ALL_MODES:
            raise ValueError(f"mode: unknown mode {mode!r}; choose from {', '.join(ALL_MODES)}")
        if mode in GENERATED_LORAS and self.config.answer.merge == "matched":
            raise ValueError(
                f"answer.merge: 'matched' weighs trained LoRAs by their documents' stored questions, and mode "
                f"{mode!r} generates its LoRAs from the passages alone: use sum or mean"
            )
        if mode in GENERATED_LORAS:
            self.translator  # noqa: B018  (no translator: the error that names the command to train one, at once)
        timings: dict[str, float] = {}
        hits = []
        if mode == "closed":
            passages = []
        elif passages is None:
            t = time.perf_counter()
            hits = self.retriever.search(question, k)
            timings["retrieval"] = time.perf_counter() - t
            passages = [hit.passage for hit in hits]
        if mode in CONTROLS:
            merged_from = lora_passages if lora_passages is not None else self.unrelated_passages(question, passages, k)
        else:
            merged_from = passages if mode in ("prag", "combine", "dyprag", "dyprag-combine") else []
        if merged_from and build and mode in TRAINED_LORAS:
            t = time.perf_counter()
            self.parameterize(merged_from, show_progress)  # a no-op once the documents are stored
            if mode in CONTROLS and self.config.answer.merge == "matched":
                self.augment_missing(passages, show_progress)  # the weights come from the question's own documents
            timings["parameterize"] = time.perf_counter() - t
        in_prompt = [p.contents for p in passages] if mode in PASSAGES_IN_PROMPT else []
        prompt = self.format.chat_ids(self.llm, question, in_prompt)
        prepared = Prepared(question, mode, k, passages, list(merged_from), prompt, timings=timings)
        prepared.scores = [hit.score for hit in hits]
        if mode in GENERATED_LORAS:
            prepared.translate = list(merged_from)
        return self.merge_adapters(prepared)

    def merge_adapters(self, prepared: Prepared) -> Prepared:
        """(Re)load and merge the stored adapters of `prepared.lora_passages`; those not stored yet stay `missing`.
        In the dyprag modes nothing is loaded: `generate` merges the generated LoRAs."""
        prepared.adapter = self.base_adapter  # the format adapter (lora.base), in every mode, or None
        if prepared.mode in GENERATED_LORAS:
            prepared.missing = []
            return prepared
        ready = [p for p in prepared.lora_passages if self.adapters.has(p.id)]
        prepared.missing = [p for p in prepared.lora_passages if not self.adapters.has(p.id)]
        if ready:
            t = time.perf_counter()
            relevance = None
            if self.config.answer.merge == "matched":
                # a control merges unrelated LoRAs at the weights the question's own documents get: the gate's
                # strength is the same, only what the LoRAs hold differs (their own weights would be ~0)
                weighed = prepared.passages if prepared.mode in CONTROLS else ready
                relevance = (self.relevance(prepared.question, weighed) + [0.0] * len(ready))[: len(ready)]
            prepared.adapter = self.merge([self.adapters.get(p.id) for p in ready], relevance)
            prepared.timings["load_merge"] = time.perf_counter() - t
        elif not prepared.lora_passages and self.config.answer.init_in_all_modes and self.initial_adapter is not None:
            prepared.adapter = self.initial_adapter  # the warmed-up model as the baseline, without any document
        return prepared

    def merge(self, adapters: list[lora.Adapter], relevance: list[float] | None = None) -> lora.Adapter:
        """The documents' LoRAs as one adapter: summed, averaged or summed with a weight per document
        (`answer.merge`; `relevance`, for "matched"), times `answer.lora_scale`, beside the format adapter
        (`lora.base`) if there is one."""
        share = 1 / len(adapters) if self.config.answer.merge == "mean" else 1.0
        weights = [share * self.config.answer.lora_scale * r for r in relevance or [1.0] * len(adapters)]
        if self.base_adapter is not None:  # the format adapter once, beside the documents' deltas
            adapters, weights = [self.base_adapter, *adapters], [1.0, *weights]
        return lora.merge(adapters, weights)

    def relevance(self, question: str, passages: list[Passage]) -> list[float]:
        """answer.merge=matched: each document's weight is how much of the question one of its stored
        questions asks (`question_match`), so that a retrieved document whose pairs do not touch the question
        adds little of its LoRA, whatever answer that LoRA has learned to give. The control modes apply the
        weights of the question's own documents to the unrelated LoRAs (`merge_adapters`)."""
        weights = []
        for p in passages:
            if not self.augmentations.has(p.id):
                raise ValueError(
                    f"answer.merge=matched: document {p.id!r} has a stored LoRA but no stored augmentation "
                    f"in {self.augmentations.root} to weigh it by"
                )
            weights.append(question_match(question, [qa["question"] for qa in self.augmentations.get(p.id).qa]))
        return weights

    def new_translator(self) -> dyprag.Translator:
        """A freshly initialised translator for this model's LoRA shapes, as `translator` configures it."""
        tc = self.config.translator
        shapes = self.lora_model.shapes(self.config.lora.rank)
        dim = self.llm.model.config.hidden_size
        return dyprag.Translator(shapes, dim, tc.hidden, tc.init_std, tc.seed).to(self.llm.device)

    def translator_examples(self, passages: list[Passage]) -> list[dyprag.Example]:
        """The documents as the translator trains on them: each with its own training sequences only (locality
        probes hold nothing of it for the translator to learn)."""
        return [dyprag.Example(p, [s for s in self.training_sequences(p) if s.teacher is None]) for p in passages]

    def translate(self, batch: list[Prepared]) -> None:
        """Generate the LoRAs of the rows' `translate` documents (all those not cached, in one forward pass) and
        merge each row's. Runs where the model is free of injected LoRAs, as the embedding must be the base model's."""
        pending = [p for p in batch if p.translate]
        if not pending:
            return
        t = time.perf_counter()
        translator = self.translator.to(self.llm.device)
        if translator.shapes != self.lora_model.shapes(self.config.lora.rank):
            raise ValueError(f"{self.translator_path}: its LoRA shapes do not match this model's")
        documents = list({p.id: p for prepared in pending for p in prepared.translate}.values())
        generated = {p.id: adapter for p in documents if (adapter := self.generated.get(p)) is not None}
        fresh = [p for p in documents if p.id not in generated]
        if fresh:
            for p, adapter in zip(
                fresh, translator.adapters(self.llm, fresh, self.config.train.max_length), strict=True
            ):
                generated[p.id] = adapter
                self.generated.put(p, adapter)
        for prepared in pending:
            adapters = [generated[p.id] for p in prepared.translate]
            if self.config.translator.merge == "mean":  # DyPRAG's: the factors averaged, then as one document's
                adapters = [lora.average(adapters)]
            prepared.adapter = self.merge(adapters)
        seconds = time.perf_counter() - t
        for prepared in pending:  # one pass for the batch: each row's load+merge is the pass's time
            prepared.timings["translate"] = prepared.timings["load_merge"] = seconds

    def frozen_prefix(self) -> PrefixCache | None:
        """The prompt format's fixed start as a LoRA trained on a frozen prefix saw it (`answer.prefix =
        "frozen"`): read beside the format adapter only, computed once and shared by every row of every batch.
        As long as training froze it and no longer than the start of a prompt with passages, so that a row
        reads the same whichever modes share its batch. None if that start is too short to be worth it."""
        if self._frozen_prefix is None:
            trained = prompt_start(self.llm, self.format, reads_passages(self.config.train))
            length = min(trained, prompt_start(self.llm, self.format, with_passages=True))
            if length < MIN_SHARED_PREFIX:
                return None
            ids = self.format.chat_ids(self.llm, "A", [])[:length]
            if self.base_adapter is not None:
                self.lora_model.inject(self.base_adapter, self.config.lora.scale)
            try:
                self._frozen_prefix = self.llm.prefill(ids)
            finally:
                self.lora_model.clear()
        return self._frozen_prefix

    def generate(self, batch: list[Prepared]) -> list[Answer]:
        """Generate for prepared requests in one batched pass, each row with its own merged adapter.

        Rows may differ in mode, prompt length and adapter rank (zero-padded: exact); with greedy
        decoding in fp32 a row's answer is the one it gets alone (in bf16 another batch shape rounds
        differently and can flip a near-tie). One request injects its adapter as is.
        The dyprag rows' LoRAs are generated first, here: in a service this is the thread that owns the model.
        """
        if not batch:
            return []
        self.translate(batch)
        if len(batch) == 1:
            adapter = batch[0].adapter
        else:
            adapter = lora.stack_padded([p.adapter for p in batch])
        t = time.perf_counter()
        clock: dict = {}
        with self.llm.phase("generate"):  # injected in the generation dtype (machine.py), not converted per step
            prefix = None
            if adapter is not None and self.config.answer.prefix == "frozen":
                prefix = self.frozen_prefix()
                # a question whose first characters merge into the start's last token (none seen) reads it all
                if prefix is not None and any(p.prompt[: len(prefix.ids)] != prefix.ids for p in batch):
                    prefix = None
            if adapter is not None:
                self.lora_model.inject(adapter, self.config.lora.scale)
            try:
                texts = self.llm.generate(
                    [p.prompt for p in batch],
                    self.config.answer.max_new_tokens,
                    stop=self.format.done,
                    clock=clock,
                    prefix=prefix,
                )
            finally:
                if adapter is not None:
                    self.lora_model.clear()
        generation = time.perf_counter() - t
        answers = []
        for row, (prepared, text) in enumerate(zip(batch, texts, strict=True)):
            timings = dict(prepared.timings, generation=generation)
            timings["first_token"] = clock.get("first_token", generation)
            answer = Answer(
                prepared.question,
                prepared.mode,
                text.strip(),
                self.format.extract(text),
                prepared.passages,
                timings,
                prepared.lora_passages,
            )
            answer.new_tokens = int(clock["row_new_tokens"][row]) if "row_new_tokens" in clock else 0
            answer.missing, answer.scores = prepared.missing, prepared.scores
            answer.prompt_tokens = len(prepared.prompt)
            answers.append(answer)
        return answers


def load_warmup_adapter(path: str, kind: str, config: LoRAConfig, shapes: dict[str, tuple[int, ...]]) -> lora.Adapter:
    """A `prag warmup` adapter (`lora.init` or `lora.base`), ready to inject at `config.scale`.

    Its B factors take the ratio of the scale it was trained at (recorded in the file; a file without it is
    taken at this one) to this one, so its delta is the one it learned whatever rank or alpha the documents'
    LoRAs use. A format adapter (`base`) may cover fewer projections than the documents' LoRAs: rank-0 factors
    stand in for the rest. A warm-up start (`init`) is where every document's training begins, so it must have
    their rank and projections. `shapes`: the documents' tensors at `config.rank` (`LoRAModel.shapes`)."""
    where = f"lora.{kind}={path!r}"
    with safe_open(path, framework="pt") as f:  # tensors and the recorded scale in one read
        adapter = {key: f.get_tensor(key).float() for key in f.keys()}
        trained_scale = (f.metadata() or {}).get("scale")
    modules = sorted({key.rsplit(".", 1)[0] for key in adapter})
    if not modules or set(adapter) != {f"{m}.{f}" for m in modules for f in "AB"}:
        raise ValueError(f"{where}: not a LoRA adapter (an A and a B per projection); it holds {sorted(adapter)}")
    extra = [m for m in modules if m not in config.target_modules]
    if extra:
        raise ValueError(f"{where}: trained on {extra}, which lora.target_modules {list(config.target_modules)} lacks")
    for key, tensor in adapter.items():
        rank_dim = 1 if key.endswith(".A") else 2  # (L, r, in) and (L, out, r)
        if tensor.dim() != 3 or [d for i, d in enumerate(tensor.shape) if i != rank_dim] != [
            d for i, d in enumerate(shapes[key]) if i != rank_dim
        ]:
            raise ValueError(
                f"{where}: {key} has shape {tuple(tensor.shape)}, where this model's LoRAs have {shapes[key]} "
                "(the rank aside): an adapter of another model?"
            )
    if kind == "init":
        rank = adapter[f"{modules[0]}.A"].shape[1]
        if modules != sorted(config.target_modules) or rank != config.rank:
            raise ValueError(
                f"{where}: every document's LoRA starts from it, so it needs lora.rank={config.rank} on "
                f"{sorted(config.target_modules)}; it has rank {rank} on {modules}"
            )
    if trained_scale is not None and float(trained_scale) != config.scale:
        ratio = float(trained_scale) / config.scale
        adapter = {k: v * ratio if k.endswith(".B") else v for k, v in adapter.items()}
    for name in config.target_modules:  # projections the format adapter leaves alone
        if f"{name}.A" not in adapter:
            layers, _, n_in = shapes[f"{name}.A"]
            adapter[f"{name}.A"] = torch.zeros(layers, 0, n_in)
            adapter[f"{name}.B"] = torch.zeros(layers, shapes[f"{name}.B"][1], 0)
    return adapter


def content_words(text: str) -> set[str]:
    """Stemmed words without English stopwords: what `question_match` compares."""
    words = [w for w in re.findall(r"\w+", text.lower()) if w not in STOPWORDS_EN_PLUS]
    return set(_STEMMER.stemWords(words))


def question_match(question: str, stored_questions: list[str]) -> float:
    """The largest share of the question's content words that one stored question holds (0 to 1); 1 when
    the question has no content words (nothing to weigh by). "When was Arthur's Magazine started?" holds
    3 of the 5 of "Which magazine was started first, Arthur's Magazine or First for Women?"."""
    wanted = content_words(question)
    if not wanted:
        return 1.0
    return max((len(wanted & content_words(q)) / len(wanted) for q in stored_questions), default=0.0)


def check_question(question: object, top_k: object = None, default_top_k: int = 3) -> int:
    """Reject what would waste a generation or fail deep inside; returns the checked top-k.

    The one place these limits live: the library, the CLI and the service all answer bad input
    with these messages, each starting with the field it is about.
    """
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question: must be a non-empty string")
    if len(question) > MAX_QUESTION_CHARS:
        raise ValueError(f"question: {len(question)} characters, at most {MAX_QUESTION_CHARS}")
    k = default_top_k if top_k is None else top_k
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_TOP_K:
        raise ValueError(f"top_k: {k!r} is out of range, expected an integer from 1 to {MAX_TOP_K}")
    return k
