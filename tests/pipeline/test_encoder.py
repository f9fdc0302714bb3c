import numpy as np

from pipeline.encoder import VectorCache


def _counting_embed(calls: list[list[str]]):
    def embed(texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        return np.array([[len(t), i] for i, t in enumerate(texts)], dtype=np.float32)
    return embed


def test_each_text_is_embedded_once_and_read_back_in_order():
    calls: list[list[str]] = []
    cache = VectorCache(_counting_embed(calls), size=10)
    first = cache(["aa", "b", "aa"])
    assert calls == [["aa", "b"]]
    assert first.tolist() == [[2, 0], [1, 1], [2, 0]]
    assert cache(["b", "ccc"]).tolist() == [[1, 1], [3, 0]]
    assert calls[1:] == [["ccc"]]


def test_the_least_recently_used_text_is_evicted():
    calls: list[list[str]] = []
    cache = VectorCache(_counting_embed(calls), size=2)
    cache(["a", "b"])
    cache(["a"])  # a is now newer than b
    cache(["c"])  # evicts b
    cache(["a", "b"])
    assert calls[-1] == ["b"]


def test_a_batch_larger_than_the_cache_still_gets_all_its_vectors():
    calls: list[list[str]] = []
    cache = VectorCache(_counting_embed(calls), size=2)
    assert cache(["a", "bb", "ccc", "dddd"])[:, 0].tolist() == [1, 2, 3, 4]
    cache.clear()
    cache(["a"])
    assert calls[-1] == ["a"]
