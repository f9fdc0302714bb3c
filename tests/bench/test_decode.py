"""Bench decode: its inputs (a prompts file bench decode did not write, a result name that is no plain name, a
count below 1) and the single-stream phases it compares llama.cpp alone on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def test_a_malformed_prompts_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "prompts.json"
    bad.write_text("{not json")
    result = subprocess.run([sys.executable, "-m", "bench", "decode", "--prompts", str(bad)], capture_output=True,
                            timeout=120, cwd=Path(__file__).parents[2])
    stderr = result.stderr.decode()
    assert result.returncode != 0
    assert f"--prompts {bad}: not the JSON that `bench decode --prompts` writes" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("command", [["bench", "decode"], ["bench", "serving"], ["bench", "nlu"], ["bench.load"]])
@pytest.mark.parametrize("name", ["../elsewhere", "sub/dir", "serving.json", ""])
def test_a_result_name_that_is_not_a_plain_name_is_refused_before_the_run(command, name):
    result = subprocess.run([sys.executable, "-m", *command, "--out", name], capture_output=True, timeout=120,
                            cwd=Path(__file__).parents[2])
    stderr = result.stderr.decode()
    assert result.returncode == 2
    assert "a plain name such as serving_q4_1" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("command", [["bench", "priority", "--tickets"], ["bench", "priority", "--chats"],
                                     ["bench", "decode", "--levels", "1"], ["bench.load", "--clients"]])
@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_a_count_below_one_or_not_a_number_is_refused_before_the_run(command, value):
    result = subprocess.run([sys.executable, "-m", *command, value], capture_output=True, timeout=120,
                            cwd=Path(__file__).parents[2])
    stderr = result.stderr.decode()
    assert result.returncode == 2
    assert f"{value!r}: a whole number of at least 1" in stderr
    assert "Traceback" not in stderr


def test_phases_split_each_reply_at_its_first_token():
    from bench.perf import phases

    # (first token s, whole reply s, tokens); a reply that wrote nothing has no first token
    got = phases([(0.4, 1.4, 11), (0.5, 2.5, 21), (0.6, 0.6, 1), (None, 0.3, 0)])
    assert got["first_token_ms_p50"] == 500.0
    assert got["tokens_per_s_after_first"] == 10.0  # 30 tokens after the first ones in 3 s
    assert got["tokens"] == 33


def test_equal_length_ratio_weighs_both_phases_at_one_length():
    from bench.perf import equal_length_ratio

    slow_read = {"first_token_ms_p50": 500.0, "tokens_per_s_after_first": 40.0}
    fast_read = {"first_token_ms_p50": 250.0, "tokens_per_s_after_first": 20.0}
    # 65 tokens: 0.5 + 64/40 = 2.1 s against 0.25 + 64/20 = 3.45 s
    assert equal_length_ratio(slow_read, fast_read, 65) == round(3.45 / 2.1, 3)
    # 2 tokens: the prompt read dominates, 0.3 s against 0.525 s
    assert equal_length_ratio(fast_read, slow_read, 2) == round(0.525 / 0.3, 3)
