"""The one prompt template that every answer mode, and LoRA training, share.

It is the reference implementation's: modes differ only in whether passages are
listed, so their answers can be compared on the same footing. The assistant turn
is pre-filled with a lead-in ("The answer is") and the short answer is cut from
what follows, the same way in every mode.
"""

from __future__ import annotations

import re

INSTRUCTION = (
    "You should answer the question by referring to the knowledge provided below and integrating your own knowledge."
)


def question_prompt(question: str, passages: list[str]) -> str:
    question = question.strip()
    if not question.endswith("?"):
        question += "?"
    context = "".join(f"Passage {i + 1}: {text}\n" for i, text in enumerate(passages))
    return f"{INSTRUCTION}\n{context}\n\nQuestion: {question}"


def short_answer(generation: str) -> str:
    """The answer proper: the generation after the lead-in, up to the first line or sentence end."""
    text = generation.strip().lstrip(":").strip().split("\n")[0]
    text = re.split(r"(?<=[^A-Z0-9.])\.(\s|$)", text)[0]  # a sentence end, but not "U.S." or "3.5"
    return text.strip().strip('"').strip().rstrip(".").strip()


def answer_done(generation: str) -> bool:
    """Stop generating once the first line of the answer is complete."""
    return "\n" in generation.strip()
