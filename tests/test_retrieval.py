import json
from pathlib import Path

import pytest

from prag.corpus import Passage, read_corpus
from prag.retrieval import BM25Retriever, Hit, Retriever, load_retriever

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"

PASSAGES = [
    Passage("paris", "Paris", "Paris is the capital and largest city of France."),
    Passage("berlin", "Berlin", "Berlin is the capital of Germany, on the river Spree."),
    Passage("tulsa", "Tinted Windows", "The band Tinted Windows played its first show in Tulsa, Oklahoma."),
    Passage("cats", "", "Cats are small domesticated carnivorous mammals that purr."),
]


@pytest.fixture(scope="module")
def retriever() -> BM25Retriever:
    return BM25Retriever.build(PASSAGES, show_progress=False)


def test_right_passage_ranks_first(retriever):
    assert isinstance(retriever, Retriever)
    hits = retriever.search("What is the capital of Germany?", k=2)
    assert hits[0].passage.id == "berlin" and isinstance(hits[0], Hit)
    assert hits[0].score >= hits[-1].score
    assert retriever.search("tinted windows first performance", k=1)[0].passage.id == "tulsa"  # title indexed


def test_search_batch_matches_search(retriever):
    queries = ["capital of France", "purring cats", "river Spree", "Oklahoma band"]
    assert retriever.search_batch(queries, k=3) == [retriever.search(q, k=3) for q in queries]
    assert retriever.search_batch([], k=3) == []


def test_k_is_clamped_and_unknown_words_do_not_crash(retriever):
    assert len(retriever.search("capital city river band cats", k=100)) == len(PASSAGES)
    assert retriever.search("zyxxy qwertz", k=3) == []
    assert retriever.search("the of and", k=3) == []  # only stopwords
    assert retriever.search("capital", k=0) == []


def test_passage_lookup_and_len(retriever):
    assert retriever.passage("cats") == PASSAGES[3]
    assert len(retriever) == 4
    with pytest.raises(KeyError):
        retriever.passage("missing")


def test_save_load_round_trip(retriever, tmp_path):
    retriever.save(tmp_path / "index")
    retriever.save(tmp_path / "index")  # overwriting an existing index works
    assert json.loads((tmp_path / "index" / "retriever.json").read_text())["backend"] == "bm25"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no temp dirs left behind
    loaded = load_retriever(tmp_path / "index")
    assert isinstance(loaded, BM25Retriever) and len(loaded) == len(retriever)
    queries = ["capital of France", "purring cats", "Tulsa"]
    assert loaded.search_batch(queries, k=4) == retriever.search_batch(queries, k=4)
    assert loaded.passage("paris") == PASSAGES[0]


def test_demo_gold_passage_retrieved(tmp_path):
    retriever = BM25Retriever.build(read_corpus(DEMO / "corpus.jsonl"), show_progress=False)
    hits = retriever.search("What is George Rankin's occupation?", k=3)
    assert "George Rankin" in [h.passage.title for h in hits]


def test_unknown_backend(tmp_path):
    (tmp_path / "retriever.json").write_text(json.dumps({"backend": "elasticsearch"}))
    with pytest.raises(ValueError, match="unknown retriever backend 'elasticsearch'"):
        load_retriever(tmp_path)
    with pytest.raises(FileNotFoundError, match="retriever.json"):
        load_retriever(tmp_path / "nowhere")


def test_empty_corpus_rejected():
    with pytest.raises(ValueError, match="empty corpus"):
        BM25Retriever.build([], show_progress=False)


def test_live_index_scores_added_passages_as_a_full_reindex_would():
    """Passages added beside the main index are searchable at once, with the scores a full re-index
    gives them; `replace_main` swaps in a rebuilt index and empties the delta."""
    from prag.retrieval.live import LiveRetriever

    corpus = read_corpus(DEMO / "corpus.jsonl")
    full = BM25Retriever.build(corpus, show_progress=False)
    live = LiveRetriever(BM25Retriever.build(corpus[:-3], show_progress=False))
    assert isinstance(live, Retriever) and len(live) == len(corpus) - 3
    live.add(corpus[-3:] + corpus[:2])  # passages the main index holds already are skipped
    assert len(live) == len(corpus) and [p.id for p in live.added] == [p.id for p in corpus[-3:]]
    for added in corpus[-3:]:
        query = f"{added.title} {added.text[:60]}"
        [top] = [h for h in live.search(query, 5) if h.passage.id == added.id]
        [reference] = [h for h in full.search(query, 5) if h.passage.id == added.id]
        assert top.score == pytest.approx(reference.score, rel=1e-5)
        assert live.search(query, 1)[0].passage.id == full.search(query, 1)[0].passage.id
    assert live.passage(corpus[-1].id) == corpus[-1] and corpus[-1].id in live

    live.replace_main(full)
    assert live.added == [] and len(live) == len(corpus)


def test_an_interrupted_index_save_is_recovered(tmp_path):
    """A crash between moving the old index aside and moving the new one in leaves only `.index.*.old`."""
    BM25Retriever.build(PASSAGES, show_progress=False).save(tmp_path / "index")
    (tmp_path / "index").rename(tmp_path / ".index.abc123.old")
    assert load_retriever(tmp_path / "index").search("capital of Germany", 1)[0].passage.id == "berlin"
    assert (tmp_path / "index" / "retriever.json").exists()
