"""Evaluation: load FlashRAG questions, score answers (SQuAD EM/F1, recall@k), summarise latency, save output.

Deliberately free of model/pipeline imports so it can be tested (and reused for re-scoring) without a GPU.
The pipeline hands `Evaluation.add` any object with `short_answer`, `text`, `passages`, `timings` (seconds).
"""

from __future__ import annotations

import collections
import io
import json
import re
import string
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write_bytes

PARTS = ("retrieval", "load_merge", "generation")  # they add up to a question's total latency
REPORT_SIZE = 100  # the first questions of every dev file are reported; choices are made on the rest
SLICES = ("report", "tune", "all")
BOOLEAN_ANSWERS = ("yes", "no", "noanswer")
RESAMPLES = 10_000
# a question is "covered" when a stored QA answer of its documents scores at least this token F1 against a gold
# answer (the round-trip check's threshold, augment.ROUNDTRIP_MIN_F1)
COVERED_F1 = 0.5
# the paired differences every table reports: (mode, minus mode)
COMPARISONS = (
    ("prag", "closed"),
    ("prag", "rag"),
    ("combine", "rag"),
    ("prag", "prag-unrelated"),
    ("combine", "combine-unrelated"),
    ("dyprag", "closed"),
    ("dyprag", "prag"),
    ("dyprag-combine", "rag"),
    ("dyprag-combine", "combine"),
    ("dyprag", "dyprag-unrelated"),
    ("dyprag-combine", "dyprag-combine-unrelated"),
)
_PUNCT = frozenset(string.punctuation)


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    golden_answers: list[str]
    type: str | None
    supporting_titles: list[str]


def _supporting_titles(meta: dict) -> list[str]:
    """Accept our `supporting_titles` and FlashRAG's HotpotQA/2Wiki `supporting_facts.title`, deduplicated."""
    titles = meta.get("supporting_titles")
    if titles is None:
        facts = meta.get("supporting_facts")
        titles = facts.get("title", []) if isinstance(facts, dict) else []
    return list(dict.fromkeys(t for t in titles if isinstance(t, str) and t))


def load_questions(path: str | Path, limit: int | None = None, offset: int = 0, slice: str = "all") -> list[Question]:
    """Read a FlashRAG jsonl file; skip `offset` questions, keep at most `limit`. Errors name file:line.

    `slice` first restricts the file to its report slice (the first REPORT_SIZE questions) or its
    tune slice (the rest); `offset` and `limit` then count within the slice.
    """
    if slice not in SLICES:
        raise ValueError(f"unknown slice {slice!r}; choose from {', '.join(SLICES)}")
    if slice == "report":
        limit = max(0, min(REPORT_SIZE - offset, REPORT_SIZE if limit is None else limit))
    elif slice == "tune":
        offset += REPORT_SIZE
    out: list[Question] = []
    seen = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            seen += 1
            if seen <= offset:
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object")
            q = obj.get("question")
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"{where}: missing or empty 'question'")
            golds = obj.get("golden_answers")
            if not isinstance(golds, list) or not golds or not all(isinstance(g, str) for g in golds):
                raise ValueError(f"{where}: 'golden_answers' must be a non-empty list of strings")
            meta = obj.get("metadata") or {}
            if not isinstance(meta, dict):
                raise ValueError(f"{where}: 'metadata' must be an object")
            qtype = meta.get("type")
            out.append(
                Question(
                    id=str(obj.get("id", seen - 1)),
                    question=q.strip(),
                    golden_answers=golds,
                    type=str(qtype) if qtype is not None else None,
                    supporting_titles=_supporting_titles(meta),
                )
            )
    return out


# ---------------------------------------------------------------- SQuAD metrics


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _golds(golds: list[str]) -> list[str]:
    """Normalised gold answers, without those that normalise to nothing (they would match any empty answer)."""
    return [g for g in (normalize_answer(g) for g in golds) if g]


def exact_match(prediction: str, golds: list[str]) -> float:
    """1.0 if the normalised prediction equals any (non-empty) normalised gold answer."""
    p = normalize_answer(prediction)
    return float(bool(p) and any(p == g for g in _golds(golds)))


