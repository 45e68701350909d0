"""Turning documents into LoRAs: training sequences from the augmentation, then batched training.

Training follows the reference recipe (per document: batch size 1, AdamW, one
pass over its sequences) but runs many documents in one forward/backward pass:
example j of the batch is the current sequence of document j and sees only
document j's LoRA (per-example A/B, see `lora.py`). The loss is the SUM of the
documents' own mean token losses, so each document's gradient is exactly what
it would get alone, and `BatchedAdamW` updates a document only on steps where
it had a sequence. A step groups sequences of similar length (documents whose
next sequence is much shorter wait for a later step), padded to the longest of
them, never to a fixed length; with causal attention, right padding never
changes the real tokens, so no attention mask is needed.

With `train.prefix = "frozen"` (the default) the prompt format's own leading tokens, which every sequence
starts with whatever its question and passages (the chat header and the instruction: most of a sequence under
PopQA's protocol), are computed once per group by the model without the documents' LoRAs, and every step runs
only the tokens after them on top of those keys and values. That start is fixed by the format, not by which
documents share a group, so a document gets the same LoRA in any batch.

Context distillation (`train.objective = "distill"`) swaps the loss: for each
generated question, the model without the passage (and with the document's
LoRA) is trained to match, token by token over the answer, the distribution of
the frozen model that reads the passage (KL(teacher || student)). Teacher
distributions are computed once per document group, before training.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from .augment import Augmentation
from .config import LoRAConfig, TrainConfig
from .corpus import Passage
from .llm import LLM, MIN_SHARED_PREFIX, shared_prefix
from .locality import locality_probes
from .lora import Adapter, LoRAModel, find_decoder_layers, init_adapter
from .prompt import AnswerFormat

IGNORE = -100
MAX_PADDING = 0.25  # a training step pads its sequences by at most this fraction of their length
# train.compile=auto compiles from this many documents on: compiling costs ~30 s per process on the
# benchmark's 2-core CPU and saves ~0.4 s per document there (docs/performance.md)
COMPILE_MIN_DOCS = 100


@dataclass
class Sequence:
    input_ids: list[int]
    labels: list[int]
    # distillation only: the same reply, labelled, after a prompt that holds the passage (the teacher's input)
    teacher: Sequence | None = None
    # how many leading tokens are the prompt format's own (`prompt_start`), the same whatever the question
    # and passages, and for every document under one config: what `train.prefix = "frozen"` may compute
    # without the LoRA (0: none, e.g. plain text)
    fixed: int = 0


def training_sequences(
    llm: LLM, passage: Passage, augmentation: Augmentation, train: TrainConfig, fmt: AnswerFormat
) -> list[Sequence]:
    """The reference's layout: the first half of the QA pairs with the passage and with each rewrite
    in the prompt, the rest with the question alone (`train.qa_context` changes that); the reply is the
    format's (`AnswerFormat.reply`).

    For distillation: every QA pair once, the question alone for the student and with the passage
    for the teacher, the reply (the generated answer) being where the two distributions are compared.
    A sequence with nothing left to learn (its prompt alone over `train.max_length`) is dropped, never
    trained as a zero-loss step (which would still decay the weights).

    `train.locality` adds that many probe questions about other subjects (`locality.py`), asked alone or
    with the passage (`train.locality_context`) and distilled from the frozen model itself, so that the
    LoRA leaves their answers as they were.
    """
    start = prompt_start(llm, fmt, reads_passages(train))  # the same for every sequence of every document
    own = [passage.contents]
    contexts = {"alone": [[]], "passage": [own], "both": [[], own]}[train.locality_context]
    probes = [
        _locality_sequence(llm, fmt, q, a, context, train, start)
        for q, a in locality_probes(passage.id, train.locality)
        for context in contexts
    ]
    if train.objective == "distill":
        sequences = []
        for qa in augmentation.qa:
            reply = _reply_ids(llm, fmt, qa)
            student = _prompt_ids(llm, fmt, qa["question"], [], train.max_length - len(reply))
            reading = _prompt_ids(llm, fmt, qa["question"], [passage.contents], train.max_length - len(reply))
            teacher = Sequence(reading + reply, _labels(reading, reply, "answer"))
            sequences.append(Sequence(student + reply, _labels(student, reply, "answer"), teacher, start))
        return [s for s in sequences + probes if _trainable(s, train.max_length)]
    texts = [passage.contents] + augmentation.rewrites
    sequences = []
    if train.document_lm:  # the passage and its rewrites as plain text, every token a label
        for text in texts:
            ids = llm.tokenizer.encode(text, add_special_tokens=False)[: train.max_length]
            sequences.append(Sequence(ids, list(ids)))
    for i, qa in enumerate(augmentation.qa):
        in_context, alone = qa_layout(i, len(augmentation.qa), train)
        contexts = ([[t] for t in texts] if in_context else []) + ([[]] if alone else [])
        reply = _reply_ids(llm, fmt, qa)
        if train.loss_on == "grounded":
            reply_labels = _grounded(llm, reply, passage.contents)
        for context in contexts:
            prompt = _prompt_ids(llm, fmt, qa["question"], context, train.max_length - len(reply))
            ids = (prompt + reply)[: train.max_length]
            labels = [IGNORE] * len(prompt) + reply_labels if train.loss_on == "grounded" else None
            labels = (labels or _labels(prompt, reply, train.loss_on))[: len(ids)]
            sequences.append(Sequence(ids, labels, fixed=start))
    return [s for s in sequences + probes if _trainable(s, train.max_length)]


def _locality_sequence(
    llm: LLM,
    fmt: AnswerFormat,
    question: str,
    answer: str,
    context: list[str],
    train: TrainConfig,
    start: int,
) -> Sequence:
    """A probe (alone, or with the document's passage in the prompt as `combine` asks); its teacher is the
    same sequence, so the loss is KL to the model without the LoRA at every reply token (the reply only
    carries the teacher forcing)."""
    reply = _reply_ids(llm, fmt, {"answer": answer, "full_answer": answer})
    prompt = _prompt_ids(llm, fmt, question, context, train.max_length - len(reply))
    labels = _labels(prompt, reply, "answer")
    return Sequence(prompt + reply, labels, teacher=Sequence(prompt + reply, labels), fixed=start)


def qa_layout(i: int, pairs: int, train: TrainConfig) -> tuple[bool, bool]:
    """Whether QA pair i of `pairs` is trained with the passage (and each rewrite) in the prompt, and alone."""
    first_half = i < (pairs + 1) // 2
    return first_half and train.qa_context != "none", not first_half or train.qa_context != "reference"


def _grounded(llm: LLM, reply: list[int], source: str) -> list[int]:
    """Labels for a reply that keep only the tokens whose words occur in the source passage: the facts the
    passage states, not the connecting words or what the augmenting model made up."""
    words = set(re.findall(r"\w+", source.lower()))
    labels = []
    for token in reply:
        pieces = re.findall(r"\w+", llm.tokenizer.decode([token]).lower())
        # a word piece counts if it is a word of the passage or a prefix/suffix of one (sub-word tokens)
        grounded = bool(pieces) and all(any(w.startswith(x) or w.endswith(x) for w in words) for x in pieces)
        labels.append(token if grounded else IGNORE)
    return labels


def warmup_sequences(
    llm: LLM, question: str, gold_answer: str, gold: list[Passage], train: TrainConfig, fmt: AnswerFormat
) -> list[Sequence]:
    """A held-in question for the warm-up LoRA: with its gold passages in the prompt and alone,
    both replying with the gold answer in the format every mode's answer is read from."""
    reply = _reply_ids(llm, fmt, {"answer": gold_answer})
    start = prompt_start(llm, fmt, with_passages=True)
    sequences = []
    for context in ([p.contents for p in gold], []) if gold else ([],):
        prompt = _prompt_ids(llm, fmt, question, context, train.max_length - len(reply))
        sequences.append(Sequence(prompt + reply, _labels(prompt, reply, train.loss_on), fixed=start))
    return [s for s in sequences if _trainable(s, train.max_length)]


def _reply_ids(llm: LLM, fmt: AnswerFormat, qa: dict) -> list[int]:
    return llm.tokenizer.encode(fmt.reply(qa["answer"], qa.get("full_answer", "")), add_special_tokens=False)


def reads_passages(train: TrainConfig) -> bool:
    """Whether any training prompt under this config holds a passage (so its fixed start ends before one)."""
    return (train.objective != "distill" and train.qa_context != "none") or (
        train.locality > 0 and train.locality_context != "alone"
    )


def prompt_start(llm: LLM, fmt: AnswerFormat, with_passages: bool) -> int:
    """How many leading tokens every prompt of this format starts with, whatever its question (chat header,
    system prompt, instruction, worked turns, what comes before the question), among prompts without passages
    only or with and without them: prompts that differ in the question (and passage) share just that."""
    prompts = [fmt.chat_ids(llm, "A", []), fmt.chat_ids(llm, "Z", [])]
    if with_passages:
        prompts += [fmt.chat_ids(llm, "A", ["x"]), fmt.chat_ids(llm, "Z", ["y"])]
    return len(shared_prefix(prompts))


def _prompt_ids(llm: LLM, fmt: AnswerFormat, question: str, context: list[str], room: int) -> list[int]:
    """The chat prompt (user turn + assistant prefix) for a question; if it is longer than `room` tokens,
    the context passage is shortened to fit (the question, instruction and reply stay whole)."""
    prompt = fmt.chat_ids(llm, question, context)
    if len(prompt) <= room or not context:
        return prompt
    words = llm.tokenizer.encode(context[0], add_special_tokens=False)
    keep = max(len(words) - (len(prompt) - room) - 8, 0)  # a few tokens' slack: re-tokenizing may differ
    return fmt.chat_ids(llm, question, [llm.tokenizer.decode(words[:keep])])


@dataclass
class FrozenPrefix:
    """The keys and values of the prompt format's leading tokens, which every sequence of a training group
    starts with, computed once by the model without the documents' LoRAs (`train.prefix = "frozen"`)."""

    length: int
    cache: DynamicCache  # batch size 1

    @classmethod
    def compute(cls, llm: LLM, sequences: list[Sequence]) -> FrozenPrefix | None:
        """None when that start is shorter than MIN_SHARED_PREFIX tokens. The prefix is at most each sequence's
        `fixed` start (so it does not depend on which documents share the group) and ends before the token
        that predicts the first label, so every label is predicted from a position the LoRA runs on."""
        ids = cls.tokens(sequences)
        return None if ids is None else cls.read(llm, ids)

    @staticmethod
    def tokens(sequences: list[Sequence]) -> list[int] | None:
        """The prefix's token ids (see `compute`), or None."""
        if not sequences:
            return None
        common = shared_prefix([s.input_ids for s in sequences])
        first_label = min(1 + next(i for i, x in enumerate(s.labels[1:]) if x != IGNORE) for s in sequences)
        length = min(len(common), first_label - 1, min(s.fixed for s in sequences))
        return common[:length] if length >= MIN_SHARED_PREFIX else None

    @classmethod
    @torch.no_grad()
    def read(cls, llm: LLM, ids: list[int]) -> FrozenPrefix:
        """The model's keys and values for `ids`, with whatever LoRAs are injected now."""
        cache = DynamicCache(config=llm.model.config)
        llm.model.model(input_ids=torch.tensor([ids], device=llm.device), cache=cache, use_cache=True)
        return cls(len(ids), cache)

    def expand(self, batch: int) -> DynamicCache:
        """A cache holding the prefix for `batch` rows (views, not copies: a step appends to new tensors)."""
        cache = DynamicCache()
        for i, layer in enumerate(self.cache.layers):
            cache.update(layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1), i)
        return cache


