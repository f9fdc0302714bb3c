"""Stream, cache and memory structures against the private redis-server (no workers needed)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from workers.streams import (
    ConversationMemory,
    Lease,
    ReplyCache,
    ReplyLeases,
    ReplyStream,
    ResumeError,
    ResumingWriter,
    Superseded,
    normalise_message,
    stream_reply,
)

from ..helpers import wait_until


def test_cache_key_depends_on_message_intent_index_and_responder():
    base = ReplyCache.key("How do I top up?", "top_up", "v1", "llama")
    assert ReplyCache.key("  how do I TOP UP ", "top_up", "v1", "llama") == base
    assert ReplyCache.key("How do I top up?", "top_up", "v2", "llama") != base, "new index version, new key"
    assert ReplyCache.key("How do I top up?", "other", "v1", "llama") != base
    assert ReplyCache.key("How do I top up?", "top_up", "v1", "openai") != base
    assert normalise_message("It costs £5.00!") == "it costs £5.00"


@pytest.fixture
def client(redis_server):
    from workers.streams import connect

    return connect(redis_server.url)


def test_stream_resumes_after_the_last_id_and_stops_at_done(client):
    reply_id = f"r{time.time_ns()}"
    stream = ReplyStream(client, reply_id, maxlen=100, ttl_s=60)

    def write():
        stream.publish("meta", {"intent": "x"})
        for i in range(5):
            time.sleep(0.02)
            stream.publish("token", {"text": str(i)})
        stream.publish("done", {"reply": "01234"})

    writer = threading.Thread(target=write)
    writer.start()
    first = []
    for event in stream_reply(client, reply_id, block_ms=200):
        first.append(event)
        if len(first) == 2:
            break
    rest = list(stream_reply(client, reply_id, last_id=first[-1][0], block_ms=200))
    writer.join()
    kinds = [k for _, k, _ in first + rest]
    assert kinds == ["meta"] + ["token"] * 5 + ["done"]
    assert "".join(d["text"] for _, k, d in first + rest if k == "token") == "01234"
    assert stream.finished()
    assert 0 < client.ttl(f"tandem:reply:{reply_id}") <= 60


def test_silent_stream_times_out(client):
    with pytest.raises(TimeoutError):
        list(stream_reply(client, f"never-{time.time_ns()}", block_ms=100, timeout_s=0.3))


def test_memory_keeps_the_last_turns(client):
    memory = ConversationMemory(client, turns=2, ttl_s=60)
    session = f"s{time.time_ns()}"
    for i in range(3):
        memory.append(session, f"q{i}", f"a{i}", turn_id=f"r{i}")
    assert [m["content"] for m in memory.history(session)] == ["q1", "a1", "q2", "a2"]


def test_a_reply_enters_memory_once_whichever_writer_finishes_it(client):
    # A worker taken for dead can wake up and finish the reply its successor also finished.
    memory = ConversationMemory(client, turns=3, ttl_s=60)
    session = f"s{time.time_ns()}"
    assert memory.append(session, "q0", "a0", turn_id="r0")
    assert not memory.append(session, "q0", "a0", turn_id="r0")
    assert memory.append(session, "q1", "a1", turn_id="r1")
    for i in range(2, 5):
        memory.append(session, f"q{i}", f"a{i}", turn_id=f"r{i}")
    assert [m["content"] for m in memory.history(session)] == ["q2", "a2", "q3", "a3", "q4", "a4"]
    assert 0 < client.ttl(f"tandem:session:{session}") <= 60 and 0 < client.ttl(f"tandem:session:{session}:turn:r4") <= 60


def test_cache_round_trip_and_ttl(client):
    cache = ReplyCache(client, ttl_s=30)
    key = ReplyCache.key(f"m{time.time_ns()}", "i", "v", "r")
    assert cache.get(key) is None
    cache.put(key, {"tokens": ["a"], "result": {"reply": "a"}})
    assert cache.get(key)["result"]["reply"] == "a"
    assert 0 < client.ttl(key) <= 30


def _write(stream: ReplyStream, pieces: list[str], die_after: int | None = None, restart_at: int | None = None) -> None:
    """One attempt at a reply; ``die_after`` tokens stands for a worker killed mid-reply, and
    ``restart_at`` for the piece that begins a second draft."""
    writer = ResumingWriter(stream)
    writer.meta({"intent": "x"})
    for n, piece in enumerate(pieces):
        if n == die_after:
            return
        writer.token(piece, restart=n == restart_at)
    writer.done({"reply": "".join(pieces[restart_at or 0:])})


def _events(client, stream: ReplyStream) -> list[tuple[str, dict]]:
    return [(f["event"], json.loads(f["data"])) for _, f in client.xrange(stream.key)]


def test_a_redelivered_reply_carries_on_where_the_dead_worker_stopped(client):
    stream = ReplyStream(client, f"r{time.time_ns()}", maxlen=100, ttl_s=60)
    pieces = ["Freeze ", "your card ", "in the app", " now."]
    _write(stream, pieces, die_after=2)
    _write(stream, ["Freeze your", " card in", " the app now."])  # the retry's tokens fall differently
    events = _events(client, stream)
    assert [kind for kind, _ in events].count("meta") == 1
    assert "".join(d["text"] for kind, d in events if kind == "token") == "".join(pieces)
    assert events[-1] == ("done", {"reply": "Freeze your card in the app now."})


def test_a_retry_that_writes_something_else_is_an_error_not_a_garbled_reply(client):
    stream = ReplyStream(client, f"r{time.time_ns()}", maxlen=100, ttl_s=60)
    _write(stream, ["Freeze ", "your card."], die_after=1)
    with pytest.raises(ResumeError, match="ask again"):
        _write(stream, ["Call ", "us."])
    shorter = ReplyStream(client, f"r{time.time_ns()}", maxlen=100, ttl_s=60)
    _write(shorter, ["Freeze ", "your card ", "now."], die_after=2)
    with pytest.raises(ResumeError):
        _write(shorter, ["Freeze "])  # stops short of what the client already has
    assert [kind for kind, _ in _events(client, shorter)] == ["meta", "token", "token"]


@pytest.mark.parametrize("die_after", [1, 2, 3])
def test_a_second_draft_restarts_the_stream_once_across_a_redelivery(client, die_after):
    stream = ReplyStream(client, f"r{time.time_ns()}", maxlen=100, ttl_s=60)
    pieces = ["We charge £9. ", "Freeze ", "your card."]
    _write(stream, pieces, die_after=die_after, restart_at=1)
    _write(stream, pieces, restart_at=1)
    tokens = [d for kind, d in _events(client, stream) if kind == "token"]
    assert "".join(d["text"] for d in tokens) == "".join(pieces)
    restarts = [d["text"] for d in tokens if d.get("restart")]
    assert restarts == ["Freeze "]  # once, on the second draft's first piece, whoever wrote it


def test_the_guards_quoted_answer_keeps_its_flags_across_a_redelivery(client):
    stream = ReplyStream(client, f"r{time.time_ns()}", maxlen=100, ttl_s=60)
    for die_after in (1, None):
        writer = ResumingWriter(stream)
        writer.meta({"intent": "x"})
        writer.token("We charge £9. ")
        if die_after:
            continue
        writer.token("Delivery is free.", restart=True, quoted=True)
        writer.done({"reply": "Delivery is free."})
    tokens = [d for kind, d in _events(client, stream) if kind == "token"]
    assert tokens == [{"text": "We charge £9. "}, {"text": "Delivery is free.", "restart": True, "quoted": True}]


def test_a_writer_that_was_superseded_cannot_add_to_the_stream(client):
    """A worker taken for dead that wakes up again must not interleave its text with the
    text of the worker that took its reply over."""
    reply_id = f"fence{time.time_ns()}"
    first = ReplyStream(client, reply_id, ttl_s=60)
    first.claim()
    first.publish("meta", {})
    first.publish("token", {"text": "Open "})
    second = ReplyStream(client, reply_id, ttl_s=60)
    second.claim()
    writer = ResumingWriter(second)
    with pytest.raises(Superseded):
        first.publish("token", {"text": "the"})
    writer.meta({})
    writer.token("Open ")
    writer.token("the app.")
    writer.done({"reply": "Open the app."})
    with pytest.raises(Superseded):
        first.publish("done", {})
    events = list(stream_reply(client, reply_id, timeout_s=5))
    assert [kind for _, kind, _ in events] == ["meta", "token", "token", "done"]
    assert "".join(d["text"] for _, k, d in events if k == "token") == "Open the app."
    assert 0 < client.ttl(f"tandem:reply:{reply_id}:writer") <= 60
    # A Redis that lost its data has no writer: the current one goes on writing rather than stopping.
    client.delete(f"tandem:reply:{reply_id}:writer")
    second.publish("token", {"text": " More."})
    assert client.get(f"tandem:reply:{reply_id}:writer") == str(second.writer)


def test_a_retried_write_that_redis_had_made_is_not_written_twice(client):
    """redis-py retries a command whose reply a Redis restart cut off; when Redis had made the
    XADD (and kept it in its append-only file), the retry must not add the token again (a
    restart test once streamed "Activatingivating")."""
    reply_id = f"retry{time.time_ns()}"
    stream = ReplyStream(client, reply_id, ttl_s=60)
    stream.claim()
    stream.publish("meta", {})
    first = stream.publish("token", {"text": "Activ"})
    stream.sequence -= 1  # the retry sends the same event with the same sequence number
    assert stream.publish("token", {"text": "Activ"}) == first
    stream.publish("token", {"text": "ating"})
    stream.publish("done", {"reply": "Activating"})
    events = list(stream_reply(client, reply_id, timeout_s=5))
    assert [kind for _, kind, _ in events] == ["meta", "token", "token", "done"]
    assert "".join(d["text"] for _, k, d in events if k == "token") == "Activating"


@pytest.fixture
def unwatched_client(redis_server):
    """A database no gen worker watches: the workers other tests start take lapsed leases over themselves."""
    from workers.streams import connect

    return connect(f"redis://127.0.0.1:{redis_server.port}/7")


def lapse(client, key: str) -> None:
    """End a lease now, as its running out would: the leases here last a minute, so that no
    pause of a loaded machine lets one lapse before the test says so."""
    client.pexpire(key, 1)
    wait_until(lambda: not client.exists(key), 10, f"{key} lapsing")


def test_a_reply_whose_lease_lapses_is_handed_over_once_and_one_that_ended_is_dropped(unwatched_client):
    client = unwatched_client
    leases = ReplyLeases(client, lease_s=60, ttl_s=60, takeover_s=60)
    alive, dead, ended = (f"{name}{time.time_ns()}" for name in ("alive", "dead", "ended"))
    leases.hold({reply_id: {"reply_id": reply_id, "understanding": {"message": "hi"}} for reply_id in (alive, dead, ended)})
    ReplyStream(client, dead, ttl_s=60).publish("meta", {})
    ReplyStream(client, ended, ttl_s=60).publish("done", {})
    assert leases.orphans() == []  # every lease is fresh
    assert 0 < client.pttl(f"tandem:reply:{dead}:lease") <= 60_000, "a lease runs out unless renewed"
    for reply_id in (dead, ended):  # their workers stopped renewing
        lapse(client, f"tandem:reply:{reply_id}:lease")
    client.pexpire(f"tandem:reply:{alive}:lease", 1000)  # most of its lease gone by ...
    leases.hold({alive: {"reply_id": alive, "understanding": {"message": "hi"}}})
    assert client.pttl(f"tandem:reply:{alive}:lease") > 1000, "... and renewed"
    orphans = leases.orphans()
    assert [reply_id for reply_id, _ in orphans] == [dead]
    assert orphans[0][1] == {"reply_id": dead, "understanding": {"message": "hi"}}
    assert leases.orphans() == [], "handed over once: the takeover waits for the task it queued"
    assert client.sismember("tandem:replies:writing", alive) and not client.sismember("tandem:replies:writing", ended)
    leases.hold({dead: orphans[0][1]})  # the task queued again starts
    assert leases.orphans(skip={alive}) == []
    for reply_id in (alive, dead):
        leases.release(reply_id)
    assert not client.smembers("tandem:replies:writing") & {alive, dead, ended}


def test_a_live_lease_turns_away_another_owner_until_it_lapses(unwatched_client):
    """A copy of a reply's task that reaches a second worker while the first still renews its
    lease must not take the reply over; once the lease lapses, it may, and the first worker
    (stalled, not dead) does not take it back."""
    client = unwatched_client
    first, second = (ReplyLeases(client, lease_s=60, ttl_s=60, takeover_s=60, owner=name) for name in ("a:1", "b:2"))
    reply_id = f"owned{time.time_ns()}"
    task = {"reply_id": reply_id, "understanding": {"message": "hi"}}
    assert first.hold({reply_id: task}) == set()
    assert second.hold({reply_id: {**task, "understanding": {"message": "copy"}}}) == {reply_id}
    second.release(reply_id)  # the duplicate's clean-up leaves the writer's lease alone
    assert client.get(f"tandem:reply:{reply_id}:lease") == "a:1"
    assert json.loads(client.get(f"tandem:reply:{reply_id}:task")) == task
    assert client.sismember("tandem:replies:writing", reply_id)
    lapse(client, f"tandem:reply:{reply_id}:lease")
    assert second.hold({reply_id: task}) == set(), "a lapsed lease is anyone's"
    assert first.hold({reply_id: task}) == {reply_id}
    first.release(reply_id)
    assert client.get(f"tandem:reply:{reply_id}:lease") == "b:2"
    second.release(reply_id)
    assert not client.exists(f"tandem:reply:{reply_id}:lease") and not client.sismember("tandem:replies:writing", reply_id)


def test_a_lease_has_one_holder_until_it_is_released_or_lapses(client):
    key = f"tandem:test:lease:{time.time_ns()}"
    first, second = Lease(client, key, 60), Lease(client, key, 60)
    assert first.take() and not second.take()
    assert 0 < client.pttl(key) <= 60_000, "a lease runs out unless renewed"
    second.release()  # not the holder: leaves the lease alone
    assert client.exists(key) and not second.renew()
    client.pexpire(key, 1000)  # most of the lease gone by
    assert first.renew()
    assert client.pttl(key) > 1000, "renewed for a whole lease"
    assert not second.take(), "renewed, so still held"
    lapse(client, key)
    assert second.take(), "lapsed without renewal"
    second.release()
    assert not client.exists(key)
