"""schemathesis, from the service's own OpenAPI document: generated requests (valid and
invalid) to every route must never get a 5xx."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import KEY


@pytest.mark.fuzz
def test_no_server_errors_for_generated_requests(api, tmp_path):
    st = Path(sys.executable).parent / "st"
    result = subprocess.run(
        [str(st), "run", f"{api}/openapi.json", "--checks", "not_a_server_error", "--max-examples", "3",
         "--phases", "examples,coverage,fuzzing", "--request-timeout", "150", "--workers", "1",
         "-H", f"Authorization: Bearer {KEY}", "--seed", "1"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "not_a_server_error" in output
