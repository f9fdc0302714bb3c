from __future__ import annotations

import json
import random

import numpy as np
import pytest

from pipeline.classifier import IntentClassifier, TrainConfig, _fit_temperature, _tune_threshold, evaluate
from pipeline.errors import InputError, ModelLoadError
from pipeline.settings import Settings

from ..conftest import BANKING77


def sample(texts, labels, classes, per_class, seed=0):
    rng = random.Random(seed)
    rows = [(t, y) for t, y in zip(texts, labels) if y in classes]
    rng.shuffle(rows)
    picked, count = [], dict.fromkeys(classes, 0)
    for t, y in rows:
        if count[y] < per_class:
            picked.append((t, y))
            count[y] += 1
    return [t for t, _ in picked], [y for _, y in picked]


@pytest.fixture(scope="module")
def banking_subset():
    from pipeline.data_io import read_labelled_csv

    texts, labels = read_labelled_csv(BANKING77 / "train.csv", "text", "category")
    classes = ["card_arrival", "exchange_rate", "lost_or_stolen_card", "pin_blocked", "top_up_limits",
               "terminate_account", "change_pin", "country_support"]
    return classes, sample(texts, labels, classes, 40)


def test_threshold_is_tuned_for_oos_when_the_data_has_it():
    classes = ["a", "b", "oos"]
    # in-scope rows are confident, oos rows are not
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.85, 0.05], [0.5, 0.3, 0.2], [0.45, 0.4, 0.15]])
    y = np.array([0, 1, 2, 2])
    threshold = _tune_threshold(probs, y, classes, TrainConfig())
    assert 0.5 < threshold <= 0.85


def test_threshold_without_oos_rejects_the_configured_share():
    probs = np.tile(np.linspace(0.3, 1.0, 200)[:, None], (1, 2))
    threshold = _tune_threshold(probs, np.zeros(200, int), ["a", "b"], TrainConfig(oos_reject_rate=0.05))
    assert np.mean(probs[:, 0] < threshold) == pytest.approx(0.05, abs=0.01)


def test_temperature_softens_overconfident_logits():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 500)
    logits = rng.normal(size=(500, 3)) * 0.1
    logits[np.arange(500), y] += 5.0
    noisy = rng.random(500) < 0.3  # 30% of confident predictions are wrong
    logits[noisy] = np.roll(logits[noisy], 1, axis=1)
    assert _fit_temperature(logits, y) > 1.5


def test_one_class_and_mismatched_input_are_rejected(encoder):
    with pytest.raises(InputError, match="only one class"):
        IntentClassifier.train(encoder, ["a", "b"], ["x", "x"], TrainConfig())
    with pytest.raises(InputError, match="differ in length"):
        IntentClassifier.train(encoder, ["a", "b"], ["x"], TrainConfig())


def test_head_training_on_banking77_subset_round_trips(encoder, banking_subset, tmp_path, banking77_test):
    classes, (texts, labels) = banking_subset
    model = IntentClassifier.train(encoder, texts, labels, TrainConfig(), out=tmp_path / "m")
    assert sorted(model.labels) == sorted(classes)
    assert json.loads((tmp_path / "m" / "metrics.json").read_text())["val_accuracy"] >= 0.8
    loaded = IntentClassifier.load(tmp_path / "m")
    test_texts, test_labels = sample(*banking77_test, classes, 20)
    report, predicted = evaluate(loaded, encoder, test_texts, test_labels)
    assert report["accuracy"] >= 0.85 and report["n"] == len(test_texts)
    assert report["oos_recall"] is None and report["in_scope_accuracy"] is None
    assert report["accuracy_before_threshold"] >= report["accuracy"]
    loaded.oos_threshold = 1.01  # every message rejected: what the threshold costs is all of it
    rejecting, _ = evaluate(loaded, encoder, test_texts, test_labels)
    assert rejecting["rejected"] == 1.0 and rejecting["accuracy"] == 0.0
    assert rejecting["accuracy_before_threshold"] == report["accuracy_before_threshold"]
    loaded.oos_threshold = model.oos_threshold
    vectors = encoder.encode(test_texts[:5])
    assert [p.to_dict() for p in model.predict(vectors, test_texts[:5])] == \
        [p.to_dict() for p in loaded.predict(vectors, test_texts[:5])]


