"""Checks that a generated reply says only what the passages say.

A small generator will sometimes invent a fee or a number of days. A reply fails the
check when any of its numbers (amounts, days, dates, percentages) is absent from the
passages, or when one of its sentences is not similar enough to any passage sentence.
A failed reply is replaced by the passage sentences closest to the question.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.knowledge import Passage

Embed = Callable[[list[str]], np.ndarray]

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def numbers_in(text: str) -> set[str]:
    """Numbers as written, thousands separators dropped: "£1,000.50" -> {"1000.50"}."""
    return {re.sub(r",(?=\d{3}\b)", "", n).rstrip(".,") for n in _NUMBER.findall(text)}


def sentences(text: str) -> list[str]:
    parts = (s.strip(" -*•\t") for s in _SENTENCE_END.split(text))
    return [s for s in parts if len(s.split()) >= 3 and not s.startswith("#")]


@dataclass
class GuardVerdict:
    supported: bool
    unsupported_numbers: list[str]
    min_similarity: float | None


class GroundingGuard:
    def __init__(self, embed: Embed, similarity_threshold: float = 0.45):
        self.embed = embed
        self.similarity_threshold = similarity_threshold

    def check(self, reply: str, passages: list[Passage]) -> GuardVerdict:
        source = "\n".join(f"{p.title}\n{p.text}" for p in passages)
        unsupported = sorted(numbers_in(reply) - numbers_in(source))
        reply_sentences = sentences(reply)
        passage_sentences = sentences(source)
        min_similarity = None
        if reply_sentences and passage_sentences:
            vectors = self.embed(reply_sentences + passage_sentences)
            similarity = vectors[: len(reply_sentences)] @ vectors[len(reply_sentences):].T
            min_similarity = round(float(similarity.max(axis=1).min()), 4)
        supported = (bool(reply.strip()) and not unsupported and
                     (min_similarity is None or min_similarity >= self.similarity_threshold))
        return GuardVerdict(supported, unsupported, min_similarity)

    def extractive_answer(self, question: str, passages: list[Passage], max_sentences: int = 3) -> str:
        """The passage sentences closest to the question, in reading order. The best passage's
        sentences get a small head start: retrieval ranked it first for a reason."""
        candidates = [(rank, sentence) for rank, p in enumerate(passages) for sentence in sentences(p.text)]
        if not candidates:
            return passages[0].text.strip() if passages else ""
        vectors = self.embed([question, *(s for _, s in candidates)])
        scores = vectors[1:] @ vectors[0] + np.array([0.1 if rank == 0 else 0.0 for rank, _ in candidates])
        chosen = sorted(np.argsort(-scores)[:max_sentences].tolist())
        return " ".join(candidates[i][1] for i in chosen)
