"""Shared fixtures: a tiny random model of the default architecture, and the real default model."""

from __future__ import annotations

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
