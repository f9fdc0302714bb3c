"""Bench inputs: a prompts file bench decode did not write, a result name that is no plain name, a count below 1."""

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
