"""Self-augmentation: the LLM writes rewrites of a passage and question/answer pairs about it.

Small models rarely emit valid JSON lists (the reference prompt asks for one),
so we ask for pairs in a fixed two-line format ("Question: ...\nAnswer: ..."),
show one worked example turn, start the assistant turn at "Question:", and parse
each pair on its own: one malformed pair does not cost the others. Pairs whose
answer does not occur in the passage are used only when nothing better came in
`attempts` rounds. Every rejection is counted by reason so that augmentation
quality can be inspected (`prag stats`).

With `roundtrip`, a pair is kept only if the model, reading the passage, answers the pair's question
with the pair's answer (round-trip consistency): a small model often writes a question that does not
ask for the answer beside it, and training on such a pair teaches the LoRA nothing about the passage.

With `qa_style = "answer_first"` the answers are chosen first, from the passage
itself (what its subject is, names other than the title, dates, numbers), and the model
only writes a question for each: every answer is then grounded and short, and
questions are about the passage's facts rather than its subject's name.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from .config import AugmentConfig
from .corpus import Passage
from .evaluate import token_f1
from .llm import LLM

REWRITE_PROMPT = (
    "Rewrite the following passage. While keeping the entities, proper nouns, and key details such as "
    "names, locations, and terminology intact, create a new version of the text that expresses the same "
    "ideas in a different way. Make sure the revised passage is distinct from the original one, but "
    "preserves the core meaning and relevant information.\n{passage}"
)
QA_PROMPT = (
    "Read the passage and write {n} different questions that can be answered from it, each followed by its "
    "short answer (a few words copied from the passage).\n\nPassage:\n{passage}\n\n"
    "Use exactly this format:\nQuestion: <question>\nAnswer: <short answer>"
)
QA_FULL_PROMPT = (
    "Read the passage and write {n} different questions that can be answered from it, each followed by its "
    "short answer (a few words copied from the passage) and by a full answer (one sentence).\n\nPassage:\n"
    "{passage}\n\nUse exactly this format:\nQuestion: <question>\nAnswer: <short answer>\n"
    "Full answer: <one sentence>"
)
QA_PREFIX = "Question:"
# The round-trip check reads the passage first, so one passage's questions share it (`llm.prefix_groups`).
ROUNDTRIP_PROMPT = "Passage:\n{passage}\n\nAnswer in a few words copied from the passage.\nQuestion: {question}"
ROUNDTRIP_PREFIX = "Answer:"
ROUNDTRIP_TOKENS = 16
ROUNDTRIP_MIN_F1 = 0.5  # the reading answer's token F1 against the pair's answer
# One worked example turn: small models copy a shown format far more reliably than a described one.
_EXAMPLE_PASSAGE = (
    "Marie Curie\nMarie Curie was a Polish-born physicist and chemist who conducted pioneering research on "
    "radioactivity. She was the first woman to win a Nobel Prize, which she received in 1903, and she "
    "discovered the elements polonium and radium."
)
_EXAMPLE_PAIRS = [
    ("In what year did Marie Curie receive her first Nobel Prize?", "1903"),
    ("What did Marie Curie conduct pioneering research on?", "radioactivity"),
    ("Which elements did Marie Curie discover?", "polonium and radium"),
    ("Where was Marie Curie born?", "Poland"),
    ("What was Marie Curie the first woman to win?", "a Nobel Prize"),
]
_EXAMPLE_FULL_ANSWERS = [
    "Marie Curie received her first Nobel Prize in 1903.",
    "Marie Curie conducted pioneering research on radioactivity.",
    "Marie Curie discovered the elements polonium and radium.",
    "Marie Curie was born in Poland.",
    "Marie Curie was the first woman to win a Nobel Prize.",
]


RESCUE_ROUNDS = 2  # QA-only rounds after `attempts`, for documents left without any pair

# Bump when the answer-first prompt or the choice of spans changes: stored answer-first augmentations (and
# the adapters trained on them) are keyed by it, so a store never mixes the old questions with the new.
# 2: the passage first in the prompt; 3: spans of what the subject is, whole dates, no single digits.
ANSWER_FIRST_VERSION = 3
# The passage comes first: the prompts for one passage's answers then share it, and generation computes
# it once for all of them (`llm.prefix_groups`).
ANSWER_FIRST_PROMPT = (
    'Passage:\n{passage}\n\nWrite one question about the passage whose answer is "{answer}". '
    "The question must not contain the answer."
)
_NOT_NAMES = set(
    "a an and as at after before but by during for from he her his in it its of on she that the their then there "
    "they this these those to was were when where which while who with".split()
)


_MONTH = "January|February|March|April|May|June|July|August|September|October|November|December"
# (kind, pattern), in the order they claim the passage's text: a date before the month name or number in it
_SPAN_PATTERNS = (
    ("date", rf"\b(?:\d{{1,2}}\s+)?(?:{_MONTH})(?:\s+\d{{1,2}},?)?\s+\d{{4}}\b|\b1\d{{3}}\b|\b20\d{{2}}\b"),
    # what the subject is ("was an English mathematician" -> "mathematician"): an occupation, a genre, a kind
    ("description", r"\b(?:is|was|are|were)\s+(?:an?|the)\s+([^,.;:()\"]+)"),
    ("name", r"\b[A-Z][\w'\-]*(?:\s+(?:of\s+|the\s+|de\s+)?[A-Z][\w'\-]*)*"),
    ("number", r"\b\d[\d,.]*\b"),
)
_KIND_ORDER = ("description", "name", "date", "number")  # how the kinds take turns in the result
# where a description stops: a relative clause, a place, a time or a second description follows
_DESCRIPTION_END = re.compile(
    r"\s+(?:who|which|that|from|in|of|for|with|and|or|born|based|known|best|by|on|at|as|to|during|after|before|"
    r"between|under|\w+ed)\b.*",
    re.S,
)


def answer_spans(passage: Passage) -> list[str]:
    """Short answers taken from the passage for answer-first QA, what the benchmarks ask about: what the
    subject is (occupation, genre, kind), names, dates and other numbers, in turn (varied questions),
    each once, never overlapping one another, never the title's own words, no single digits."""
    title = set(_words(passage.title))
    kinds: dict[str, list[str]] = {kind: [] for kind in _KIND_ORDER}
    taken: list[tuple[int, int]] = []  # character ranges already claimed by a span
    for kind, pattern in _SPAN_PATTERNS:
        for match in re.finditer(pattern, passage.text):
            group = match.lastindex or 0
            span, start = match.group(group), match.start(group)
            if kind == "description":  # the description's head: no relative clause, no leading nationality
                span = _DESCRIPTION_END.sub("", span)
            words = span.split()
            while words and (words[0].lower() in _NOT_NAMES or (kind == "description" and words[0][0].isupper())):
                start += len(words[0]) + 1  # a leading "The", "On", or a nationality before the description
                words = words[1:]
            span = " ".join(words[-4:] if kind == "description" else words).rstrip(".,")
            end = start + len(" ".join(words))
            if not _words(span) or set(_words(span)) <= title or (span.isdigit() and len(span) == 1):
                continue
            if any(start < e and s < end for s, e in taken) or span in kinds[kind]:
                continue
            taken.append((start, end))
            kinds[kind].append(span)
    spans = []
    for i in range(max(map(len, kinds.values()))):
        spans += [kinds[kind][i] for kind in _KIND_ORDER if i < len(kinds[kind])]
    return spans


