"""Shared fixtures: the real bundled encoder and generator, loaded once per test session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pipeline.settings import PACKAGE_DATA, Settings  # noqa: E402

from .helpers import NeverReady, free_port, wait_until  # noqa: E402

BANKING77 = PACKAGE_DATA / "banking77"


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tandem")


@pytest.fixture(scope="session")
def settings(session_dir) -> Settings:
    return Settings(data_dir=session_dir / "data")


@pytest.fixture(scope="session")
def encoder(settings):
    from pipeline.encoder import SentenceEncoder

    encoder = SentenceEncoder(settings.encoder)
    encoder.warm_up()
    return encoder


@pytest.fixture(scope="session")
def pipeline(settings):
    """The whole chain on the shipped defaults: intent model, bundled help centre, SmolLM2 via llama.cpp."""
    from pipeline.chain import HybridPipeline

    return HybridPipeline.from_settings(settings)


@pytest.fixture(scope="session")
def banking77_test():
    from pipeline.data_io import read_labelled_csv

    return read_labelled_csv(BANKING77 / "test.csv", "text", "category")


# ---------------------------------------------------------------- Redis and workers

ROOT = Path(__file__).parents[1]  # the repository root, where the workers run (parents[2] was its parent)


class Workers:
    """Starts, kills and restarts `tandem worker` processes against one Redis."""

    def __init__(self, env: dict[str, str], logs: Path):
        self.env = env
        self.logs = logs
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, queue: str, wait: bool = True, env: dict[str, str] | None = None) -> None:
        log = open(self.logs / f"worker-{queue}-{len(os.listdir(self.logs))}.log", "w")  # noqa: SIM115 (outlives this call)
        self.processes[queue] = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "worker", "--queues", queue, "--name", f"{queue}-{os.getpid()}"],
            env={**self.env, **(env or {})}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready(queue)

    def wait_ready(self, queue: str, timeout: float = 180) -> None:
        from workers.app import app

        def ready() -> bool:
            if self.processes[queue].poll() is not None:
                raise NeverReady(f"{queue} worker exited with {self.processes[queue].returncode}; see {self.logs}")
            queues = app.control.inspect(timeout=1).active_queues() or {}
            return any(q["name"] == queue for qs in queues.values() for q in qs)

        wait_until(ready, timeout, f"{queue} worker")

    def kill(self, queue: str) -> None:
        process = self.processes.pop(queue)
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def restart(self, queue: str, env: dict[str, str] | None = None) -> None:
        """Kill the ``queue`` worker if there is one, and start another with ``env``: also after a
        failed start, which leaves a process that never got ready."""
        if queue in self.processes:
            self.kill(queue)
        self.start(queue, env=env)

    def stop_all(self) -> None:
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        self.processes.clear()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    from workers.redis_server import EmbeddedRedis

    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def worker_settings(redis_server, session_dir, monkeypatch_session) -> Settings:
    env = {"TANDEM_REDIS_URL": redis_server.url, "TANDEM_DATA_DIR": str(session_dir / "data"),
           "TANDEM_VISIBILITY_TIMEOUT_S": "5", "TANDEM_BATCH_CHUNK_SIZE": "25",
           # the nlu and gen workers share the 2 cores here: one decode thread (see `tandem up`)
           "TANDEM_RESPONDER_THREADS": "1", "TANDEM_RESPONDER_SLOTS": "4"}
    for key, value in env.items():
        monkeypatch_session.setenv(key, value)
    from workers.app import configure

    settings = Settings()
    configure(settings)
    return settings


@pytest.fixture(scope="session")
def monkeypatch_session():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="session")
def workers(worker_settings, tmp_path_factory):
    pool = Workers(dict(os.environ), tmp_path_factory.mktemp("worker-logs"))
    try:  # one worker that fails to get ready must not leave the other running after the session
        pool.start("nlu", wait=False)
        pool.start("gen", wait=False)
        pool.wait_ready("nlu")
        pool.wait_ready("gen")
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture
def redis_client(worker_settings):
    from workers.streams import connect

    return connect(worker_settings.resolved_redis_url)
