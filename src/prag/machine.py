"""How many threads, and which dtype per phase, this machine runs the model with.

Threads. On a CPU that other jobs also use, the number of threads decides more than anything else:
PyTorch splits every operation across its threads and waits for all of them, so when another
process holds the cores each of a decoding step's hundreds of operations waits for a descheduled
thread. On this project's 2-core machine, busy with other jobs, 16 decoding steps took 132-153 s
on 2 threads and 20-23 s on 1. So unless told otherwise, each phase (a generation call, a group of
documents trained together) counts the runnable threads of other processes when it starts and
takes only the cores they leave free (at least one). `model.threads` or `$PRAG_THREADS` force a
number instead; jobs that share one process (a service answering while it parameterizes in the
background) split the cores deliberately with `using_threads(n)` in the thread that runs each
(PyTorch's thread count belongs to the calling thread).

Dtype. Each phase's dtype (generation, training) is chosen by a measurement, not by CPU flags:
a CPU that has bf16 instructions can still be slower in bf16 at this model's shapes, and a bf16
path that wins on an idle machine can collapse when another process competes for the cores (one
report: 1.27 s bf16 vs 2.31 s fp32 idle, 56.9 s vs 8.7 s busy). So each candidate dtype is timed
on a short generation and a short training step, once alone and once beside a competing process
doing matmuls on the same cores (at the threads chosen as above), and a phase gets the dtype with
the least total time. The result is cached per machine beside the model (`speed-*.json`), so it
costs seconds once. `model.dtype` other than "auto" forces one dtype for both phases.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from transformers import DynamicCache, PreTrainedModel

from .atomic import atomic_write_text

PHASES = ("generate", "train")
CANDIDATES = (torch.float32, torch.bfloat16)
NAMES = {str(dtype).removeprefix("torch.") for dtype in CANDIDATES}
MEASUREMENT = 2  # bump when the timed work changes: a cached choice made by another measurement is redone
SLOW = 3.0  # a dtype whose first run takes this many times the best one's time so far is timed only once
Timings = dict[str, dict[str, dict[str, float | None]]]  # phase -> dtype -> {"idle", "busy"} seconds


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_local = threading.local()  # a thread count set with `using_threads`, per Python thread
_recent: tuple[float, int] = (0.0, 0)  # (when, threads) of the last adaptive choice
RECHECK_S = 1.0  # an adaptive choice is reused this long: the online path checks at most once a second


def forced_threads(configured: int = 0) -> int | None:
    """The thread count set deliberately: `using_threads` in this thread, else `configured` if positive,
    else $PRAG_THREADS; None if none was (the count is then chosen adaptively)."""
    if getattr(_local, "threads", None):
        return _local.threads
    if configured > 0:
        return configured
    env = os.environ.get("PRAG_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"PRAG_THREADS={env!r}: expected a positive number of threads")
        return int(env)
    return None


def runnable_elsewhere() -> int | None:
    """How many threads of other processes are runnable right now (Linux /proc), or None where unknown."""
    try:
        match = re.search(r"^procs_running (\d+)", Path("/proc/stat").read_text(), flags=re.M)
        ours = 0
        for stat in Path("/proc/self/task").glob("*/stat"):
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                ours += stat.read_text().rsplit(")", 1)[1].split()[0] == "R"
    except OSError:
        return None
    return max(int(match.group(1)) - ours, 0) if match else None


def free_cpus(samples: int = 5, interval_s: float = 0.002) -> int:
    """The CPUs this process may use minus the other processes' runnable threads (median of a few
    readings, 10 ms in all), at least 1."""
    cpus = available_cpus()
    readings = []
    for i in range(samples):
        if i:
            time.sleep(interval_s)
        reading = runnable_elsewhere()
        if reading is None:
            return cpus
        readings.append(reading)
    return max(1, cpus - sorted(readings)[len(readings) // 2])


def choose_threads(configured: int = 0, fresh: bool = False) -> int:
    """Threads for the next phase: the forced count if any, else the CPUs other processes leave free
    (re-read at most every RECHECK_S unless `fresh`)."""
    global _recent
    forced = forced_threads(configured)
    if forced:
        return forced
    now = time.monotonic()
    if fresh or now - _recent[0] > RECHECK_S:
        _recent = (now, free_cpus())
    return _recent[1]


@contextlib.contextmanager
def using_threads(n: int) -> Iterator[None]:
    """Run the block with `n` intra-op threads in the calling thread (a deliberate split: phases run
    inside it use `n` instead of choosing), then restore the previous count."""
    previous = getattr(_local, "threads", None)
    _local.threads = n
    try:
        with torch_threads(n):
            yield
    finally:
        _local.threads = previous


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def choose(timings: Timings) -> dict[str, str]:
    """Per phase, the dtype with the least idle + busy seconds (a busy time not measured: it could not win)."""
    return {phase: min(by_dtype, key=lambda d: _total(by_dtype[d])) for phase, by_dtype in timings.items()}


def _total(timing: dict[str, float | None]) -> float:
    return sum(math.inf if t is None else t for t in timing.values())


def machine_key(threads: int) -> str:
    """What the measurement depends on: the CPU model, the CPUs, the forced thread count (0: adaptive),
    torch's version and the measurement itself."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    payload = f"{cpu}|{available_cpus()}|{threads}|{torch.__version__}|m{MEASUREMENT}"
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def measured_dtypes(
    model: PreTrainedModel, cache_file: Path, threads: int = 0, measure: Callable[[], dict] | None = None
) -> dict:
    """The per-phase dtypes for this machine: read from `cache_file`, or measured now (by `measure`,
    default `measure_phases`) and written there. Returns {"dtypes": {phase: dtype name}, "timings": ...}.

    One measurement at a time per folder (a file lock): processes that load a model together (the
    service and its builder) would otherwise time each other's competing process, and cache that.
    """
    stored = _stored(cache_file)
    if stored is not None:
        return stored
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_file.parent / ".speed.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        stored = _stored(cache_file)  # measured by another process while this one waited
        if stored is not None:
            return stored
        timings = (measure or (lambda: measure_phases(model, threads)))()
        result = {"dtypes": choose(timings), "timings": timings}
        atomic_write_text(cache_file, json.dumps(result, indent=2))
    return result


