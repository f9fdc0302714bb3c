import numpy as np
import pytest

from pipeline.guard import GroundingGuard, numbers_in, sentences
from pipeline.knowledge import Passage


def passage(text: str) -> Passage:
    return Passage(article_id="fees", title="Fees", url="", text=text, score=1.0)


def test_numbers_are_normalised():
    assert numbers_in("£1,000.50 within 3–5 days, 0.5%") == {"1000.50", "3", "5", "0.5"}
    assert numbers_in("no digits") == set()


def test_sentences_skip_headings_and_fragments():
    assert sentences("## Fees\nIt costs £5 to order.\n- ok\nYou can pay by card. Thanks!") == \
        ["It costs £5 to order.", "You can pay by card."]


@pytest.fixture(scope="module")
def guard(encoder):
    return GroundingGuard(encoder.embed, similarity_threshold=0.45)


PASSAGES = [passage("A replacement card costs £5. Standard delivery takes 3–5 working days in the UK."),
            passage("Express delivery costs £5 and takes 1–2 working days.")]


def test_supported_reply_passes(guard):
    verdict = guard.check("A replacement card costs £5 and arrives in 3–5 working days.", PASSAGES)
    assert verdict.supported and verdict.unsupported_numbers == []


def test_invented_number_fails(guard):
    verdict = guard.check("A replacement card costs £12 and arrives in 3–5 working days.", PASSAGES)
    assert not verdict.supported and verdict.unsupported_numbers == ["12"]


def test_unrelated_sentence_fails(guard):
    verdict = guard.check("Our headquarters has a lovely rooftop garden with tomatoes.", PASSAGES)
    assert not verdict.supported and verdict.min_similarity < 0.45


def test_empty_reply_fails(guard):
    assert not guard.check("   ", PASSAGES).supported


def test_extractive_answer_quotes_the_passages(guard):
    answer = guard.extractive_answer("How long does express delivery take?", PASSAGES, max_sentences=1)
    assert answer in {"Express delivery costs £5 and takes 1–2 working days.",
                      "Standard delivery takes 3–5 working days in the UK."}
    assert guard.check(answer, PASSAGES).supported
    assert guard.extractive_answer("anything", []) == ""


def test_guard_uses_the_embedder_it_is_given():
    calls = []

    def embed(texts):
        calls.append(texts)
        return np.eye(len(texts), 4, dtype=np.float32)

    GroundingGuard(embed).check("One sentence here.", [passage("Another sentence there.")])
    assert calls == [["One sentence here.", "Another sentence there."]]
