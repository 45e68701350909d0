import json
from pathlib import Path

import pytest

from prag.corpus import CorpusError, Passage, read_corpus

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_contents_joins_title_and_text():
    assert Passage("1", "Paris", "Capital of France.").contents == "Paris\nCapital of France."
    assert Passage("1", "", "No title.").contents == "No title."


def test_jsonl_title_text(tmp_path):
    rows = [{"id": 7, "title": "A", "text": "a"}, "", {"id": "b", "text": "b"}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    assert read_corpus(path) == [Passage("7", "A", "a"), Passage("b", "", "b")]


def test_jsonl_flashrag_contents(tmp_path):
    path = write_jsonl(tmp_path / "c.json", [{"id": "1", "contents": "Title\nline one\nline two"}])
    assert read_corpus(path) == [Passage("1", "Title", "line one\nline two")]


def test_tsv_with_and_without_header(tmp_path):
    (tmp_path / "h.tsv").write_text("id\ttext\ttitle\n1\tsome text\tTitle\n\n2\tmore\tMore\n")
    (tmp_path / "n.tsv").write_text("1\tsome text\tTitle\n")
    both = [Passage("1", "Title", "some text"), Passage("2", "More", "more")]
    assert read_corpus(tmp_path / "h.tsv") == both
    assert read_corpus(tmp_path / "n.tsv") == [Passage("1", "Title", "some text")]


def test_directory(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.md").write_text("# Heading\n\nBody text.\n", encoding="utf-8")
    (tmp_path / "sub" / "a.txt").write_text("Plain text.", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "ignored.csv").write_text("x", encoding="utf-8")
    expected = [Passage("b", "Heading", "Body text."), Passage("sub/a", "a", "Plain text.")]
    assert read_corpus(tmp_path) == expected


def test_demo_corpus_reads():
    passages = read_corpus(DEMO / "corpus.jsonl")
    assert len(passages) == 217 and all(p.title and p.text for p in passages)


@pytest.mark.parametrize(
    "rows, line, problem",
    [
        ([{"id": "1", "text": "a"}, "{not json"], 2, "invalid JSON"),
        (["", {"id": "1", "title": "t"}], 2, "missing field 'text'"),
        ([{"title": "t", "text": "a"}], 1, "missing field 'id'"),
        ([{"id": " ", "text": "a"}], 1, "empty id"),
        ([{"id": "a", "text": "x"}, {"id": "b", "title": "", "text": "  "}], 2, "passage 'b' is empty"),
        (
            [{"id": "x", "text": "a"}, {"id": "y", "text": "b"}, {"id": "x", "text": "c"}],
            3,
            "duplicate id 'x' (first seen at line 1)",
        ),
        ([[1, 2]], 1, "expected a JSON object"),
    ],
)
def test_jsonl_errors_name_file_line_and_problem(tmp_path, rows, line, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(CorpusError) as e:
        read_corpus(path)
    assert str(e.value).startswith(f"{path}:{line}: ")
    assert problem in str(e.value)


def test_tsv_wrong_column_count(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("id\ttext\ttitle\n1\ttext\tTitle\n2\tonly two\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad\.tsv:3: expected 3 tab-separated columns .*got 2"):
        read_corpus(path)


def test_directory_duplicate_id_names_both_files(tmp_path):
    (tmp_path / "a.md").write_text("one", encoding="utf-8")
    (tmp_path / "a.txt").write_text("two", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"a\.txt:1: duplicate id 'a' \(first seen at .*a\.md:1\)"):
        read_corpus(tmp_path)


def test_unsupported_format(tmp_path):
    with pytest.raises(ValueError, match="unsupported corpus format"):
        read_corpus(tmp_path / "corpus.csv")
