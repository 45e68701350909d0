"""Tests for prag.evaluate: scoring, question loading, aggregation and result files (no model needed)."""

import json
from types import SimpleNamespace

import pytest

from prag.evaluate import (
    REPORT_SIZE,
    Evaluation,
    Question,
    coverage_summary,
    exact_match,
    latency_summary,
    load_questions,
    normalize_answer,
    paired_bootstrap,
    pool_runs,
    recall_at_k,
    report_md,
    stored_answer_f1,
    token_f1,
    unrelated_partners,
    write_results,
)

try:
    from prag.corpus import Passage
except ImportError:  # corpus module not written yet

    def Passage(id: str, title: str, text: str) -> SimpleNamespace:
        return SimpleNamespace(id=id, title=title, text=text)


def test_normalize_answer():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("An apple, a day.") == "apple day"
    assert normalize_answer("theater") == "theater"  # articles only as whole words
    assert normalize_answer("  U.S.A. ") == "usa"
    assert normalize_answer("") == ""


def test_exact_match():
    assert exact_match("the Eiffel Tower.", ["Eiffel Tower"]) == 1.0
    assert exact_match("Paris", ["London", "paris"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert exact_match("x", []) == 0.0


def test_token_f1():
    assert token_f1("Paris", ["Paris"]) == 1.0
    # pred {barack, obama, jr}, gold {barack, obama}: p=2/3, r=1 -> f1=0.8
    assert token_f1("Barack Obama Jr", ["Barack Obama"]) == pytest.approx(0.8)
    assert token_f1("Barack Obama Jr", ["Michelle", "Barack Obama"]) == pytest.approx(0.8)  # max over golds
    assert token_f1("the cat", ["a cat!"]) == 1.0
    assert token_f1("dog", ["cat"]) == 0.0
    assert token_f1("the", ["an"]) == 0.0  # a gold answer that normalises to nothing matches nothing
    assert token_f1("", ["an", "cat"]) == 0.0 and exact_match("", ["the"]) == 0.0
    assert token_f1("the", ["cat"]) == 0.0
    assert token_f1("cat cat", ["cat"]) == pytest.approx(2 * 0.5 * 1 / 1.5)  # repeated tokens counted once


def test_yes_no_rule():
    """The reference's rule: F1 is 0 unless both or neither side is yes / no / noanswer."""
    assert token_f1("yes", ["yes"]) == 1.0 and token_f1("No.", ["no"]) == 1.0
    assert token_f1("yes", ["no"]) == 0.0
    assert token_f1("yes it is", ["yes"]) == 0.0  # plain token F1 would give 0.5
    assert token_f1("no", ["no man's land"]) == 0.0  # plain token F1 would give 0.5
    assert token_f1("yes", ["no", "yes"]) == 1.0  # max over golds
    assert token_f1("noanswer", ["Paris"]) == 0.0


def test_recall_at_k():
    assert recall_at_k(["A", "B", "C"], ["A", "D"]) == 0.5
    assert recall_at_k(["a "], ["A"]) == 1.0
    assert recall_at_k([], ["A"]) == 0.0
    assert recall_at_k(["A"], []) is None


def test_latency_summary():
    s = latency_summary([10.0, 20.0, 30.0, 40.0])
    assert s == {"p50": 25.0, "p95": 38.5, "mean": 25.0}
    assert latency_summary([]) == {"p50": 0.0, "p95": 0.0, "mean": 0.0}


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


ROWS = [
    {
        "id": "q0",
        "question": "Who?",
        "golden_answers": ["Ann"],
        "metadata": {"type": "bridge", "supporting_titles": ["T1", "T2"]},
    },
    {"id": "q1", "question": "What?", "golden_answers": ["x", "y"]},
    {
        "id": "q2",
        "question": "When?",
        "golden_answers": ["1999"],
        "metadata": {"type": "comparison", "supporting_facts": {"title": ["T3", "T3", "T4"]}},
    },
]


def test_load_questions_round_trip(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl", [ROWS[0], "", ROWS[1], ROWS[2]])
    qs = load_questions(p)
    assert qs[0] == Question("q0", "Who?", ["Ann"], "bridge", ["T1", "T2"])
    assert qs[1] == Question("q1", "What?", ["x", "y"], None, [])
    assert qs[2].supporting_titles == ["T3", "T4"]  # FlashRAG supporting_facts, deduplicated
    assert [q.id for q in load_questions(p, limit=1, offset=1)] == ["q1"]
    assert [q.id for q in load_questions(p, offset=2)] == ["q2"]
    assert load_questions(p, limit=0) == []


@pytest.mark.parametrize(
    "bad, msg",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"id": "b", "golden_answers": ["a"]}, "'question'"),
        ({"id": "b", "question": "  ", "golden_answers": ["a"]}, "'question'"),
        ({"id": "b", "question": "q"}, "golden_answers"),
        ({"id": "b", "question": "q", "golden_answers": []}, "golden_answers"),
        ({"id": "b", "question": "q", "golden_answers": "a"}, "golden_answers"),
        ({"id": "b", "question": "q", "golden_answers": ["a", 3]}, "golden_answers"),
        ({"id": "b", "question": "q", "golden_answers": ["a"], "metadata": [1]}, "metadata"),
    ],
)
def test_load_questions_errors(tmp_path, bad, msg):
    p = _write_jsonl(tmp_path / "d.jsonl", [ROWS[0], "", bad])
    with pytest.raises(ValueError, match=msg) as e:
        load_questions(p)
    assert f"{p}:3:" in str(e.value)


