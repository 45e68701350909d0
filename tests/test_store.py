"""Adapters and augmentations are written atomically, found by id, and a rerun resumes."""

from __future__ import annotations

import pytest
import torch

import prag.store as store
from prag.augment import Augmentation
from prag.store import AdapterStore, AugmentationStore


def adapter(value: float) -> dict[str, torch.Tensor]:
    return {"gate_proj.A": torch.full((2, 2, 4), value), "gate_proj.B": torch.full((2, 6, 2), value)}


def test_adapter_round_trip_in_bf16(tmp_path):
    adapters = AdapterStore(tmp_path)
    adapters.put("doc/1", adapter(0.5))
    loaded = adapters.get("doc/1")
    assert loaded["gate_proj.A"].dtype == torch.bfloat16
    torch.testing.assert_close(loaded["gate_proj.B"].float(), torch.full((2, 6, 2), 0.5))
    assert adapters.has("doc/1") and not adapters.has("doc/2") and adapters.count() == 1
    with pytest.raises(KeyError, match="doc/2"):
        adapters.get("doc/2")


def test_crash_during_write_leaves_nothing_half_written(tmp_path, monkeypatch):
    adapters = AdapterStore(tmp_path)
    adapters.put("kept", adapter(1.0))

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(store, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        adapters.put("lost", adapter(2.0))
    assert not adapters.has("lost")
    assert not list(tmp_path.rglob("*.tmp"))  # the temporary file is removed too
    torch.testing.assert_close(adapters.get("kept")["gate_proj.A"].float(), torch.full((2, 2, 4), 1.0))


def test_augmentation_round_trip(tmp_path):
    augmentations = AugmentationStore(tmp_path)
    aug = Augmentation("d1", ["a rewrite"], [{"question": "Who?", "answer": "Ada"}], {"unparsable": 2})
    augmentations.put(aug)
    assert augmentations.get("d1") == aug


def test_parameterize_resumes_and_skips_done_documents(tiny_llm, tmp_path, monkeypatch):
    from prag import Config, Passage, Pipeline

    config = Config()
    config.augment.attempts = 1
    config.augment.rewrite_max_tokens = 8
    config.augment.qa_tokens_per_pair = 8
    config.train.docs_per_batch = 2
    pipeline = Pipeline(tmp_path, config, llm=tiny_llm)
    passages = [Passage(f"p{i}", f"Title {i}", f"Some text about topic number {i}.") for i in range(3)]
    # A random model writes no valid QA pairs; give the passages augmentations directly.
    for p in passages:
        pipeline.augmentations.put(
            Augmentation(p.id, [p.text], [{"question": f"What is {p.title}?", "answer": p.text}])
        )

    calls = []
    real_put = pipeline.adapters.put

    def crash_after_first_batch(doc_id, a):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run dies after storing the first batch of two
        calls.append(doc_id)
        real_put(doc_id, a)

    monkeypatch.setattr(pipeline.adapters, "put", crash_after_first_batch)
    with pytest.raises(KeyboardInterrupt):
        pipeline.parameterize(passages, show_progress=False)
    assert [pipeline.adapters.has(p.id) for p in passages] == [True, True, False]

    monkeypatch.setattr(pipeline.adapters, "put", real_put)
    assert pipeline.parameterize(passages, show_progress=False) == 1  # only the missing one is built
    assert pipeline.parameterize(passages, show_progress=False) == 0
