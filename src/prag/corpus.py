"""Read a passage corpus from a directory of text files, JSON lines or a DPR-style TSV.

Every reader validates the whole file before returning, so a bad row fails loudly at load time with its
file and line number instead of silently corrupting an index built hours later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str

    @property
    def contents(self) -> str:
        """Title and text together, the string that gets indexed and shown to the model."""
        return f"{self.title}\n{self.text}" if self.title else self.text


class CorpusError(ValueError):
    """A malformed corpus row; the message reads `path:line: problem`."""

    def __init__(self, path: Path, line: int, problem: str):
        super().__init__(f"{path}:{line}: {problem}")


def read_corpus(path: str | Path) -> list[Passage]:
    """Read every passage in `path` (a directory, .jsonl/.json or .tsv file) with unique, non-empty ids."""
    path = Path(path)
    if path.is_dir():
        rows = _read_dir(path)
    elif path.suffix in (".jsonl", ".json"):
        rows = _read_jsonl(path)
    elif path.suffix == ".tsv":
        rows = _read_tsv(path)
    else:
        raise ValueError(f"{path}: unsupported corpus format (expected a directory, .jsonl, .json or .tsv)")
    seen: dict[str, tuple[Path, int]] = {}
    passages = []
    for where, line, passage in rows:
        if not passage.id.strip():
            raise CorpusError(where, line, "empty id")
        if not passage.contents.strip():
            raise CorpusError(where, line, f"passage {passage.id!r} is empty (no title, no text)")
        if passage.id in seen:
            first, first_line = seen[passage.id]
            at = f"line {first_line}" if first == where else f"{first}:{first_line}"
            raise CorpusError(where, line, f"duplicate id {passage.id!r} (first seen at {at})")
        seen[passage.id] = (where, line)
        passages.append(passage)
    return passages


def _read_dir(root: Path) -> list[tuple[Path, int, Passage]]:
    """One passage per .txt/.md file; the id is its relative path, the title its `# heading` or stem."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".txt", ".md"))
    rows = []
    for file in files:
        text = file.read_text(encoding="utf-8").strip()
        if not text:
            continue
        first, _, rest = text.partition("\n")
        if first.startswith("# "):
            title, text = first[2:].strip(), rest.strip()
        else:
            title = file.stem
        rows.append((file, 1, Passage(file.relative_to(root).with_suffix("").as_posix(), title, text)))
    return rows


def _read_jsonl(path: Path) -> list[tuple[Path, int, Passage]]:
    """Rows are `{"id", "title", "text"}` or FlashRAG's `{"id", "contents": "title\\ntext"}`."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                raise CorpusError(path, line, f"invalid JSON: {e}") from None
            if not isinstance(row, dict):
                raise CorpusError(path, line, f"expected a JSON object, got {type(row).__name__}")
            if row.get("id") is None:
                raise CorpusError(path, line, "missing field 'id'")
            if "contents" in row and "text" not in row:
                title, _, text = str(row["contents"]).partition("\n")
            elif "text" in row:
                title, text = row.get("title") or "", row["text"]
            else:
                raise CorpusError(path, line, "missing field 'text' (or 'contents')")
            if not isinstance(title, str) or not isinstance(text, str):
                raise CorpusError(path, line, "fields 'title' and 'text' must be strings")
            rows.append((path, line, Passage(str(row["id"]), title, text)))
    return rows


def _read_tsv(path: Path) -> list[tuple[Path, int, Passage]]:
    """DPR's psgs_w100.tsv layout: `id<TAB>text<TAB>title`, with an optional header row."""
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        for line, raw in enumerate(f, 1):
            raw = raw.rstrip("\r\n")
            if not raw.strip():
                continue
            cols = raw.split("\t")
            if len(cols) != 3:
                problem = f"expected 3 tab-separated columns (id, text, title), got {len(cols)}"
                raise CorpusError(path, line, problem)
            if not rows and cols == ["id", "text", "title"]:
                continue
            rows.append((path, line, Passage(cols[0], cols[2], cols[1])))
    return rows
