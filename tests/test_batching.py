"""Batched multi-adapter generation: each row of one batch carries its own merged adapter, and gets
the answer it would get alone (greedy decoding)."""

from __future__ import annotations

from pathlib import Path

import torch

from prag import Config, Pipeline, lora

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"


def random_adapter(shapes, seed, std=0.05):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * std for k, s in shapes.items()}


def test_padded_stack_gives_each_row_its_own_delta(tiny_llm):
    """Rows with rank 2, rank 6 (three merged documents) and no adapter, in one forward pass, equal
    each row run alone with its own adapter injected as is (or none)."""
    model = tiny_llm.model
    lora_model = lora.LoRAModel(model, ("gate_proj", "up_proj", "down_proj"))
    shapes = lora_model.shapes(rank=2)
    one = random_adapter(shapes, 0)
    three = lora.merge([random_adapter(shapes, s) for s in (1, 2, 3)])
    rows = [one, three, None]
    stacked = lora.stack_padded(rows)
    assert stacked["up_proj.A"].shape[1:3] == (3, 6) and stacked["up_proj.B"].shape[1] == 3
    assert lora.stack_padded([None, None]) is None

    ids = torch.randint(0, 1000, (3, 10))
    scale = 16.0
    with torch.no_grad():
        lora_model.inject(stacked, scale)
        batched = model(input_ids=ids).logits
        lora_model.clear()
        for row, adapter in enumerate(rows):
            if adapter is not None:
                lora_model.inject(adapter, scale)
            alone = model(input_ids=ids[row : row + 1]).logits[0]
            lora_model.clear()
            torch.testing.assert_close(batched[row], alone, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(batched[0], batched[2], atol=1e-3)  # the adapters do act


def test_batched_answers_equal_one_by_one(default_llm, tmp_path):
    """Mixed modes, top-k and prompt lengths in one batch, with the real default model. The documents'
    adapters are random (stored as parameterization would store them): this checks the batching, not
    what the adapters know."""
    config = Config()
    pipeline = Pipeline(tmp_path / "home", config, llm=default_llm)
    pipeline.index(DEMO / "corpus.jsonl", show_progress=False)
    requests = [
        ("What is George Rankin's occupation?", "prag", 3),
        ("What is Henry Feilden's occupation?", "closed", 3),
        ("What is Eleanor Davis's occupation?", "rag", 2),
        ("What is Scooter Braun's occupation?", "prag", 1),
        ("Where was the place of burial of Charles Mathew's father?", "combine", 2),
        ("What is Henry Feilden's occupation?", "prag-unrelated", 2),
    ]
    shapes = pipeline.lora_model.shapes(config.lora.rank)
    seed = 0
    for question, _, k in requests:
        for p in pipeline.retrieve(question, k) + pipeline.unrelated_passages(question, [], k):
            if not pipeline.adapters.has(p.id):
                seed += 1
                pipeline.adapters.put(p.id, random_adapter(shapes, seed, std=0.02))

    prepared = [pipeline.prepare(q, mode, k, build=False) for q, mode, k in requests]
    assert all(not p.missing for p in prepared)
    assert len({len(p.prompt) for p in prepared}) > 2  # prompts of different lengths
    assert {p.adapter["up_proj.A"].shape[1] for p in prepared if p.adapter is not None} == {2, 4, 6}
    batched = pipeline.generate(prepared)
    alone = [pipeline.answer(q, mode, k) for q, mode, k in requests]
    for b, a in zip(batched, alone, strict=True):
        assert (b.mode, b.text, b.short_answer) == (a.mode, a.text, a.short_answer)
        assert [p.id for p in b.passages] == [p.id for p in a.passages]
        assert b.new_tokens == a.new_tokens > 0
    assert len({a.text for a in alone}) > 2  # not one answer for everything
