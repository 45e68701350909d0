"""Parsing what the model writes, choosing answer spans, and answer-first augmentation on the real model."""

from __future__ import annotations

import prag.augment as augment_module
from prag.augment import (
    RESCUE_ROUNDS,
    Augmentation,
    _has_pairs,
    _rewrite_done,
    answer_spans,
    augment,
    is_grounded,
    parse_qa,
    rewrite_body,
    roundtrip_passes,
)
from prag.config import AugmentConfig
from prag.corpus import Passage

PASSAGE = Passage(
    "d1",
    "Ada Lovelace",
    "Ada Lovelace was an English mathematician. In 1843 she published notes on the Analytical Engine "
    "designed by Charles Babbage, including what is seen as the first computer program. She died in London.",
)


def test_parse_qa_keeps_good_pairs_and_counts_bad_ones():
    text = (
        " Who designed the Analytical Engine?\nAnswer: Charles Babbage.\n"
        "Question: When were the notes published\nAnswer: 1843\n"
        "Question: no answer line here\n"
        "Question: What was she?\nAnswer: " + "a very long answer " * 5
    )
    pairs, problems = parse_qa(text)
    assert pairs == [
        {"question": "Who designed the Analytical Engine?", "answer": "Charles Babbage"},
        {"question": "When were the notes published?", "answer": "1843"},
    ]
    assert problems == {"unparsable": 1, "answer_too_long": 1}


def test_free_qa_stops_at_a_line_end_once_the_pairs_still_needed_are_in():
    result = Augmentation("d1", qa=[{"question": "Where did she die?", "answer": "London"}])
    done = _has_pairs(PASSAGE, result, [], AugmentConfig(qa_pairs=3))  # two more grounded pairs needed
    one = " Who designed the Analytical Engine?\nAnswer: Charles Babbage\n"
    assert not done(one)
    ungrounded = one + "Question: Where was she born?\nAnswer: Paris\n"  # not in the passage: does not count
    assert not done(ungrounded)
    again = one + "Question: Where did she die?\nAnswer: London\n"  # already kept: does not count
    assert not done(again)
    two = one + "Question: When were the notes published?\nAnswer: 1843"
    assert not done(two)  # the answer's line may still be going ("1843 and 1844")
    assert done(two + "\n")
    full = _has_pairs(PASSAGE, Augmentation("d1"), [], AugmentConfig(qa_pairs=1, full_answers=True))
    assert not full(one)  # its full answer is still to come
    assert full(one + "Full answer: Charles Babbage designed the Analytical Engine.\n")


def test_grounded_means_every_answer_word_is_in_the_passage():
    assert is_grounded("Charles Babbage", PASSAGE)
    assert is_grounded("ada lovelace", PASSAGE)  # the title counts
    assert not is_grounded("Paris", PASSAGE)


def test_answer_spans_are_names_years_and_numbers_but_not_the_title():
    spans = answer_spans(PASSAGE)
    assert "1843" in spans and "Charles Babbage" in spans and "London" in spans
    assert "Ada Lovelace" not in spans and "Ada" not in spans
    assert "She" not in spans and "In" not in spans  # sentence-initial words are not names
    assert len(spans) == len(set(spans))
    assert all(is_grounded(s, PASSAGE) for s in spans)


def test_answer_spans_include_what_the_subject_is_and_whole_dates():
    singer = Passage(
        "d2",
        "Laura Marling",
        "Laura Beatrice Marling (born 1 February 1990) is an English folk singer-songwriter and musician from "
        "Eversley, Hampshire. She has released 2 albums and toured 14 countries.",
    )
    spans = answer_spans(singer)
    assert spans[0] == "folk singer-songwriter"  # what PopQA asks (occupation), first; no nationality
    assert "1 February 1990" in spans and "1990" not in spans  # a date whole, not its year alone
    assert "Eversley" in spans and "14" in spans
    assert "2" not in spans and "1" not in spans  # single digits are rarely what a question is about
    assert answer_spans(PASSAGE)[0] == "mathematician"
    assert all(is_grounded(s, singer) for s in spans)


def test_answer_first_augmentation_with_the_real_model(default_llm):
    config = AugmentConfig(qa_style="answer_first", rewrites=0, qa_pairs=2, attempts=2)
    [aug] = augment(default_llm, [PASSAGE], config, show_progress=False)
    assert 1 <= len(aug.qa) <= 2
    spans = answer_spans(PASSAGE)
    for qa in aug.qa:
        assert qa["answer"] in spans  # the answer was chosen from the passage, not generated
        assert qa["question"].endswith("?") and len(qa["question"].split()) >= 3


