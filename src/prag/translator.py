"""DyPRAG's parameter translator: a document's LoRA from one forward pass, instead of augmentation and training.

Dynamic Parametric RAG (Tan et al. 2025, arXiv 2503.23895) learns once a map from a document to the LoRA
that parameterization would train for it:

    e = the frozen model's last-layer hidden state at the document's last token     (one forward pass)
    for every target module m and layer l:   A[m, l] = MLP_A[m, l](e),   B[m, l] = MLP_B[m, l](e)

Each MLP is Linear(hidden size -> translator.hidden), ReLU, Linear(-> the tensor's elements), one per
(module, layer, A or B); here the MLPs of one tensor name are stacked over layers, so that a forward is two
einsums. The first linear has a bias: a learned input of its own layer, what the reference's extra input
(the layer index appended to e, a constant per layer) amounts to. The output is an adapter in the stored
format ({"gate_proj.A": (L, r, in), ...}), so generated LoRAs merge and inject through the same code as
trained ones.

Training pairs are (document, its trained LoRA from the adapter store); a step takes one document:

    loss = lm_weight  * LM loss of the document's training sequences under the generated LoRA
         + kl_weight  * KL(model under the trained LoRA || model under the generated LoRA), on the same tokens
         + mse_weight * squared error to the trained LoRA, summed over (module, layer, A/B) of the mean per tensor

with the paper's weights 1, 0.01 and 100, AdamW at lr 1e-5, one epoch, documents in a seeded random order.
The LM and KL terms are each sequence's mean over its labelled tokens, averaged over the sequences (the
reference sums its KL over every position of a sequence padded to 3,000 tokens). With `train.prefix = "frozen"`
(the default) the sequences' fixed start is read once per document without any document's LoRA, as the trained
LoRAs were trained on it, and both LoRAs run from there on; this also spares the gradients through the prompt
format (most of a chain-of-thought sequence is its few-shot prompt). A checkpoint every
`translator.checkpoint_every` documents lets an interrupted run resume where it stopped.
"""

from __future__ import annotations

import json
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from . import lora
from .atomic import atomic_write
from .config import TranslatorConfig
from .corpus import Passage
from .llm import LLM
from .lora import Adapter, LoRAModel
from .parameterize import FrozenPrefix, Sequence, label_logits

LOSSES = ("lm", "kl", "mse")


class Head(nn.Module):
    """The MLPs that make one tensor (say gate_proj.A) of every layer: a two-layer MLP per layer, stacked."""

    def __init__(self, shape: tuple[int, ...], dim: int, hidden: int, init_std: float, generator: torch.Generator):
        super().__init__()
        layers, *self.shape = shape  # (L, r, in) or (L, out, r): one MLP per layer, each making an (r, in) tensor
        size = self.shape[0] * self.shape[1]
        self.w1 = nn.Parameter(torch.randn(layers, dim, hidden, generator=generator) * init_std)
        self.b1 = nn.Parameter(torch.randn(layers, hidden, generator=generator) * init_std)  # the per-layer input
        self.w2 = nn.Parameter(torch.randn(layers, hidden, size, generator=generator) * init_std)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        """Document embeddings (n, dim) -> this tensor for every layer and document, (L, n, *shape)."""
        h = F.relu(torch.einsum("nd,ldh->lnh", e, self.w1) + self.b1[:, None])
        out = torch.einsum("lnh,lho->lno", h, self.w2)
        return out.view(out.shape[0], out.shape[1], *self.shape)


