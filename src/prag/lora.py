"""The LoRA math, and nothing about documents.

A document's parameters are, for every targeted FFN projection of every layer, a
low-rank pair (A: r x in, B: out x r) whose delta to the weight is
`scale * B @ A`. We keep them as plain tensors, stacked over layers:

    adapter = {"gate_proj.A": (L, r, in), "gate_proj.B": (L, out, r), ...}

Summing k documents' deltas is exact by concatenating along the rank
dimension: [B_1 ... B_k] @ [A_1; ...; A_k] = sum_i B_i A_i. The projection then
computes `W x + scale * B (A x)` with the request's A/B (`LoRALinear.forward`),
so switching documents costs a few tensor assignments, never module surgery.
During batched training, A and B carry one more leading dimension, one slice
per example, so each sequence in a batch sees only its own document's LoRA.
"""

from __future__ import annotations

import math

import torch
from torch import nn

Adapter = dict[str, torch.Tensor]


class LoRALinear(nn.Module):
    """A frozen linear layer plus an optional low-rank delta held as plain tensors."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.A: torch.Tensor | None = None  # (r, in), or (batch, r, in) for one delta per example
        self.B: torch.Tensor | None = None  # (out, r), or (batch, out, r)
        self.scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.A is None:
            return y
        A, B = self.A.to(x.dtype), self.B.to(x.dtype)
        if A.dim() == 2:
            return y + self.scale * ((x @ A.T) @ B.T)
        # per-example deltas: x is (batch, tokens, in)
        return y + self.scale * torch.bmm(torch.bmm(x, A.transpose(1, 2)), B.transpose(1, 2))


# where each projection lives in a Llama/Qwen2/Mistral decoder layer (the paper targets the FFN only)
BLOCKS = {
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
}


class LoRAModel:
    """Handles to the LoRALinear layers put into a model's projections, by module name and layer."""

    def __init__(self, model: nn.Module, target_modules: tuple[str, ...]):
        self.target_modules = tuple(target_modules)
        self.layers: dict[str, list[LoRALinear]] = {name: [] for name in self.target_modules}
        for layer in find_decoder_layers(model):
            for name in self.target_modules:
                where = BLOCKS.get(name, "mlp")  # other names: a projection of the FFN
                block = getattr(layer, where)
                module = getattr(block, name, None)
                if not isinstance(module, (nn.Linear, LoRALinear)):
                    linears = [n for n, m in block.named_children() if isinstance(m, (nn.Linear, LoRALinear))]
                    raise ValueError(
                        f"lora.target_modules: {type(model).__name__}'s {where} ({type(block).__name__}) "
                        f"has no linear {name!r}; its linear projections are {linears}"
                    )
                if not isinstance(module, LoRALinear):
                    module = LoRALinear(module)
                    setattr(block, name, module)
                self.layers[name].append(module)

    @property
    def num_layers(self) -> int:
        return len(self.layers[self.target_modules[0]])

    def shapes(self, rank: int) -> dict[str, tuple[int, ...]]:
        """Shapes of one document's stacked adapter tensors at this rank."""
        shapes = {}
        for name, modules in self.layers.items():
            base = modules[0].base
            shapes[f"{name}.A"] = (len(modules), rank, base.in_features)
            shapes[f"{name}.B"] = (len(modules), base.out_features, rank)
        return shapes

    def inject(self, adapter: Adapter, scale: float) -> None:
        """Make every projection add `scale * B (A x)` with this adapter's tensors (views of them)."""
        for name, modules in self.layers.items():
            # one move to the model's device and dtype per request (a no-op in training), not per forward
            weight = modules[0].base.weight
            A = adapter[f"{name}.A"].to(weight.device, weight.dtype)
            B = adapter[f"{name}.B"].to(weight.device, weight.dtype)
            for i, module in enumerate(modules):
                # batched adapters are (L, batch, ...): index the layer, keep the batch dimension
                module.A, module.B, module.scale = A[i], B[i], scale

    def clear(self) -> None:
        for modules in self.layers.values():
            for module in modules:
                module.A = module.B = None