def _answer(short, passages=(), **timings):
    text = f"reasoning... {short}"
    return SimpleNamespace(short_answer=short, text=text, passages=list(passages), timings=timings)


def test_evaluation_and_write_results(tmp_path):
    q0, q1, q2 = load_questions(_write_jsonl(tmp_path / "d.jsonl", ROWS))
    pa, pb = Passage(id="1", title="T1", text="..."), Passage(id="2", title="T9", text="...")
    ev = Evaluation()
    rec = ev.add(q0, "closed", _answer("Bob", generation=0.1))
    assert rec["passages"] == [] and rec["recall"] is None and rec["em"] == 0.0
    assert rec["timings_ms"] == {
        "retrieval": 0.0,
        "load_merge": 0.0,
        "generation": 100.0,
        "total": 100.0,
        "first_token": 100.0,  # no clock: all of generation
        "per_token": 0.0,
    }
    ev.add(q1, "closed", _answer("x", generation=0.3))
    ev.add(q2, "closed", _answer("in 1999", generation=0.2))
    answer = _answer("Ann", [pa, pb], retrieval=0.01, generation=0.2, first_token=0.05)
    answer.new_tokens = 4
    rec = ev.add(q0, "rag", answer)
    assert rec["recall"] == 0.5
    assert (rec["timings_ms"]["first_token"], rec["timings_ms"]["per_token"]) == (50.0, 50.0)  # 150 ms / 3 tokens
    assert rec["passages"] == [{"id": "1", "title": "T1"}, {"id": "2", "title": "T9"}]
    assert rec["timings_ms"]["total"] == 210.0 and rec["generation"] == "reasoning... Ann"
    ev.add(q1, "rag", _answer("z", [pa], retrieval=0.01, generation=0.2))  # no supporting titles: skipped
    ev.add(q2, "rag", _answer("1999", [pb], retrieval=0.01, generation=0.2))
    # q0 retrieved again: counted once in recall@k
    ev.add(q0, "prag", _answer("Ann", [pa], retrieval=0.01, load_merge=0.5, generation=0.2))

    m = ev.metrics("toy", top_k=2, model="tiny", extra={"command": "prag eval"})
    assert set(m) == {"dataset", "n", "top_k", "model", "retrieval", "modes", "comparisons", "command"}
    assert set(m["comparisons"]) == {"prag - closed", "prag - rag"}
    assert (m["dataset"], m["n"], m["top_k"], m["model"]) == ("toy", 3, 2, "tiny")
    assert m["retrieval"]["recall@k"] == pytest.approx((0.5 + 0.0) / 2)
    assert list(m["modes"]) == ["closed", "rag", "prag"]
    closed, rag, prag = m["modes"]["closed"], m["modes"]["rag"], m["modes"]["prag"]
    assert set(closed) == {"em", "f1", "n", "latency_ms", "by_type", "new_tokens"}
    assert closed["n"] == 3 and closed["em"] == pytest.approx(1 / 3, abs=1e-4)
    assert closed["f1"] == round((0 + 1 + 2 / 3) / 3, 4)  # "in 1999" vs "1999": p=1/2, r=1 -> 2/3
    assert rag["em"] == round(2 / 3, 4) and prag == {**prag, "em": 1.0, "f1": 1.0, "n": 1}
    lat = closed["latency_ms"]
    assert (lat["p50"], lat["mean"]) == (200.0, 200.0)
    assert set(lat["parts"]) == {"retrieval", "load_merge", "generation"}
    assert prag["latency_ms"]["parts"]["load_merge"]["mean"] == 500.0 and prag["latency_ms"]["p95"] == 710.0
    assert closed["by_type"] == {
        "bridge": {"em": 0.0, "f1": 0.0, "n": 1},
        "comparison": {"em": 0.0, "f1": round(2 / 3, 4), "n": 1},
        "unknown": {"em": 1.0, "f1": 1.0, "n": 1},
    }

    out = tmp_path / "run"
    write_results(out, m, ev.records, notes="prag eval --dataset toy")
    assert sorted(p.name for p in out.iterdir()) == [
        "f1_by_mode.png",
        "latency_by_mode.png",
        "metrics.json",
        "predictions.jsonl",
        "report.md",
    ]
    assert json.loads((out / "metrics.json").read_text()) == m
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert preds == ev.records
    for png in ("f1_by_mode.png", "latency_by_mode.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "# toy: n=3, top-k=2, model=tiny" in report and "recall@2: 0.2500" in report
    assert "| rag | 0.6667 | 0.6667 | 210.0 | 210.0 | 10.0 | 0.0 | 200.0 |" in report
    assert "| comparison | 0.6667 | 1.0000 | - |" in report
    assert "![F1 by mode](f1_by_mode.png)" in report and "prag eval --dataset toy" in report


def test_no_recall_when_no_supporting_titles():
    q = Question("q", "?", ["a"], None, [])
    ev = Evaluation()
    ev.add(q, "rag", _answer("a", [Passage(id="1", title="T", text="")]))
    assert ev.metrics("d", 1, "m")["retrieval"]["recall@k"] is None


def test_report_and_tune_slices(tmp_path):
    rows = [{"id": f"q{i}", "question": f"Q{i}?", "golden_answers": ["a"]} for i in range(REPORT_SIZE + 30)]
    p = _write_jsonl(tmp_path / "d.jsonl", rows)
    report = load_questions(p, slice="report")
    tune = load_questions(p, slice="tune")
    assert [q.id for q in report] == [f"q{i}" for i in range(REPORT_SIZE)]
    assert [q.id for q in tune] == [f"q{i}" for i in range(REPORT_SIZE, REPORT_SIZE + 30)]
    assert [q.id for q in load_questions(p, slice="tune", offset=5, limit=2)] == ["q105", "q106"]
    assert [q.id for q in load_questions(p, slice="report", offset=98, limit=10)] == ["q98", "q99"]  # never past 100
    assert len(load_questions(p)) == REPORT_SIZE + 30
    with pytest.raises(ValueError, match="unknown slice"):
        load_questions(p, slice="test")


def test_paired_bootstrap():
    same = paired_bootstrap([0.5, 1.0, 0.0], [0.5, 1.0, 0.0])
    assert same == {"diff": 0.0, "low": 0.0, "high": 0.0}
    better = paired_bootstrap([1.0] * 20 + [0.0] * 5, [0.0] * 25)
    assert better["diff"] == 0.8 and 0.6 < better["low"] < better["diff"] < better["high"] <= 0.96
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 0.0])