NAME_SUBJECT = ' The question must name "{title}".'


def answer_first_prompt(answer: str, passage: Passage, name_subject: bool = False) -> str:
    prompt = ANSWER_FIRST_PROMPT.format(answer=answer, passage=passage.contents)
    if name_subject and passage.title:
        prompt += NAME_SUBJECT.format(title=passage.title)
    return prompt


def answer_first_example(name_subject: bool = False) -> tuple[str, str]:
    example = Passage("example", *_EXAMPLE_PASSAGE.split("\n", 1))
    return answer_first_prompt("1903", example, name_subject), " " + _EXAMPLE_PAIRS[0][0]


def _question_done(text: str) -> bool:
    return "\n" in text.strip() or text.strip().endswith("?")


def qa_example(n: int, full_answers: bool = False) -> tuple[str, str]:
    rows = []
    for i in range(n):
        question, answer = _EXAMPLE_PAIRS[i % len(_EXAMPLE_PAIRS)]
        full = f"\nFull answer: {_EXAMPLE_FULL_ANSWERS[i % len(_EXAMPLE_PAIRS)]}" if full_answers else ""
        rows.append(f"Question: {question}\nAnswer: {answer}{full}")
    prompt = QA_FULL_PROMPT if full_answers else QA_PROMPT
    return prompt.format(n=n, passage=_EXAMPLE_PASSAGE), "\n".join(rows)


