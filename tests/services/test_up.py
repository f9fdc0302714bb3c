"""`tandem up`: embedded Redis and one worker per queue from nothing, stopped cleanly by Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from ..helpers import free_port, wait_until


def kill_tree(process: subprocess.Popen) -> None:
    """kill -9 on `tandem up` and everything it started. Its redis-server runs in a session of
    its own, so nothing but this reaches it once `tandem up` is stuck and will not stop it."""
    import psutil

    try:
        children = psutil.Process(process.pid).children(recursive=True)  # before the parent dies: they move to init
    except psutil.NoSuchProcess:
        children = []
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    process.kill()
    psutil.wait_procs(children, timeout=10)


def communicate(process: subprocess.Popen, timeout: float) -> str:
    """The output of a `tandem up` expected to end within ``timeout``; on a timeout its process
    tree is killed before the test fails, so the run is not left with its workers and Redis."""
    try:
        return process.communicate(timeout=timeout)[0].decode()
    except subprocess.TimeoutExpired:
        kill_tree(process)
        output = process.communicate(timeout=30)[0].decode()
        raise AssertionError(f"`tandem up` still running after {timeout} s; its output ends:\n{output[-3000:]}") from None


def up_env(tmp_path: Path, redis_port: int, api_port: int, **settings: str) -> dict[str, str]:
    """The environment of a `tandem up` on private ports and a private data folder, whatever Redis
    or API keys this one names."""
    env = {k: v for k, v in os.environ.items() if k not in ("TANDEM_REDIS_URL", "TANDEM_API_KEYS")}
    env.update(TANDEM_DATA_DIR=str(tmp_path / "data"), TANDEM_EMBEDDED_REDIS_PORT=str(redis_port), HF_HUB_OFFLINE="1",
               TANDEM_API_PORT=str(api_port), COLUMNS="200", **settings)
    return env


def start_up(env: dict[str, str]) -> subprocess.Popen:
    """`tandem up` with its output, stdout and stderr together, in one pipe."""
    return subprocess.Popen([sys.executable, "-m", "services.cli", "up"], env=env, cwd=Path(__file__).parents[2],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_up_serves_a_message_and_stops_on_ctrl_c(tmp_path):
    port, api_port = free_port(), free_port()
    env = up_env(tmp_path, port, api_port)
    up = start_up(env)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        wait_until(lambda: redis.Redis.from_url(url).ping(), 30, "embedded redis")
        # Talk to it the way a chat backend would, from another process.
        code = ("import sys; from pipeline.settings import Settings; from workers.app import configure, app;"
                "configure(Settings());"
                "from workers.client import submit_message; from workers.streams import connect, stream_reply;"
                "import time\n"
                "for _ in range(300):\n"
                "    q = app.control.inspect(timeout=1).active_queues() or {}\n"
                "    if {x['name'] for v in q.values() for x in v} >= {'nlu', 'gen'}: break\n"
                "    time.sleep(0.5)\n"
                "rid = submit_message('How do I activate my card?');"
                "ev = list(stream_reply(connect(Settings().resolved_redis_url), rid));"
                "print(ev[0][1], ev[-1][1], ev[-1][2]['intent'])")
        client = subprocess.run([sys.executable, "-c", code], env={**env, "TANDEM_REDIS_URL": url},
                                capture_output=True, timeout=300, cwd=Path(__file__).parents[2])
        assert client.stdout.decode().split() == ["meta", "done", "activate_my_card"], client.stderr.decode()[-2000:]

        # The official openai client against the API that `tandem up` started.
        from openai import OpenAI

        openai = OpenAI(base_url=f"http://127.0.0.1:{api_port}/v1", api_key="unused")
        wait_until(lambda: openai.models.list().data[0].id == "tandem", 60, "API")
        plain = openai.chat.completions.create(model="tandem", messages=[{"role": "user", "content": "I lost my card"}])
        assert plain.choices[0].message.content.strip()
        assert plain.model_extra["tandem"]["intent"] == "lost_or_stolen_card"
        chunks = list(openai.chat.completions.create(model="tandem", stream=True, messages=[
            {"role": "user", "content": "How much does express delivery cost?"}]))
        assert "".join(c.choices[0].delta.content or "" for c in chunks).strip()
        assert chunks[-1].choices[0].finish_reason == "stop"

        # kill -9 on the gen worker: `tandem up` starts it again, and the API answers as before.
        import psutil

        gen = next(c for c in psutil.Process(up.pid).children() if "gen" in c.cmdline())
        gen.kill()
        gen.wait(10)
        again = openai.chat.completions.create(model="tandem", messages=[{"role": "user", "content": "I lost my card"}])
        assert again.model_extra["tandem"]["intent"] == "lost_or_stolen_card"
        assert again.choices[0].message.content.strip()
        assert any("gen" in c.cmdline() for c in psutil.Process(up.pid).children())

        # kill -9 on the embedded redis-server: `tandem up` starts it again on its port, the
        # workers and the API reconnect, and a chat is answered as before.
        server = next(c for c in psutil.Process(up.pid).children() if c.name() == "redis-server")
        server.kill()
        server.wait(10)
        wait_until(lambda: any(c.name() == "redis-server" and c.pid != server.pid
                               for c in psutil.Process(up.pid).children()), 30, "redis-server started again")
        wait_until(lambda: redis.Redis.from_url(url).ping(), 30, "the embedded redis answering again")
        after = openai.chat.completions.create(model="tandem", messages=[{"role": "user", "content": "I lost my card"}])
        assert after.model_extra["tandem"]["intent"] == "lost_or_stolen_card"
        assert after.choices[0].message.content.strip()
    finally:
        up.send_signal(signal.SIGINT)
        output = communicate(up, timeout=90)
    assert "`tandem worker --queues gen` exited with status -9; starting it again" in output, output[-2000:]
    assert "the embedded redis-server exited with status -9; starting it again" in output, output[-2000:]
    assert "stopped" in output, output[-2000:]
    assert up.returncode == 0, output[-2000:]
    time.sleep(0.5)
    try:
        redis.Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=1).ping()
        raise AssertionError("the embedded redis-server is still running")
    except redis.ConnectionError:
        pass


@pytest.mark.long
def test_up_stops_at_once_when_a_worker_cannot_load_its_models(tmp_path):
    """A setting that stops a worker at start is not fixed by starting it again (exit status 2)."""
    up = start_up(up_env(tmp_path, free_port(), free_port(), TANDEM_HANDOFF_INTENTS='["compromized_card"]'))
    output = communicate(up, timeout=240)
    assert up.returncode == 2, output[-3000:]
    assert "unknown intent 'compromized_card' (did you mean 'compromised_card'?)" in output, output[-3000:]
    assert "could not start (its error is above); nothing was restarted" in output, output[-3000:]
    assert "starting it again" not in output and "Traceback" not in output, output[-3000:]


def test_up_gives_up_on_a_redis_server_that_keeps_dying(tmp_path):
    """Restarts have a budget: a fourth death within a minute stops everything, naming the log."""
    import psutil

    port = free_port()
    up = start_up(up_env(tmp_path, port, free_port()))
    try:
        killed: set[int] = set()

        def serving() -> int | None:
            """The pid of a redis-server that answers on the port and was not killed yet."""
            try:
                pid = int(redis.Redis.from_url(f"redis://127.0.0.1:{port}/0").info("server")["process_id"])
            except redis.ConnectionError:
                return None
            return pid if pid not in killed else None

        for _ in range(4):
            wait_until(serving, 30, "a restarted redis-server answering")
            # One killed before `tandem up` has seen it answer (it looks every 0.05 s) is a start
            # that failed, with messages of its own (the next test's path).
            time.sleep(2)
            server = psutil.Process(serving())
            killed.add(server.pid)
            server.kill()
            server.wait(10)
    finally:
        output = communicate(up, timeout=90)
    assert output.count("the embedded redis-server exited with status -9; starting it again") == 3, output[-3000:]
    assert "the embedded redis-server exited 4 times within 60 s (last status -9); see " in output, output[-3000:]
    assert "redis.log" in output and up.returncode != 0, output[-3000:]


def test_up_counts_a_redis_server_that_dies_at_start_against_its_restart_budget(tmp_path):
    """A restarted redis-server that cannot start (here its append-only file is corrupt) is tried
    again within the budget, then `tandem up` stops naming the cause, where before the first
    failed restart ended it with a guess at a taken port."""
    import psutil

    port = free_port()
    up = start_up(up_env(tmp_path, port, free_port()))
    try:
        url = f"redis://127.0.0.1:{port}/0"
        wait_until(lambda: redis.Redis.from_url(url).ping(), 30, "embedded redis")
        # `tandem up` starts its workers once it has seen the server answer. Killed before that,
        # the server is a first start that failed, which ends `tandem up` at once (a CI run of
        # 2026-12-07 killed it there: the test's ping answered before `tandem up`'s own did).
        wait_until(lambda: len(psutil.Process(up.pid).children()) > 1, 30, "`tandem up` past starting Redis")
        redis.Redis.from_url(url).set("tandem-test", "x")  # something for the append-only file to hold
        server = psutil.Process(int(redis.Redis.from_url(url).info("server")["process_id"]))
        # Before the kill, or `tandem up` may restart it first. The server appends to the file
        # it has open, so what it writes meanwhile lands after the bad line.
        aofs = list((tmp_path / "data" / "redis").rglob("*.aof"))  # Redis 6: appendonly.aof; 7: the .incr.aof
        assert aofs, "no append-only file to corrupt"
        for aof in aofs:
            aof.write_bytes(b"*not a redis command\r\n" + aof.read_bytes())
        server.kill()
        server.wait(10)
    finally:
        output = communicate(up, timeout=90)
    # The kill, then three restarts that die at start: four deaths within the minute.
    assert output.count("exited at start (status 1: ") == 3, output[-3000:]
    assert "append only file" in output.lower() and "taken" not in output, output[-3000:]
    assert "the embedded redis-server exited 4 times within 60 s (last status 1); see " in output, output[-3000:]
    assert up.returncode != 0 and "Traceback" not in output, output[-3000:]
