"""One real question through every mode with the real default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

from pathlib import Path

import torch

from prag import ALL_MODES, Config, Pipeline
from prag.corpus import read_corpus
from prag.pipeline import GENERATED_LORAS

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"


def test_every_mode_answers_a_real_question(default_llm, tmp_path):
    config = Config()
    config.answer.top_k = 2
    pipeline = Pipeline(tmp_path / "home", config, llm=default_llm)
    assert pipeline.index(DEMO / "corpus.jsonl", show_progress=False) == len(read_corpus(DEMO / "corpus.jsonl"))

    question = "What is George Rankin's occupation?"
    # the dyprag modes need a trained translator: tests/test_translator.py
    answers = {mode: pipeline.answer(question, mode) for mode in ALL_MODES if mode not in GENERATED_LORAS}

    retrieved = [p.title for p in answers["rag"].passages]
    assert "George Rankin" in retrieved and len(retrieved) == 2
    assert answers["closed"].passages == []
    for mode, answer in answers.items():
        assert answer.text and answer.short_answer, mode
        assert 0 < answer.timings["first_token"] < answer.timings["generation"] and answer.new_tokens > 1
    for mode in ("prag", "combine"):
        assert answers[mode].timings["load_merge"] > 0
        assert [p.id for p in answers[mode].passages] == [p.id for p in answers["rag"].passages]
        assert answers[mode].lora_passages == answers[mode].passages
    # the controls: the question's own passages retrieved, unrelated documents' LoRAs merged
    for mode in ("prag-unrelated", "combine-unrelated"):
        own = {p.id for p in answers[mode].passages}
        assert own == {p.id for p in answers["rag"].passages}
        assert len(answers[mode].lora_passages) == 2 and not own & {p.id for p in answers[mode].lora_passages}
    assert answers["prag-unrelated"].lora_passages == answers["combine-unrelated"].lora_passages  # seeded
    # lazily parameterized when first retrieved, then reused from the store
    assert all(pipeline.adapters.has(p.id) for p in answers["prag"].passages)
    for p in answers["prag"].passages:
        aug = pipeline.augmentations.get(p.id)
        assert aug.qa and all(qa["question"] and qa["answer"] for qa in aug.qa)
    assert answers["prag"].timings["parameterize"] > answers["combine"].timings["parameterize"]

    # the injected LoRAs really change the model: logits differ from the closed-book model
    prompt = torch.tensor([pipeline.format.chat_ids(default_llm, question, [])])
    with torch.no_grad():
        base = default_llm.model(prompt).logits[0, -1]
        from prag import lora

        merged = lora.merge([pipeline.adapters.get(p.id) for p in answers["prag"].passages])
        pipeline.lora_model.inject(merged, config.lora.scale)
        injected = default_llm.model(prompt).logits[0, -1]
        pipeline.lora_model.clear()
    assert not torch.allclose(base, injected, atol=1e-3)


def test_cli_index_ask_and_eval(tmp_path, monkeypatch, capsys):
    """The command line end to end, on two demo questions in two modes (the model comes from the cache)."""
    import json

    from prag.cli import main

    home = tmp_path / "home"
    assert main(["index", str(DEMO / "corpus.jsonl"), "--home", str(home), "--quiet"]) == 0
    assert main(["ask", "What is George Rankin's occupation?", "--mode", "rag", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert "answer:" in out and "George Rankin" in out and "timings:" in out
    out_dir = tmp_path / "eval"
    args = [
        "eval",
        "--dataset",
        str(DEMO / "questions.jsonl"),
        "--modes",
        "closed,rag",
        "--limit",
        "2",
        "--out",
        str(out_dir),
        "--home",
        str(home),
        "--quiet",
    ]
    assert main(args) == 0
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["n"] == 2 and set(metrics["modes"]) == {"closed", "rag"}
    assert 0 <= metrics["retrieval"]["recall@k"] <= 1
    assert (out_dir / "report.md").exists() and len((out_dir / "predictions.jsonl").read_text().splitlines()) == 4
    assert (
        main(
            [
                "eval",
                "--dataset",
                str(DEMO / "questions.jsonl"),
                "--modes",
                "bogus",
                "--out",
                str(out_dir),
                "--home",
                str(home),
            ]
        )
        == 2
    )
    assert "unknown mode" in capsys.readouterr().err


def test_warmup_initializes_distilled_documents(default_llm, tmp_path):
    """`warmup` on held-in questions, then a document distilled from that start, merged by mean."""
    from safetensors.torch import load_file

    from prag.evaluate import load_questions

    home = tmp_path / "home"
    Pipeline(home, Config(), llm=default_llm).index(DEMO / "corpus.jsonl", show_progress=False)
    held_in = load_questions(DEMO / "questions.jsonl", offset=6, limit=2)
    warm = tmp_path / "warmup.safetensors"
    n = Pipeline(home, Config(), llm=default_llm).warmup(held_in, warm, show_progress=False)
    assert n == 4  # each question with its gold passages, and alone
    warm_adapter = load_file(str(warm))
    assert warm_adapter["down_proj.B"].abs().sum() > 0  # trained away from the zero-B initialization

    config = Config.from_dict(
        {
            "lora": {"init": str(warm)},
            "train": {"objective": "distill", "epochs": 2},
            "answer": {"top_k": 1, "merge": "mean", "init_in_all_modes": True},
        }
    )
    pipeline = Pipeline(home, config, llm=default_llm)
    assert "-init" in pipeline.adapters.root.name  # a different initialization is a different store
    question = "What is George Rankin's occupation?"
    answer = pipeline.answer(question, "prag")
    assert answer.short_answer
    [doc] = answer.passages
    adapter = pipeline.adapters.get(doc.id)
    assert not torch.allclose(adapter["down_proj.B"].float(), warm_adapter["down_proj.B"], atol=1e-4)

    # init_in_all_modes: the closed-book baseline runs the warmed-up model
    prompt = torch.tensor([pipeline.format.chat_ids(default_llm, question, [])])
    with torch.no_grad():
        base = default_llm.model(prompt).logits[0, -1]
        pipeline.lora_model.inject(pipeline.initial_adapter, config.lora.scale)
        warmed = default_llm.model(prompt).logits[0, -1]
        pipeline.lora_model.clear()
    assert not torch.allclose(base, warmed, atol=1e-3)
    assert pipeline.answer(question, "closed").short_answer


def test_cli_rejects_bad_questions_before_any_work(tmp_path, capsys):
    """The library's checks (the service answers the same input with a 422 naming the same field)."""
    import time

    from prag.cli import main

    home = str(tmp_path / "home")
    for argv, field in (
        (["ask", ""], "question:"),
        (["ask", "   "], "question:"),
        (["ask", "x" * 2001], "question:"),
        (["ask", "who", "--top-k", "-5"], "top_k:"),
        (["ask", "who", "--top-k", "0"], "top_k:"),
    ):
        t = time.perf_counter()
        assert main([*argv, "--home", home]) == 2
        assert field in capsys.readouterr().err and time.perf_counter() - t < 5  # no model loaded, nothing generated
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"id": "a", "title": "", "text": "  "}\n')
    assert main(["index", str(empty), "--home", home]) == 2
    assert "empty.jsonl:1: passage 'a' is empty" in capsys.readouterr().err
