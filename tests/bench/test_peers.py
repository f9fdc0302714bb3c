"""The benchmark's peers run and classify as well as the shipped model does.

Speed is not checked here (nothing in the suite is a timed test); the figures come
from ``bench``. Needs the ``bench`` extra, which CI does not install.
"""

from __future__ import annotations

import pytest

pytest.importorskip("haystack")
pytest.importorskip("haystack_integrations.components.embedders.sentence_transformers")

from bench import peers  # noqa: E402
from bench.__main__ import banking77_test  # noqa: E402

NLU_KEYS = {"peer", "n", "seconds", "tickets_per_s", "accuracy", "recall_at_3"}


@pytest.fixture(scope="module")
def sample() -> tuple[list[str], list[str]]:
    # Spread over the file: it is sorted by intent, so the first ten rows are one intent.
    return banking77_test(10)


def test_sample_spans_intents(sample):
    texts, labels = sample
    assert len(texts) == len(labels) == 10
    assert len(set(labels)) >= 8


@pytest.mark.parametrize("peer", [peers.naive_nlu, peers.haystack_nlu], ids=["naive", "haystack"])
def test_nlu_peer_classifies_and_retrieves(peer, sample, settings):
    result = peer(*sample, settings=settings)
    assert result.keys() >= NLU_KEYS
    assert result["n"] == 10
    assert result["tickets_per_s"] > 0
    assert result["accuracy"] > 0.5  # the shipped model scores 0.94 on all of BANKING77 test
    assert result["recall_at_3"] > 0.5
