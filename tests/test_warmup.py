"""A warm-up adapter is trained on the tune slice only, and no question it saw can be evaluated with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from prag import Config, Pipeline
from prag.cli import main
from prag.evaluate import REPORT_SIZE, load_questions, run

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"


def _questions_file(tmp_path: Path) -> Path:
    """The demo questions repeated past the report slice, each row with its own id."""
    rows = [json.loads(line) for line in (DEMO / "questions.jsonl").read_text().splitlines() if line.strip()]
    path = tmp_path / "dev.jsonl"
    with open(path, "w") as f:
        for i in range(REPORT_SIZE + 4):
            f.write(json.dumps({**rows[i % len(rows)], "id": f"q{i}"}) + "\n")
    return path


def _warm_up(tiny_llm, tmp_path: Path, monkeypatch) -> tuple[Path, Path, Path]:
    """An indexed home, the questions file, and the adapter `prag warmup` trained on its tune slice (the 4
    questions after the first 100, which is all the CLI reads)."""
    questions = _questions_file(tmp_path)
    home = tmp_path / "home"
    Pipeline(home, Config(), llm=tiny_llm).index(DEMO / "corpus.jsonl", show_progress=False)
    monkeypatch.setattr("prag.llm.LLM.load", classmethod(lambda cls, config: tiny_llm))
    warm = tmp_path / "warm.safetensors"
    assert main(["warmup", "--home", str(home), "--dataset", str(questions), "--out", str(warm), "--quiet"]) == 0
    return home, questions, warm


@pytest.mark.parametrize("use", ["init", "base"])  # a warm-up start, or the format adapter of every mode
def test_no_evaluated_question_can_enter_a_warm_up(use, tiny_llm, tmp_path, monkeypatch):
    home, questions, warm = _warm_up(tiny_llm, tmp_path, monkeypatch)
    with safe_open(str(warm), framework="pt") as f:  # what it was trained at, for other LoRA settings
        assert float(f.metadata()["scale"]) == Config().lora.scale
    config = Config()
    setattr(config.lora, use, str(warm))
    pipeline = Pipeline(home, config, llm=tiny_llm)
    assert pipeline.warmup_question_ids() == {f"q{i}" for i in range(REPORT_SIZE, REPORT_SIZE + 4)}
    tune = load_questions(questions, slice="tune", limit=2)
    with pytest.raises(ValueError, match="trained the warm-up or format adapter"):
        run(pipeline, tune, ["closed"], top_k=1, show_progress=False)
    report = load_questions(questions, slice="report", limit=1)
    evaluation, _ = run(pipeline, report, ["closed"], top_k=1, show_progress=False)
    assert [r["id"] for r in evaluation.records] == ["q0"]


def test_a_warm_up_start_that_does_not_fit_is_named_before_any_work(tiny_llm, tmp_path, monkeypatch):
    home, questions, warm = _warm_up(tiny_llm, tmp_path, monkeypatch)
    config = Config()
    config.lora.init, config.lora.rank = str(warm), 4  # trained at rank 2
    pipeline = Pipeline(home, config, llm=tiny_llm)
    report = load_questions(questions, slice="report", limit=1)
    with pytest.raises(ValueError, match="needs lora.rank=4"):
        run(pipeline, report, ["prag"], top_k=1, show_progress=False)
    for store in (pipeline.augmentations, pipeline.adapters):  # no document was augmented or trained first
        assert not Path(store.root).exists() or not any(Path(store.root).iterdir())
