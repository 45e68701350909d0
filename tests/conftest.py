"""Shared fixtures: tiny random models (the default architecture, and Qwen2), the real default model, and a
local S3-compatible server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from prag.config import DEFAULT_MODEL, ModelConfig
from prag.llm import LLM, resolve_model_dir


@pytest.fixture(scope="session")
def default_model_dir():
    return resolve_model_dir(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir)


def tiny_llama(tokenizer, max_position_embeddings: int = 512) -> LlamaForCausalLM:
    """A randomly initialised Llama (the default model's architecture) small enough to train in a test; seeded."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


@pytest.fixture
def tiny_llm(tokenizer) -> LLM:
    """The tiny Llama, loaded for generation and training in this process."""
    model = tiny_llama(tokenizer).eval()
    model.requires_grad_(False)
    return LLM(model, tokenizer, "tiny-llama")


@pytest.fixture
def tiny_qwen2(tokenizer) -> LLM:
    """A randomly initialised Qwen2 (the architecture of the larger models): biases on the attention
    projections, an output matrix of its own, and sizes unlike the Llama fixture's."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = Qwen2ForCausalLM(config).eval()
    model.requires_grad_(False)
    return LLM(model, tokenizer, "tiny-qwen2")


@pytest.fixture(scope="session")
def default_llm() -> LLM:
    """The default model in fp32: several tests check that batching, shared prefixes and our decoding loop
    change no token, which holds in fp32; in bf16 (what `model.dtype=auto` measures fastest on some CPUs) a
    different batch shape rounds differently and can flip a near-tie."""
    return LLM.load(ModelConfig(dtype="float32"))


# -- a real `prag serve` process, for the service's tests ------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
# the answers of a random model do not matter to these tests: keep its augmentation short
FAST_BUILD = [
    "augment.rewrite_max_tokens=24",
    "augment.qa_tokens_per_pair=12",
    "augment.attempts=1",
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """The tiny random Llama saved as a local Hugging Face model directory, for a server process to load."""
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(tokenizer, max_position_embeddings=2048).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 60, process=None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if (process is not None and process.poll() is not None) or time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {host}:{port}") from None
            time.sleep(0.1)


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server (moto) on loopback; the AWS_* variables point this process and its children at it.

    Yields the variables, for processes started with an environment of their own."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    variables = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in variables}
    try:
        wait_for_port(port, process=server)
        os.environ.update(variables)
        yield variables
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.kill()
        server.wait()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket: its URL."""
    import uuid

    import fsspec

    name = f"prag-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"


def prag_env() -> dict:
    """The environment of a child `prag` process: this checkout's sources first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("PRAG_API_KEY", None)
    return env


def make_workspace(home: Path, model_dir: Path) -> Path:
    """An index of the demo corpus whose config names the tiny model (recorded in the workspace)."""
    sets = [arg for s in [f"model.name={model_dir}", *FAST_BUILD] for arg in ("--set", s)]
    cmd = [sys.executable, "-m", "prag.cli", "index", str(REPO / "data" / "demo" / "corpus.jsonl"), "--home", str(home)]
    subprocess.run([*cmd, *sets, "--quiet"], check=True, env=prag_env(), capture_output=True, timeout=300)
    return home


class Server:
    """`prag serve` on a free loopback port, as a user starts it."""

    def __init__(self, home: Path, key: str | None = "test-key", args: tuple[str, ...] = ()):
        self.home, self.key, self.args = home, key, args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / f"serve-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> Server:
        cmd = [sys.executable, "-m", "prag.cli", "serve", "--home", str(self.home), "--port", str(self.port)]
        cmd += ["--threads", "1", "--log-level", "warning", *self.args]
        if self.key:
            cmd += ["--api-key", self.key]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(cmd, env=prag_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prag serve exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"prag serve did not become healthy in {timeout}s:\n{self.log.read_text()}")

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.url + path, headers=kwargs.pop("headers", self.headers), timeout=300, **kwargs)

    def post(self, path: str, json=None, **kwargs) -> httpx.Response:
        headers = kwargs.pop("headers", self.headers)
        return httpx.post(self.url + path, json=json, headers=headers, timeout=300, **kwargs)

    def children(self) -> list[int]:
        """Pids of the server's child processes (its builder)."""
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.process.pid:
                pids.append(int(stat.parent.name))
        return pids

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory, tiny_model_dir):
    """One server over the demo corpus with the tiny model, shared by the HTTP and page tests."""
    home = make_workspace(tmp_path_factory.mktemp("serve") / "home", tiny_model_dir)
    server = Server(home).start()
    yield server
    server.stop()
