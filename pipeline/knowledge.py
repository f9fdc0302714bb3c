"""Help-centre articles, their chunks, and the FAISS index that finds them.

An article is split into passages of about ``chunk_words`` words; each passage is
embedded as "title + text". The article's "Common questions" section is not answer
text, so it is kept out of the passages and embedded as extra search keys that point
at the article's first passage (customers' phrasings match customers' messages far
better than the answer prose does). Vectors are L2-normalised, so inner product is
cosine similarity.

The index is exact (``IndexFlatIP`` behind an ``IndexIDMap2``) while small and an
``IndexIVFFlat`` past ``exact_index_max`` vectors; both take our own vector ids, so
articles can be added, replaced and deleted without rebuilding. ``version`` is a hash of the
content and the encoder, so it changes whenever either does (caches key on it).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np
import yaml

from pipeline.errors import IndexLoadError, InputError

Embed = Callable[[list[str]], np.ndarray]

INDEX_FORMAT = 1
# A Markdown list item's mark ("- ", "* ", "• ", "1. ", "2) "); the guard reads sentences without it too.
LIST_MARK = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")
_QUESTIONS_HEADING = re.compile(r"^##+\s*(common questions|you might be asking|related questions)\s*$",
                                re.IGNORECASE | re.MULTILINE)


@dataclass
class Article:
    id: str
    title: str
    body: str
    intents: list[str] = field(default_factory=list)
    url: str = ""
    questions: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def content_hash(self) -> str:
        payload = json.dumps([self.title, self.body, self.intents, self.url, self.questions])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class Passage:
    article_id: str
    title: str
    url: str
    text: str
    score: float
    intents: list[str] = field(default_factory=list)
    # The passage begins its article, so its opening paragraph is the article's lead: a help
    # article opens with the answer, which the guard completes a reply with first.
    opens_article: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- parsing

def _split_questions(body: str) -> tuple[str, list[str]]:
    match = _QUESTIONS_HEADING.search(body)
    if not match:
        return body.strip(), []
    rest = body[match.end():]
    next_heading = re.search(r"^#+\s", rest, re.MULTILINE)  # any heading: "### Fees" after "### Common questions" too
    section = rest[: next_heading.start()] if next_heading else rest
    after = rest[next_heading.start():] if next_heading else ""
    # Only a list mark goes: stripping digits as well turned "3D Secure failed?" into "D Secure failed?".
    questions = [LIST_MARK.sub("", line).strip() for line in section.splitlines()]
    return (body[: match.start()] + after).strip(), [q for q in questions if q]


def _article_from_fields(fields: dict, body: str, source: str) -> Article:
    if not isinstance(fields, dict):
        raise InputError(f"{source}: front matter must be a mapping with id, title, intents, url")
    article_id = "" if fields.get("id") is None else str(fields["id"]).strip()
    if not article_id:
        raise InputError(f"{source}: article has no 'id'")
    intents = fields.get("intents") or []
    if isinstance(intents, str):
        intents = [intents]
    if not isinstance(intents, list):
        raise InputError(f"{source}: 'intents' must be a list of intent labels")
    extra = fields.get("questions") or []
    if isinstance(extra, str):  # one question; iterated as it was, each character became one
        extra = [extra]
    if not isinstance(extra, list):
        raise InputError(f"{source}: 'questions' must be a list of questions")
    body, questions = _split_questions(body)
    questions += [str(q) for q in extra]
    if not body:
        raise InputError(f"{source}: article {article_id!r} has no text")
    return Article(id=article_id, title=str(fields.get("title") or article_id), body=body,
                   intents=[str(i) for i in intents], url=str(fields.get("url") or ""),
                   questions=questions, source=source)


def parse_markdown(text: str, source: str) -> Article:
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n(.*)$", text, re.DOTALL)
    if not match:
        raise InputError(f"{source}: no front matter (a '---' block with id, title, intents, url)")
    try:
        fields = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        raise InputError(f"{source}: front matter is not valid YAML: {exc}") from None
    return _article_from_fields(fields, match.group(2), source)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not valid UTF-8 (byte {exc.start})") from None


def load_articles(path: Path) -> list[Article]:
    """Articles from a folder of Markdown files, a JSONL file, or a folder holding both."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    articles: list[Article] = []
    for file in files:
        if file.suffix in {".md", ".markdown"}:
            articles.append(parse_markdown(_read_text(file), str(file)))
        elif file.suffix == ".jsonl":
            for n, line in enumerate(_read_text(file).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{file}:{n}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise InputError(f"{file}:{n}: each line must be a JSON object")
                body = row.get("text") or row.get("body") or ""
                articles.append(_article_from_fields(row, str(body), f"{file}:{n}"))
    if not articles:
        raise InputError(f"{path}: no articles found (expected *.md files with front matter, or *.jsonl)")
    seen: dict[str, str] = {}
    for article in articles:
        if article.id in seen:
            raise InputError(f"duplicate article id {article.id!r} in {seen[article.id]} and {article.source}")
        seen[article.id] = article.source
    return articles


def chunk_article(article: Article, chunk_words: int) -> list[str]:
    """Passages of at most ~chunk_words words, cut at paragraph boundaries where possible."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", article.body) if p.strip()]
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for paragraph in paragraphs:
        words = len(paragraph.split())
        if current and size + words > chunk_words:
            chunks.append("\n\n".join(current))
            current, size = [], 0
        current.append(paragraph)
        size += words
    if current:
        chunks.append("\n\n".join(current))
    return chunks


# ----------------------------------------------------------------------------- index

@dataclass
class _Chunk:
    article_id: str
    text: str


@contextmanager
def _one_openmp_thread() -> Iterator[None]:
    """FAISS on one OpenMP thread in the calling thread (the setting is per thread).

    One query is too little work to split, and FAISS's threads would fight torch's, which
    spin for a while after each encoder batch. In a profiling run (2 cores, 2026-11-22)
    retrieval took 0.2 ms a message instead of 0.9, and NLU ran 1.13x faster."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


class KnowledgeIndex:
    """FAISS vectors plus the passages and articles they point to."""

    def __init__(self, dim: int, encoder: str, exact_max: int = 20_000, chunk_words: int = 120):
        self.dim = dim
        self.encoder = encoder
        self.exact_max = exact_max
        self.chunk_words = chunk_words
        self.articles: dict[str, Article] = {}
        self.chunks: dict[int, _Chunk] = {}
        self.vector_chunk: dict[int, int] = {}  # vector id -> chunk id
        self.article_vectors: dict[str, list[int]] = {}
        self._by_intent: dict[str, list[int]] | None = None  # see _intent_vectors
        self._opening_chunks: set[int] | None = None  # see _openings
        self._version: str | None = None  # see version
        self._next_id = 0
        self._faiss: faiss.Index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    # -- content ------------------------------------------------------------------
    @property
    def version(self) -> str:
        # Kept until the content changes: every understand() call stamps it on its results.
        if self._version is None:
            digest = hashlib.sha256(self.encoder.encode())
            for article_id in sorted(self.articles):
                digest.update(f"{article_id}:{self.articles[article_id].content_hash};".encode())
            digest.update(str(self.chunk_words).encode())
            self._version = digest.hexdigest()[:16]
        return self._version

    @property
    def kind(self) -> str:
        return "exact" if self._is_exact() else "ivf"

    def __len__(self) -> int:
        return self._faiss.ntotal

    def _is_exact(self) -> bool:
        return not isinstance(self._faiss, faiss.IndexIVF)

    def upsert(self, articles: Iterable[Article], embed: Embed) -> dict[str, int]:
        """Add new articles, replace changed ones, skip unchanged ones. Returns counts."""
        counts = {"added": 0, "updated": 0, "unchanged": 0}
        keys: list[str] = []
        key_chunks: list[int] = []
        for article in articles:
            old = self.articles.get(article.id)
            if old is not None and old.content_hash == article.content_hash:
                counts["unchanged"] += 1
                continue
            counts["updated" if old else "added"] += 1
            if old is not None:
                self._remove(article.id)
            self.articles[article.id] = article
            first_chunk = None
            for text in chunk_article(article, self.chunk_words):
                chunk_id = self._take_id()
                self.chunks[chunk_id] = _Chunk(article.id, text)
                first_chunk = chunk_id if first_chunk is None else first_chunk
                keys.append(f"{article.title}\n{text}")
                key_chunks.append(chunk_id)
            for question in article.questions:
                keys.append(question)
                key_chunks.append(first_chunk)
        if keys:
            vectors = np.ascontiguousarray(embed(keys), dtype=np.float32)
            if vectors.shape != (len(keys), self.dim):
                raise IndexLoadError(f"encoder returned vectors of shape {vectors.shape}, index expects dim {self.dim}")
            ids = np.array([self._take_id() for _ in keys], dtype=np.int64)
            for vector_id, chunk_id in zip(ids.tolist(), key_chunks):
                self.vector_chunk[vector_id] = chunk_id
                self.article_vectors.setdefault(self.chunks[chunk_id].article_id, []).append(vector_id)
            self._add(vectors, ids)
        self._by_intent = self._opening_chunks = self._version = None
        return counts

    def delete(self, article_ids: Iterable[str]) -> int:
        removed = 0
        for article_id in article_ids:
            if article_id in self.articles:
                self._remove(article_id)
                del self.articles[article_id]
                removed += 1
        return removed

    def _take_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _remove(self, article_id: str) -> None:
        self._by_intent = self._opening_chunks = self._version = None
        vector_ids = self.article_vectors.pop(article_id, [])
        if vector_ids:
            self._faiss.remove_ids(np.array(vector_ids, dtype=np.int64))
        for vector_id in vector_ids:
            self.vector_chunk.pop(vector_id, None)
        for chunk_id in [c for c, chunk in self.chunks.items() if chunk.article_id == article_id]:
            del self.chunks[chunk_id]

    def _add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if self._is_exact() and self._faiss.ntotal + len(ids) > self.exact_max:
            self._switch_to_ivf(vectors, ids)
        else:
            self._faiss.add_with_ids(vectors, ids)

    def _switch_to_ivf(self, new_vectors: np.ndarray, new_ids: np.ndarray) -> None:
        """Past the size threshold, move every vector into an IVF index (one-off retrain)."""
        flat = faiss.downcast_index(self._faiss.index)
        old_ids = faiss.vector_to_array(self._faiss.id_map).astype(np.int64)
        old_vectors = flat.reconstruct_n(0, flat.ntotal) if flat.ntotal else np.zeros((0, self.dim), np.float32)
        vectors = np.vstack([old_vectors, new_vectors]).astype(np.float32)
        ids = np.concatenate([old_ids, new_ids])
        nlist = max(1, int(4 * math.sqrt(len(ids))))
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.train(vectors)
        ivf.nprobe = min(nlist, 16)
        ivf.add_with_ids(vectors, ids)  # IVF keeps ids itself and can remove them; no IDMap needed
        self._faiss = ivf

    # -- search -------------------------------------------------------------------
    def search(self, query: np.ndarray, k: int = 3, intents: Iterable[str] | None = None) -> list[Passage]:
        """The k best passages for one query vector; ``intents`` keeps only articles tagged with one."""
        return self.search_many(query.reshape(1, -1), k, None if intents is None else [intents])[0]

    def search_many(self, queries: np.ndarray, k: int = 3,
                    intents: list[Iterable[str]] | None = None) -> list[list[Passage]]:
        """``search`` for each row of ``queries``, with ``intents[i]`` filtering row i.

        Without filters the rows go to FAISS in one call; with them, rows that share a filter do.
        Per-row calls had made retrieval an eighth of NLU time (profile, 2 cores, 2026-11-23)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        if self._faiss.ntotal == 0:
            return [[] for _ in queries]
        # Several vectors can point at one passage: over-fetch, keep each passage's best score.
        fetch = min(self._faiss.ntotal, max(4 * k, k + 16))
        groups: dict[frozenset[str] | None, list[int]] = {}
        for row in range(len(queries)):
            groups.setdefault(None if intents is None else frozenset(intents[row]), []).append(row)
        results: list[list[Passage]] = [[] for _ in queries]
        with _one_openmp_thread():
            for wanted, rows in groups.items():
                params = None
                if wanted is not None:
                    allowed = {v for intent in wanted for v in self._intent_vectors().get(intent, ())}
                    if not allowed:
                        continue
                    selector = faiss.IDSelectorBatch(np.fromiter(allowed, np.int64, len(allowed)))
                    params = (faiss.SearchParametersIVF(sel=selector, nprobe=self._nprobe()) if not self._is_exact()
                              else faiss.SearchParameters(sel=selector))
                scores, ids = self._faiss.search(queries[rows], fetch, params=params)
                for row, row_scores, row_ids in zip(rows, scores.tolist(), ids.tolist()):
                    results[row] = self._passages(row_scores, row_ids, k)
        return results

    def _passages(self, scores: list[float], vector_ids: list[int], k: int) -> list[Passage]:
        # FAISS gives a row best first, so the first k distinct chunks are the best k: stopping
        # there took this from 0.17 to 0.12 s per 1,024 tickets (profile, 2 cores, 2026-12-02).
        openings = self._openings()
        passages: list[Passage] = []
        seen: set[int] = set()
        for score, vector_id in zip(scores, vector_ids):
            if vector_id < 0:  # fewer vectors than asked for
                continue
            chunk_id = self.vector_chunk[vector_id]
            if chunk_id in seen:
                continue
            seen.add(chunk_id)
            chunk = self.chunks[chunk_id]
            article = self.articles[chunk.article_id]
            passages.append(Passage(article_id=article.id, title=article.title, url=article.url, text=chunk.text,
                                    score=round(score, 4), intents=list(article.intents),
                                    opens_article=chunk_id in openings))
            if len(passages) == k:
                break
        return passages

    def _openings(self) -> set[int]:
        """Ids of the chunks that begin their article: an article's chunks take ids in reading order."""
        openings = self._opening_chunks
        if openings is None:
            first: dict[str, int] = {}
            for chunk_id, chunk in self.chunks.items():
                first[chunk.article_id] = min(chunk_id, first.get(chunk.article_id, chunk_id))
            openings = self._opening_chunks = set(first.values())
        return openings

    @property
    def intents(self) -> set[str]:
        """The intents at least one article is tagged with."""
        return set(self._intent_vectors())

    def _intent_vectors(self) -> dict[str, list[int]]:
        """Intent -> ids of the vectors of articles tagged with it (rebuilt after a change)."""
        by_intent = self._by_intent
        if by_intent is None:
            by_intent = {}  # built aside, so a search in another thread never sees it half-filled
            for article_id, vector_ids in self.article_vectors.items():
                for intent in set(self.articles[article_id].intents):
                    by_intent.setdefault(intent, []).extend(vector_ids)
            self._by_intent = by_intent
        return by_intent

    def _nprobe(self) -> int:
        return self._faiss.nprobe

    # -- persistence --------------------------------------------------------------
    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": INDEX_FORMAT, "version": self.version, "dim": self.dim, "encoder": self.encoder,
            "exact_max": self.exact_max, "chunk_words": self.chunk_words, "next_id": self._next_id,
            "articles": [asdict(a) for a in self.articles.values()],
            "chunks": {str(c): asdict(chunk) for c, chunk in self.chunks.items()},
            "vectors": {str(v): c for v, c in self.vector_chunk.items()},
        }
        # Write both files beside the old ones, then rename: a crash never leaves a half index.
        # One process at a time: workers sharing a folder (compose's /data) sync it together
        # at start, and one's rename took the other's temporary file from under it.
        with open(directory / ".save.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            faiss.write_index(self._faiss, str(directory / "index.faiss.tmp"))
            (directory / "meta.json.tmp").write_text(json.dumps(meta), encoding="utf-8")
            os.replace(directory / "index.faiss.tmp", directory / "index.faiss")
            os.replace(directory / "meta.json.tmp", directory / "meta.json")

    @staticmethod
    def stored_version(directory: Path) -> str | None:
        """The version of the index saved in ``directory``; None where there is none, or while
        a ``save`` is under way there (its files are renamed into place one at a time)."""
        directory = Path(directory)
        if (directory / "meta.json.tmp").exists() or (directory / "index.faiss.tmp").exists():
            return None
        try:
            return json.loads((directory / "meta.json").read_text(encoding="utf-8")).get("version")
        except (OSError, ValueError, AttributeError):
            return None

    @classmethod
    def load(cls, directory: Path) -> KnowledgeIndex:
        directory = Path(directory)
        hint = f"rebuild it with: tandem index KB_DIR --out {directory}"
        if not (directory / "meta.json").is_file() or not (directory / "index.faiss").is_file():
            raise IndexLoadError(f"no knowledge index at {directory} (index.faiss and meta.json); {hint}")
        try:
            meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
            vectors = faiss.read_index(str(directory / "index.faiss"))
            index = cls(meta["dim"], meta["encoder"], meta["exact_max"], meta["chunk_words"])
            index._faiss = vectors
            index._next_id = meta["next_id"]
            index.articles = {a["id"]: Article(**a) for a in meta["articles"]}
            index.chunks = {int(c): _Chunk(**chunk) for c, chunk in meta["chunks"].items()}
            index.vector_chunk = {int(v): c for v, c in meta["vectors"].items()}
            for vector_id, chunk_id in index.vector_chunk.items():
                index.article_vectors.setdefault(index.chunks[chunk_id].article_id, []).append(vector_id)
        except (ValueError, KeyError, TypeError, AttributeError, RuntimeError, UnicodeDecodeError) as exc:
            raise IndexLoadError(f"knowledge index at {directory} is corrupt ({type(exc).__name__}: {exc}); {hint}") from None
        if meta.get("format") != INDEX_FORMAT:
            raise IndexLoadError(f"knowledge index at {directory} has format {meta.get('format')}, expected {INDEX_FORMAT}; {hint}")
        if vectors.ntotal != len(index.vector_chunk) or vectors.d != index.dim:
            raise IndexLoadError(f"knowledge index at {directory} is inconsistent "
                                 f"({vectors.ntotal} vectors, {len(index.vector_chunk)} in metadata); {hint}")
        return index
