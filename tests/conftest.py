"""Shared fixtures: a tiny random model of the default architecture, and the real default model."""

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
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from prag.config import DEFAULT_MODEL, ModelConfig
from prag.llm import LLM, resolve_model_dir


@pytest.fixture(scope="session")
def default_model_dir():
    return resolve_model_dir(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture
def tiny_llm(tokenizer) -> LLM:
    """A randomly initialised Llama (the default model's architecture) small enough to train in a test."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return LLM(model, tokenizer, "tiny-llama")


@pytest.fixture(scope="session")
def default_llm() -> LLM:
    return LLM.load(ModelConfig())


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
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-model")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
