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


def test_onnx_int8_vectors_stay_close_to_fp32_ones_and_the_export_is_made_once(encoder, settings, tmp_path):
    from pipeline.encoder import SentenceEncoder

    texts = ["I lost my card", "How long does a transfer to Spain take?", "hi", "my top-up failed twice " * 8]
    onnx = SentenceEncoder(settings.encoder)
    assert onnx.use_onnx_int8(tmp_path)
    (copy,) = tmp_path.glob("*.int8.onnx")
    vectors, reference = onnx.encode(texts), encoder.encode(texts)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    assert ((vectors * reference).sum(axis=1) > 0.97).all()  # measured 0.98-0.996
    made = copy.stat().st_mtime_ns
    again = SentenceEncoder(settings.encoder)
    assert again.use_onnx_int8(tmp_path)
    assert copy.stat().st_mtime_ns == made and np.allclose(again.encode(texts), vectors, atol=1e-5)


def test_an_encoder_that_cannot_be_exported_stays_on_torch(encoder, settings, tmp_path):
    from pipeline.encoder import SentenceEncoder

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")  # the cache folder cannot be made
    fallback = SentenceEncoder(settings.encoder)
    assert not fallback.use_onnx_int8(blocked)
    assert np.allclose(fallback.encode(["I lost my card"]), encoder.encode(["I lost my card"]), atol=1e-5)


def test_onnx_batches_run_side_by_side_with_the_vectors_of_one_run_after_another(settings):
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.encoder import SentenceEncoder

    texts = [f"ticket {i}: my card " + "was declined again " * (i % 7) for i in range(50)]
    serial, pooled = SentenceEncoder(settings.encoder, batch_size=4), SentenceEncoder(settings.encoder, batch_size=4)
    assert serial.use_onnx_int8(settings.data_dir / "models", threads=1)
    assert pooled.use_onnx_int8(settings.data_dir / "models", threads=2)
    seen: list[int] = []
    vectors = pooled.encode(texts, progress=seen.append)
    assert np.array_equal(vectors, serial.encode(texts))  # same batches, so the same int8 scales
    assert sorted(seen) == seen and len(seen) == 13 and seen[-1] == 50
    # A gen worker's drafting threads call at once: they share the pool, each gets its own vectors.
    with ThreadPoolExecutor(4) as callers:
        parts = list(callers.map(lambda i: pooled.encode(texts[i::4]), [0, 1, 2, 3] * 3))
    for i, part in enumerate(parts):
        assert np.array_equal(part, serial.encode(texts[i % 4::4]))


def test_batches_keep_under_the_token_budget_and_cover_every_message_once(encoder):
    from pipeline.encoder import SentenceEncoder

    texts = ["hi", "my card was declined at the shop " * 6, "card", "where is my transfer?", "ok", "refund " * 40]
    budgeted = SentenceEncoder(encoder.model_name, batch_size=3, batch_tokens=24)
    batches = budgeted.batches(texts)
    lengths = {i: len(encoder.tokenizer(t)["input_ids"]) for i, t in enumerate(texts)}
    assert sorted(i for rows, _ in batches for i in rows) == list(range(len(texts)))
    widths = [arrays["input_ids"].shape[1] for _, arrays in batches]
    assert widths == sorted(widths, reverse=True)  # longest first
    for rows, arrays in batches:
        assert len(rows) <= 3
        assert len(rows) == 1 or arrays["input_ids"].size <= 24  # only a message alone may exceed the budget
        assert arrays["attention_mask"].sum(axis=1).tolist() == [lengths[i] for i in rows]
    # The two long messages (over 24 tokens) get a batch each; the short ones are not padded to them.
    assert [len(rows) for rows, _ in batches][:2] == [1, 1]
    # In fp32 a batch's padding does not change a vector: the budget changes the cost, not the result.
    assert np.allclose(budgeted.encode(texts), encoder.encode(texts), atol=1e-5)
    assert np.allclose(budgeted.encode(texts), np.concatenate([encoder.encode([t]) for t in texts]), atol=1e-5)


def test_an_encoder_built_in_code_refuses_batches_that_could_never_be_cut():
    import pytest

    from pipeline.encoder import SentenceEncoder

    with pytest.raises(ValueError, match="batch_size >= 1"):
        SentenceEncoder("any", batch_size=0)
    with pytest.raises(ValueError, match="batch_tokens >= 0"):
        SentenceEncoder("any", batch_tokens=-1)


def test_token_ids_read_without_transformers_are_the_ones_its_tokenizer_gives(encoder, tmp_path):
    """A sentence-transformers folder is tokenized by the ``tokenizers`` library alone (no torch in
    a worker); a folder without tokenizer.json goes through transformers. Both give its ids."""
    import shutil

    from pipeline.encoder import SentenceEncoder

    texts = ["I LOST my card!!!", "word " * 300, "Ünïcödé £5 → Cards → Security", "😀" * 40, " ", "a\tb\nc"]
    expected = encoder.tokenizer(texts, truncation=True, max_length=128)["input_ids"]
    without = tmp_path / "no-tokenizer-json"
    shutil.copytree(encoder.model_name, without, ignore=shutil.ignore_patterns("tokenizer.json", "*.safetensors"))
    for folder in (encoder.model_name, without):
        light = SentenceEncoder(str(folder))
        ids = [[] for _ in texts]
        for rows, arrays in light.batches(texts):
            for row, i in enumerate(rows):
                ids[i] = arrays["input_ids"][row][arrays["attention_mask"][row] == 1].tolist()
        assert ids == expected, folder
        assert light.dim == 384 and light._model is None, "reading the folder loads no model"


def test_a_corrupt_tokenizer_json_is_a_clear_error_naming_the_encoder(encoder, tmp_path):
    import shutil

    import pytest

    from pipeline.encoder import SentenceEncoder
    from pipeline.errors import ModelLoadError

    broken = tmp_path / "broken-encoder"
    shutil.copytree(encoder.model_name, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=f"cannot load encoder '{broken}'"):
        SentenceEncoder(str(broken)).encode(["I lost my card"])