def test_the_round_trip_keeps_a_question_that_asks_for_its_answer(default_llm):
    pairs = [
        (PASSAGE, {"question": "In what year did Ada Lovelace publish her notes?", "answer": "1843"}),
        (PASSAGE, {"question": "Who designed the Analytical Engine?", "answer": "1843"}),  # asks for another fact
    ]
    assert roundtrip_passes(default_llm, pairs) == [True, False]


def test_round_trip_augmentation_keeps_only_what_passes_of_the_same_pairs(default_llm, monkeypatch):
    """The same seed draws the same pairs with and without the check: with it, those kept are among them and
    every other one is counted as not_roundtrip (in one round: a rescue round would draw more)."""
    monkeypatch.setattr(augment_module, "RESCUE_ROUNDS", 0)
    plain = AugmentConfig(rewrites=0, qa_pairs=4, attempts=1)
    checked = AugmentConfig(rewrites=0, qa_pairs=4, attempts=1, roundtrip=True)
    [drawn] = augment(default_llm, [PASSAGE], plain, show_progress=False)
    [kept] = augment(default_llm, [PASSAGE], checked, show_progress=False)
    assert drawn.qa and all(qa in drawn.qa for qa in kept.qa)
    assert len(kept.qa) + kept.rejected.get("not_roundtrip", 0) == len(drawn.qa)
    assert "not_roundtrip" not in drawn.rejected


def test_parse_qa_with_full_answers():
    text = (
        " Who designed the Analytical Engine?\nAnswer: Charles Babbage\n"
        "Full answer: The Analytical Engine was designed by Charles Babbage.\n"
        "Question: When were the notes published?\nAnswer: 1843\nFull answer: She published them later.\n"
        "Question: Where did she die?\nAnswer: London"
    )
    pairs, problems = parse_qa(text, full_answers=True)
    assert pairs == [
        {
            "question": "Who designed the Analytical Engine?",
            "answer": "Charles Babbage",
            "full_answer": "The Analytical Engine was designed by Charles Babbage.",
        },
        # a full answer that does not state the short answer is left out, the pair kept
        {"question": "When were the notes published?", "answer": "1843", "full_answer": ""},
        {"question": "Where did she die?", "answer": "London", "full_answer": ""},
    ]
    assert problems == {"full_answer_missing": 2}
    assert parse_qa(text)[0][0] == {"question": "Who designed the Analytical Engine?", "answer": "Charles Babbage"}


def test_a_rewrite_after_a_preamble_is_kept():
    body = "Ada Lovelace, an English mathematician, published notes on Babbage's Analytical Engine in 1843."
    assert rewrite_body(f"Here is a rewritten version of the passage:\n\n{body}\n\nI hope this helps!") == body
    assert rewrite_body(f"Sure! Here's the revised text:\n\n{body}") == body
    assert rewrite_body(body) == body
    assert rewrite_body("Here is a rewritten version:\n\n") == ""
    # generation stops after the first paragraph of rewrite, not after the preamble
    assert not _rewrite_done("Here is a rewritten version:\n\nAda Love")
    assert _rewrite_done(f"Here is a rewritten version:\n\n{body}\n\nI")


def test_a_document_left_without_any_pair_gets_qa_only_rescue_rounds(tiny_llm, monkeypatch):
    """A random model writes no parsable pair: after its one round the document has none, so up to
    RESCUE_ROUNDS more rounds ask for QA pairs only (no rewrite again) before it is given up."""
    calls = []
    generate = tiny_llm.generate

    def counted(prompts, max_new_tokens, **kwargs):
        calls.append("rewrite" if max_new_tokens == 8 else "qa")
        return generate(prompts, max_new_tokens, **kwargs)

    monkeypatch.setattr(tiny_llm, "generate", counted)
    config = AugmentConfig(rewrites=1, qa_pairs=2, attempts=1, rewrite_max_tokens=8, qa_tokens_per_pair=3)
    [result] = augment(tiny_llm, [PASSAGE], config, show_progress=False)
    assert result.qa == []
    assert calls == ["rewrite", "qa"] + ["qa"] * RESCUE_ROUNDS
