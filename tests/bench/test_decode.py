"""`python -m bench decode`'s input: a prompts file it did not write is a clear error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_a_malformed_prompts_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "prompts.json"
    bad.write_text("{not json")
    result = subprocess.run([sys.executable, "-m", "bench", "decode", "--prompts", str(bad)], capture_output=True,
                            timeout=120, cwd=Path(__file__).parents[2])
    stderr = result.stderr.decode()
    assert result.returncode != 0
    assert f"--prompts {bad}: not the JSON that `bench decode --prompts` writes" in stderr
    assert "Traceback" not in stderr
