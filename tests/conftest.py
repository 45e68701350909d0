"""Shared fixtures: tiny random models (the default architecture, and Qwen2), and the real default model."""

from __future__ import annotations

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