def _stored(cache_file: Path) -> dict | None:
    with contextlib.suppress(OSError, json.JSONDecodeError, KeyError, TypeError):
        stored = json.loads(cache_file.read_text())
        if set(stored["dtypes"]) == set(PHASES) and all(name in NAMES for name in stored["dtypes"].values()):
            return stored
    return None


def measure_phases(model: PreTrainedModel, threads: int = 0, repeats: int = 2) -> Timings:
    """Seconds of a short generation and a short training step in every candidate dtype, alone and then
    beside a competing process, at the threads `choose_threads(threads)` picks in each case. A dtype
    whose first run is SLOW times behind is not run again, and one whose time alone already exceeds
    another's total is not timed busy (it cannot win). The model's weights are converted for the
    measurement and restored."""
    original = {name: p.data for name, p in model.named_parameters()}
    work = {"generate": lambda: _generation_step(model), "train": lambda: _training_step(model)}
    timings: Timings = {phase: {} for phase in PHASES}
    names = {dtype: str(dtype).removeprefix("torch.") for dtype in CANDIDATES}
    try:
        with torch_threads(choose_threads(threads, fresh=True)):
            for dtype in CANDIDATES:
                _convert(model, original, dtype)
                for phase, fn in work.items():
                    first = _seconds(fn)  # also the warm-up: thread pool, first-call allocations
                    best = min((t["idle"] for t in timings[phase].values()), default=math.inf)
                    # far behind at once (bf16 emulated on a CPU without it: tens of times slower): not repeated
                    idle = first if first > SLOW * best else _best(fn, repeats)
                    timings[phase][names[dtype]] = {"idle": idle, "busy": None}
        with competing_process(available_cpus()), torch_threads(choose_threads(threads, fresh=True)):
            for dtype in CANDIDATES:
                phases = [
                    phase
                    for phase in PHASES
                    if timings[phase][names[dtype]]["idle"] < min(_total(t) for t in timings[phase].values())
                ]
                if phases:
                    _convert(model, original, dtype)
                for phase in phases:
                    timings[phase][names[dtype]]["busy"] = _best(work[phase], repeats)
    finally:
        _convert(model, original, None)
    return timings


def _convert(model: PreTrainedModel, original: dict[str, torch.Tensor], dtype: torch.dtype | None) -> None:
    """The model's weights in `dtype`, converted from `original` (None: `original` itself)."""
    for name, p in model.named_parameters():
        p.data = original[name] if dtype is None else original[name].to(dtype)


def _best(fn: Callable[[], None], repeats: int) -> float:
    return min(_seconds(fn) for _ in range(repeats))


def _seconds(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@torch.no_grad()
def _generation_step(model: PreTrainedModel, batch: int = 8, prompt: int = 128, new_tokens: int = 8) -> None:
    """A batch of prompts read, then a few single-token decoding steps through a KV cache, as generation does.

    Mostly prompt, as real calls are (augmentation reads passages of a few hundred tokens at batch 16-32,
    `rag` three passages): a shorter prompt (32 tokens at batch 4, MEASUREMENT 1) timed mostly decoding
    and chose fp32 or bf16 from one measurement to the next on a CPU where bf16 augments 1.6x faster
    (docs/performance.md, "The generation dtype, and no rewrite")."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(0)).to(model.device)
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits
    for _ in range(new_tokens):
        logits = model(input_ids=logits[:, -1:].argmax(-1), cache=cache, use_cache=True).logits


def _training_step(model: PreTrainedModel, batch: int = 2, length: int = 64) -> None:
    """A forward and backward pass to the activations (the frozen weights get no gradient), as LoRA training does."""
    embed = model.get_input_embeddings()
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    inputs = embed(ids.to(model.device)).detach().requires_grad_(True)
    hidden = model.model(inputs_embeds=inputs, use_cache=False).last_hidden_state
    model.lm_head(hidden[:, -8:]).float().logsumexp(-1).sum().backward()


_COMPETITOR = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
a = torch.tanh(torch.randn(512, 512) @ torch.randn(512, 512))  # the thread pool is up
print("ready", flush=True)
while True:
    a = torch.tanh(a @ a)
"""


@contextlib.contextmanager
def competing_process(threads: int) -> Iterator[None]:
    """Another process doing fp32 matmuls on `threads` threads for the duration of the block."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _COMPETITOR, str(threads)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        proc.stdout.readline()  # "ready": torch imported, its threads started
        time.sleep(0.1)
        yield
    finally:
        proc.kill()
        proc.wait()
