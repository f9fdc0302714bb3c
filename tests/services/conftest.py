"""The API in its own process, shared by the API and browser tests."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ..helpers import NeverReady, free_port, wait_until

KEY = "test-key-123"


def start_api(log: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`tandem api` in its own process on a free port, with an API key; returns it and its URL."""
    port = free_port()
    env = {**os.environ, "TANDEM_API_KEYS": json.dumps([KEY]), "TANDEM_RATE_LIMIT_PER_MINUTE": "100000", **(env or {})}
    process = subprocess.Popen([sys.executable, "-m", "services.cli", "api", "--port", str(port)], env=env,
                               cwd=Path(__file__).parents[2], stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if process.poll() is not None:
            raise NeverReady(f"the API exited with {process.returncode}; see {log}")
        return httpx.get(f"{url}/healthz").status_code == 200

    try:
        wait_until(healthy, 60, "API")
    except BaseException:  # the caller gets no process to stop
        stop_api(process)
        raise
    return process, url


def stop_api(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:  # stuck in shutdown: it must not outlive the session
        process.kill()
        process.wait(10)


@pytest.fixture(scope="session")
def api(workers, tmp_path_factory):
    """The API shared by the API and browser tests."""
    process, url = start_api(tmp_path_factory.mktemp("api") / "api.log")
    try:
        yield url
    finally:
        stop_api(process)


class OpenAPIDocument:
    """The API's own OpenAPI document, as a check on real responses: a response's status must
    be one the document states for its route, and its JSON body must match the stated schema
    (a client generated from the document reads what is sent)."""

    def __init__(self, document: dict):
        self.document = document
        self.routes = [(re.compile("^" + re.sub(r"\{[^}/]+\}", "[^/]+", path) + "$"), path)
                       for path in document["paths"]]

    def check(self, response: httpx.Response) -> httpx.Response:
        from jsonschema import Draft202012Validator

        method, path = response.request.method.lower(), response.request.url.path
        stated = next((self.document["paths"][p] for pattern, p in self.routes if pattern.match(path)), {})
        operation = stated.get(method)
        assert operation, f"{method.upper()} {path} is not in the OpenAPI document"
        answer = operation["responses"].get(str(response.status_code))
        assert answer, f"{method.upper()} {path} answered {response.status_code}, which the document does not state " \
                       f"(it states {sorted(operation['responses'])})"
        media_type = response.headers.get("content-type", "").split(";")[0]
        assert media_type in answer.get("content", {}), \
            f"{method.upper()} {path} {response.status_code} sent {media_type}; the document states {list(answer['content'])}"
        schema = answer["content"][media_type].get("schema", {})
        if media_type == "application/json":
            # the document's own references (#/components/...) resolve against this root
            validator = Draft202012Validator({**schema, "components": self.document["components"]})
            problems = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(response.json())]
            assert not problems, f"{method.upper()} {path} {response.status_code} does not match its schema: {problems}"
        return response


@pytest.fixture(scope="session")
def openapi(api) -> OpenAPIDocument:
    return OpenAPIDocument(httpx.get(f"{api}/openapi.json").json())
