"""The merge is exact: injecting k documents' concatenated LoRAs equals adding their summed deltas to W."""

from __future__ import annotations

import copy

import torch

from prag import lora
from prag.store import export_peft


def random_adapter(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merged_injection_equals_summed_weight_deltas(tiny_llm):
    model = tiny_llm.model
    reference = copy.deepcopy(model)  # plain nn.Linear layers, weights edited below
    lora_model = lora.LoRAModel(model, ("gate_proj", "up_proj", "down_proj"))
    shapes = lora_model.shapes(rank=2)
    adapters = [random_adapter(shapes, seed) for seed in range(3)]
    scale = 16.0
    for name in lora_model.target_modules:
        for i, layer in enumerate(lora.find_decoder_layers(reference)):
            weight = getattr(layer.mlp, name).weight
            weight += sum(lora.delta(a, name, i, scale) for a in adapters)
    ids = torch.randint(0, 1000, (2, 12))

    merged = lora.merge(adapters)
    assert merged["gate_proj.A"].shape[1] == 6  # rank 2 x 3 documents
    lora_model.inject(merged, scale)
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=1e-4, atol=1e-4)

    lora_model.clear()
    base = logits(model, ids)
    assert not torch.allclose(base, logits(reference, ids), atol=1e-3)  # the deltas do change the output


def test_weighted_merge_is_the_weighted_sum_of_deltas():
    shapes = {"down_proj.A": (2, 2, 8), "down_proj.B": (2, 6, 2)}
    adapters = [random_adapter(shapes, seed) for seed in range(3)]
    weights = [1 / 3] * 3  # answer.merge = "mean"
    merged = lora.merge(adapters, weights)
    for layer in range(2):
        expected = sum(w * lora.delta(a, "down_proj", layer, 2.0) for a, w in zip(adapters, weights, strict=True))
        torch.testing.assert_close(lora.delta(merged, "down_proj", layer, 2.0), expected)
    assert torch.equal(adapters[0]["down_proj.B"], random_adapter(shapes, 0)["down_proj.B"])  # inputs untouched


def test_per_example_adapters_match_one_at_a_time(tiny_llm):
    lora_model = lora.LoRAModel(tiny_llm.model, ("gate_proj", "up_proj", "down_proj"))
    shapes = lora_model.shapes(rank=2)
    adapters = [random_adapter(shapes, seed) for seed in (5, 6)]
    ids = torch.randint(0, 1000, (2, 9))
    lora_model.inject(lora.stack(adapters), 16.0)
    batched = logits(tiny_llm.model, ids)
    for row, adapter in enumerate(adapters):
        lora_model.inject(adapter, 16.0)
        torch.testing.assert_close(batched[row], logits(tiny_llm.model, ids[row : row + 1])[0], rtol=1e-4, atol=1e-4)
    lora_model.clear()


def test_peft_export_loads_and_matches(tiny_llm, tmp_path):
    from peft import PeftModel

    base_dir = tmp_path / "base"
    tiny_llm.model.save_pretrained(base_dir)
    lora_model = lora.LoRAModel(tiny_llm.model, ("gate_proj", "up_proj", "down_proj"))
    shapes = lora_model.shapes(rank=2)
    merged = lora.merge([random_adapter(shapes, 1), random_adapter(shapes, 2)])
    meta = {"lora": {"rank": 2, "alpha": 32.0, "target_modules": ["gate_proj", "up_proj", "down_proj"]}}
    out = export_peft(merged, tmp_path / "peft", meta, str(base_dir))

    ids = torch.randint(0, 1000, (1, 10))
    lora_model.inject(merged, 16.0)
    ours = logits(tiny_llm.model, ids)
    lora_model.clear()
    from transformers import LlamaForCausalLM

    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), out).eval()
    torch.testing.assert_close(logits(peft_model, ids), ours, rtol=1e-4, atol=1e-4)
