from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.errors import IndexLoadError, InputError
from pipeline.knowledge import Article, KnowledgeIndex, chunk_article, load_articles, parse_markdown
from pipeline.settings import PACKAGE_DATA

ARTICLE = """---
id: fees
title: Our fees
intents: [card_payment_fee_charged]
url: https://help.example/fees
---
Card payments in pounds are free.

## Abroad
Payments abroad cost 1%.

## Common questions
- Why was I charged a fee?
- Do you charge for card payments?
"""


def fake_embed(texts: list[str]) -> np.ndarray:
    """Deterministic unit vectors per text: enough to test the index's bookkeeping."""
    out = []
    for text in texts:
        rng = np.random.default_rng(abs(hash(text)) % (2**32))
        v = rng.normal(size=8).astype(np.float32)
        out.append(v / np.linalg.norm(v))
    return np.array(out)


def make_article(i: int, text: str = "body text", intents=("a",)) -> Article:
    return Article(id=f"a{i}", title=f"Title {i}", body=f"{text} {i}", intents=list(intents))


def test_markdown_front_matter_and_common_questions_are_parsed():
    article = parse_markdown(ARTICLE, "fees.md")
    assert article.id == "fees"
    assert article.intents == ["card_payment_fee_charged"]
    assert article.url == "https://help.example/fees"
    assert article.questions == ["Why was I charged a fee?", "Do you charge for card payments?"]
    assert "Common questions" not in article.body and "1%" in article.body
    # One question in the front matter, not a list: each of its characters had become a question.
    one = parse_markdown("---\nid: x\nquestions: How do I freeze my card?\n---\nbody", "x.md")
    assert one.questions == ["How do I freeze my card?"]


def test_a_common_questions_section_ends_at_the_next_heading_and_keeps_its_questions_whole():
    article = parse_markdown("---\nid: x\n---\nIntro text.\n\n### Common questions\n1. 3D Secure failed?\n"
                             "* Why was I charged?\n\n### Fees\nA check costs £2.\n", "x.md")
    assert article.questions == ["3D Secure failed?", "Why was I charged?"]
    assert "A check costs £2." in article.body and "### Fees" in article.body


@pytest.mark.parametrize("text, message", [
    ("no front matter here", "no front matter"),
    ("---\ntitle: x\n---\nbody", "has no 'id'"),
    ("---\nid: x\ntitle: a: b\n---\nbody", "not valid YAML"),
    ("---\nid: x\n---\n", "has no text"),
    ("---\nid: x\nintents: 5\n---\nbody", "'intents' must be a list"),
    ("---\nid: x\nquestions: 5\n---\nbody", "'questions' must be a list"),
])
def test_bad_articles_get_clear_errors(text, message):
    with pytest.raises(InputError, match=message):
        parse_markdown(text, "bad.md")


def test_duplicate_article_ids_are_rejected(tmp_path):
    (tmp_path / "one.md").write_text(ARTICLE)
    (tmp_path / "two.md").write_text(ARTICLE)
    with pytest.raises(InputError, match="duplicate article id 'fees'"):
        load_articles(tmp_path)


