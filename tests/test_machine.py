"""Threads and per-phase dtypes: forced, or chosen from what this machine measures."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from prag import machine
from prag.config import Config, ModelConfig
from prag.llm import LLM
from prag.lora import LoRAModel


def test_forced_threads_win_over_the_adaptive_choice(monkeypatch):
    monkeypatch.delenv("PRAG_THREADS", raising=False)
    assert machine.choose_threads(3) == 3
    monkeypatch.setenv("PRAG_THREADS", "2")
    assert machine.choose_threads() == 2
    assert machine.choose_threads(3) == 3  # the config field before the environment
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with machine.using_threads(1):  # a deliberate split (one job of a process that runs two)
            assert machine.choose_threads(3) == 1 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv("PRAG_THREADS", "many")
    with pytest.raises(ValueError, match="PRAG_THREADS"):
        machine.choose_threads()


def test_adaptive_threads_leave_the_cores_a_competing_process_uses(monkeypatch, tiny_llm):
    monkeypatch.delenv("PRAG_THREADS", raising=False)
    assert 1 <= machine.choose_threads(fresh=True) <= machine.available_cpus()
    with machine.competing_process(machine.available_cpus()):
        assert machine.runnable_elsewhere() >= 1
        assert machine.choose_threads(fresh=True) == 1
        with tiny_llm.phase("generate"):  # a phase runs on the threads chosen as it starts
            assert torch.get_num_threads() == 1
    tiny_llm.threads = 2
    with tiny_llm.phase("train"):
        assert torch.get_num_threads() == 2


def test_dtype_measurement_picks_the_fastest_per_phase_and_is_cached(tiny_llm, tmp_path):
    model = tiny_llm.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cache_file = tmp_path / "speed-x.json"
    result = machine.measured_dtypes(model, cache_file)
    timings = result["timings"]
    for phase in machine.PHASES:
        assert set(timings[phase]) == {"float32", "bfloat16"}
        assert all(t["idle"] > 0 for t in timings[phase].values())
        chosen = timings[phase][result["dtypes"][phase]]
        assert chosen["busy"] > 0  # the winner was timed beside the competing process...
        for other in timings[phase].values():  # ...and beats every total, or every time alone not timed busy
            assert chosen["idle"] + chosen["busy"] <= other["idle"] + (other["busy"] or other["idle"])
    assert json.loads(cache_file.read_text()) == result
    for n, p in model.named_parameters():  # the measurement converted the weights and put them back
        assert p.dtype == torch.float32 and torch.equal(p, before[n])

    def must_not_measure():
        raise AssertionError("measured again despite the cache")

    assert machine.measured_dtypes(model, cache_file, measure=must_not_measure) == result


def test_a_new_measurement_is_not_answered_from_an_old_one(monkeypatch):
    key = machine.machine_key(0)
    assert machine.machine_key(0) == key and machine.machine_key(1) != key
    monkeypatch.setattr(machine, "MEASUREMENT", machine.MEASUREMENT + 1)  # the timed work changed
    assert machine.machine_key(0) != key


def test_choose_weighs_idle_and_busy_time():
    # the reported case: bf16 faster idle, collapsing beside another job
    timings = {
        "generate": {"bfloat16": {"idle": 1.27, "busy": 56.9}, "float32": {"idle": 2.31, "busy": 8.7}},
        "train": {"bfloat16": {"idle": 1.0, "busy": 2.0}, "float32": {"idle": 2.0, "busy": 4.0}},
    }
    assert machine.choose(timings) == {"generate": "float32", "train": "bfloat16"}
    timings["train"]["float32"]["busy"] = None  # not timed busy: it could not win
    assert machine.choose(timings)["train"] == "bfloat16"


def test_phases_run_in_their_own_dtype_and_restore_the_exact_weights(tiny_llm):
    before = {n: p.detach().clone() for n, p in tiny_llm.model.named_parameters()}
    tiny_llm.set_phase_dtypes({"generate": torch.float32, "train": torch.bfloat16})
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    greedy = tiny_llm.generate(prompts, 5)
    with tiny_llm.phase("train"):
        assert tiny_llm.model.dtype == torch.bfloat16
        assert tiny_llm.model.lm_head.weight.dtype == torch.bfloat16  # tied to the embedding, both converted
        assert tiny_llm.generate(prompts, 5) == greedy  # generation switches to its own dtype and back
        assert tiny_llm.model.dtype == torch.bfloat16
    assert tiny_llm.model.dtype == torch.float32
    for n, p in tiny_llm.model.named_parameters():
        assert torch.equal(p, before[n])  # fp32 weights as loaded, not a round trip through bf16


def test_phases_switch_dtypes_after_lora_layers_are_put_into_the_model(tiny_llm):
    """Parameterizing in batches generates (its weights copied per dtype), puts LoRA layers into the model
    (renaming its projections' weights) and generates again: the copies must still fit."""
    tiny_llm.set_phase_dtypes({"generate": torch.bfloat16, "train": torch.float32})
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    greedy = tiny_llm.generate(prompts, 5)
    lora = LoRAModel(tiny_llm.model, ("gate_proj", "up_proj", "down_proj"))
    assert any(".base." in n for n, _ in tiny_llm.model.named_parameters())
    assert tiny_llm.generate(prompts, 5) == greedy  # no LoRA injected: the same model, switched to bf16 and back
    assert tiny_llm.model.dtype == torch.float32
    lora.clear()


def test_forced_dtype_loads_that_dtype_for_every_phase():
    llm = LLM.load(ModelConfig(dtype="bfloat16", threads=1))
    assert llm.model.dtype == torch.bfloat16 and llm.phase_dtypes == {} and llm.threads == 1
    with llm.phase("train"):
        assert llm.model.dtype == torch.bfloat16 and torch.get_num_threads() == 1


def test_a_negative_thread_count_is_refused():
    with pytest.raises(ValueError, match="bad value -1 for model.threads"):
        Config.from_dict({"model": {"threads": -1}}).validate()
    assert Config.from_dict({"model": {"threads": "2"}}).validate().model.threads == 2  # from --set


def test_one_measurement_at_a_time_and_a_waiting_one_reads_its_result(tiny_llm, tmp_path):
    """Two loads at once (the service and its builder): the second waits for the first measurement
    (it would time the other's competing process) and takes its result instead of measuring again."""
    cache_file = tmp_path / "speed-x.json"
    timing = {"float32": {"idle": 1.0, "busy": 2.0}, "bfloat16": {"idle": 3.0, "busy": None}}
    running, most, calls = [0], [0], []

    def measure():
        calls.append(1)
        running[0] += 1
        most[0] = max(most[0], running[0])
        time.sleep(0.5)
        running[0] -= 1
        return {phase: timing for phase in machine.PHASES}

    results = []
    loads = [
        threading.Thread(target=lambda: results.append(machine.measured_dtypes(tiny_llm.model, cache_file, 0, measure)))
        for _ in range(2)
    ]
    for load in loads:
        load.start()
    for load in loads:
        load.join()
    assert len(calls) == 1 and most[0] == 1
    assert results[0] == results[1] and results[0]["dtypes"] == {"generate": "float32", "train": "float32"}