class RowDeltas:
    """The per-example deltas injected in a model's LoRALinear layers (one per row of a batch), as seen by a
    batched generation whose finished rows leave the batch: `keep(rows)` keeps those rows' deltas (indices
    into the rows still there), in step with the KV cache; `restore()` puts back the whole batch's deltas,
    as injected. False when no layer holds per-example deltas."""

    def __init__(self, model: nn.Module, batch_size: int):
        self.layers = [m for m in model.modules() if isinstance(m, LoRALinear) and m.A is not None and m.A.dim() == 3]
        for module in self.layers:
            if module.A.shape[0] != batch_size:
                raise ValueError(
                    f"the model carries LoRA deltas for {module.A.shape[0]} examples, not one per row of a batch "
                    f"of {batch_size}"
                )
        self.injected = [(module.A, module.B) for module in self.layers]

    def __bool__(self) -> bool:
        return bool(self.layers)

    def keep(self, rows: torch.Tensor) -> None:
        for module in self.layers:
            module.A, module.B = module.A[rows], module.B[rows]

    def restore(self) -> None:
        for module, (A, B) in zip(self.layers, self.injected, strict=True):
            module.A, module.B = A, B


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama/Qwen2/Mistral-style model (each has an `mlp`), as the model holds them."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    for candidate in (decoder, getattr(model, "model", None), model):
        layers = getattr(candidate, "layers", None)
        if layers is not None and all(hasattr(layer, "mlp") for layer in layers):
            return layers
    raise ValueError(f"{type(model).__name__}: no decoder layers with an `mlp` (gate/up/down) found")


def init_adapter(shapes: dict[str, tuple[int, ...]], seed: int) -> Adapter:
    """PEFT's default initialization (A kaiming-uniform, B zero), the same for every document."""
    generator = torch.Generator().manual_seed(seed)
    adapter = {}
    for key, shape in shapes.items():
        if key.endswith(".A"):
            fan_in = shape[-1]
            bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) reduces to this bound
            adapter[key] = (torch.rand(shape, generator=generator) * 2 - 1) * bound
        else:
            adapter[key] = torch.zeros(shape)
    return adapter


def merge(adapters: list[Adapter], weights: list[float] | None = None) -> Adapter:
    """The exact weighted sum of the adapters' deltas (plain sum by default), as one adapter of the summed rank."""
    if weights is not None and all(w == 1 for w in weights):
        weights = None
    if weights is None and len(adapters) == 1:
        return adapters[0]
    if weights is not None:  # w * (B A) = (w B) A: weight the B factors
        adapters = [
            {k: v * w if k.endswith(".B") else v for k, v in a.items()} for a, w in zip(adapters, weights, strict=True)
        ]
    merged = {}
    for key in adapters[0]:
        parts = [a[key] for a in adapters]
        dtype = parts[0].dtype if all(p.dtype == parts[0].dtype for p in parts) else torch.float32
        merged[key] = torch.cat([p.to(dtype) for p in parts], dim=1 if key.endswith(".A") else 2)
    return merged


def average(adapters: list[Adapter]) -> Adapter:
    """Each factor averaged over the adapters (A and B apart, as DyPRAG's inference averages its generated
    parameters): one adapter of their rank, whose delta mean(B) mean(A) is not the mean of their deltas."""
    return {key: torch.stack([a[key].float() for a in adapters]).mean(0) for key in adapters[0]}


def stack(adapters: list[Adapter]) -> Adapter:
    """One adapter per example, for batched generation: (L, batch, r, in) / (L, batch, out, r)."""
    return {key: torch.stack([a[key] for a in adapters], dim=1) for key in adapters[0]}


def stack_padded(adapters: list[Adapter | None]) -> Adapter | None:
    """`stack` for adapters of different ranks, and rows without one (None): each is padded with zero
    rows of A and zero columns of B up to the largest rank, which adds exactly nothing to its delta.
    Lets one batched generation serve requests that merged 0, 1 or k documents. None if no row has one."""
    present = [a for a in adapters if a is not None]
    if not present:
        return None
    first = present[0]
    names = sorted({key.rsplit(".", 1)[0] for key in first})
    rank = max(a[f"{names[0]}.A"].shape[1] for a in present)
    stacked: Adapter = {}
    for key, ref in first.items():
        rank_dim = 1 if key.endswith(".A") else 2  # A: (L, r, in), B: (L, out, r)
        shape = list(ref.shape)
        shape.insert(1, len(adapters))
        shape[rank_dim + 1] = rank
        out = torch.zeros(shape, dtype=ref.dtype)
        for row, a in enumerate(adapters):
            if a is not None:
                r = a[key].shape[rank_dim]
                (out[:, row, :r] if rank_dim == 1 else out[:, row, :, :r]).copy_(a[key])
        stacked[key] = out
    return stacked


def delta(adapter: Adapter, name: str, layer: int, scale: float) -> torch.Tensor:
    """The dense weight delta `scale * B @ A` of one projection (for tests and export checks)."""
    return scale * adapter[f"{name}.B"][layer].float() @ adapter[f"{name}.A"][layer].float()
