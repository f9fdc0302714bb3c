"""Checks that a generated reply says only what the passages say.

A small generator will sometimes invent a fee or a number of days. A reply fails the
check when any of its numbers (amounts, days, dates, percentages) is absent from the
passages or misstates a duration they give, or when one of its sentences is not similar
enough to any passage sentence.
A failed reply is replaced by the passage sentences closest to the question. A reply
that passes but leaves some of those sentences unsaid is completed with them: the small
generator often answers vaguely ("a small fee that can vary") where the article names it,
so a sentence counts as said only when the reply also gives its specifics (its numbers and
app paths such as "Cards → Security"), however close the reply's wording comes to it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.encoder import VectorCache
from pipeline.knowledge import Passage

Embed = Callable[[list[str]], np.ndarray]

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_DURATION = re.compile(r"(\d+(?:[.,]\d+)*)(?:\s*(?:–|—|-|to)\s*(\d+(?:[.,]\d+)*))?\s*"
                       r"(?:working |business |calendar )?(minute|hour|day|week|month|year)s?\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_APP_PATH_STEP = re.compile(r"([\w'’]+)[\"”]?\s*(?:→|->)\s*(?=[\"“]?([\w'’]+))")
# A passage sentence counts as already said when a reply sentence is this close to it. On the
# grounding set 0.8 and 0.9 gave the same key-fact recall; 0.8 repeats less.
_ALREADY_SAID = 0.8


def numbers_in(text: str) -> set[str]:
    """Numbers as written, thousands separators dropped: "£1,000.50" -> {"1000.50"}."""
    return {re.sub(r",(?=\d{3}\b)", "", n).rstrip(".,") for n in _NUMBER.findall(text)}


def durations_in(text: str) -> set[tuple[str, str, str]]:
    """Durations as (from, to, unit), ``to`` empty for a single one: "3–5 working days" -> ("3", "5", "day")."""
    return {(a, b, unit.lower()) for a, b, unit in _DURATION.findall(text)}


def unsupported_numbers(reply: str, source: str) -> list[str]:
    """The reply's numbers that the source does not give, and its durations that misstate one:
    "3 days" where the source says "3–5 working days" understates it. A single duration must be
    one the source gives alone or as the top of a range ("up to 5 days"); a range must match."""
    missing = sorted(numbers_in(reply) - numbers_in(source))
    given = durations_in(source)
    for start, end, unit in sorted(durations_in(reply)):
        if end and (start, end, unit) in given:
            continue
        if not end and any(u == unit and (start == b or (start == a and not b)) for a, b, u in given):
            continue
        missing.append(f"{start}–{end} {unit}s" if end else f"{start} {unit}s")
    return missing


def specifics(text: str) -> set[str]:
    """What a customer acts on: the numbers, and each step of an app path ("Cards → Security" -> "cards→security")."""
    steps = {f"{a}→{b}".lower().replace("’", "'") for a, b in _APP_PATH_STEP.findall(text)}
    return numbers_in(text) | steps


def last_sentence_end(text: str) -> int:
    """Where the text's last complete sentence ends (after the break that follows it), 0 if none.
    ``sentences`` splits the text before it as it splits the whole text, so a reply whose
    beginning fails ``check`` fails it whole."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return ends[-1] if ends else 0


def sentences(text: str) -> list[str]:
    parts = (s.strip(" -*•\t") for s in _SENTENCE_END.split(text))
    return [s for s in parts if len(s.split()) >= 3 and not s.startswith("#")]


@dataclass
class GuardVerdict:
    supported: bool
    unsupported_numbers: list[str]
    min_similarity: float | None


class GroundingGuard:
    def __init__(self, embed: Embed, similarity_threshold: float = 0.45, complete_sentences: int = 3):
        self.embed = embed
        # Passage sentences come back reply after reply (and twice within one): each is
        # embedded once, then read from here.
        self._embed = VectorCache(embed, 8192)
        self.similarity_threshold = similarity_threshold
        self.complete_sentences = complete_sentences

    @property
    def identity(self) -> str:
        """What a cached reply depends on in the guard; the version moves when its rules do."""
        return f"guard2:{self.similarity_threshold}:{self.complete_sentences}"

    def check(self, reply: str, passages: list[Passage]) -> GuardVerdict:
        source = "\n".join(f"{p.title}\n{p.text}" for p in passages)
        unsupported = unsupported_numbers(reply, source)
        reply_sentences = sentences(reply)
        passage_sentences = sentences(source)
        min_similarity = None
        if reply_sentences and passage_sentences:
            vectors = self._embed(reply_sentences + passage_sentences)
            similarity = vectors[: len(reply_sentences)] @ vectors[len(reply_sentences):].T
            min_similarity = round(float(similarity.max(axis=1).min()), 4)
        supported = (bool(reply.strip()) and not unsupported and
                     (min_similarity is None or min_similarity >= self.similarity_threshold))
        return GuardVerdict(supported, unsupported, min_similarity)

    def extractive_answer(self, question: str, passages: list[Passage], max_sentences: int = 3) -> str:
        """The passage sentences closest to the question, in reading order."""
        chosen = self.closest_sentences(question, passages, max_sentences)
        if not chosen:
            return passages[0].text.strip() if passages else ""
        return " ".join(chosen)

    def missing_sentences(self, reply: str, question: str, passages: list[Passage]) -> list[str]:
        """Of the ``complete_sentences`` passage sentences closest to the question, those the
        reply does not already say, in reading order: none of its sentences is close to them,
        or the reply leaves out one of their specifics."""
        chosen = self.closest_sentences(question, passages, self.complete_sentences)
        said = sentences(reply) or ([reply.strip()] if reply.strip() else [])
        if not chosen or not said:
            return chosen
        vectors = self._embed(said + chosen)
        similarity = vectors[len(said):] @ vectors[: len(said)].T
        given = specifics(reply)
        return [s for s, row in zip(chosen, similarity) if row.max() < _ALREADY_SAID or not specifics(s) <= given]

    def closest_sentences(self, question: str, passages: list[Passage], n: int) -> list[str]:
        """The ``n`` passage sentences closest to the question, in reading order. The best
        passage's sentences get a small head start: retrieval ranked it first for a reason."""
        candidates = [(rank, sentence) for rank, p in enumerate(passages) for sentence in sentences(p.text)]
        if not candidates or n <= 0:
            return []
        vectors = self._embed([question, *(s for _, s in candidates)])
        scores = vectors[1:] @ vectors[0] + np.array([0.1 if rank == 0 else 0.0 for rank, _ in candidates])
        return [candidates[i][1] for i in sorted(np.argsort(-scores)[:n].tolist())]