class Translator(nn.Module):
    """Document embedding -> LoRA. `shapes` are one document's adapter shapes (`LoRAModel.shapes(rank)`)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], dim: int, hidden: int = 32, init_std: float = 1e-7, seed=0):
        super().__init__()
        self.shapes = {key: tuple(shape) for key, shape in shapes.items()}
        self.dim, self.hidden = dim, hidden
        generator = torch.Generator().manual_seed(seed)
        # module names may not hold dots: "gate_proj.A" is the head "gate_proj_A"
        self.heads = nn.ModuleDict(
            {key.replace(".", "_"): Head(shape, dim, hidden, init_std, generator) for key, shape in self.shapes.items()}
        )

    @property
    def architecture(self) -> dict:
        return {"shapes": {k: list(v) for k, v in self.shapes.items()}, "dim": self.dim, "hidden": self.hidden}

    def forward(self, e: torch.Tensor) -> Adapter:
        """Embeddings (n, dim) -> one adapter per document, stacked on dim 1 as `lora.stack` does:
        {"gate_proj.A": (L, n, r, in), "gate_proj.B": (L, n, out, r), ...}."""
        return {key: self.heads[key.replace(".", "_")](e) for key in self.shapes}

    @torch.no_grad()
    def adapters(self, llm: LLM, passages: list[Passage], max_length: int = 2048) -> list[Adapter]:
        """The generated LoRA of each passage: one batched forward pass of the model, then the MLPs.
        No LoRA may be injected into the model meanwhile (the embedding is the base model's)."""
        stacked = self(embed(llm, [p.contents for p in passages], max_length).to(self.device))
        return [{key: value[:, i] for key, value in stacked.items()} for i in range(len(passages))]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


@torch.no_grad()
def embed(llm: LLM, texts: list[str], max_length: int = 2048, batch_size: int = 8) -> torch.Tensor:
    """The frozen model's last-layer hidden state (after its final norm) at each text's last token, (n, dim), float.

    Texts are tokenized as the reference does (with the tokenizer's special tokens, the first `max_length`
    tokens kept) and right-padded in batches: with causal attention a row's real tokens never see its padding.
    """
    ids = [llm.tokenizer.encode(text)[:max_length] for text in texts]
    if any(not row for row in ids):
        raise ValueError("embed: a document tokenizes to nothing")
    out = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        batch = torch.full((len(chunk), max(map(len, chunk))), llm.pad_id, dtype=torch.long)
        for row, tokens in enumerate(chunk):
            batch[row, : len(tokens)] = torch.tensor(tokens)
        hidden = llm.model.model(input_ids=batch.to(llm.device), use_cache=False).last_hidden_state
        last = torch.tensor([len(tokens) - 1 for tokens in chunk], device=hidden.device)
        out.append(hidden[torch.arange(len(chunk), device=hidden.device), last].float())
    return torch.cat(out)


# -- training ---------------------------------------------------------------------------------------------


@dataclass
class Example:
    """A training document: its passage and its augmented training sequences (`parameterize.training_sequences`)."""

    passage: Passage
    sequences: list[Sequence]


def train(
    llm: LLM,
    lora_model: LoRAModel,
    translator: Translator,
    examples: list[Example],
    target: Callable[[str], Adapter],
    cfg: TranslatorConfig,
    scale: float,
    base: Adapter | None = None,
    checkpoint: Path | None = None,
    max_length: int = 2048,
    show_progress: bool = True,
    prefix: str = "lora",
) -> dict:
    """Train `translator` on (document, trained LoRA) pairs; `target(doc_id)` is the trained LoRA.

    `base`, the format adapter (`lora.base`) beside which documents' LoRAs were trained, is injected beside
    the generated and the trained LoRA alike. With `checkpoint`, the state is saved there every
    `cfg.checkpoint_every` documents and a run of the same documents resumes from it. `prefix` is the trained
    LoRAs' `train.prefix`: "frozen" reads the sequences' fixed start without them. Returns what training
    did: documents, steps, seconds, and the per-step losses.
    """
    documents = [e.passage.id for e in examples]
    if not documents:
        raise ValueError("translator: no training documents")
    optimizer = torch.optim.AdamW(translator.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state: dict = {"step": 0, "seconds": 0.0, "losses": {name: [] for name in LOSSES}}
    if checkpoint is not None and checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True)
        if saved["documents"] != documents:
            raise ValueError(
                f"{checkpoint}: a checkpoint of another training run ({len(saved['documents'])} documents, "
                f"this one has {len(documents)}): rerun that command to resume it, or pass --restart"
            )
        translator.load_state_dict(saved["translator"])
        optimizer.load_state_dict(saved["optimizer"])
        state = {"step": saved["step"], "seconds": saved["seconds"], "losses": saved["losses"]}
    order = []
    for epoch in range(cfg.epochs):
        shuffled = list(examples)
        random.Random(f"{cfg.seed}-{epoch}").shuffle(shuffled)
        order += shuffled
    with_base = (lambda a: lora.merge([base, a])) if base is not None else (lambda a: a)
    if prefix not in ("lora", "frozen"):
        raise ValueError(f"translator: prefix {prefix!r} is neither 'lora' nor 'frozen'")
    bar = tqdm(total=len(order), initial=state["step"], desc="translator", unit="doc", disable=not show_progress)
    translator.train()
    prefixes: dict[tuple[int, ...], FrozenPrefix] = {}  # one protocol: the same fixed start for every document
    for step in range(state["step"], len(order)):
        t = time.perf_counter()
        example = order[step]
        frozen = None
        if prefix == "frozen":
            frozen = _frozen_prefix(llm, lora_model, example.sequences, base, scale, prefixes)
        losses = _step_losses(llm, lora_model, translator, example, target, cfg, scale, with_base, max_length, frozen)
        loss = cfg.lm_weight * losses["lm"] + cfg.kl_weight * losses["kl"] + cfg.mse_weight * losses["mse"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for name in LOSSES:
            state["losses"][name].append(round(losses[name].item(), 6))
        state["step"] = step + 1
        state["seconds"] += time.perf_counter() - t
        bar.update()
        bar.set_postfix({name: f"{state['losses'][name][-1]:.4g}" for name in LOSSES}, refresh=False)
        if checkpoint is not None and state["step"] % cfg.checkpoint_every == 0 and state["step"] < len(order):
            saved = {"documents": documents, "translator": translator.state_dict(), "optimizer": optimizer.state_dict()}
            atomic_write(checkpoint, lambda tmp, saved=saved: torch.save({**saved, **state}, tmp))
    bar.close()
    translator.eval()
    return {
        "documents": len(documents),
        "steps": len(order),
        "seconds": round(state["seconds"], 2),
        "losses": state["losses"],
    }


def _frozen_prefix(llm, lora_model, sequences, base, scale, read: dict) -> FrozenPrefix | None:
    """The sequences' fixed start as standard training reads it: beside the format adapter only. `read` keeps
    the prefixes already read, by their tokens (a few at most: every document of a protocol shares its start)."""
    ids = FrozenPrefix.tokens(sequences)
    if ids is None:
        return None
    key = tuple(ids)
    if key not in read:
        if len(read) >= 8:
            read.clear()
        try:
            if base is not None:
                lora_model.inject(base, scale)
            read[key] = FrozenPrefix.read(llm, ids)
        finally:
            lora_model.clear()
    return read[key]


def _step_losses(llm, lora_model, translator, example, target, cfg, scale, with_base, max_length, frozen) -> dict:
    """The three loss terms for one document (each a scalar tensor; zero where its weight is zero); with
    `frozen`, its sequences run from the end of that prefix."""
    e = embed(llm, [example.passage.contents], max_length).to(translator.device)
    generated = {key: value[:, 0] for key, value in translator(e).items()}
    trained = {key: value.to(translator.device, torch.float32) for key, value in target(example.passage.id).items()}
    zero = torch.zeros((), device=translator.device)
    # per (module, layer, A/B) tensor: its mean squared error; summed, as the reference sums over its tensors
    mse = sum((generated[k] - trained[k]).pow(2).flatten(1).mean(1).sum() for k in generated)
    lm = kl = zero
    if (cfg.lm_weight or cfg.kl_weight) and example.sequences:
        try:
            teacher = None
            if cfg.kl_weight:
                with torch.no_grad():
                    lora_model.inject(with_base(trained), scale)
                    teacher = F.log_softmax(label_logits(llm, example.sequences, frozen)[0], dim=-1)
            lora_model.inject(with_base(generated), scale)
            logits, targets, rows, counts = label_logits(llm, example.sequences, frozen)
            log_probs = F.log_softmax(logits, dim=-1)
            per_sequence = _per_sequence_mean(F.nll_loss(log_probs, targets, reduction="none"), rows, counts)
            lm = per_sequence.mean().to(zero.device)
            if teacher is not None:
                token_kl = (teacher.exp() * (teacher - log_probs)).sum(-1)
                kl = _per_sequence_mean(token_kl, rows, counts).mean().to(zero.device)
        finally:
            lora_model.clear()
    return {"lm": lm, "kl": kl, "mse": mse}


def _per_sequence_mean(token_values: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    summed = torch.zeros(len(counts), device=token_values.device).index_add(0, rows, token_values)
    return summed / counts.clamp(min=1)


# -- storage ----------------------------------------------------------------------------------------------


def nbytes(adapter: Adapter) -> int:
    """The bytes an adapter's tensors hold (their own elements, not the storage a view may share)."""
    return sum(t.numel() * t.element_size() for t in adapter.values())


class GeneratedCache:
    """The generated LoRAs of recently translated documents, least recently used dropped beyond `max_bytes`.

    Keyed by the document's id and text, so a document whose text changed is translated again. An evaluation
    asks for each document in several modes (its own question's, and another's control): once is enough.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[str, str], tuple[Adapter, int]] = OrderedDict()
        self.bytes = 0

    def get(self, passage: Passage) -> Adapter | None:
        key = (passage.id, passage.contents)
        if key not in self.entries:
            return None
        self.entries.move_to_end(key)
        return self.entries[key][0]

    def put(self, passage: Passage, adapter: Adapter) -> None:
        key, size = (passage.id, passage.contents), nbytes(adapter)
        if key in self.entries or size > self.max_bytes:
            return
        # a copy: the generated tensors are views into their whole batch's, which would stay alive otherwise
        self.entries[key] = ({name: tensor.clone() for name, tensor in adapter.items()}, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self.entries.popitem(last=False)
            self.bytes -= dropped

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


def save(translator: Translator, path: Path, info: dict) -> None:
    """The weights, the architecture and what trained it, in one safetensors file, written atomically."""
    tensors = {name: value.detach().cpu().contiguous() for name, value in translator.state_dict().items()}
    metadata = {"architecture": json.dumps(translator.architecture), "training": json.dumps(info)}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load(path: Path, device: torch.device | str = "cpu") -> tuple[Translator, dict]:
    """A saved translator and its training record."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "architecture" not in metadata:
        raise ValueError(f"{path}: not a translator file (no architecture in its metadata)")
    architecture = json.loads(metadata["architecture"])
    translator = Translator(architecture["shapes"], architecture["dim"], architecture["hidden"], init_std=0.0)
    translator.load_state_dict(load_file(str(path)))
    return translator.to(device).eval(), json.loads(metadata.get("training", "{}"))