def _trainable(sequence: Sequence, max_length: int) -> bool:
    return len(sequence.input_ids) <= max_length and any(label != IGNORE for label in sequence.labels[1:])


def _labels(prompt: list[int], reply: list[int], loss_on: str) -> list[int]:
    """Labels of prompt + reply: every token ("all", the reference) or the reply only ("answer")."""
    return prompt + reply if loss_on == "all" else [IGNORE] * len(prompt) + reply


class BatchedAdamW:
    """AdamW over parameters stacked along dim 1 (documents), stepping only the active documents.

    Adam is elementwise, so one stacked tensor gives each document exactly the update that
    torch.optim.AdamW would give it alone, provided idle documents are left untouched (a plain
    optimizer would still move them with their momentum).
    """

    def __init__(self, params: list[torch.Tensor], lr: float, weight_decay: float, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lr, self.wd, self.betas, self.eps = params, lr, weight_decay, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.steps = torch.zeros(params[0].shape[1], device=params[0].device)

    @torch.no_grad()
    def step(self, active: torch.Tensor) -> None:
        b1, b2 = self.betas
        self.steps += active.float()
        t = self.steps.clamp(min=1)
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            shape = (1, -1) + (1,) * (p.dim() - 2)
            on = active.view(shape)
            g = p.grad
            m.copy_(torch.where(on, b1 * m + (1 - b1) * g, m))
            v.copy_(torch.where(on, b2 * v + (1 - b2) * g * g, v))
            step_size = (self.lr / (1 - b1**t)).view(shape)
            denom = (v.sqrt() / (1 - b2**t).sqrt().view(shape)) + self.eps
            decayed = p * (1 - self.lr * self.wd)
            p.copy_(torch.where(on, decayed - step_size * m / denom, p))
            p.grad = None


def train_adapters(
    llm: LLM,
    lora_model: LoRAModel,
    documents: list[list[Sequence]],
    lora: LoRAConfig,
    train: TrainConfig,
    initial: Adapter | None = None,
    show_progress: bool = True,
    base: Adapter | None = None,
) -> list[Adapter]:
    """One trained adapter per document (given as its training sequences), in input order.

    `base`, a fixed adapter (the format adapter, `lora.base`), is applied beside every document's LoRA
    and is not trained: the documents learn what it does not already provide.
    """
    shapes = lora_model.shapes(lora.rank)
    initial = initial if initial is not None else init_adapter(shapes, lora.init_seed)
    results: list[Adapter] = []
    total_steps = sum(len(seqs) * train.epochs for seqs in documents)
    bar = tqdm(total=total_steps, desc="train", unit="seq", disable=not show_progress)
    with llm.phase("train"):  # the training dtype measured for this machine, and its threads (machine.py)
        for start in range(0, len(documents), train.docs_per_batch):
            group = documents[start : start + train.docs_per_batch]
            results += _train_group(llm, lora_model, group, lora, train, initial, bar, base)
    bar.close()
    return results


def _train_group(llm, lora_model, group, lora, train, initial, bar, base=None) -> list[Adapter]:
    n = len(group)
    device = llm.device
    fixed = {k: v.to(device, torch.float32) for k, v in base.items()} if base is not None else None
    # fp32 master weights, one slice per document, all starting from the same initialization
    params = {
        k: v.to(device, torch.float32).unsqueeze(1).repeat(1, n, *[1] * (v.dim() - 1)) for k, v in initial.items()
    }
    for p in params.values():
        p.requires_grad_(True)
    optimizer = BatchedAdamW(list(params.values()), lr=train.lr, weight_decay=train.weight_decay)
    schedules = [seqs * train.epochs for seqs in group]
    # the teacher is the model every mode answers with: the fixed base adapter in, no document's LoRA
    if fixed is not None:
        lora_model.inject(fixed, lora.scale)
    every = [s for seqs in group for s in seqs]
    try:
        teacher = _teacher_log_probs(llm, every)
        frozen = FrozenPrefix.compute(llm, every) if train.prefix == "frozen" else None
    finally:
        lora_model.clear()
    done = [0] * n  # how many of its sequences each document has trained on
    try:
        while True:
            # Each step takes the longest next sequence and every document whose next one is nearly as
            # long: padding stays under MAX_PADDING; the others wait (their optimizer state untouched).
            pending = {j: len(schedules[j][done[j]].input_ids) for j in range(n) if done[j] < len(schedules[j])}
            if not pending:
                break
            longest = max(pending.values())
            chosen = [j for j, length in pending.items() if length * (1 + MAX_PADDING) >= longest]
            chosen = chosen[: max(1, train.max_tokens_per_step // longest)]  # activation memory stays bounded
            active = torch.zeros(n, dtype=torch.bool)
            active[chosen] = True
            rows = torch.tensor(chosen)
            batch = [schedules[j][done[j]] for j in chosen]
            lora_model.inject(_with_base({k: p[:, rows] for k, p in params.items()}, fixed), lora.scale)
            loss = sequence_losses(llm, batch, teacher, frozen).sum()
            loss.backward()
            optimizer.step(active.to(device))
            for j in chosen:
                done[j] += 1
            bar.update(len(batch))
    finally:
        lora_model.clear()
    return [{k: p[:, j].detach().to("cpu").clone() for k, p in params.items()} for j in range(n)]


def _with_base(batched: Adapter, fixed: Adapter | None) -> Adapter:
    """Per-example adapters (L, batch, ...) with the fixed base adapter beside each one: concatenated
    along the rank, so each example's delta is the base's plus its own (gradients reach only its own)."""
    if fixed is None:
        return batched
    out = {}
    for key, p in batched.items():
        base = fixed[key].unsqueeze(1).expand(-1, p.shape[1], *fixed[key].shape[1:])
        out[key] = torch.cat([base, p], dim=2 if key.endswith(".A") else 3)
    return out


def should_compile(train: TrainConfig, num_documents: int, device: torch.device) -> bool:
    """train.compile as a decision: "auto" compiles for big enough jobs where a compiler is at hand, and not
    on a frozen prefix: layers that read a KV cache recompile per layer index (one graph per layer, past
    torch's recompile limit), which costs more than the fusion saves."""
    if train.compile != "auto":
        return train.compile == "on"
    if train.prefix == "frozen":
        return False
    if device.type == "cuda":
        have_compiler = importlib.util.find_spec("triton") is not None
    else:
        have_compiler = any(shutil.which(cxx) for cxx in ("g++", "clang++"))
    return num_documents >= COMPILE_MIN_DOCS and have_compiler


@contextmanager
def compiled_decoder(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run the decoder layers through torch.compile inside the block (training), eager outside it.

    Every layer has the same code, so one compiled graph (per input shape class) serves all of them:
    it fuses the norms, rotary embedding, activation and LoRA adds around the matmuls. Generation
    keeps the eager layers: its KV cache would make the compiled graphs recompile per length.
    """
    if not enabled:
        yield
        return
    layers = find_decoder_layers(model)
    eager = list(layers)
    for i, layer in enumerate(eager):
        layers[i] = torch.compile(layer, dynamic=True)
    try:
        yield
    finally:
        for i, layer in enumerate(eager):
            layers[i] = layer


@torch.no_grad()
def _teacher_log_probs(llm: LLM, sequences: list[Sequence], batch_size: int = 8) -> dict[int, torch.Tensor]:
    """For sequences with a teacher (distillation, locality probes): the frozen model's log-probabilities
    over each reply token of the teacher's input. Keyed by id(sequence); empty when none has one."""
    todo = [s for s in sequences if s.teacher is not None]
    out: dict[int, torch.Tensor] = {}
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        logits, _, rows, _ = label_logits(llm, [s.teacher for s in chunk])
        log_probs = F.log_softmax(logits, dim=-1)
        for row, s in enumerate(chunk):
            out[id(s)] = log_probs[rows == row]
    return out


def sequence_losses(
    llm: LLM, batch: list[Sequence], teacher: dict[int, torch.Tensor] | None = None, prefix: FrozenPrefix | None = None
) -> torch.Tensor:
    """Each sequence's mean loss over its labelled tokens (like HF's loss at batch size 1): next-token
    cross-entropy, or KL(teacher || model) for sequences that have teacher distributions."""
    logits, targets, rows, counts = label_logits(llm, batch, prefix)
    token_loss = F.cross_entropy(logits, targets, reduction="none")
    if teacher:
        distilled = torch.tensor([id(s) in teacher for s in batch], device=llm.device)[rows]
        if distilled.any():
            t = torch.cat([teacher[id(s)] for s in batch if id(s) in teacher])
            kl = (t.exp() * (t - F.log_softmax(logits[distilled], dim=-1))).sum(-1)
            token_loss = token_loss.masked_scatter(distilled, kl)
    per_row = torch.zeros(len(batch), device=llm.device).index_add(0, rows, token_loss)
    return per_row / counts.clamp(min=1)


def label_logits(llm: LLM, batch: list[Sequence], prefix: FrozenPrefix | None = None) -> tuple[torch.Tensor, ...]:
    """Float logits at the positions that predict a label (in order), those labels, their row in the
    batch, and the number of labels per row. Only those positions go through the (large) vocabulary projection.
    With a `prefix` (which every sequence of the batch starts with), only the tokens after it are run."""
    width = max(len(s.input_ids) for s in batch)
    ids = torch.full((len(batch), width), llm.pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for row, s in enumerate(batch):
        ids[row, : len(s.input_ids)] = torch.tensor(s.input_ids)
        labels[row, : len(s.labels)] = torch.tensor(s.labels)
    ids, labels = ids.to(llm.device), labels.to(llm.device)
    # Right padding only: causal attention keeps real tokens from seeing the padding, so no mask
    # (which would also cost the fused causal attention kernel).
    if prefix is None:
        hidden = llm.model.model(input_ids=ids, use_cache=False).last_hidden_state
    else:  # the rest of each sequence on top of the prefix's keys and values; no label lies in the prefix
        start = prefix.length
        positions = torch.arange(start, width, device=llm.device).expand(len(batch), -1)
        run = llm.model.model(input_ids=ids[:, start:], position_ids=positions, cache=prefix.expand(len(batch)))
        hidden, labels = run.last_hidden_state, labels[:, start:]
    targets = labels[:, 1:]
    keep = targets != IGNORE
    logits = llm.model.lm_head(hidden[:, :-1][keep]).float()
    return logits, targets[keep], keep.nonzero()[:, 0], keep.sum(1)
