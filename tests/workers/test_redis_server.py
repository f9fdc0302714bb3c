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
