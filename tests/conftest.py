"""Shared fixtures: tiny random models (the default architecture, and Qwen2), the real default model, and a
local S3-compatible server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

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
    return LLM.load(ModelConfig())


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
