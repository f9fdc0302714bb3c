"""Measurements the README quotes: retrieval recall@k and grounding of generated replies.

Used by the test suite on small samples and by ``bench/`` on the full sets.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from pipeline.chain import Done, HybridPipeline, Token
from pipeline.guard import sentences, unsupported_numbers

_TRANSLATE = str.maketrans({"–": "-", "—": "-", "’": "'", "‘": "'", "“": '"', "”": '"', "→": ">"})


def normalise(text: str) -> str:
    text = text.lower().translate(_TRANSLATE).replace("->", ">")
    return re.sub(r"\s+", " ", text)


def key_fact_recall(reply: str, facts: list[str]) -> float:
    reply = normalise(reply)
    return sum(normalise(f) in reply for f in facts) / len(facts) if facts else 1.0


def repeats_a_sentence(reply: str) -> bool:
    """Whether the reply says one of its sentences twice, word for word."""
    said = [" ".join(s.lower().split()) for s in sentences(reply)]
    return len(said) != len(set(said))


def load_questions(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def retrieval_recall(pipeline: HybridPipeline, texts: list[str], labels: list[str], k: int = 3,
                     progress: Callable[[int], None] | None = None, batch: int = 256) -> dict:
    """Share of messages whose top-k passages include an article written for their intent,
    with intent routing (as the pipeline retrieves) and with the vector search alone."""
    if not texts:
        raise ValueError("no messages to measure retrieval on")
    routed = plain = 0
    for start in range(0, len(texts), batch):
        chunk, gold = texts[start:start + batch], labels[start:start + batch]
        vectors = pipeline.encoder.encode(chunk)
        predictions = pipeline.classifier.predict(vectors, chunk, k=3)
        for vector, prediction, label in zip(vectors, predictions, gold):
            routed += any(label in p.intents for p in pipeline.retrieve(vector, prediction.top_intents, k=k))
            plain += any(label in p.intents for p in pipeline.index.search(vector, k))
        if progress:
            progress(min(start + batch, len(texts)))
    return {"n": len(texts), "k": k, "recall_routed": round(routed / len(texts), 4),
            "recall_vector_only": round(plain / len(texts), 4)}


def grounding_eval(pipeline: HybridPipeline, questions: list[dict],
                   progress: Callable[[int], None] | None = None) -> dict:
    """Key-fact recall and unsupported-number rate of the draft (before the guard) and the
    final reply (after it: replaced, completed with passage sentences, or as drafted)."""
    if not questions:
        raise ValueError("no grounding questions")
    rows = []
    for n, question in enumerate(questions, 1):
        draft = []
        result = None
        completed = second_draft = False
        for event in pipeline.stream(question["question"]):
            if isinstance(event, Token):
                if event.quoted:  # the guard's answer in place of the drafts: neither a completion nor a draft
                    continue
                completed |= event.from_guard
                second_draft |= event.restart or event.second_draft
                if not event.from_guard and not second_draft:  # "before the guard" is the first draft
                    draft.append(event.text)
            elif isinstance(event, Done):
                result = event.result
        shown = " ".join(f"{p['title']} {p['text']}" for p in result.passages[: pipeline.responder.max_passages])
        draft_text = "".join(draft)
        rows.append({
            "id": question["id"], "intent_ok": result.intent == question["intent"],
            "retrieved_ok": question["article_id"] in result.sources,
            "draft_recall": key_fact_recall(draft_text, question["key_facts"]),
            "final_recall": key_fact_recall(result.reply, question["key_facts"]),
            "draft_unsupported": unsupported_numbers(draft_text, shown),
            "final_unsupported": unsupported_numbers(result.reply, shown),
            "grounded": result.grounded, "completed": completed, "second_draft": second_draft,
            "draft": draft_text, "reply": result.reply,
            "first_token_ms": result.timings_ms.get("first_token"),
        })
        if progress:
            progress(n)
    count = len(rows)
    return {
        "n": count,
        "intent_accuracy": round(sum(r["intent_ok"] for r in rows) / count, 4),
        "article_in_sources": round(sum(r["retrieved_ok"] for r in rows) / count, 4),
        "key_fact_recall_before_guard": round(sum(r["draft_recall"] for r in rows) / count, 4),
        "key_fact_recall_after_guard": round(sum(r["final_recall"] for r in rows) / count, 4),
        "unsupported_number_rate_before_guard": round(sum(bool(r["draft_unsupported"]) for r in rows) / count, 4),
        "unsupported_number_rate_after_guard": round(sum(bool(r["final_unsupported"]) for r in rows) / count, 4),
        "replies_repeating_a_sentence": round(sum(repeats_a_sentence(r["reply"]) for r in rows) / count, 4),
        "guard_replaced": round(sum(not r["grounded"] for r in rows) / count, 4),
        "guard_completed": round(sum(r["completed"] for r in rows) / count, 4),
        "second_drafts": round(sum(r["second_draft"] for r in rows) / count, 4),
        "rows": rows,
    }