_PREAMBLE = re.compile(r"^(here|sure|certainly|of course|okay|rewritten|revised|new version)\b|:$", re.I)


def rewrite_body(text: str) -> str:
    """The rewrite proper: the first paragraph that is not a preamble ("Here is a rewritten version:")."""
    for paragraph in text.strip().split("\n\n"):
        paragraph = paragraph.strip()
        if paragraph and not (len(_words(paragraph)) < 20 and _PREAMBLE.search(paragraph)):
            return paragraph
    return ""


def _rewrite_done(text: str) -> bool:
    """Stop once a paragraph of rewrite (not just a preamble) is complete."""
    finished = text.strip().split("\n\n")[:-1]
    return any(rewrite_body(paragraph) for paragraph in finished)


@dataclass
class Augmentation:
    doc_id: str
    rewrites: list[str] = field(default_factory=list)
    qa: list[dict[str, str]] = field(default_factory=list)  # {"question", "answer"}
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count

    def to_dict(self) -> dict:
        return {"doc_id": self.doc_id, "rewrites": self.rewrites, "qa": self.qa, "rejected": self.rejected}

    @classmethod
    def from_dict(cls, data: dict) -> Augmentation:
        return cls(data["doc_id"], list(data["rewrites"]), list(data["qa"]), dict(data.get("rejected", {})))


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def parse_qa(generation: str, full_answers: bool = False) -> tuple[list[dict[str, str]], Counter]:
    """Pairs from 'Q\nAnswer: A\nQuestion: Q\nAnswer: A...' (the reply after the 'Question:' prefix),
    each block optionally followed by 'Full answer: <sentence>' (kept with `full_answers`).

    Returns the well-formed pairs and a count of the malformed blocks by reason.
    """
    pairs, problems = [], Counter()
    blocks = [b for b in re.split(r"\n\s*Question\s*:", "\n" + generation.strip()) if b.strip()]
    for block in blocks:
        match = re.match(r"\s*(.+?)\s*\n+\s*Answer\s*:[ \t]*(.+)", block, flags=re.S | re.I)
        if not match:
            problems["unparsable"] += 1
            continue
        question = match.group(1).strip()
        answer_lines = match.group(2).strip().split("\n")
        answer = answer_lines[0].strip().rstrip(".").strip()
        full = re.search(r"^\s*Full answer\s*:[ \t]*(.+)$", "\n".join(answer_lines[1:]), flags=re.M | re.I)
        if not question or not answer or "\n" in question:
            problems["unparsable" if question and answer else "empty"] += 1
            continue
        if not question.endswith("?"):
            question = question.rstrip(".") + "?"
        if len(_words(answer)) > 12:
            problems["answer_too_long"] += 1
            continue
        pair = {"question": question, "answer": answer}
        if full_answers:
            # a full answer that does not state the short one would teach a different answer: left out
            sentence = full.group(1).strip() if full else ""
            if sentence and set(_words(answer)) <= set(_words(sentence)):
                pair["full_answer"] = sentence
            else:
                problems["full_answer_missing"] += 1
                pair["full_answer"] = ""
        pairs.append(pair)
    return pairs, problems