def test_oos_class_in_training_data_is_learned_and_reported(encoder, banking_subset):
    classes, (texts, labels) = banking_subset
    oos = ["what's the weather tomorrow", "tell me a joke", "who won the football", "recipe for pancakes",
           "how tall is mount everest", "play some jazz music", "what time is it in tokyo", "book a table for two",
           "translate hello into french", "how do I fix a flat bike tyre", "what's the capital of peru",
           "recommend a good film", "set an alarm for 7am", "is it going to snow", "how many calories in an apple",
           "who wrote hamlet", "best way to learn guitar", "how far is the moon", "turn on the lights",
           "what is the meaning of life"]
    model = IntentClassifier.train(encoder, texts + oos * 2, labels + ["oos"] * 40, TrainConfig(val_split=0.2))
    held_out = ["what's a good pizza topping", "how do volcanoes form", "sing me a song", "what's the score in the cricket"]
    report, predicted = evaluate(model, encoder, held_out + ["My card still hasn't arrived"],
                                 ["oos"] * 4 + ["card_arrival"])
    assert report["oos_recall"] >= 0.75
    assert report["in_scope_accuracy"] == 1.0


@pytest.mark.parametrize("method", ["finetune", "lora", "prefix", "prompt"])
def test_encoder_training_methods_produce_loadable_artifacts(settings, banking_subset, tmp_path, method):
    from pipeline.encoder import SentenceEncoder

    classes, (texts, labels) = banking_subset
    trainer = SentenceEncoder(settings.encoder)
    config = TrainConfig(method=method, epochs=1, max_train=96, batch_size=16, lexical=False)
    model = IntentClassifier.train(trainer, texts, labels, config, out=tmp_path / method)
    assert model.metrics["method"] == method
    if method != "finetune":
        saved = {f.name for f in (tmp_path / method / "adapter").iterdir()}
        assert "adapter_model.safetensors" in saved and not any(f.endswith((".bin", ".pt", ".pkl")) for f in saved)

    serving = SentenceEncoder(settings.encoder)
    base_identity = serving.identity
    loaded = IntentClassifier.load(tmp_path / method)
    loaded.attach_encoder(serving)
    assert serving.identity != base_identity, "a tuned encoder must not search an index built by the base one"
    probe = ["I still haven't got my new card"]
    np.testing.assert_allclose(serving.encode(probe), trainer.encode(probe), atol=1e-4)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_virtual_tokens_train_only_the_adapter_and_pool_only_the_message(settings, banking_subset, method):
    from pipeline.encoder import SentenceEncoder

    classes, (texts, labels) = banking_subset
    trainer = SentenceEncoder(settings.encoder)
    config = TrainConfig(method=method, epochs=1, max_train=64, batch_size=16, lexical=False, val_split=0.25)
    model = IntentClassifier.train(trainer, texts, labels, config)
    tuned = trainer.model
    trainable = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
    assert 0 < trainable < 50_000, "only the virtual tokens (prompt) or per-layer prefixes train"
    # Padding next to a longer message must not move a vector: the virtual tokens' mask
    # and the pooling window line up with the real tokens.
    alone = trainer.encode(["hi"])
    batched = trainer.forward(trainer.tokenize(["hi", "my card still has not arrived and it has been two weeks"]))
    np.testing.assert_allclose(alone[0], batched[0].detach().numpy(), atol=1e-4)
    base = SentenceEncoder(settings.encoder).encode(["hi"])
    assert not np.allclose(alone, base, atol=1e-3), "the virtual tokens must change the vector"
    assert model.metrics["val_accuracy"] is not None


