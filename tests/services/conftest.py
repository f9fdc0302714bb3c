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


def start_api(log: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`tandem api` in its own process on a free port, with an API key; returns it and its URL."""
    port = free_port()
    env = {**os.environ, "TANDEM_API_KEYS": json.dumps([KEY]), "TANDEM_RATE_LIMIT_PER_MINUTE": "100000", **(env or {})}
    process = subprocess.Popen([sys.executable, "-m", "services.cli", "api", "--port", str(port)], env=env,
                               cwd=Path(__file__).parents[2], stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/healthz").status_code == 200, 60, "API")
    return process, url


@pytest.fixture(scope="session")
def api(workers, tmp_path_factory):
    """The API shared by the API and browser tests."""
    process, url = start_api(tmp_path_factory.mktemp("api") / "api.log")
    yield url
    process.terminate()
    process.wait(20)