def test_unrelated_partners_share_no_document():
    qs = [Question(f"q{i}", "?", ["a"], None, []) for i in range(4)]
    P = Passage
    retrieved = {
        "q0": [P("1", "", ""), P("2", "", "")],
        "q1": [P("2", "", ""), P("3", "", "")],  # overlaps q0 and q2
        "q2": [P("3", "", ""), P("4", "", "")],
        "q3": [P("5", "", "")],
    }
    partners = unrelated_partners(qs, retrieved)
    assert partners == {"q0": "q2", "q1": "q3", "q2": "q3", "q3": "q0"}
    for q, other in partners.items():
        assert not {p.id for p in retrieved[q]} & {p.id for p in retrieved[other]}
    with pytest.raises(ValueError, match="disjoint"):
        unrelated_partners(qs[:2], {"q0": retrieved["q0"], "q1": retrieved["q1"]})


def test_comparisons_in_metrics():
    qs = [Question(f"q{i}", "?", ["Ann"], None, []) for i in range(10)]
    ev = Evaluation()
    for i, q in enumerate(qs):
        ev.add(q, "rag", _answer("Ann" if i < 3 else "Bob", generation=0.1))
        ev.add(q, "prag", _answer("Ann" if i < 6 else "Bob", generation=0.1))
        ev.add(q, "prag-unrelated", _answer("Ann" if i < 6 else "Bob", generation=0.1))
    c = ev.metrics("toy", 3, "m")["comparisons"]
    assert set(c) == {"prag - rag", "prag - prag-unrelated"}
    assert c["prag - rag"]["diff"] == 0.3 and c["prag - prag-unrelated"] == {"diff": 0.0, "low": 0.0, "high": 0.0}


