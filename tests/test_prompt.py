"""Answer formats: prompts per style, the answer cut, and when generation may stop (no model needed)."""

from __future__ import annotations

import json

import pytest

from prag.config import AnswerConfig
from prag.prompt import REFERENCE_INSTRUCTION, SHORT_INSTRUCTION, AnswerFormat, first_sentence, load_fewshot

DIRECT = AnswerFormat()


@pytest.mark.parametrize(
    "generation, answer",
    [
        (" 1990. He was born in Ohio.", "1990"),  # a date ends the sentence
        (" 1990.\nHe was born in Ohio.", "1990"),
        (" March 11, 1887. He died later.", "March 11, 1887"),  # the comma of a date stays
        (" 15,140 people.", "15,140 people"),
        (" 3.5 million. That is a lot.", "3.5 million"),  # a decimal point is no sentence end
        (" the U.S. Army. It was founded in 1775.", "the U.S. Army"),  # nor an acronym's periods
        (" J. K. Rowling wrote it.", "J. K. Rowling wrote it"),  # nor initials
        (" World War II. It ended in 1945.", "World War II"),  # capitals that are no initial do end
        (" NASA. It is an agency.", "NASA"),
        (" Dr. Smith is a surgeon.", "Dr. Smith is a surgeon"),
        (': "Paris".', "Paris"),
        (" Paris", "Paris"),
        ("", ""),
    ],
)
def test_direct_answer_cut(generation, answer):
    assert DIRECT.extract(generation) == answer


def test_first_sentence_takes_the_first_line():
    assert first_sentence("Ohio\nHe was born in 1990.") == "Ohio"


COT = AnswerFormat(style="cot", examples=(("Who?", "Someone did it. So the answer is Ann."),))


@pytest.mark.parametrize(
    "generation, answer",
    [
        (" Jan de Bont was born in 1943. Raoul Walsh was born in 1887. So the answer is Raoul Walsh.", "Raoul Walsh"),
        (" The film came out in 1990. So the answer is 1990. Question: next", "1990"),
        (" Both are in the U.S. So the answer is yes.", "yes"),
        (" So The Answer Is: U.S. Army.", "U.S. Army"),
        (" Lonny was founded in 2009.", "Lonny was founded in 2009"),  # no marker: the first sentence (reference)
    ],
)
def test_cot_answer_cut(generation, answer):
    assert COT.extract(generation) == answer


def test_generation_stops_once_the_answer_is_complete():
    assert not DIRECT.done(" 1990")
    assert not DIRECT.done(" 1990.")  # "1990.5" is still possible
    assert DIRECT.done(" 1990. He")
    assert not DIRECT.done(" 3.5")
    assert not DIRECT.done(" the U.S. Army")
    assert DIRECT.done(" Paris\n")
    assert not DIRECT.done("\n")  # leading whitespace is no answer yet
    assert not COT.done(" Jan de Bont was born in 1943. Raoul Walsh was born in 1887.")
    assert not COT.done(" So the answer is Raoul Walsh")
    assert COT.done(" So the answer is Raoul Walsh. ")
    assert COT.done(" He was born in 1887.\n\nQuestion: Who")  # moved on to an example of its own


def test_prompts_and_replies_per_style():
    user = DIRECT.user("Who wrote Hamlet", ["Hamlet\nA play by Shakespeare."])
    assert user.startswith(SHORT_INSTRUCTION) and "Passage 1: Hamlet" in user
    assert user.endswith("Question: Who wrote Hamlet?")
    reference = AnswerFormat(instruction="reference").user("Who?", [])
    assert reference == f"{REFERENCE_INSTRUCTION}\n\n\nQuestion: Who?"  # the reference's template, word for word
    assert DIRECT.prefix == "The answer is" and DIRECT.reply("Paris.") == " Paris."

    cot_user = COT.user("Who?", ["P"])
    assert "Question: Who?\nAnswer: Someone did it. So the answer is Ann.\n\n" in cot_user
    assert cot_user.index("Passage 1: P") > cot_user.index("So the answer is Ann")
    assert cot_user.endswith("Answer the questions in the same format as above.\nQuestion: Who?")
    assert COT.prefix == "Answer:"
    full = COT.reply("Paris", "The capital of France is Paris")
    assert full == " The capital of France is Paris. So the answer is Paris."
    assert COT.reply("Paris") == " So the answer is Paris."


def test_fewshot_sets(tmp_path):
    hotpot = load_fewshot("hotpotqa")
    assert len(hotpot) == 11 and all(a.endswith((".", "..")) for _, a in hotpot)
    assert len(load_fewshot("2wikimultihopqa")) == 8
    own = tmp_path / "shots.json"
    own.write_text(json.dumps([{"question": "Q?", "answer": "A. So the answer is A."}]))
    assert load_fewshot(str(own)) == (("Q?", "A. So the answer is A."),)
    with pytest.raises(ValueError, match="neither a bundled set"):
        load_fewshot("nosuchset")
    (tmp_path / "bad.json").write_text('[{"question": "Q?"}]')
    with pytest.raises(ValueError, match="example 0 needs"):
        load_fewshot(str(tmp_path / "bad.json"))
    cot = AnswerFormat.from_config(AnswerConfig(style="cot", fewshot="hotpotqa"))
    assert cot.examples == hotpot
    with pytest.raises(ValueError, match="needs few-shot examples"):
        AnswerFormat.from_config(AnswerConfig(style="cot"))