def _f1(prediction: str, gold: str) -> float:
    """The reference's F1 of normalised strings: 0 when exactly one side is yes / no / noanswer (or they
    differ), so a 'yes' is never half right against 'no' and a name never scores against 'yes'."""
    if (prediction in BOOLEAN_ANSWERS or gold in BOOLEAN_ANSWERS) and prediction != gold:
        return 0.0
    pred_toks, gold_toks = prediction.split(), gold.split()
    common = sum((collections.Counter(pred_toks) & collections.Counter(gold_toks)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_toks), common / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, golds: list[str]) -> float:
    """SQuAD token-overlap F1 with the reference's yes/no rule, max over the gold answers."""
    p = normalize_answer(prediction)
    return max((_f1(p, g) for g in _golds(golds)), default=0.0)


def paired_bootstrap(a: list[float], b: list[float], resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Mean of a - b over paired questions, with its 95% paired-bootstrap interval (resampling questions)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired scores needed: got {len(a)} and {len(b)}")
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"diff": round(float(diff.mean()), 4), "low": round(float(low), 4), "high": round(float(high), 4)}


def recall_at_k(passage_titles: list[str], supporting_titles: list[str]) -> float | None:
    """Fraction of supporting titles among the retrieved titles (case-insensitive); None if none to find."""
    gold = {t.strip().lower() for t in supporting_titles if t.strip()}
    if not gold:
        return None
    got = {t.strip().lower() for t in passage_titles}
    return len(gold & got) / len(gold)


def latency_summary(values_ms: list[float]) -> dict:
    """p50/p95/mean in ms (zeros when empty, so the schema stays fixed)."""
    if not values_ms:
        return {"p50": 0.0, "p95": 0.0, "mean": 0.0}
    v = np.asarray(values_ms, dtype=float)
    return {
        "p50": round(float(np.percentile(v, 50)), 2),
        "p95": round(float(np.percentile(v, 95)), 2),
        "mean": round(float(v.mean()), 2),
    }


def _mean(xs: list[float]) -> float:
    return round(float(np.mean(xs)), 4) if xs else 0.0


def stored_answer_f1(golds: list[str], stored_answers: list[str]) -> float | None:
    """How well the augmentation of a question's documents already holds its answer: the best token F1 of
    a gold answer against the answers of their stored QA pairs (None: no stored pairs). A document's LoRA
    is trained on those pairs, so this bounds what it can be expected to carry for the question."""
    if not stored_answers:
        return None
    return round(max(token_f1(answer, golds) for answer in stored_answers), 4)


def stored_answers(augmentations: Any, doc_ids: list[str]) -> list[str]:
    """The answers of the QA pairs stored for these documents (an `AugmentationStore`; unaugmented ones skipped)."""
    return [qa["answer"] for d in doc_ids if augmentations.has(d) for qa in augmentations.get(d).qa]


def coverage_summary(records: list[dict]) -> dict | None:
    """Questions whose gold answer is among their documents' stored QA answers (token F1 >= COVERED_F1),
    and each mode's F1 on the covered and the uncovered questions: whether the parameters carry what the
    augmentation gave them (covered), and what they carry beyond it (uncovered)."""
    scored = {r["id"]: r["stored_answer_f1"] for r in records if r.get("stored_answer_f1") is not None}
    if not scored:
        return None
    covered = {i for i, f1 in scored.items() if f1 >= COVERED_F1}
    by_mode: dict[str, dict[str, list[float]]] = {}
    for r in records:
        if r["id"] in scored:
            part = "covered" if r["id"] in covered else "uncovered"
            by_mode.setdefault(r["mode"], {"covered": [], "uncovered": []})[part].append(r["f1"])
    return {
        "questions": len(scored),
        "covered": len(covered),
        "threshold": COVERED_F1,
        "mean_stored_answer_f1": _mean(list(scored.values())),
        "f1_by_mode": {
            mode: {part: {"f1": _mean(xs), "n": len(xs)} for part, xs in parts.items()}
            for mode, parts in by_mode.items()
        },
    }


# ---------------------------------------------------------------- accumulation


