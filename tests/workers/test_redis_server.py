"""The embedded redis-server that `tandem up` starts when no TANDEM_REDIS_URL is set."""

from __future__ import annotations

from pathlib import Path

import redis

from workers.redis_server import EmbeddedRedis

from ..helpers import free_port


def test_a_relative_data_dir_works_as_the_default_one_does(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with EmbeddedRedis(Path(".tandem") / "redis", free_port()) as server:
        assert redis.Redis.from_url(server.url).ping()
    assert (tmp_path / ".tandem" / "redis" / "redis.log").is_file()


def test_a_port_another_redis_server_holds_is_a_clear_error(tmp_path):
    # The other server answered the first ping while ours was still failing to bind, and this
    # one served from it unawares (a second `tandem up`, or a server a killed run left behind).
    import os

    import pytest

    from pipeline.errors import TandemError

    port = free_port()
    with EmbeddedRedis(tmp_path / "first", port) as first:
        # By the time the other one answers, ours may have exited on the bind, or not yet.
        with pytest.raises(TandemError, match="taken by another redis-server|Address already in use"):
            EmbeddedRedis(tmp_path / "second", port).start()
        assert redis.Redis.from_url(first.url).ping()
        # Its own process group: Ctrl-C in a terminal reaches the workers, and Redis stays up
        # until `tandem up` stops it after them.
        assert os.getpgid(first.process.pid) != os.getpgid(0)


def test_a_port_something_else_holds_names_the_bind_error(tmp_path):
    import socket

    import pytest

    from pipeline.errors import TandemError

    with socket.socket() as holder:  # not a redis-server: nothing answers the ping, ours cannot bind
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(TandemError, match=r"exited at start \(status 1: .*Address already in use"):
            EmbeddedRedis(tmp_path, port).start()


def test_a_server_killed_at_start_says_so_and_not_that_the_port_is_taken(tmp_path, monkeypatch):
    import pytest

    from pipeline.errors import TandemError

    # A stand-in binary that SIGKILLs itself before it could answer: an OOM kill, or a person's kill -9.
    binary = tmp_path / "redis-server"
    binary.write_text("#!/bin/sh\nkill -9 $$\n")
    binary.chmod(0o755)
    monkeypatch.setattr("workers.redis_server.redis_server_binary", lambda: str(binary))
    with pytest.raises(TandemError, match=r"exited at start \(killed by SIGKILL\)") as error:
        EmbeddedRedis(tmp_path, free_port()).start()
    assert "taken" not in str(error.value)