def test_coverage_splits_f1_by_whether_the_augmentation_holds_the_answer():
    assert stored_answer_f1(["politician"], []) is None  # no stored pairs: nothing to say
    assert stored_answer_f1(["politician", "pol"], ["1887", "a British politician"]) == round(2 / 3, 4)
    assert stored_answer_f1(["politician"], ["actor"]) == 0.0

    def record(qid, mode, f1, stored):
        return {"id": qid, "mode": mode, "f1": f1, "stored_answer_f1": stored}

    records = [
        record("q1", "rag", 0.0, 1.0),
        record("q1", "prag", 1.0, 1.0),  # covered, and the LoRA answers it
        record("q2", "rag", 1.0, 0.2),
        record("q2", "prag", 0.0, 0.2),  # uncovered
        record("q3", "rag", 0.5, None),  # no stored pairs: left out
        record("q3", "prag", 0.5, None),
    ]
    c = coverage_summary(records)
    assert (c["questions"], c["covered"], c["threshold"], c["mean_stored_answer_f1"]) == (2, 1, 0.5, 0.6)
    assert c["f1_by_mode"]["prag"] == {"covered": {"f1": 1.0, "n": 1}, "uncovered": {"f1": 0.0, "n": 1}}
    assert c["f1_by_mode"]["rag"] == {"covered": {"f1": 0.0, "n": 1}, "uncovered": {"f1": 1.0, "n": 1}}
    assert coverage_summary([record("q3", "rag", 0.5, None)]) is None

    ev = Evaluation()
    ev.records = [
        {**r, "em": 0.0, "type": None, "recall": None, "new_tokens": 1, "timings_ms": _ZERO_MS} for r in records
    ]
    metrics = ev.metrics("toy", top_k=1, model="tiny")
    assert metrics["coverage"] == c
    report = report_md(metrics)
    assert "1 of 2 questions have a gold answer among" in report
    assert "| prag | 1.0000 (n=1) | 0.0000 (n=1) |" in report


_ZERO_MS = {"retrieval": 0.0, "load_merge": 0.0, "generation": 0.0, "total": 0.0, "first_token": 0.0, "per_token": 0.0}