class Evaluation:
    """Collects one prediction record per (question, mode) and aggregates them into metrics."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def add(self, question: Question, mode: str, answer: Any) -> dict:
        timings = getattr(answer, "timings", None) or {}
        ms = {k: round(1000.0 * float(timings.get(k, 0.0)), 2) for k in PARTS}
        ms["total"] = round(sum(ms.values()), 2)
        # time to the first token (the prompt's cost), then per further token (what the answer's length costs)
        new_tokens = int(getattr(answer, "new_tokens", 0) or 0)
        ms["first_token"] = round(1000.0 * float(timings.get("first_token", timings.get("generation", 0.0))), 2)
        ms["per_token"] = round((ms["generation"] - ms["first_token"]) / (new_tokens - 1), 2) if new_tokens > 1 else 0.0
        passages = list(getattr(answer, "passages", None) or [])
        pred = answer.short_answer or ""
        titles = [p.title for p in passages]
        rec = {
            "id": question.id,
            "question": question.question,
            "golden_answers": question.golden_answers,
            "type": question.type,
            "mode": mode,
            "prediction": pred,
            "generation": answer.text,
            "em": exact_match(pred, question.golden_answers),
            "f1": round(token_f1(pred, question.golden_answers), 4),
            "passages": [{"id": p.id, "title": p.title} for p in passages],
            "recall": recall_at_k(titles, question.supporting_titles) if passages else None,
            "lora_passages": [p.id for p in getattr(answer, "lora_passages", None) or []],
            "new_tokens": new_tokens,
            "timings_ms": ms,
        }
        self.records.append(rec)
        return rec

    def metrics(self, dataset: str, top_k: int, model: str, extra: dict | None = None) -> dict:
        recall: dict[str, float] = {}  # each question once: first retrieving mode that scored it
        for r in self.records:
            if r["recall"] is not None:
                recall.setdefault(r["id"], r["recall"])
        by_mode: dict[str, list[dict]] = {}
        for r in self.records:
            by_mode.setdefault(r["mode"], []).append(r)
        modes = {}
        for mode, rs in by_mode.items():
            by_type: dict[str, list[dict]] = {}
            for r in rs:
                by_type.setdefault(r["type"] or "unknown", []).append(r)
            modes[mode] = {
                "em": _mean([r["em"] for r in rs]),
                "f1": _mean([r["f1"] for r in rs]),
                "n": len(rs),
                "latency_ms": {
                    **latency_summary([r["timings_ms"]["total"] for r in rs]),
                    "parts": {k: latency_summary([r["timings_ms"][k] for r in rs]) for k in PARTS},
                    "first_token": latency_summary([r["timings_ms"]["first_token"] for r in rs]),
                    "per_token": latency_summary([r["timings_ms"]["per_token"] for r in rs if r["new_tokens"] > 1]),
                },
                "new_tokens": _mean([r["new_tokens"] for r in rs]),
                "by_type": {
                    t: {"em": _mean([r["em"] for r in trs]), "f1": _mean([r["f1"] for r in trs]), "n": len(trs)}
                    for t, trs in sorted(by_type.items())
                },
            }
        out = {
            "dataset": dataset,
            "n": len({r["id"] for r in self.records}),
            "top_k": top_k,
            "model": model,
            "retrieval": {"recall@k": _mean(list(recall.values())) if recall else None},
            "modes": modes,
            "comparisons": self.comparisons(),
        }
        coverage = coverage_summary(self.records)
        if coverage:
            out["coverage"] = coverage
        return {**out, **(extra or {})}

    def comparisons(self) -> dict[str, dict]:
        """F1 differences between modes on the same questions (COMPARISONS), with bootstrap intervals."""
        f1: dict[str, dict[str, float]] = {}
        for r in self.records:
            f1.setdefault(r["mode"], {})[r["id"]] = r["f1"]
        out = {}
        for a, b in COMPARISONS:
            if a in f1 and b in f1:
                ids = sorted(f1[a].keys() & f1[b].keys())
                if ids:
                    out[f"{a} - {b}"] = paired_bootstrap([f1[a][i] for i in ids], [f1[b][i] for i in ids])
        return out


# ---------------------------------------------------------------- output


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def _plots(metrics: dict) -> tuple[bytes, bytes]:
    """F1/EM bars and stacked mean latency bars per mode (Agg canvas, no pyplot global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(metrics["modes"])
    x = np.arange(len(names))
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(x - 0.2, [metrics["modes"][m]["em"] for m in names], 0.4, label="EM")
    ax.bar(x + 0.2, [metrics["modes"][m]["f1"] for m in names], 0.4, label="F1")
    ax.set(xticks=x, xticklabels=names, ylim=(0, 1), ylabel="score", title=f"{metrics['dataset']}: EM / F1")
    ax.legend()
    f1_png = _png(fig)

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bottom = np.zeros(len(names))
    for part in PARTS:
        vals = np.array([metrics["modes"][m]["latency_ms"]["parts"][part]["mean"] for m in names])
        ax.bar(x, vals, 0.6, bottom=bottom, label=part)
        bottom += vals
    ax.set(xticks=x, xticklabels=names, ylabel="mean latency (ms)", title=f"{metrics['dataset']}: latency")
    ax.legend()
    return f1_png, _png(fig)


def report_md(metrics: dict, notes: str = "") -> str:
    """Human-readable summary: headline, per-mode table, by-type F1 table, plots, notes."""
    rec = metrics["retrieval"]["recall@k"]
    lines = [
        f"# {metrics['dataset']}: n={metrics['n']}, top-k={metrics['top_k']}, model={metrics['model']}",
        "",
        f"recall@{metrics['top_k']}: {'n/a' if rec is None else f'{rec:.4f}'}",
    ]
    if "protocol" in metrics:
        proto = metrics["protocol"]
        settings = ", ".join(f"{k}={v}" for k, v in proto["settings"].items()) or "the defaults"
        lines += ["", f"protocol: {proto['name']} ({proto['profile']} profile): {settings}"]
    lines += [
        "",
        "Latency in ms: p50/p95 of the total; means of its parts; time to first token (the prompt's cost) and "
        "time per further token (the answer's length) are parts of generation.",
        "",
        "| mode | EM | F1 | p50 | p95 | retrieval | load+merge | generation | first token p50 | per token | "
        "new tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, m in metrics["modes"].items():
        lat, parts = m["latency_ms"], m["latency_ms"]["parts"]
        lines.append(
            f"| {mode} | {m['em']:.4f} | {m['f1']:.4f} | {lat['p50']:.1f} | {lat['p95']:.1f} | "
            + " | ".join(f"{parts[k]['mean']:.1f}" for k in PARTS)
            + f" | {lat['first_token']['p50']:.1f} | {lat['per_token']['mean']:.1f} | {m['new_tokens']:.1f} |"
        )
    if metrics.get("comparisons"):
        lines += [
            "",
            "## F1 differences (paired over questions, 95% bootstrap interval)",
            "",
            "| difference | F1 | interval |",
            "|---|---|---|",
        ]
        for name, c in metrics["comparisons"].items():
            lines.append(f"| {name} | {c['diff']:+.4f} | [{c['low']:+.4f}, {c['high']:+.4f}] |")
    coverage = metrics.get("coverage")
    if coverage:
        lines += [
            "",
            "## What the augmentation gave the documents",
            "",
            f"{coverage['covered']} of {coverage['questions']} questions have a gold answer among the answers of "
            f"their documents' stored QA pairs (token F1 >= {coverage['threshold']}); F1 on those and on the rest:",
            "",
            "| mode | covered | uncovered |",
            "|---|---|---|",
        ]
        for mode, parts in coverage["f1_by_mode"].items():
            cells = [
                f"{parts[p]['f1']:.4f} (n={parts[p]['n']})" if parts[p]["n"] else "-" for p in ("covered", "uncovered")
            ]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    types = sorted({t for m in metrics["modes"].values() for t in m["by_type"]})
    names = list(metrics["modes"])
    lines += ["", "## F1 by question type", "", "| type | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for t in types:
        cells = [metrics["modes"][m]["by_type"].get(t) for m in names]
        lines.append(f"| {t} | " + " | ".join("-" if c is None else f"{c['f1']:.4f}" for c in cells) + " |")
    lines += ["", "![F1 by mode](f1_by_mode.png)", "", "![Latency by mode](latency_by_mode.png)", ""]
    if notes:
        lines += ["## Notes", "", notes.strip(), ""]
    return "\n".join(lines)


def write_results(out_dir: str | Path, metrics: dict, records: list[dict], notes: str = "") -> None:
    """Write metrics.json, predictions.jsonl, report.md and two PNG plots, each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "metrics.json", (json.dumps(metrics, indent=2, ensure_ascii=False) + "\n").encode())
    preds = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_bytes(out / "predictions.jsonl", preds.encode())
    f1_png, lat_png = _plots(metrics)
    atomic_write_bytes(out / "f1_by_mode.png", f1_png)
    atomic_write_bytes(out / "latency_by_mode.png", lat_png)
    atomic_write_bytes(out / "report.md", report_md(metrics, notes).encode())


# what chunks of one evaluation must share; the offline parts are summed (a later chunk builds only the documents
# the earlier ones had not)
_SHARED = ("dataset", "top_k", "model", "config", "protocol")
_SUMMED = ("documents_parameterized", "parameterize_s", "augment_s", "train_s")


def pool_runs(run_dirs: list[str | Path]) -> tuple[dict, list[dict]]:
    """Pool chunks of one evaluation (`prag eval --offset/--limit` on disjoint questions) into one run.

    Long evaluations are run in chunks so that a crash or a stop loses one chunk, not hours; the report then
    needs the whole slice's means and paired intervals, recomputed here from the chunks' per-question records.
    """
    metrics, records, seen = [], [], {}
    for run in map(Path, run_dirs):
        m = _loads((run / "metrics.json").read_text(encoding="utf-8"), run / "metrics.json")
        first = metrics[0] if metrics else m
        for key in _SHARED:
            if m.get(key) != first.get(key):
                raise ValueError(f"{run}: its {key!r} differs from {run_dirs[0]}'s: not chunks of one evaluation")
        if sorted(m["modes"]) != sorted(first["modes"]):
            raise ValueError(f"{run}: answered modes {sorted(m['modes'])}, {run_dirs[0]} {sorted(first['modes'])}")
        path = run / "predictions.jsonl"
        with open(path, encoding="utf-8") as f:
            rows = [_loads(line, path, n) for n, line in enumerate(f, 1) if line.strip()]
        ids = {r["id"] for r in rows}
        again = sorted(ids & seen.keys())
        if again:
            raise ValueError(f"{run}: question(s) {again[:3]} were answered in {seen[again[0]]} too")
        seen.update(dict.fromkeys(ids, run))
        metrics.append(m)
        records += rows
    evaluation = Evaluation()
    evaluation.records = records
    offline: dict = {k: round(sum(m.get("offline", {}).get(k) or 0 for m in metrics), 2) for k in _SUMMED}
    built = offline["documents_parameterized"]
    offline["parameterize_s_per_doc"] = round(offline["parameterize_s"] / built, 2) if built else None
    translators = [m.get("offline", {}).get("translator") for m in metrics]
    if any(t != translators[0] for t in translators):  # the dyprag modes' generated LoRAs must share one source
        raise ValueError(f"{run_dirs[0]} and another chunk used different translators: not chunks of one evaluation")
    if translators[0]:
        offline["translator"] = translators[0]
    first = metrics[0]
    pooled = evaluation.metrics(
        first["dataset"],
        first["top_k"],
        first["model"],
        extra={
            "slice": {
                "name": "+".join(dict.fromkeys(m.get("slice", {}).get("name", "?") for m in metrics)),
                "offset": min(m.get("slice", {}).get("offset", 0) for m in metrics),
                "ids": [i for m in metrics for i in m.get("slice", {}).get("ids", [])],
            },
            **{k: first[k] for k in ("batch_size", "protocol", "config") if k in first},
            "offline": offline,
            "pooled_from": [str(r) for r in run_dirs],
        },
    )
    return pooled, records


def _loads(text: str, path: Path, line: int | None = None) -> dict:
    """JSON from `path` (the whole file, or its line `line`), or an error naming the file and line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{line or error.lineno}: invalid JSON: {error.msg}") from None


# ---------------------------------------------------------------- running


def unrelated_partners(questions: list[Question], retrieved: dict[str, list]) -> dict[str, str]:
    """For each question, another question of the set whose top-k shares no passage with its own: the
    control modes merge that question's LoRAs. The next such question in file order (wrapping around),
    so the pairing is fixed and every question's documents serve as someone's unrelated documents."""
    partners = {}
    for i, q in enumerate(questions):
        own = {p.id for p in retrieved[q.id]}
        for step in range(1, len(questions)):
            other = questions[(i + step) % len(questions)]
            if retrieved[other.id] and not own & {p.id for p in retrieved[other.id]}:
                partners[q.id] = other.id
                break
        else:
            raise ValueError(f"question {q.id}: no other question retrieves documents disjoint from its own")
    return partners


def run(
    pipeline: Any,
    questions: list[Question],
    modes: list[str],
    top_k: int,
    show_progress: bool = True,
    batch_size: int = 1,
) -> tuple[Evaluation, dict]:
    """Answer every question in every mode with `pipeline` (a `prag.Pipeline`).

    Documents are parameterized up front, in batches, so that per-question latency measures only
    the online path (retrieval, load+merge, generation); the offline cost is returned separately.
    The control modes (`prag-unrelated`, `combine-unrelated`, `dyprag-unrelated`, `dyprag-combine-unrelated`)
    merge the LoRAs of another question's top-k (`unrelated_partners`), documents the set parameterizes anyway.
    `batch_size` > 1 answers that many questions of a mode in one batched generation (each with its own
    adapter): faster on accuracy runs, but a question's latency is then its batch's.
    """
    from tqdm.auto import tqdm

    from .pipeline import GENERATED_LORAS, TRAINED_LORAS

    leaked = sorted({q.id for q in questions} & pipeline.warmup_question_ids())
    if leaked:
        raise ValueError(
            f"{len(leaked)} evaluated question(s) trained the warm-up or format adapter "
            f"({', '.join(pipeline.warmup_adapter_paths)}; e.g. "
            f"{leaked[:3]}): evaluate other questions, or warm up on the tune slice"
        )
    pipeline.initial_adapter, pipeline.base_adapter  # noqa: B018  (one that does not fit: say so before any work)
    offline: dict = {"documents_parameterized": 0, "parameterize_s": 0.0}
    if any(m in GENERATED_LORAS for m in modes):
        pipeline.translator  # noqa: B018  (none trained: say so before any work)
        trained = pipeline.translator_record()
        leaked = sorted({q.id for q in questions} & set(trained.get("question_ids", [])))
        if leaked:
            raise ValueError(
                f"{len(leaked)} evaluated question(s) retrieved the documents that trained the translator "
                f"{pipeline.translator_path} (e.g. {leaked[:3]}): evaluate other questions, or train it on the "
                "tune slice"
            )
        offline["translator"] = {
            "path": str(pipeline.translator_path),
            **{k: trained.get(k) for k in ("documents", "steps", "seconds", "parameterize_s", "config")},
            "questions": len(trained.get("question_ids", [])),
        }
    retrieved = {q.id: pipeline.retrieve(q.question, top_k) for q in questions}
    partners = unrelated_partners(questions, retrieved) if any(m.endswith("-unrelated") for m in modes) else {}
    if any(m in TRAINED_LORAS for m in modes):  # the dyprag modes generate their LoRAs: nothing to build
        passages = {p.id: p for q in questions for p in retrieved[q.id]}
        before = dict(pipeline.offline_seconds)
        t = time.perf_counter()
        built = pipeline.parameterize(list(passages.values()), show_progress)
        offline["parameterize_s"] = round(time.perf_counter() - t, 2)
        offline["documents_parameterized"] = built
        for part in ("augment_s", "train_s"):
            offline[part] = round(pipeline.offline_seconds[part] - before[part], 2)
        offline["parameterize_s_per_doc"] = round(offline["parameterize_s"] / built, 2) if built else None
    stored = {}  # question id -> stored_answer_f1 of its own documents' augmentations, where they have any
    for q in questions:
        answers = stored_answers(pipeline.augmentations, [p.id for p in retrieved[q.id]])
        stored[q.id] = stored_answer_f1(q.golden_answers, answers)
    evaluation = Evaluation()
    bar = tqdm(total=len(modes) * len(questions), desc="answer", unit="q", disable=not show_progress)
    for mode in modes:
        for start in range(0, len(questions), batch_size):
            chunk = questions[start : start + batch_size]
            prepared = [
                pipeline.prepare(q.question, mode, top_k, retrieved[partners[q.id]] if q.id in partners else None)
                for q in chunk
            ]
            for q, answer in zip(chunk, pipeline.generate(prepared), strict=True):
                record = evaluation.add(q, mode, answer)
                record["stored_answer_f1"] = stored[q.id]
                if mode.endswith("-unrelated"):
                    record["unrelated_to"] = partners[q.id]
                bar.update()
    bar.close()
    return evaluation, offline