def is_grounded(answer: str, passage: Passage) -> bool:
    """Every word of the answer occurs in the passage (its title included)."""
    words = set(_words(passage.contents))
    return all(w in words for w in _words(answer))


def valid_rewrite(rewrite: str, passage: Passage) -> str:
    """'' if the rewrite is usable, else why not: too short, or keeps too few of the passage's words."""
    text, source = _words(rewrite), set(_words(passage.text))
    if len(text) < max(8, len(_words(passage.text)) // 4):
        return "rewrite_too_short"
    if len(source & set(text)) < 0.3 * len(source):
        return "rewrite_off_topic"
    return ""


def augment(llm: LLM, passages: list[Passage], config: AugmentConfig, show_progress: bool = True) -> list[Augmentation]:
    """Rewrites and QA pairs for each passage, generated in left-padded batches across documents.

    A round makes one generation per missing rewrite and one per document still short of QA pairs
    (asking for all its missing pairs at once: the prompt, which dominates the cost on a CPU, is then
    read once). Rounds repeat, with fresh seeds, until every document is complete or `attempts` ran out;
    then up to RESCUE_ROUNDS more, for QA pairs only, for the documents that still have none at all
    (a document without a pair would get a LoRA that learned nothing).
    """
    if config.full_answers and config.qa_style != "free":
        raise ValueError(
            "augment.full_answers needs augment.qa_style=free (answer-first questions have no full answer)"
        )
    # Batches of similar length: one long passage would otherwise pad (and slow) its whole batch.
    given, passages = passages, sorted(passages, key=lambda p: len(p.contents))
    results = {p.id: Augmentation(p.id) for p in passages}
    rejected = {p.id: Counter() for p in passages}
    fallback: dict[str, list[dict[str, str]]] = {p.id: [] for p in passages}  # valid but ungrounded pairs
    by_id = {p.id: p for p in passages}
    bar = tqdm(total=len(passages), desc="augment", unit="doc", disable=not show_progress)

    spans = {p.id: answer_spans(p) for p in passages} if config.qa_style == "answer_first" else {}
    checked = {p.id: 0 for p in passages}  # how many of a document's pairs passed the round-trip check
    tried: dict[str, set[str]] = {p.id: set() for p in passages}

    def complete(r: Augmentation) -> bool:
        return len(r.rewrites) >= config.rewrites and len(r.qa) >= config.qa_pairs

    for attempt in range(config.attempts + RESCUE_ROUNDS):
        # after `attempts` rounds, only the documents without a single QA pair (grounded or not) go on
        rescue = attempt >= config.attempts
        todo = [p for p in passages if not (rescue and (results[p.id].qa or fallback[p.id]))]
        if not todo:
            break
        rewrites = 0 if rescue else config.rewrites
        rewrite_jobs = [p.id for p in todo for _ in range(rewrites - len(results[p.id].rewrites))]
        if config.qa_style == "answer_first":  # one job per (document, answer span) still needed
            qa_jobs = []
            for p in todo:
                missing = config.qa_pairs - len(results[p.id].qa)
                used = {qa["answer"] for qa in results[p.id].qa}
                fresh = [a for a in spans[p.id] if a not in tried[p.id]]
                retry = [a for a in spans[p.id] if a in tried[p.id] and a not in used]
                chosen = (fresh + retry)[: max(missing, 0)]
                tried[p.id].update(chosen)
                qa_jobs += [(p.id, a) for a in chosen]
        else:
            qa_jobs = [p.id for p in todo if len(results[p.id].qa) < config.qa_pairs]
        for kind, jobs in (("rewrite", rewrite_jobs), ("qa", qa_jobs)):
            for start in range(0, len(jobs), config.batch_size):
                batch = jobs[start : start + config.batch_size]
                seed = config.seed + 1000 * attempt + start + (0 if kind == "rewrite" else 500_000)
                sampling = dict(sample=True, temperature=config.temperature, top_k=config.top_k, seed=seed)
                if kind == "rewrite":
                    prompts = [llm.chat(REWRITE_PROMPT.format(passage=by_id[d].text)) for d in batch]
                    # a rewrite is about as long as its passage
                    longest = max(len(llm.tokenizer.encode(by_id[d].text)) for d in batch)
                    max_tokens = min(config.rewrite_max_tokens, int(1.3 * longest) + 16)
                    outputs = llm.generate(prompts, max_tokens, stop=_rewrite_done, **sampling)
                    for doc_id, output in zip(batch, outputs, strict=True):
                        _accept_rewrite(output, by_id[doc_id], results[doc_id], rejected[doc_id], config)
                elif config.qa_style == "answer_first":
                    prompts = [
                        llm.chat(
                            answer_first_prompt(a, by_id[d], config.name_subject),
                            QA_PREFIX,
                            history=(answer_first_example(config.name_subject),),
                        )
                        for d, a in batch
                    ]
                    outputs = llm.generate(prompts, config.qa_tokens_per_pair, stop=_question_done, **sampling)
                    for (doc_id, answer), output in zip(batch, outputs, strict=True):
                        _accept_question(output, answer, by_id[doc_id], results[doc_id], rejected[doc_id], config)
                else:
                    n = config.qa_pairs + 1  # one spare: some pairs are always rejected
                    template = QA_FULL_PROMPT if config.full_answers else QA_PROMPT
                    example = qa_example(n, config.full_answers)
                    prompts = [
                        llm.chat(template.format(n=n, passage=by_id[d].contents), QA_PREFIX, history=(example,))
                        for d in batch
                    ]
                    budget = config.qa_tokens_per_pair * n * (2 if config.full_answers else 1)
                    stops = [_has_pairs(by_id[d], results[d], fallback[d], config) for d in batch]
                    outputs = llm.generate(prompts, budget, stop=stops, **sampling)
                    for doc_id, output in zip(batch, outputs, strict=True):
                        _accept_qa(output, by_id[doc_id], results[doc_id], rejected[doc_id], fallback[doc_id], config)
                bar.n = sum(complete(r) for r in results.values())
                bar.set_postfix(round=attempt + 1)
        if config.roundtrip:  # this round's new pairs, kept only if reading the passage gives their answer
            new = [(d, qa) for d, r in results.items() for qa in r.qa[checked[d] :]]
            for d, r in results.items():
                r.qa = r.qa[: checked[d]]
            for d, qa in _roundtrip_kept(llm, new, by_id, rejected, config.batch_size):
                results[d].qa.append(qa)
            checked = {d: len(r.qa) for d, r in results.items()}
            bar.n = sum(complete(r) for r in results.values())
        if all(complete(r) for r in results.values()):
            break
    bar.n = len(passages)  # the rest are finished too: with fallbacks, or as complete as they will get
    bar.close()
    if config.roundtrip:  # the fallbacks too must pass, but only as many as could be used are checked
        candidates = [(d, qa) for d, r in results.items() for qa in fallback[d][: max(config.qa_pairs - len(r.qa), 0)]]
        fallback = {d: [] for d in fallback}
        for d, qa in _roundtrip_kept(llm, candidates, by_id, rejected, config.batch_size):
            fallback[d].append(qa)
    for doc_id, result in results.items():
        # Grounded pairs first; ungrounded ones only fill what is still missing after every attempt.
        missing = max(config.qa_pairs - len(result.qa), 0)
        result.qa += fallback[doc_id][:missing]
        rejected[doc_id]["ungrounded_used"] = min(missing, len(fallback[doc_id]))
        result.rejected = {k: v for k, v in rejected[doc_id].items() if v}
    return [results[p.id] for p in given]


def roundtrip_passes(llm: LLM, pairs: list[tuple[Passage, dict[str, str]]], batch_size: int = 32) -> list[bool]:
    """Whether the model, reading each pair's passage, answers its question with its answer (greedy decoding,
    token F1 at least ROUNDTRIP_MIN_F1). Pairs of one passage should come together: they share its tokens."""
    passed = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        prompts = [
            llm.chat(ROUNDTRIP_PROMPT.format(passage=p.contents, question=qa["question"]), ROUNDTRIP_PREFIX)
            for p, qa in batch
        ]
        readings = llm.generate(prompts, ROUNDTRIP_TOKENS, stop=lambda text: "\n" in text.strip())
        passed += [
            token_f1(reading.strip().split("\n")[0], [qa["answer"]]) >= ROUNDTRIP_MIN_F1
            for (_, qa), reading in zip(batch, readings, strict=True)
        ]
    return passed


def _roundtrip_kept(llm: LLM, pairs: list, by_id: dict, rejected: dict, batch_size: int) -> list:
    """The (doc_id, pair)s that pass `roundtrip_passes`, in order; the others counted as not_roundtrip."""
    passed = roundtrip_passes(llm, [(by_id[d], qa) for d, qa in pairs], batch_size)
    kept = []
    for pair, ok in zip(pairs, passed, strict=True):
        if ok:
            kept.append(pair)
        else:
            rejected[pair[0]]["not_roundtrip"] += 1
    return kept


def _accept_rewrite(output: str, passage: Passage, result: Augmentation, rejected: Counter, config) -> None:
    output = rewrite_body(output)
    problem = valid_rewrite(output, passage)
    if problem:
        rejected[problem] += 1
    elif len(result.rewrites) < config.rewrites:
        result.rewrites.append(output)


def _accept_question(
    output: str, answer: str, passage: Passage, result: Augmentation, rejected: Counter, config
) -> None:
    question = output.strip().split("\n")[0].strip()
    if len(_words(question)) < 3:
        rejected["unparsable"] += 1
    elif set(_words(answer)) <= set(_words(question)):
        rejected["answer_in_question"] += 1
    elif config.name_subject and passage.title and not set(_words(passage.title)) & set(_words(question)):
        rejected["subject_not_named"] += 1
    elif question.lower() in {q["question"].lower() for q in result.qa}:
        rejected["duplicate"] += 1
    elif len(result.qa) < config.qa_pairs:
        result.qa.append({"question": question if question.endswith("?") else question + "?", "answer": answer})


def _has_pairs(passage: Passage, result: Augmentation, fallback: list, config: AugmentConfig) -> Callable[[str], bool]:
    """A stop test for one document's free QA generation: true at the end of a line once the reply holds
    every grounded pair the document still needs (what `_accept_qa` would keep), so that a row does not
    write spare pairs that nothing would use."""
    needed = config.qa_pairs - len(result.qa)
    seen = {q["question"].lower() for q in result.qa + fallback}

    def done(text: str) -> bool:
        if not text.rstrip(" \t").endswith("\n"):
            return False  # only whole lines: the last pair's answer (or full answer) may still be going
        pairs, _ = parse_qa(text, config.full_answers)
        kept = {
            p["question"].lower()
            for p in pairs
            if is_grounded(p["answer"], passage) and (p.get("full_answer") or not config.full_answers)
        }
        return len(kept - seen) >= needed

    return done


def _accept_qa(output: str, passage: Passage, result: Augmentation, rejected: Counter, fallback: list, config) -> None:
    pairs, problems = parse_qa(output, config.full_answers)
    rejected.update(problems)
    for pair in pairs:
        seen = {q["question"].lower() for q in result.qa + fallback}
        if pair["question"].lower() in seen:
            rejected["duplicate"] += 1
        elif not is_grounded(pair["answer"], passage):
            rejected["ungrounded"] += 1
            fallback.append(pair)
        elif len(result.qa) < config.qa_pairs:
            result.qa.append(pair)
