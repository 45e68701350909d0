"""The prompts that every answer mode, and LoRA training, share; and how the answer is read back.

Two answer styles, both the reference implementation's:

    direct  the user turn lists the passages, then the question; the assistant turn is pre-filled
            with "The answer is" and the answer is the first sentence after it
    cot     the reference's chain-of-thought prompt with the dataset's few-shot examples; the
            assistant turn starts with "Answer:", the model reasons, and the answer is what follows
            "the answer is"

Modes differ only in whether passages are listed, so their answers compare on the same footing.
Training sequences are built from the same format (prompt + prefix, then the reply), so what a
document's LoRA learns is asked for in exactly the form it is trained in.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

REFERENCE_INSTRUCTION = (
    "You should answer the question by referring to the knowledge provided below and integrating your own knowledge."
)
# The strong baseline: every mode is asked for the short form that trained LoRAs would otherwise teach.
SHORT_INSTRUCTION = (
    REFERENCE_INSTRUCTION + " Reply with the answer only: a name, a place, a date, a number, or yes or no."
)
COT_INSTRUCTION = (
    "You should reference the knowledge provided below and combine it with your own knowledge to answer the "
    "question. Please follow the format of the example I provided above.\n"
    "Here are some examples about how to answer the questions.\n"
)
COT_PREFIX = "Answer:"
COT_MARKER = "the answer is"
INSTRUCTIONS = {"short": SHORT_INSTRUCTION, "examples": SHORT_INSTRUCTION, "reference": REFERENCE_INSTRUCTION}
# instruction=examples: these worked turns precede every question, showing the short form rather than
# describing it (small models copy a shown format far more reliably). Generic facts, from no benchmark.
SHORT_EXAMPLES = (
    ("Who wrote the novel Pride and Prejudice?", "Jane Austen"),
    ("In what year did the Berlin Wall fall?", "1989"),
    ("Is the Nile longer than the Thames?", "yes"),
)

# A period after one of these does not end the sentence: initials and acronyms ("J. K.", "U.S."),
# titles and common abbreviations ("Dr.", "St.", "Jr.", "Inc.", "vs.", "No.", month names).
_ABBREVIATION = re.compile(
    r"(?:\b[A-Z]|\b(?:Mr|Mrs|Ms|Dr|St|Sr|Jr|Inc|Ltd|Co|Corp|vs|etc|No|Mt|Ft|Gen|Col|Lt|Sgt|Capt|Prof|Rev|Hon|"
    r"Gov|Sen|Rep|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec|e\.g|i\.e))$"
)


def sentence_end(text: str, need_space: bool = False) -> int | None:
    """Index of the period that ends the first sentence of `text`, or None.

    A period ends a sentence when whitespace (or, unless `need_space`, the end) follows it and it
    does not close an initial, acronym or abbreviation: "1990. He was" ends at "1990", "3.5" and
    "U.S. Army" do not end. `need_space` is for text still being generated, whose last period may
    yet turn out to be a decimal point.
    """
    for match in re.finditer(r"[.!?](?=\s)" if need_space else r"[.!?](?=\s|$)", text):
        if match.group() == "." and _ABBREVIATION.search(text[: match.start()]):
            continue
        return match.start()
    return None


def first_sentence(text: str) -> str:
    """The answer proper: the first line, up to the end of its first sentence, without quotes."""
    text = text.strip().lstrip(":").strip()
    text = text.split("\n")[0]
    end = sentence_end(text)
    if end is not None:
        text = text[:end]
    return text.strip().strip("\"'").strip().rstrip(".").strip()


def load_fewshot(name: str) -> tuple[tuple[str, str], ...]:
    """Chain-of-thought examples: a bundled set by dataset name, or a JSON file of {question, answer}."""
    if not name:
        return ()
    bundled = resources.files("prag") / "data" / "fewshot" / f"{name}.json"
    path = Path(name)
    if bundled.is_file():
        text = bundled.read_text(encoding="utf-8")
    elif path.is_file():
        text = path.read_text(encoding="utf-8")
    else:
        known = sorted(p.name.removesuffix(".json") for p in (resources.files("prag") / "data" / "fewshot").iterdir())
        raise ValueError(f"answer.fewshot={name!r}: neither a bundled set ({', '.join(known)}) nor a JSON file")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"answer.fewshot={name!r}: invalid JSON at line {error.lineno}: {error.msg}") from None
    examples = []
    for i, row in enumerate(rows if isinstance(rows, list) else [None]):
        if not (isinstance(row, dict) and isinstance(row.get("question"), str) and isinstance(row.get("answer"), str)):
            raise ValueError(f"answer.fewshot={name!r}: example {i} needs string fields 'question' and 'answer'")
        examples.append((row["question"].strip(), row["answer"].strip()))
    return tuple(examples)


@dataclass(frozen=True)
class AnswerFormat:
    """How a question is put to the model and how its answer is read back (one per config)."""

    style: str = "direct"  # "direct" or "cot"
    # direct style: "short" (ask for the answer only), "examples" (and show it in worked turns), "reference"
    instruction: str = "short"
    lead_in: str = "The answer is"
    examples: tuple[tuple[str, str], ...] = ()  # cot: few-shot (question, worked answer) pairs

    @classmethod
    def from_config(cls, answer) -> AnswerFormat:
        """From an `AnswerConfig` (duck-typed, so this module needs no config import)."""
        examples = load_fewshot(answer.fewshot) if answer.style == "cot" else ()
        if answer.style == "cot" and not examples:
            raise ValueError("answer.style=cot needs few-shot examples: set answer.fewshot (e.g. hotpotqa)")
        return cls(answer.style, answer.instruction, answer.lead_in, examples)

    @property
    def prefix(self) -> str:
        """The start of the assistant turn, given to the model (and not trained on)."""
        return COT_PREFIX if self.style == "cot" else self.lead_in

    @property
    def history(self) -> tuple[tuple[str, str], ...]:
        """Worked (user, assistant) turns before the question: the short-answer examples, if asked for."""
        if self.style == "cot" or self.instruction != "examples":
            return ()
        return tuple((self.user(q, []), f"{self.lead_in}{self.reply(a)}") for q, a in SHORT_EXAMPLES)

    def chat_ids(self, llm, question: str, passages: list[str]) -> list[int]:
        """Token ids of the whole prompt for `llm` (an `LLM`): turns, user turn, assistant prefix."""
        return llm.chat(self.user(question, passages), self.prefix, history=self.history)

    def user(self, question: str, passages: list[str]) -> str:
        question = question.strip()
        if not question.endswith("?"):
            question += "?"
        context = "".join(f"Passage {i + 1}: {text}\n" for i, text in enumerate(passages))
        if self.style == "cot":
            shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in self.examples)
            return (
                f"{COT_INSTRUCTION}{shots}Here are some reference.\n{context}\n\n"
                f"Let's think step by step. Answer the questions in the same format as above.\nQuestion: {question}"
            )
        return f"{INSTRUCTIONS[self.instruction]}\n{context}\n\nQuestion: {question}"

    def reply(self, answer: str, full_answer: str = "") -> str:
        """The trained continuation of the prefix: ' <answer>.' (direct), or the full-sentence answer
        and then 'So the answer is <answer>.' (cot), the form the few-shot examples show."""
        answer = answer.strip().rstrip(".")
        if self.style == "cot":
            full = full_answer.strip()
            full = full if not full or full.endswith((".", "!", "?")) else full + "."
            return f" {full + ' ' if full else ''}So the answer is {answer}."
        return f" {answer}."

    def extract(self, generation: str) -> str:
        """The short answer in a generation (what EM and F1 score)."""
        text = generation
        if self.style == "cot":
            at = text.lower().find(COT_MARKER)
            if at >= 0:
                text = text[at + len(COT_MARKER) :]
        return first_sentence(text)

    def done(self, generation: str) -> bool:
        """Whether the answer `extract` takes is complete, so that generation can stop."""
        text = generation.lstrip()
        if self.style == "cot":
            at = text.lower().find(COT_MARKER)
            if at < 0:  # no answer yet, unless the model has moved on to a next example of its own
                return "\nQuestion:" in text
            text = text[at + len(COT_MARKER) :].lstrip()
        else:
            text = text.lstrip(":").lstrip()
        return "\n" in text or sentence_end(text, need_space=True) is not None