def test_missing_and_corrupt_artifacts(tmp_path, settings):
    with pytest.raises(ModelLoadError, match="no intent model"):
        IntentClassifier.load(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="corrupt"):
        IntentClassifier.load(tmp_path)


def test_damaged_model_files_are_clear_errors(tmp_path, settings):
    # A save cut short leaves a truncated or empty head.npz (a zip), and an encoder/ or adapter/
    # folder without its weights: each was a traceback (BadZipFile, EOFError, OSError).
    import json
    import shutil

    from pipeline.encoder import SentenceEncoder

    for damage in (lambda head: head.write_bytes(head.read_bytes()[:100]), lambda head: head.write_bytes(b"")):
        model = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        shutil.copytree(Settings().resolved_intent_model, model)
        damage(model / "head.npz")
        with pytest.raises(ModelLoadError, match="corrupt"):
            IntentClassifier.load(model)
    tuned = tmp_path / "tuned"
    shutil.copytree(Settings().resolved_intent_model, tuned)
    config = json.loads((tuned / "config.json").read_text())
    (tuned / "config.json").write_text(json.dumps({**config, "method": "finetune"}))
    (tuned / "encoder").mkdir()
    with pytest.raises(ModelLoadError, match="encoder/ folder does not load"):
        IntentClassifier.load(tuned).attach_encoder(SentenceEncoder(settings.encoder))


def test_a_save_cut_short_leaves_the_model_that_was_there(tmp_path, monkeypatch):
    # Written in place, a save that failed after head.npz left the new head beside the old
    # labels: a folder no worker could load.
    import shutil

    from pipeline.classifier import LexicalModel

    served = tmp_path / "served"
    shutil.copytree(Settings().resolved_intent_model, served)
    new = IntentClassifier.load(served)
    new.labels, new.weight, new.bias = new.labels[:-1], new.weight[:-1], new.bias[:-1]

    def disk_full(self, directory):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(LexicalModel, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        new.save(served)
    assert len(IntentClassifier.load(served).labels) == 77
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served"], "nothing of the failed save is left"
    monkeypatch.undo()
    new.save(served)
    assert len(IntentClassifier.load(served).labels) == 76
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served"]


def test_a_save_stopped_between_its_renames_serves_the_model_it_replaced(tmp_path, caplog):
    import os
    import shutil

    served = tmp_path / "served"
    shutil.copytree(Settings().resolved_intent_model, served)
    os.replace(served, tmp_path / ".served.4242.old")  # killed after moving the old model aside
    assert len(IntentClassifier.load(served).labels) == 77
    assert "a save was cut short" in caplog.text
    model = IntentClassifier.load(tmp_path / ".served.4242.old")
    model.save(served)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served"], "the next save clears what the cut one left"
    with pytest.raises(ModelLoadError, match="no intent model"):
        IntentClassifier.load(tmp_path / "other")


def test_shipped_model_is_the_banking77_default():
    model = IntentClassifier.load(Settings().resolved_intent_model)
    assert len(model.labels) == 77
    assert model.metrics["method"] == "head" and model.lexical is not None


def test_lexical_character_features_match_sklearns_transform():
    from pipeline.classifier import LexicalModel

    texts = ["my card was declined", "card declined again", "top up failed", "Top-up FAILED!!", "where is my card"] * 2
    model = LexicalModel.fit(texts, np.array([0, 0, 1, 1, 2] * 2), 3, c=1.0)
    queries = ["My CARD   declined\tagain", "", "😀 top up", "x" * 300, "unseen words only", "card card card"]
    for _ in range(2):  # cold, then from the word cache
        ours = model._char_tfidf(queries).toarray()
        assert np.allclose(ours, model.char.transform(queries).toarray(), atol=1e-12)
