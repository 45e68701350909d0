"""Adapters and augmentations are written atomically and once, found by id, in a local directory or an
S3-compatible object store, and a rerun resumes."""

from __future__ import annotations

import threading

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


@pytest.fixture(params=["local", "s3"])
def store_root(request, tmp_path):
    """A store's root: a local directory, or a fresh bucket on a local S3-compatible server."""
    return tmp_path / "store" if request.param == "local" else request.getfixturevalue("s3_bucket") + "/store"


def test_augmentation_round_trip(store_root):
    augmentations = AugmentationStore(store.join(store_root, "augment"))
    aug = Augmentation("d1", ["a rewrite"], [{"question": "Who?", "answer": "Ada"}], {"unparsable": 2})
    assert augmentations.put(aug) and augmentations.has("d1") and not augmentations.has("d2")
    assert augmentations.get("d1") == aug
    assert not augmentations.put(Augmentation("d1", ["another"]))  # written once: the first one stays
    assert list(augmentations) == [aug]


def test_adapters_are_written_once_and_found_by_id(store_root):
    adapters = AdapterStore(store.join(store_root, "adapters"))
    assert adapters.put("doc/1", adapter(0.5)) and adapters.put("doc/2", adapter(1.5))
    assert not adapters.put("doc/1", adapter(9.0))  # a retried task: the stored adapter is not replaced
    torch.testing.assert_close(adapters.get("doc/1")["gate_proj.A"].float(), torch.full((2, 2, 4), 0.5))
    assert adapters.count() == 2 and adapters.has("doc/2") and not adapters.has("doc/3")
    assert adapters.missing(["doc/3", "doc/1", "doc/4"]) == ["doc/3", "doc/4"]
    assert adapters.missing([f"doc/{i}" for i in range(300)]) == [f"doc/{i}" for i in range(300) if i not in (1, 2)]
    with pytest.raises(KeyError, match="doc/3"):
        adapters.get("doc/3")
    assert adapters.put_meta({"lora": {"rank": 2}}) and not adapters.put_meta({"lora": {"rank": 8}})
    assert adapters.meta == {"lora": {"rank": 2}}


def test_concurrent_writers_of_one_adapter_write_it_once(tmp_path):
    adapters = AdapterStore(tmp_path)
    start, wins = threading.Barrier(8), []

    def write(value: float) -> None:
        start.wait()
        if adapters.put("doc", adapter(value)):
            wins.append(value)

    threads = [threading.Thread(target=write, args=(float(i),)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1  # exactly one writer created the file, and its content is what is stored
    torch.testing.assert_close(adapters.get("doc")["gate_proj.B"].float(), torch.full((2, 6, 2), wins[0]))
    assert adapters.count() == 1 and not list(tmp_path.rglob("*.tmp"))


def test_parameterize_resumes_and_skips_done_documents(tiny_llm, store_root, tmp_path, monkeypatch):
    from prag import Config, Passage, Pipeline

    config = Config()
    config.augment.attempts = 1
    config.augment.rewrite_max_tokens = 8
    config.augment.qa_tokens_per_pair = 8
    config.train.docs_per_batch = 2
    pipeline = Pipeline(tmp_path / "home", config, llm=tiny_llm, store=store_root)
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