def _chunk(tmp_path, name, questions, answers, offline, **changes):
    """A `prag eval` output directory for some questions, answered in closed and prag."""
    ev = Evaluation()
    for q, short in zip(questions, answers, strict=True):
        ev.add(q, "closed", _answer(short, generation=0.1))
        ev.add(q, "prag", _answer(short if q.id != "q1" else "x", generation=0.2))
    extra = {"slice": {"name": "report", "offset": 0, "ids": [q.id for q in questions]}, "config": {"lr": 1}}
    m = ev.metrics("toy", top_k=3, model="tiny", extra={**extra, "offline": offline, **changes})
    write_results(tmp_path / name, m, ev.records)
    return tmp_path / name, ev


def test_pooled_chunks_score_as_one_run(tmp_path):
    from prag.cli import main

    q0, q1, q2 = load_questions(_write_jsonl(tmp_path / "d.jsonl", ROWS))
    off_a = {"documents_parameterized": 3, "parameterize_s": 6.0, "augment_s": 4.0, "train_s": 2.0}
    off_b = {"documents_parameterized": 1, "parameterize_s": 1.0, "augment_s": 0.5, "train_s": 0.5}
    a, ev_a = _chunk(tmp_path, "a", [q0, q1], ["Ann", "nope"], off_a)
    b, ev_b = _chunk(tmp_path, "b", [q2], ["1999"], off_b)
    whole = Evaluation()
    whole.records = ev_a.records + ev_b.records
    pooled, records = pool_runs([a, b])
    assert records == whole.records and pooled["n"] == 3
    assert pooled["modes"] == whole.metrics("toy", 3, "tiny")["modes"]
    assert pooled["comparisons"]["prag - closed"]["diff"] == pytest.approx(1 / 3, abs=1e-4)  # q1 right only in prag
    assert pooled["offline"] == {
        "documents_parameterized": 4,
        "parameterize_s": 7.0,
        "augment_s": 4.5,
        "train_s": 2.5,
        "parameterize_s_per_doc": 1.75,
    }
    assert pooled["slice"]["ids"] == ["q0", "q1", "q2"] and pooled["pooled_from"] == [str(a), str(b)]

    assert main(["pool", str(a), str(b), "--out", str(tmp_path / "ab")]) == 0
    assert json.loads((tmp_path / "ab" / "metrics.json").read_text())["modes"] == pooled["modes"]
    assert f"Pooled by `prag pool` from: {a}, {b}" in (tmp_path / "ab" / "report.md").read_text()


def test_pooling_refuses_what_is_not_one_evaluation(tmp_path, capsys):
    from prag.cli import main

    q0, q1, q2 = load_questions(_write_jsonl(tmp_path / "d.jsonl", ROWS))
    a, _ = _chunk(tmp_path, "a", [q0, q1], ["Ann", "x"], {})
    again, _ = _chunk(tmp_path, "again", [q1, q2], ["x", "1999"], {})
    with pytest.raises(ValueError, match=r"\['q1'\] were answered in .*a too"):
        pool_runs([a, again])
    other, _ = _chunk(tmp_path, "other", [q2], ["1999"], {}, config={"lr": 2})
    with pytest.raises(ValueError, match="its 'config' differs"):
        pool_runs([a, other])
    first = {"path": "t/translator.safetensors", "documents": 180, "seconds": 800.0}
    gen_a, _ = _chunk(tmp_path, "gen_a", [q0, q1], ["Ann", "x"], {"translator": first})
    gen_b, _ = _chunk(tmp_path, "gen_b", [q2], ["1999"], {"translator": first})
    assert pool_runs([gen_a, gen_b])[0]["offline"]["translator"] == first  # the dyprag modes' source is kept
    retrained, _ = _chunk(tmp_path, "retrained", [q2], ["1999"], {"translator": {**first, "seconds": 900.0}})
    with pytest.raises(ValueError, match="different translators"):
        pool_runs([gen_a, retrained])
    broken, _ = _chunk(tmp_path, "broken", [q2], ["1999"], {})
    lines = (broken / "predictions.jsonl").read_text().splitlines()
    (broken / "predictions.jsonl").write_text(lines[0] + "\n{oops\n")
    assert main(["pool", str(a), str(broken), "--out", str(tmp_path / "out")]) == 2
    assert f"{broken / 'predictions.jsonl'}:2: invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
