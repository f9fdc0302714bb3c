"""The CLI end to end, in a subprocess where it matters (exit codes, no tracebacks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import BANKING77
from ..helpers import free_port

TANDEM = [sys.executable, "-m", "services.cli"]


def run(args: list[str], tmp_path: Path, stdin: bytes | None = None, timeout: float = 300,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # A Redis no one listens on: a command that should fail before it connects must not join
    # the session's Redis (or one on the default port) if it regresses.
    env = {**os.environ, "TANDEM_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "TANDEM_DATA_DIR": str(tmp_path / "data"),
           "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run([*TANDEM, *args], capture_output=True, env=env, input=stdin, timeout=timeout,
                          cwd=Path(__file__).parents[2])


def assert_clean_error(result: subprocess.CompletedProcess, message: str) -> None:
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert message in stderr
    assert "Traceback" not in stderr


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


def test_ask_json_has_every_field(cli_dir):
    result = run(["ask", "I lost my card", "--json"], cli_dir)
    assert result.returncode == 0, result.stderr.decode()
    payload = json.loads(result.stdout)
    assert payload["intent"] == "lost_or_stolen_card" and payload["grounded"]  # issue 2's demo
    assert {"intent", "confidence", "top_intents", "passages", "reply", "grounded", "escalate",
            "timings_ms"} <= set(payload)


def test_ask_says_where_a_second_draft_begins(cli_dir):
    result = run(["ask", "I lost my card"], cli_dir)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    draft, second = out.split("The draft above was not supported by the help articles; a new one:")
    assert draft.strip() and "Cards → Security" in second
    assert "quoted" not in out.lower()  # the second draft passed the guard


def test_ask_streams_to_the_terminal(cli_dir):
    result = run(["ask", "How long does card delivery take?"], cli_dir)
    assert result.returncode == 0, result.stderr.decode()
    assert "intent card_delivery_estimate" in result.stderr.decode()
    assert result.stdout.decode().strip()


@pytest.mark.parametrize("args, stdin, message", [
    (["ask", ""], None, "message is empty"),
    (["ask", "-"], b"x" * 100_000, "the limit is 4000"),
    (["ask", "-"], b"caf\xe9 card", "not valid UTF-8"),
])
def test_ask_rejects_bad_messages(cli_dir, args, stdin, message):
    assert_clean_error(run(args, cli_dir, stdin), message)


def test_train_and_eval_on_a_small_csv(tmp_path):
    rows = ["text,label"] + [f"where is my card number {i},card_arrival" for i in range(12)] + \
           [f"what exchange rate do you use {i},exchange_rate" for i in range(12)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    trained = run(["train-intents", str(tmp_path / "train.csv"), "--out", str(tmp_path / "model")], tmp_path)
    assert trained.returncode == 0, trained.stderr.decode()
    assert (tmp_path / "model" / "config.json").is_file()
    # a head is fitted to the vectors the pipeline will serve it, from the int8 encoder
    assert json.loads((tmp_path / "model" / "metrics.json").read_text())["encoder_runtime"] == "onnxruntime-int8"
    (tmp_path / "test.csv").write_text("utterance,intent\nmy card has not come,card_arrival\n"
                                       "what rate for euros,exchange_rate\n")
    evaluated = run(["eval-intents", str(tmp_path / "test.csv"), "--model", str(tmp_path / "model"),
                     "--text-col", "utterance", "--label-col", "intent", "--json", str(tmp_path / "r.json"),
                     "--plot", str(tmp_path / "cm.png")], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr.decode()
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report) >= {"accuracy", "macro_f1", "in_scope_accuracy", "oos_recall", "n"}
    assert report["n"] == 2 and report["oos_recall"] is None
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_of_the_shipped_model_on_a_banking77_slice(tmp_path):
    lines = (BANKING77 / "test.csv").read_text().splitlines()
    (tmp_path / "slice.csv").write_text("\n".join([lines[0], *lines[1::20]]) + "\n")
    result = run(["eval-intents", str(tmp_path / "slice.csv"), "--label-col", "category"], tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads(result.stdout.decode().strip().splitlines()[-1])
    from pipeline.data_io import read_labelled_csv

    expected_n = len(read_labelled_csv(tmp_path / "slice.csv", "text", "category")[0])
    assert report["n"] == expected_n > 100 and report["accuracy"] >= 0.88


@pytest.mark.parametrize("content, message", [
    (b"text,category\nhi,a\nho,b\n", "missing column(s) label"),
    (b"text,label\nhi,a\nho,a\n", "only one class"),
    (b"text,label\nh\xe9,a\n", "not valid UTF-8"),
])
def test_train_rejects_bad_csv(tmp_path, content, message):
    (tmp_path / "bad.csv").write_bytes(content)
    assert_clean_error(run(["train-intents", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "m")], tmp_path),
                       message)


def test_index_builds_updates_and_rejects_duplicates(tmp_path):
    kb = tmp_path / "kb"
    kb.mkdir()
    article = "---\nid: {id}\ntitle: T {id}\nintents: [x]\n---\nFee is £{id}.\n"
    for i in range(3):
        (kb / f"{i}.md").write_text(article.format(id=i))
    (kb / "2.md").write_text(article.format(id=2).replace("[x]", "[card_arrival]"))
    built = run(["index", str(kb), "--out", str(tmp_path / "ix")], tmp_path)
    assert built.returncode == 0, built.stderr.decode()
    assert "3 added" in built.stdout.decode()
    # Tagged with an intent the shipped intent model does not predict: said, not refused.
    warnings = [line for line in built.stderr.decode().splitlines() if line.startswith("warning:")]
    assert [w.split(":")[1].strip() for w in warnings] == ["article '0'", "article '1'"], built.stderr.decode()
    assert "unknown intent 'x' to the intent model" in warnings[0]
    (kb / "1.md").write_text(article.format(id=1).replace("Fee", "The fee"))
    updated = run(["index", str(kb), "--out", str(tmp_path / "ix")], tmp_path)
    assert "1 updated" in updated.stdout.decode() and "2 unchanged" in updated.stdout.decode()
    (kb / "dup.md").write_text(article.format(id=0))
    assert_clean_error(run(["index", str(kb), "--out", str(tmp_path / "ix")], tmp_path), "duplicate article id")


def test_ask_with_a_corrupt_index_is_a_clear_error(tmp_path):
    (tmp_path / "ix").mkdir()
    (tmp_path / "ix" / "meta.json").write_text("{}")
    (tmp_path / "ix" / "index.faiss").write_bytes(b"junk")
    assert_clean_error(run(["ask", "hello"], tmp_path, env={"TANDEM_INDEX_DIR": str(tmp_path / "ix")}), "corrupt")


def test_index_builds_a_corrupt_index_again_from_the_articles(tmp_path):
    # The error said to run `tandem index KB_DIR --out DIR`, which loaded the folder first and
    # failed the same way: only deleting it by hand got out.
    kb = tmp_path / "kb"
    kb.mkdir()
    (kb / "a.md").write_text("---\nid: a\ntitle: Fees\nintents: [card_payment_fee_charged]\n---\nCard payments are free.\n")
    (tmp_path / "ix").mkdir()
    (tmp_path / "ix" / "meta.json").write_text("{}")
    (tmp_path / "ix" / "index.faiss").write_bytes(b"junk")
    result = run(["index", str(kb), "--out", str(tmp_path / "ix")], tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    assert "is corrupt" in result.stderr.decode() and "building it again" in result.stderr.decode()
    assert "1 added" in result.stdout.decode()
    assert json.loads((tmp_path / "ix" / "meta.json").read_text())["articles"][0]["id"] == "a"


@pytest.mark.long
def test_index_serves_a_pipeline_whose_intent_model_tuned_the_encoder(tmp_path, settings):
    """A fine-tuned intent model carries its own encoder weights, and the pipeline embeds with
    them: `tandem index` embedded with the base encoder, and the pipeline refused its index."""
    from pipeline.classifier import IntentClassifier, TrainConfig
    from pipeline.data_io import read_labelled_csv
    from pipeline.encoder import SentenceEncoder

    texts, labels = read_labelled_csv(BANKING77 / "train.csv", "text", "category")
    keep = {"card_arrival", "lost_or_stolen_card", "exchange_rate", "top_up_failed"}
    rows = [(t, label) for label in sorted(keep) for t in [t for t, x in zip(texts, labels) if x == label][:24]]
    IntentClassifier.train(SentenceEncoder(settings.encoder), [t for t, _ in rows], [label for _, label in rows],
                           TrainConfig(method="finetune", epochs=1, max_train=96, batch_size=16, lexical=False),
                           out=tmp_path / "tuned")
    env = {**os.environ, "TANDEM_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1", "COLUMNS": "200",
           "TANDEM_INTENT_MODEL": str(tmp_path / "tuned"), "TANDEM_INDEX_DIR": str(tmp_path / "ix"),
           "TANDEM_HANDOFF_INTENTS": "[]"}
    kb = Path(__file__).parents[2] / "pipeline" / "data" / "helpcentre"
    for _ in range(2):  # built, then updated in place
        built = subprocess.run([*TANDEM, "index", str(kb), "--out", str(tmp_path / "ix")], capture_output=True,
                               env=env, timeout=600, cwd=Path(__file__).parents[2])
        assert built.returncode == 0, built.stderr.decode()
    assert ":finetune:" in json.loads((tmp_path / "ix" / "meta.json").read_text())["encoder"]
    asked = subprocess.run([*TANDEM, "ask", "My new card still has not arrived", "--json"], capture_output=True,
                           env=env, timeout=300, cwd=Path(__file__).parents[2])
    assert asked.returncode == 0, asked.stderr.decode()
    assert json.loads(asked.stdout)["intent"] in keep | {"oos"}  # the pipeline took the index: the point here


def test_eval_with_a_missing_or_corrupt_model_is_a_clear_error(tmp_path):
    """The encoder is chosen from the model's config before the model loads; a model folder
    without a readable one still gets the loader's error, not a traceback."""
    (tmp_path / "t.csv").write_text("text,label\nhi,a\n")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{broken")
    for model, message in ((tmp_path / "missing", "config.json missing"), (tmp_path / "broken", "is corrupt")):
        assert_clean_error(run(["eval-intents", str(tmp_path / "t.csv"), "--model", str(model)], tmp_path), message)


def test_train_rejects_an_unknown_method(tmp_path):
    (tmp_path / "t.csv").write_text("text,label\nhi,a\nho,b\n")
    result = run(["train-intents", str(tmp_path / "t.csv"), "--out", str(tmp_path / "m"), "--method", "bogus"], tmp_path)
    assert result.returncode == 2 and "must be one of head, finetune, lora, prefix, prompt" in result.stderr.decode()
    assert "Traceback" not in result.stderr.decode()


@pytest.mark.parametrize("name, value, message", [
    ("TANDEM_GEN_POOL", "bogus", "TANDEM_GEN_POOL: Input should be 'solo' or 'threads'"),
    ("TANDEM_RESPONDER_SLOTS", "0", "TANDEM_RESPONDER_SLOTS: Input should be greater than or equal to 1"),
    ("TANDEM_RESPONDER_GPU_LAYERS", "-2", "TANDEM_RESPONDER_GPU_LAYERS: Input should be greater than or equal to -1"),
    ("TANDEM_ENCODER_INT8_ATTENTION", "sometimes", "TANDEM_ENCODER_INT8_ATTENTION: Input should be a valid boolean"),
    ("TANDEM_ENCODER_ONNX_INT8", "perhaps", "TANDEM_ENCODER_ONNX_INT8: Input should be a valid boolean"),
    ("TANDEM_ENCODER_BATCH_SIZE", "0", "TANDEM_ENCODER_BATCH_SIZE: Input should be greater than or equal to 1"),
    ("TANDEM_ENCODER_BATCH_TOKENS", "-1", "TANDEM_ENCODER_BATCH_TOKENS: Input should be greater than or equal to 0"),
    ("TANDEM_BATCH_PRIORITY", "10", "TANDEM_BATCH_PRIORITY: Input should be less than or equal to 9"),
    ("TANDEM_RESPONDER_CHAT_SLOTS", "-1", "TANDEM_RESPONDER_CHAT_SLOTS: Input should be greater than or equal to 0"),
    ("TANDEM_RESPONDER_CPU_WEIGHTS", "int4",
     "TANDEM_RESPONDER_CPU_WEIGHTS: Input should be 'auto', 'bf16', 'q8_0', 'iq4_nl' or 'file'"),
    ("TANDEM_RESPONDER_PREFIX_CACHE_MB", "-1",
     "TANDEM_RESPONDER_PREFIX_CACHE_MB: Input should be greater than or equal to 0"),
    ("TANDEM_RESPONDER_PREFIX_CACHE_MB", "lots", "TANDEM_RESPONDER_PREFIX_CACHE_MB: Input should be a valid integer"),
    ("TANDEM_JOB_LEASE_S", "1", "TANDEM_JOB_LEASE_S: Input should be greater than or equal to 2"),
    ("TANDEM_JOB_LEASE_S", "soon", "TANDEM_JOB_LEASE_S: Input should be a valid number"),
    ("TANDEM_REPLY_LEASE_S", "0.5", "TANDEM_REPLY_LEASE_S: Input should be greater than or equal to 2"),
    ("TANDEM_REPLY_LEASE_S", "a while", "TANDEM_REPLY_LEASE_S: Input should be a valid number"),
    ("TANDEM_REPEAT_PENALTY", "0.5", "TANDEM_REPEAT_PENALTY: Input should be greater than or equal to 1"),
    ("TANDEM_GUARD_COMPLETE_SENTENCES", "-1",
     "TANDEM_GUARD_COMPLETE_SENTENCES: Input should be greater than or equal to 0"),
    ("TANDEM_GUARD_COMPLETE_SENTENCES", "three", "TANDEM_GUARD_COMPLETE_SENTENCES: Input should be a valid integer"),
    ("TANDEM_GUARD_STOP_EARLY", "perhaps", "TANDEM_GUARD_STOP_EARLY: Input should be a valid boolean"),
    ("TANDEM_GUARD_HOLD_SENTENCES", "perhaps", "TANDEM_GUARD_HOLD_SENTENCES: Input should be a valid boolean"),
    ("TANDEM_GUARD_SECOND_DRAFT", "twice", "TANDEM_GUARD_SECOND_DRAFT: Input should be a valid boolean"),
    ("TANDEM_OOS_MIN_SIMILARITY", "1.5", "TANDEM_OOS_MIN_SIMILARITY: Input should be less than or equal to 1"),
    ("TANDEM_OOS_MIN_SIMILARITY", "near", "TANDEM_OOS_MIN_SIMILARITY: Input should be a valid number"),
    ("TANDEM_BATCH_CHUNKS_IN_FLIGHT", "0", "TANDEM_BATCH_CHUNKS_IN_FLIGHT: Input should be greater than or equal to 1"),
    ("TANDEM_BATCH_CHUNKS_IN_FLIGHT", "many", "TANDEM_BATCH_CHUNKS_IN_FLIGHT: Input should be a valid integer"),
    ("TANDEM_INDEX_RELOAD_S", "-1", "TANDEM_INDEX_RELOAD_S: Input should be greater than or equal to 0"),
    ("TANDEM_INDEX_RELOAD_S", "often", "TANDEM_INDEX_RELOAD_S: Input should be a valid number"),
])
def test_a_bad_setting_is_a_clear_error(tmp_path, monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    assert_clean_error(run(["worker", "--queues", "gen"], tmp_path), message)


@pytest.mark.parametrize("command", [["ask", "I lost my card"], ["worker", "--queues", "nlu"]])
def test_a_misspelt_handoff_intent_is_a_clear_error(tmp_path, monkeypatch, command):
    """The worker too: it loads its models before Celery starts, which would swallow the error,
    report ready and fail every task (before, this run ended at the timeout, waiting for Redis)."""
    monkeypatch.setenv("TANDEM_HANDOFF_INTENTS", '["compromised_card", "compromized_card"]')
    monkeypatch.setenv("TANDEM_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")  # nothing there
    assert_clean_error(run(command, tmp_path, timeout=120),
                       "TANDEM_HANDOFF_INTENTS: unknown intent 'compromized_card' (did you mean 'compromised_card'?)")


def test_a_worker_with_a_corrupt_index_ends_with_the_error(tmp_path, monkeypatch):
    (tmp_path / "ix").mkdir()
    (tmp_path / "ix" / "meta.json").write_text("{}")
    monkeypatch.setenv("TANDEM_INDEX_DIR", str(tmp_path / "ix"))
    monkeypatch.setenv("TANDEM_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert_clean_error(run(["worker", "--queues", "nlu"], tmp_path, timeout=120), "corrupt")


def test_worker_and_batch_reject_bad_arguments(tmp_path):
    result = run(["worker", "--queues", "bogus"], tmp_path)
    assert result.returncode == 2 and "queues must be among nlu, gen" in result.stderr.decode()
    assert "Traceback" not in result.stderr.decode()
    (tmp_path / "t.txt").write_text("x")
    assert_clean_error(run(["batch", str(tmp_path / "t.txt"), "--out", str(tmp_path / "o.jsonl")], tmp_path),
                       "tickets must be .csv")
    assert_clean_error(run(["batch", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o.jsonl")], tmp_path),
                       "no such file")


def test_ask_shows_the_guards_quoted_answer_once_in_place_of_a_rejected_draft(pipeline, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.responder import ANSWER
    from services import cli

    # The generator is replaced by drafts the guard rejects: this tests what the terminal shows.
    monkeypatch.setattr(pipeline.settings, "guard_second_draft", False)
    monkeypatch.setattr(pipeline.responder, "stream", lambda *a, instruction=ANSWER, **k: (
        p for p in ["Delivery takes 9 working days. ", "It is free."]))
    monkeypatch.setattr(cli, "_load_pipeline", lambda load_responder=True: pipeline)
    monkeypatch.setenv("COLUMNS", "300")  # rich wraps at the terminal width
    result = CliRunner().invoke(cli.app, ["ask", "How long does card delivery take?"])
    assert result.exit_code == 0, result.output
    quoted = pipeline.guard.extractive_answer("How long does card delivery take?",
                                              pipeline.understand(["How long does card delivery take?"])[0].passages[:1])
    draft, answer = result.stdout.split("The draft above was not supported by the help articles; the answer quoted "
                                        "from them is:")
    assert "Delivery takes 9 working days." in draft
    assert answer.strip() == quoted and result.stdout.count(quoted) == 1
