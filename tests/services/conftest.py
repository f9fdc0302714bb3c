"""The API in its own process, shared by the API and browser tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ..helpers import free_port, wait_until

KEY = "test-key-123"


@pytest.fixture(scope="session")
def api(workers, tmp_path_factory):
    """`tandem api` in its own process, with an API key configured."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("api") / "api.log", "w")  # noqa: SIM115
    env = {**os.environ, "TANDEM_API_KEYS": json.dumps([KEY]), "TANDEM_RATE_LIMIT_PER_MINUTE": "100000"}
    process = subprocess.Popen([sys.executable, "-m", "services.cli", "api", "--port", str(port)], env=env,
                               cwd=Path(__file__).parents[2], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/healthz").status_code == 200, 60, "API")
    yield url
    process.terminate()
    process.wait(20)


