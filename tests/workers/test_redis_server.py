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
        with pytest.raises(TandemError, match="taken"):  # by then ours may have exited, or not
            EmbeddedRedis(tmp_path / "second", port).start()
        assert redis.Redis.from_url(first.url).ping()
        # Its own process group: Ctrl-C in a terminal reaches the workers, and Redis stays up
        # until `tandem up` stops it after them.
        assert os.getpgid(first.process.pid) != os.getpgid(0)