def test_jsonl_articles_and_their_errors(tmp_path):
    good = tmp_path / "kb.jsonl"
    good.write_text(json.dumps({"id": "x", "title": "X", "text": "Fee is £5.", "intents": ["a"]}) + "\n\n")
    assert load_articles(good)[0].body == "Fee is £5."
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "text": "ok"}\n{not json\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: not valid JSON"):
        load_articles(bad)
    latin = tmp_path / "latin.md"
    latin.write_bytes(b"---\nid: x\n---\ncaf\xe9")
    with pytest.raises(InputError, match="not valid UTF-8"):
        load_articles(latin)
    with pytest.raises(InputError, match="no such file"):
        load_articles(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no articles found"):
        load_articles(tmp_path / "empty")


def test_chunks_respect_the_word_budget_at_paragraph_boundaries():
    body = "\n\n".join(" ".join(["word"] * 50) for _ in range(5))
    chunks = chunk_article(Article(id="x", title="t", body=body), chunk_words=120)
    assert [len(c.split()) for c in chunks] == [100, 100, 50]


def test_upsert_update_delete_and_version():
    index = KnowledgeIndex(dim=8, encoder="fake")
    assert index.upsert([make_article(i) for i in range(3)], fake_embed) == {"added": 3, "updated": 0, "unchanged": 0}
    v1 = index.version
    assert index.upsert([make_article(0), make_article(1, "new text")], fake_embed) == \
        {"added": 0, "updated": 1, "unchanged": 1}
    v2 = index.version
    assert v2 != v1
    assert len(index) == 3
    assert index.delete(["a2", "nope"]) == 1
    assert len(index) == 2 and index.version not in {v1, v2}
    # the updated article's old passage is gone, the new one is found
    hit = index.search(fake_embed(["Title 1\nnew text 1"])[0], k=1)[0]
    assert hit.article_id == "a1" and hit.text == "new text 1" and hit.score == pytest.approx(1.0, abs=1e-4)


def test_a_passage_says_whether_it_begins_its_article_after_updates_and_a_reload(tmp_path):
    body = "\n\n".join(f"Paragraph {i}: " + " ".join(["word"] * 50) for i in range(3))
    index = KnowledgeIndex(dim=8, encoder="fake", chunk_words=60)
    index.upsert([Article(id="long", title="Long", body=body), make_article(1)], fake_embed)

    def opening(text: str) -> bool:
        return next(p for p in index.search(fake_embed([f"Long\n{text}"])[0], 5) if p.text == text).opens_article

    chunks = chunk_article(index.articles["long"], 60)
    assert [opening(c) for c in chunks] == [True, False, False]
    # a new version of the article takes new chunk ids; its first chunk still opens it
    index.upsert([Article(id="long", title="Long", body="New lead.\n\n" + body)], fake_embed)
    chunks = chunk_article(index.articles["long"], 60)
    assert chunks[0].startswith("New lead.") and [opening(c) for c in chunks] == [True, False, False]
    index.save(tmp_path / "ix")
    index = KnowledgeIndex.load(tmp_path / "ix")
    assert [opening(c) for c in chunks] == [True, False, False]


def test_intent_filter_keeps_only_tagged_articles():
    index = KnowledgeIndex(dim=8, encoder="fake")
    index.upsert([make_article(0, intents=("x",)), make_article(1, intents=("y",)), make_article(2, intents=("y",))],
                 fake_embed)
    hits = index.search(fake_embed(["Title 0\nbody text 0"])[0], k=3, intents=["y"])
    assert {h.article_id for h in hits} == {"a1", "a2"}
    assert index.search(fake_embed(["q"])[0], k=3, intents=["unknown"]) == []


def test_search_many_equals_one_search_per_row_and_follows_article_changes():
    index = KnowledgeIndex(dim=8, encoder="fake")
    index.upsert([make_article(0, intents=("x",)), make_article(1, intents=("y",)),
                  make_article(2, intents=("x", "y"))], fake_embed)
    queries = fake_embed(["Title 0\nbody text 0", "q", "Title 2\nbody text 2", "r"])
    filters = [["y"], ["x"], ["y"], ["unknown"]]
    assert index.search_many(queries, 2, filters) == [index.search(q, 2, intents=f) for q, f in zip(queries, filters)]
    assert index.search_many(queries, 2) == [index.search(q, 2) for q in queries]
    assert index.search_many(queries[:0], 2) == []
    # the intent -> vectors map is rebuilt after a change, not served stale
    assert index.search(queries[1], 3, intents=["z"]) == []
    index.upsert([make_article(3, intents=("z",))], fake_embed)
    assert [p.article_id for p in index.search(queries[1], 3, intents=["z"])] == ["a3"]
    index.delete(["a3"])
    assert index.search(queries[1], 3, intents=["z"]) == []


def test_a_search_runs_faiss_on_one_thread_and_leaves_the_setting_as_it_was(monkeypatch):
    import faiss

    index = KnowledgeIndex(dim=8, encoder="fake")
    index.upsert([make_article(i) for i in range(5)], fake_embed)
    inside: list[int] = []
    search = index._faiss.search

    def recording_search(*args, **kwargs):
        inside.append(faiss.omp_get_max_threads())
        return search(*args, **kwargs)

    monkeypatch.setattr(index._faiss, "search", recording_search)
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        assert len(index.search(fake_embed(["q"])[0], k=3)) == 3
        assert inside == [1]
        assert faiss.omp_get_max_threads() == 2
    finally:
        faiss.omp_set_num_threads(before)


def test_switches_to_ivf_past_the_threshold_and_still_updates(tmp_path):
    index = KnowledgeIndex(dim=8, encoder="fake", exact_max=50)
    index.upsert([make_article(i) for i in range(40)], fake_embed)
    assert index.kind == "exact"
    index.upsert([make_article(i) for i in range(40, 80)], fake_embed)
    assert index.kind == "ivf" and len(index) == 80
    index.delete(["a5"])
    index.upsert([make_article(6, "changed")], fake_embed)
    assert len(index) == 79
    index.save(tmp_path / "ix")
    loaded = KnowledgeIndex.load(tmp_path / "ix")
    assert loaded.kind == "ivf" and loaded.version == index.version
    assert loaded.search(fake_embed(["Title 7\nbody text 7"])[0], k=1)[0].article_id == "a7"


def test_save_load_round_trip_and_broken_files(tmp_path):
    index = KnowledgeIndex(dim=8, encoder="fake")
    index.upsert([make_article(i) for i in range(3)], fake_embed)
    index.save(tmp_path / "ix")
    loaded = KnowledgeIndex.load(tmp_path / "ix")
    assert loaded.version == index.version and len(loaded) == len(index)
    query = fake_embed(["Title 2\nbody text 2"])[0]
    assert loaded.search(query, 2) == index.search(query, 2)

    with pytest.raises(IndexLoadError, match="no knowledge index"):
        KnowledgeIndex.load(tmp_path / "missing")
    (tmp_path / "ix" / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(IndexLoadError, match="corrupt"):
        KnowledgeIndex.load(tmp_path / "ix")
    index.save(tmp_path / "ix2")
    (tmp_path / "ix2" / "meta.json").write_text("{truncated")
    with pytest.raises(IndexLoadError, match="corrupt"):
        KnowledgeIndex.load(tmp_path / "ix2")
    (tmp_path / "ix2" / "index.faiss").unlink()
    with pytest.raises(IndexLoadError, match="tandem index"):
        KnowledgeIndex.load(tmp_path / "ix2")


def test_saves_of_one_folder_at_once_each_complete(tmp_path):
    # Workers sharing a folder sync it together at start: one's rename took the other's
    # temporary file from under it (FileNotFoundError), as processes here, threads below.
    import threading

    index = KnowledgeIndex(dim=8, encoder="fake")
    index.upsert([make_article(i) for i in range(200)], fake_embed)
    start, errors = threading.Barrier(4), []

    def save() -> None:
        start.wait()
        for _ in range(10):
            try:
                index.save(tmp_path / "ix")
            except Exception as exc:  # whatever it is, here it fails the test, not just this thread
                errors.append(exc)
    threads = [threading.Thread(target=save) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert KnowledgeIndex.load(tmp_path / "ix").version == index.version
    assert KnowledgeIndex.stored_version(tmp_path / "ix") == index.version


def test_bundled_help_centre_has_one_article_per_banking77_intent():
    articles = load_articles(PACKAGE_DATA / "helpcentre")
    categories = json.loads((PACKAGE_DATA / "banking77" / "categories.json").read_text())
    assert len(articles) == 77
    assert sorted(i for a in articles for i in a.intents) == sorted(categories)
    assert all(any(ch.isdigit() for ch in a.body) for a in articles), "every article carries concrete figures"
