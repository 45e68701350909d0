"""`prag recall`: each document's own generated questions, asked with its own LoRA and with another's
(a tiny random model trained hard enough to memorize: no download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prag import Config, Pipeline
from prag.augment import Augmentation
from prag.cli import main
from prag.evaluate import load_questions
from prag.recall import recall_rows, summarize, summary_table

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"
ANSWERS = ["zebra crossing", "purple mountain"]


def test_a_lora_that_memorized_its_document_answers_its_questions_and_another_does_not(tiny_llm, tmp_path):
    config = Config()
    # three new tokens: the trained reply (" zebra", " crossing", "."), no more; what a random model writes
    # after it was never trained and is chance ("zebra crossing.Labels ...")
    settings = {"train.qa_context": "none", "train.lr": "1e-2", "train.epochs": "60", "answer.max_new_tokens": "3"}
    for key, value in settings.items():
        config.set(key, value)
    pipeline = Pipeline(tmp_path / "home", config, llm=tiny_llm)
    pipeline.index(DEMO / "corpus.jsonl", show_progress=False)
    docs = list(pipeline.retriever.passages)[:2]
    for doc, answer in zip(docs, ANSWERS, strict=True):  # the same question, a different answer per document
        pipeline.augmentations.put(Augmentation(doc.id, [], [{"question": "What is the secret?", "answer": answer}]))

    rows = recall_rows(pipeline, docs, batch_size=3, show_progress=False)
    assert all(pipeline.adapters.has(d.id) for d in docs)  # trained first, from the stored augmentations
    assert {r["condition"] for r in rows} == {"own", "other", "none", "passage"} and len(rows) == 8
    assert all(r["trained_alone"] for r in rows)  # qa_context=none: every pair without the passage
    by = {(r["doc_id"], r["condition"]): r for r in rows}
    for i, doc in enumerate(docs):
        assert by[doc.id, "own"]["f1"] == 1.0, by[doc.id, "own"]["prediction"]
        assert by[doc.id, "other"]["lora_doc"] == docs[1 - i].id and by[doc.id, "other"]["f1"] == 0.0
    summary = summarize(rows)
    assert summary["all"]["own"]["f1"] == 1.0 and summary["all"]["own - other"]["diff"] == 1.0
    assert "trained with the passage only" not in summary
    assert "| all | 2 | 1.000 | 0.000 |" in summary_table(summary)

    only = recall_rows(pipeline, docs, show_progress=False, conditions=("other",))
    assert {r["condition"] for r in only} == {"own", "other"}  # own is always asked
    assert "| all | 2 | 1.000 | 0.000 |  |  |" in summary_table(summarize(only))
    with pytest.raises(ValueError, match="unknown \\['mine'\\]"):
        recall_rows(pipeline, docs, conditions=("mine",))
    with pytest.raises(ValueError, match="at least two documents"):
        recall_rows(pipeline, docs[:1])


def test_recall_splits_pairs_by_how_they_were_trained(tiny_llm, tmp_path):
    pipeline = Pipeline(tmp_path / "home", Config(), llm=tiny_llm)  # the reference layout
    pipeline.index(DEMO / "corpus.jsonl", show_progress=False)
    docs = list(pipeline.retriever.passages)[:2]
    qa = [{"question": f"Question {i}?", "answer": f"answer {i}"} for i in range(3)]
    for doc in docs:
        pipeline.augmentations.put(Augmentation(doc.id, [], qa))
    rows = recall_rows(pipeline, docs, batch_size=8, show_progress=False, conditions=("own", "other"))
    alone = {r["question"] for r in rows if r["trained_alone"]}
    assert alone == {"Question 2?"}  # the first half of the pairs was trained with the passage only
    summary = summarize(rows)
    assert summary["trained alone"]["pairs"] == 2 and summary["trained with the passage only"]["pairs"] == 4


def test_cli_recall_prints_the_table_and_writes_every_answer(tiny_llm, tmp_path, monkeypatch, capsys):
    home, out, questions = tmp_path / "home", tmp_path / "recall.json", DEMO / "questions.jsonl"
    monkeypatch.setattr("prag.llm.LLM.load", classmethod(lambda cls, config: tiny_llm))
    common = ["--home", str(home), "--quiet"]
    assert main(["index", str(DEMO / "corpus.jsonl"), *common]) == 0
    pipeline = Pipeline(home, Config(), llm=tiny_llm)
    [question] = load_questions(questions, limit=1)
    for doc in pipeline.retrieve(question.question, 2):  # stored augmentations: only training runs
        pipeline.augmentations.put(Augmentation(doc.id, [], [{"question": "Who is it?", "answer": doc.title}]))
    recall = ["recall", "--dataset", str(questions), "--slice", "all", "--limit", "1", "--top-k", "2", *common]
    assert main([*recall, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 documents of 1 questions" in printed and "| all | 2 |" in printed
    record = json.loads(out.read_text())
    assert record["question_ids"] == [question.id] and len(record["rows"]) == 2 * 4
    assert set(record["summary"]["all"]) >= {"own", "other", "none", "passage", "own - other", "own - none"}
    assert main([*recall, "--conditions", "own,mine"]) == 2
    assert "unknown ['mine']" in capsys.readouterr().err


def test_eval_records_whether_the_documents_augmentation_holds_the_gold_answer(tiny_llm, tmp_path):
    from prag.evaluate import run

    pipeline = Pipeline(tmp_path / "home", Config(), llm=tiny_llm)
    pipeline.index(DEMO / "corpus.jsonl", show_progress=False)
    questions = load_questions(DEMO / "questions.jsonl", limit=2)
    for q, answer in zip(questions, ["a politician", "an actor"], strict=True):  # the first covered, not the second
        for doc in pipeline.retrieve(q.question, 1):
            pipeline.augmentations.put(Augmentation(doc.id, [], [{"question": "What was he?", "answer": answer}]))
    evaluation, _ = run(pipeline, questions, ["closed", "prag"], top_k=1, show_progress=False)
    stored = {(r["id"], r["mode"]): r["stored_answer_f1"] for r in evaluation.records}
    assert stored == {(questions[0].id, m): 1.0 for m in ("closed", "prag")} | {
        (questions[1].id, m): 0.0 for m in ("closed", "prag")
    }
    coverage = evaluation.metrics("demo", top_k=1, model="tiny")["coverage"]
    assert (coverage["questions"], coverage["covered"]) == (2, 1)
    assert {part: v["n"] for part, v in coverage["f1_by_mode"]["prag"].items()} == {"covered": 1, "uncovered": 1}
