"""The distributed path against a real redis-server and real Celery worker processes."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from pipeline.errors import InputError
from workers.batch import length_sorted_chunks, read_tickets, run_batch
from workers.client import submit_message
from workers.streams import STREAM_KEY, stream_reply

from ..conftest import BANKING77
from ..helpers import wait_until


def events_of(client, reply_id, **kwargs) -> list[tuple[str, str, dict]]:
    return list(stream_reply(client, reply_id, timeout_s=120, **kwargs))


def test_one_message_through_the_chain_streams_events_in_order(workers, redis_client):
    reply_id = submit_message("How long does card delivery take?", use_cache=False)
    events = events_of(redis_client, reply_id)
    kinds = [kind for _, kind, _ in events]
    assert kinds[0] == "meta" and kinds[-1] == "done"
    assert set(kinds[1:-1]) == {"token"} and len(kinds) > 5
    meta, done = events[0][2], events[-1][2]
    assert meta["intent"] == done["intent"] == "card_delivery_estimate"
    assert meta["sources"] and {"article_id", "title", "url", "score"} <= set(meta["sources"][0])
    assert {"reply", "grounded", "escalate", "timings_ms", "intent", "confidence"} <= set(done)
    assert shown_text(events) == done["reply"]  # the guard's quoted answer streams too
    assert redis_client.ttl(STREAM_KEY.format(reply_id)) > 0, "reply streams expire"


def test_workers_served_by_onnx_runtime_never_load_torch(workers, redis_client):
    """torch is 280 MB of a worker's memory and serves nothing once ONNX Runtime runs the encoder:
    the intent model is numpy and the generator llama.cpp."""
    reply_id = submit_message("Can I top up by bank transfer?", use_cache=False)
    assert events_of(redis_client, reply_id)[-1][1] == "done"
    for queue in ("nlu", "gen"):
        maps = Path(f"/proc/{workers.processes[queue].pid}/maps").read_text()
        assert "onnxruntime" in maps and "libtorch" not in maps, f"the {queue} worker loaded torch"


def shown_text(events: list[tuple[str, str, dict]]) -> str:
    """What a client shows: the token text from the last second-draft restart on."""
    tokens = [d for _, k, d in events if k == "token"]
    start = max((i for i, d in enumerate(tokens) if d.get("restart")), default=0)
    return "".join(d["text"] for d in tokens[start:]).strip()


def test_a_second_draft_restarts_the_stream_and_replays_from_the_cache(workers, redis_client):
    """The first draft fails the guard, the second passes (as "I lost my card" in tests/pipeline/test_chain.py).
    A wording no other test sends, so the first is not in the cache already."""
    first = events_of(redis_client, submit_message("I've lost my card"))
    again = events_of(redis_client, submit_message("I've lost my card"))
    done = first[-1][2]
    assert done["grounded"] and done["cached"] is False and again[-1][2]["cached"] is True
    assert sum(bool(d.get("restart")) for _, k, d in first if k == "token") == 1
    assert shown_text(first) == done["reply"] != "".join(d["text"] for _, k, d in first if k == "token").strip()
    assert [d for _, k, d in first if k == "token"] == [d for _, k, d in again if k == "token"]


def test_a_repeated_message_is_served_from_the_cache(workers, redis_client):
    message = "Can I get a spare card for my partner?"
    first = events_of(redis_client, submit_message(message))
    second = events_of(redis_client, submit_message(message.upper() + "  "))  # normalised to the same key
    assert first[-1][2]["cached"] is False and second[-1][2]["cached"] is True
    assert second[0][2]["cached"] is True
    assert [d for _, k, d in first if k == "token"] == [d for _, k, d in second if k == "token"]
    assert first[-1][2]["reply"] == second[-1][2]["reply"]
    bypass = events_of(redis_client, submit_message(message, use_cache=False))
    assert bypass[-1][2]["cached"] is False


def test_one_gen_worker_streams_concurrent_replies_together(workers, redis_client):
    """Continuous batching through the real worker: a second reply starts streaming while the
    first is still streaming (a one-at-a-time worker would hold it until the first is done),
    and each stream carries only its own reply."""
    # Messages whose intent is clear (confidence > 0.6): a borderline one can be answered as out of
    # scope or handed off, in one token, and then there is no streaming to overlap.
    messages = ["How long does card delivery take?", "What is the fee for an international transfer?",
                "How do I activate my card?"]
    ids = [submit_message(m, use_cache=False) for m in messages]  # the session's gen worker: threads pool
    spans = _stream_together(redis_client, ids)
    first_ends = min(end for _, end in spans)
    assert sum(start < first_ends for start, _ in spans) >= 2, f"replies streamed one after another: {spans}"


def test_threads_pool_worker_rides_out_a_redis_restart_mid_reply(workers, worker_settings, redis_client, redis_server):
    """Redis restarts while a threads-pool gen worker is writing three replies: each reply
    still ends in `done` with all its tokens, and the same worker serves the next message."""
    messages = ["How do I activate my card?", "How do I change my PIN?", "Can I top up by bank transfer?"]
    assert worker_settings.gen_pool == "threads", "the session's gen worker runs the default pool"
    try:
        ids = [submit_message(m, use_cache=False) for m in messages]
        next(e for e in stream_reply(redis_client, ids[0], timeout_s=120) if e[1] == "token")
        redis_server.stop()
        time.sleep(3)
        redis_server.start()
        for reply_id in ids:
            events = events_of(redis_client, reply_id)
            kinds = [kind for _, kind, _ in events]
            assert kinds[0] == "meta" and kinds[-1] == "done", (reply_id, kinds[-1], events[-1][2])
            done = events[-1][2]
            assert shown_text(events) == done["reply"]
        assert workers.processes["gen"].poll() is None, "the gen worker died with Redis"
        after = events_of(redis_client, submit_message("How do I freeze my card?", use_cache=False))
        assert after[-1][1] == "done"
    finally:
        if workers.processes["gen"].poll() is not None:
            workers.start("gen")  # for the tests after this one


def test_gen_worker_killed_mid_reply_resumes_the_stream_without_repeating_it(workers, redis_client):
    """kill -9 on the gen worker after three tokens: the task comes back to a new worker, which
    writes only the rest, so the client reads one meta and the same text as an unbroken reply."""
    events, unbroken, _ = kill_gen_mid_reply(workers, redis_client, "How do I activate my card?")
    assert events[-1][2]["reply"] == unbroken[-1][2]["reply"]


def test_a_reply_whose_worker_died_is_taken_over_long_before_the_visibility_timeout(workers, redis_client):
    """With the default five-minute visibility timeout Celery would hand the killed worker's task
    to another only after five minutes, far past the API's two-minute wait. The reply's lapsed
    lease has the next gen worker queue it again at once: the stream goes on where it stopped."""
    slow_redelivery = {"TANDEM_VISIBILITY_TIMEOUT_S": "300", "TANDEM_REPLY_LEASE_S": "3"}
    try:
        for queue in ("nlu", "gen"):  # any consumer restores unacknowledged tasks: all must wait 300 s
            workers.restart(queue, env=slow_redelivery)
        events, _, seconds = kill_gen_mid_reply(workers, redis_client, "How do I change my PIN?", env=slow_redelivery)
        assert seconds < 200, "resumed by the visibility timeout, not the lease"
        assert not redis_client.sismember("tandem:replies:writing", events[-1][2]["reply_id"])
    finally:
        for queue in ("nlu", "gen"):  # the session's workers, for the tests after this one
            workers.restart(queue)


def kill_gen_mid_reply(workers, redis_client, message: str, env: dict[str, str] | None = None):
    """kill -9 on the gen worker after the reply's third token, then start another (with ``env``).
    Checks the reply ends once, resumed, with the text of an unbroken one; returns its events,
    the unbroken reply's, and the seconds from the kill to the end of the stream."""
    reply_id = submit_message(message, use_cache=False)
    tokens = 0
    for _, kind, _ in stream_reply(redis_client, reply_id, timeout_s=120):
        tokens += kind == "token"
        if tokens == 3:
            break
    workers.kill("gen")
    killed_at = time.monotonic()
    try:
        last = redis_client.xrevrange(STREAM_KEY.format(reply_id), count=1)[0][1]["event"]
    finally:  # whatever the stream holds, the tests after this one need a gen worker
        workers.start("gen", env=env)
    assert last == "token", "killed mid-reply"
    events = events_of(redis_client, reply_id)
    seconds = time.monotonic() - killed_at
    kinds = [kind for _, kind, _ in events]
    assert kinds.count("meta") == 1 and kinds[-1] == "done", kinds
    assert events[-1][2].get("resumed") is True
    unbroken = events_of(redis_client, submit_message(message, use_cache=False))
    assert "".join(d["text"] for _, k, d in events if k == "token") == \
        "".join(d["text"] for _, k, d in unbroken if k == "token")
    return events, unbroken, seconds


def test_a_copy_of_a_reply_task_is_turned_away_while_another_worker_holds_the_reply(workers, redis_client):
    """The broker hands out again a task it thinks unacknowledged (after a reconnect, past the
    visibility timeout) even while a live worker writes that reply: the copy must leave it be."""
    from workers.tasks import classify, respond, retrieve

    reply_id = f"held{time.time_ns()}"
    understanding = retrieve.delay(classify.delay("How do I change my PIN?").get(timeout=120)).get(timeout=120)
    redis_client.set(f"{STREAM_KEY.format(reply_id)}:lease", "another-worker:1:ab12", px=120_000)
    try:
        result = respond.apply_async(kwargs={"understanding": understanding, "reply_id": reply_id,
                                             "use_cache": False}).get(timeout=120)
        assert result == {"reply_id": reply_id, "duplicate": True}
        assert not redis_client.exists(STREAM_KEY.format(reply_id)), "the copy wrote to the stream"
        assert redis_client.get(f"{STREAM_KEY.format(reply_id)}:lease") == "another-worker:1:ab12"
    finally:
        redis_client.delete(f"{STREAM_KEY.format(reply_id)}:lease")


def test_a_message_sent_while_redis_restarts_is_queued_when_it_returns(workers, redis_client, redis_server):
    """Sending a task waits for Redis to come back (the app reconnects without limit,
    `broker_connection_max_retries=None`), as every hop of the chain does inside the workers."""
    redis_server.stop()
    box: dict = {}

    def send() -> None:
        try:
            box["reply_id"] = submit_message("How do I change my PIN?", use_cache=False)
        except Exception as exc:  # noqa: BLE001 (reported by the assertion below)
            box["error"] = exc

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(3)
    redis_server.start()
    sender.join(60)
    assert "error" not in box, repr(box.get("error"))
    assert events_of(redis_client, box["reply_id"])[-1][1] == "done"


def _stream_together(redis_client, ids: list[str]) -> list[tuple[int, int]]:
    """Reads the replies at once; returns each one's first and last token time (ms, from the stream ids)."""
    events = {i: [] for i in ids}

    def read(reply_id: str) -> None:
        for event_id, kind, data in stream_reply(redis_client, reply_id, timeout_s=120):
            events[reply_id].append((int(event_id.split("-")[0]), kind, data))

    readers = [threading.Thread(target=read, args=(i,)) for i in ids]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(180)
    spans = []
    for reply_id in ids:
        kinds = [k for _, k, _ in events[reply_id]]
        assert kinds[0] == "meta" and kinds[-1] == "done" and "token" in kinds
        tokens = [ms for ms, k, _ in events[reply_id] if k == "token"]
        spans.append((tokens[0], tokens[-1]))
        done = events[reply_id][-1][2]
        assert shown_text(events[reply_id]) == done["reply"]
    return spans


def test_reconnecting_consumer_gets_every_token_exactly_once(workers, redis_client):
    reply_id = submit_message("What are the fees for topping up by card?", use_cache=False)
    seen = []
    for event_id, kind, data in stream_reply(redis_client, reply_id, timeout_s=120):
        seen.append((event_id, kind, data))
        if len(seen) == 3:
            break  # the client drops the connection here
    from workers.streams import connect

    fresh = connect(workers.env["TANDEM_REDIS_URL"])
    seen += events_of(fresh, reply_id, last_id=seen[-1][0])
    everything = events_of(fresh, reply_id)
    assert [e[0] for e in seen] == [e[0] for e in everything]
    assert len({e[0] for e in seen}) == len(seen)
    assert seen[-1][1] == "done"


def test_conversation_memory_keeps_recent_turns(workers, redis_client, worker_settings):
    session = f"s-{time.time_ns()}"
    events_of(redis_client, submit_message("I want to change my PIN", session_id=session))
    events_of(redis_client, submit_message("Can I do it at any ATM?", session_id=session))
    turns = [json.loads(t) for t in redis_client.lrange(f"tandem:session:{session}", 0, -1)]
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[0]["content"] == "I want to change my PIN"
    assert redis_client.ttl(f"tandem:session:{session}") > 0


def test_a_reply_no_gen_worker_began_before_its_deadline_is_not_written(workers, redis_client, worker_settings):
    # After a gen worker outage, the replies queued meanwhile were drafted first, and each made
    # new chats wait past their own deadline; a session remembered turns its user never saw.
    session = f"s-{time.time_ns()}"
    late = worker_settings.model_copy(update={"request_timeout_s": 0.0})
    events = events_of(redis_client, submit_message("Where is my card?", session_id=session, settings=late))
    assert [kind for _, kind, _ in events] == ["error"] and events[0][2]["code"] == "expired"
    assert not redis_client.exists(f"tandem:session:{session}")
    on_time = events_of(redis_client, submit_message("Where is my card?", session_id=session, use_cache=False))
    assert on_time[-1][1] == "done"


def test_bad_message_is_refused_before_queueing(worker_settings):
    with pytest.raises(InputError, match="empty"):
        submit_message("   ")


def write_tickets(path, n: int, extra: list[str] = ()) -> list[str]:
    from pipeline.data_io import read_labelled_csv

    texts = read_labelled_csv(BANKING77 / "test.csv", "text", "category")[0]
    lines = [json.dumps({"id": f"T{i:05d}", "text": texts[i % len(texts)]}) for i in range(n)]
    path.write_text("\n".join([*lines, *extra]) + "\n")
    return [f"T{i:05d}" for i in range(n)]


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_of_500_is_complete_and_in_input_order(workers, tmp_path):
    bad = [json.dumps({"id": "empty", "text": ""}), "{not json", json.dumps({"id": "huge", "text": "x" * 100_000})]
    ids = write_tickets(tmp_path / "t.jsonl", 500, bad)
    summary = run_batch(tmp_path / "t.jsonl", tmp_path / "out.jsonl", drafts=False)
    rows = read_rows(tmp_path / "out.jsonl")
    assert [r["id"] for r in rows] == [*ids, "empty", "line-502", "huge"]
    good = rows[:500]
    assert all("error" not in r and r["intent"] for r in good)
    assert all(r["article_ids"] for r in good if r["intent"] != "oos")
    assert sum(r["intent"] == "oos" for r in good) < 10
    assert {"id", "text", "intent", "confidence", "top_intents", "escalate", "article_ids"} <= set(good[0])
    assert "empty" in rows[500]["error"] and "JSON" in rows[501]["error"] and "limit" in rows[502]["error"]
    assert summary["errors"] == 3
    again = run_batch(tmp_path / "t.jsonl", tmp_path / "out.jsonl", drafts=False)
    # answered tickets are skipped; the two that failed are tried again (and fail again)
    assert again["skipped"] == 500 and again["processed"] == 2
    assert read_rows(tmp_path / "out.jsonl") == rows


def test_batch_chunks_hold_tickets_of_like_length_and_each_ticket_once():
    tickets = [{"id": str(i), "text": "word " * n} for i, n in enumerate([9, 1, 5, 3, 7, 2, 8])]
    chunks = length_sorted_chunks(tickets, 3)
    assert [len(chunk) for chunk in chunks] == [3, 3, 1]
    assert sorted(t["id"] for chunk in chunks for t in chunk) == sorted(t["id"] for t in tickets)
    lengths = [[len(t["text"]) for t in chunk] for chunk in chunks]
    assert all(max(shorter) <= min(longer) for shorter, longer in zip(lengths, lengths[1:]))


def test_a_job_started_later_takes_turns_with_one_already_running(workers, worker_settings):
    """Each job keeps TANDEM_BATCH_CHUNKS_IN_FLIGHT chunks queued (2 here), so the chunks of a job
    started later queue behind two of the first job's, not behind all forty: it finishes while
    the first is still running. Queued all at once, it would finish after the first."""
    from workers.batch import process_chunks

    finished: list[str] = []  # the job each finished chunk belongs to, in the order they finished

    def job(name: str, n: int) -> None:
        tickets = [{"id": f"{name}{i}", "text": f"How do I top up my account by card? ({name} {i})"} for i in range(n)]
        for rows in process_chunks(length_sorted_chunks(tickets, 4), False, None,
                                   priority=worker_settings.batch_priority, in_flight=2):
            assert all("error" not in row for row in rows), rows
            finished.append(name)

    first, first_box = run_in_thread(lambda: job("a", 160))
    wait_until(lambda: "a" in finished, 120, "the first job's first chunk")
    second, second_box = run_in_thread(lambda: job("b", 8))
    for thread in (first, second):
        thread.join(300)
    assert "error" not in first_box and "error" not in second_box, (first_box, second_box)
    assert finished.count("a") == 40 and finished.count("b") == 2
    last_of_second = max(i for i, name in enumerate(finished) if name == "b")
    assert finished[last_of_second:].count("a") >= 20, finished


def test_batch_with_drafts(workers, tmp_path):
    write_tickets(tmp_path / "t.jsonl", 3)
    run_batch(tmp_path / "t.jsonl", tmp_path / "out.jsonl", drafts=True, chunk_size=1)
    rows = read_rows(tmp_path / "out.jsonl")
    assert len(rows) == 3 and all(r["reply"].strip() and isinstance(r["grounded"], bool) for r in rows)


def test_a_rerun_reuses_only_rows_that_answer_the_same_tickets_as_asked(workers, tmp_path):
    # Ids alone decided: another file's rows (CSVs without an id column share row-2, row-3...)
    # and a --no-drafts run's rows, for a run with drafts, were taken as done.
    tickets, out = tmp_path / "t.csv", tmp_path / "out.jsonl"
    tickets.write_text("text\nmy card has not arrived\nI want to close my account\n")
    run_batch(tickets, out, drafts=False)
    first = read_rows(out)
    tickets.write_text("text\nmy card has not arrived\nwhat is your exchange rate for dollars\n")
    summary = run_batch(tickets, out, drafts=False)
    rows = read_rows(out)
    assert (summary["skipped"], summary["processed"]) == (1, 1)
    assert rows[0] == first[0] and rows[1]["text"] == "what is your exchange rate for dollars"
    assert rows[1]["intent"] != first[1]["intent"]
    drafted = run_batch(tickets, out, drafts=True, chunk_size=1)
    assert drafted["skipped"] == 0 and all(r["reply"].strip() for r in read_rows(out))
    assert run_batch(tickets, out, drafts=False)["skipped"] == 2, "rows with drafts serve a run without"
    with pytest.raises(InputError, match="no folder"):
        run_batch(tickets, tmp_path / "missing" / "out.jsonl")
    with pytest.raises(InputError, match="a folder"):
        run_batch(tickets, tmp_path)


@pytest.mark.long
def test_a_draft_chunk_that_outlasts_the_visibility_timeout_is_drafted_once(workers, worker_settings, redis_client):
    """kombu hands a task out again once it has gone unacknowledged for the visibility timeout
    (5 s for these workers, 300 s shipped, which a chunk waiting behind others at a busy worker's
    draft gate can outlast): a sweep every worker makes when it starts and every ~100 s puts it
    back in its queue. The copy must stop, not draft the chunk a second time. Counted by the
    progress key, which each run of the chunk that finishes adds its tickets to."""
    from celery import chain

    from workers.app import app, workers_idle
    from workers.tasks import draft_batch, understand_batch

    def idle() -> bool:
        return workers_idle(redis_client) and (time.sleep(1) or workers_idle(redis_client))

    def drafting() -> bool:
        active = [t for tasks in (app.control.inspect(timeout=1).active() or {}).values() for t in tasks]
        return any(t["id"] == job.id for t in active)

    wait_until(idle, 600, "the workers idle")
    questions = ["How long does card delivery take?", "How do I change my PIN?", "Why was I charged a fee?",
                 "Can I top up by bank transfer?", "My transfer has not arrived yet", "How do I freeze my card?"]
    tickets = [{"id": str(i), "text": f"{questions[i % len(questions)]} ({i})"} for i in range(16)]
    progress_key = f"tandem:test:drafted-once:{time.time_ns()}"
    job = chain(understand_batch.s(tickets, progress_key).set(priority=9),
                draft_batch.s(progress_key).set(priority=9)).apply_async()
    wait_until(drafting, 120, "the chunk drafting")
    time.sleep(worker_settings.visibility_timeout_s + 2)
    with app.connection_for_write() as connection:  # the sweep, now rather than in up to 100 s
        connection.default_channel.qos.restore_visible(num=100, interval=1)
    rows = job.get(timeout=600)
    wait_until(idle, 600, "the workers idle again")  # a copy that did not stop has finished by now
    log = "\n".join(path.read_text(errors="replace") for path in workers.logs.iterdir())
    assert f"draft chunk {job.id} delivered again" in log, "no copy of the chunk arrived: the test showed nothing"
    assert [row["id"] for row in rows] == [t["id"] for t in tickets]
    assert all(row.get("reply") and "error" not in row for row in rows)
    assert int(redis_client.get(progress_key)) == 2 * len(tickets), "the chunk was drafted more than once"


@pytest.mark.long
def test_workers_serve_the_help_centre_that_tandem_index_saved_without_a_restart(workers, worker_settings,
                                                                                redis_client, tmp_path):
    """A team edits its help centre and runs `tandem index` on the folder the workers serve: both
    workers serve the new version within TANDEM_INDEX_RELOAD_S (10 s), as their heartbeats (and
    /readyz) say, and a message finds the new article. Removing it again restores the first version."""
    import subprocess
    import sys

    from pipeline.settings import PACKAGE_DATA
    from workers.tasks import search

    def served_versions() -> set[str]:
        return {json.loads(redis_client.get(key))["index_version"] for key in redis_client.keys("tandem:worker:*")}

    def index(kb) -> None:
        run = subprocess.run([sys.executable, "-m", "services.cli", "index", str(kb), "--out",
                              str(worker_settings.resolved_index_dir)], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr

    question = "Does Northwind insure my dog?"
    (before,) = served_versions()
    assert "pet-insurance" not in {p["article_id"] for p in search.delay(question).get(timeout=60)}
    kb = tmp_path / "kb"
    shutil.copytree(PACKAGE_DATA / "helpcentre", kb)
    (kb / "pet-insurance.md").write_text("---\nid: pet-insurance\ntitle: Pet insurance\nintents: [pet_insurance]\n"
                                         "url: https://help.northwind.example/articles/pet-insurance\n---\n"
                                         "Northwind insures dogs and cats from £7 a month. Add a pet in the app "
                                         "under Insurance → Pets.\n", encoding="utf-8")
    index(kb)
    try:
        wait_until(lambda: len(served_versions()) == 1 and served_versions() != {before}, 60,
                   "both workers serving the new index")
        assert search.delay(question).get(timeout=60)[0]["article_id"] == "pet-insurance"
    finally:
        index(PACKAGE_DATA / "helpcentre")
        wait_until(lambda: served_versions() == {before}, 60, "both workers back on the first index")
    assert "pet-insurance" not in {p["article_id"] for p in search.delay(question).get(timeout=60)}


def test_bad_ticket_files_get_clear_errors(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(InputError, match="must be .csv"):
        read_tickets(tmp_path / "a.txt")
    (tmp_path / "b.csv").write_text("id,body\n1,hi\n")
    with pytest.raises(InputError, match="no 'text' column"):
        read_tickets(tmp_path / "b.csv")
    (tmp_path / "c.jsonl").write_text('{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n')
    with pytest.raises(InputError, match="appears twice"):
        read_tickets(tmp_path / "c.jsonl")
    (tmp_path / "d.csv").write_bytes(b"id,text\n1,caf\xe9\n")
    with pytest.raises(InputError, match="not valid UTF-8"):
        read_tickets(tmp_path / "d.csv")


def run_in_thread(target):
    box: dict = {}

    def run():
        try:
            box["result"] = target()
        except BaseException as exc:  # surfaced to the test below
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def batch_under_way(tmp_path, tickets: int, rows_before: int):
    """Start a batch in a thread; return once ``rows_before`` results are saved."""
    ids = write_tickets(tmp_path / "t.jsonl", tickets)
    thread, box = run_in_thread(lambda: run_batch(tmp_path / "t.jsonl", tmp_path / "out.jsonl", drafts=False))
    partial = tmp_path / "out.jsonl.partial"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not partial.exists() or len(partial.read_text().splitlines()) < rows_before):
        time.sleep(0.2)
    assert partial.exists(), "the batch had started"
    return ids, thread, box


def test_killed_worker_loses_no_ticket(workers, tmp_path, redis_client):
    ids, thread, box = batch_under_way(tmp_path, 2000, rows_before=300)
    workers.kill("nlu")  # kill -9 in the middle of a chunk
    workers.start("nlu")
    thread.join(300)
    assert "error" not in box, box.get("error")
    rows = read_rows(tmp_path / "out.jsonl")
    assert [r["id"] for r in rows] == ids
    assert all("error" not in r for r in rows)


def joined(thread, timeout: float, workers) -> None:
    """Wait for a batch thread; if it is still running, fail with what the workers logged."""
    thread.join(timeout)
    if thread.is_alive():
        logs = sorted(workers.logs.iterdir(), key=lambda path: path.stat().st_mtime)[-2:]
        tails = "\n".join(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:])
                          for log in logs)
        raise AssertionError(f"the batch was still running after {timeout:.0f} s; the workers' logs end:\n{tails}")


def test_redis_outage_mid_batch_is_ridden_out(workers, tmp_path, redis_server):
    ids, thread, box = batch_under_way(tmp_path, 1000, rows_before=100)
    redis_server.stop()
    time.sleep(5)
    redis_server.start()
    joined(thread, 300, workers)
    if "error" in box:  # the batch may stop with a clear error; a rerun must then finish it
        assert "run the same command again" in str(box["error"])
        run_batch(tmp_path / "t.jsonl", tmp_path / "out.jsonl", drafts=False)
    rows = read_rows(tmp_path / "out.jsonl")
    assert [r["id"] for r in rows] == ids
    assert all("error" not in r for r in rows)


def test_a_redis_that_comes_back_empty_mid_batch_loses_no_ticket(workers, tmp_path, redis_server, caplog):
    """A Redis without persistence comes back empty: the queued chunks, the one a worker held
    and the results not yet collected are gone. The batch notices its chunks are nowhere
    in the broker and queues them again (after 30 s without a chunk finishing)."""
    ids, thread, box = batch_under_way(tmp_path, 1000, rows_before=100)
    redis_server.stop()
    for data in redis_server.directory.glob("appendonly*"):  # a file up to Redis 6, a folder from 7
        shutil.rmtree(data) if data.is_dir() else data.unlink()
    redis_server.start()
    joined(thread, 300, workers)
    assert "error" not in box, box.get("error")
    rows = read_rows(tmp_path / "out.jsonl")
    assert [r["id"] for r in rows] == ids
    assert all("error" not in r for r in rows)
    assert "gone from the broker" in caplog.text


@pytest.mark.long
def test_a_chat_does_not_wait_for_the_draft_chunk_a_solo_gen_worker_is_on(workers, worker_settings, redis_client):
    """A solo gen worker runs one task at a time. A chat sent while it drafts a job's chunk gets
    its first token before that chunk is finished: the task starts no more drafts and hands the
    rest back behind the chat, under the same id, so the job still gets every row once."""
    from celery import chain

    from workers.app import queued_tasks, tasks_in_broker
    from workers.tasks import draft_batch, understand_batch

    assert worker_settings.batch_priority == 9
    try:
        workers.restart("gen", env={"TANDEM_GEN_POOL": "solo"})
        tickets = [{"id": str(i), "text": f"How do I top up my account by bank transfer? ({i})"} for i in range(12)]
        job = chain(understand_batch.s(tickets).set(priority=9), draft_batch.s().set(priority=9)).apply_async()
        wait_until(lambda: job.parent.ready() and queued_tasks(redis_client, "gen") == 0 and job.id in tasks_in_broker(),
                   120, "the gen worker drafting the chunk")
        reply_id = submit_message("How long does card delivery take?", use_cache=False)
        first = next(kind for _, kind, _ in stream_reply(redis_client, reply_id, timeout_s=180)
                     if kind in ("token", "done"))
        chunk_finished_first = job.ready()
        rows = job.get(timeout=300)
    finally:
        workers.restart("gen")  # the session's threads-pool worker, for the tests after this one
    assert first == "token"
    assert not chunk_finished_first, "the chat waited for the whole draft chunk"
    assert [row["id"] for row in rows] == [t["id"] for t in tickets]
    assert all(row.get("reply") and "error" not in row and "understanding" not in row for row in rows)
    log = "\n".join(path.read_text(errors="replace") for path in workers.logs.iterdir())
    assert "drafts handed back behind it" in log


@pytest.mark.long
def test_a_chat_gets_a_thread_while_a_job_holds_every_thread_of_the_gen_worker(workers, worker_settings, redis_client):
    """The threads pool runs a task per reply slot (4 here), and a job of more draft chunks than
    that takes them all. A chat sent then must not wait for a whole chunk: chunks whose drafts
    wait for the one draft slot hand back at once, and the chat gets a thread and its first token
    before any chunk is finished. The job still gets every row drafted once."""
    from celery import chain

    from workers.app import app, queued_tasks
    from workers.tasks import draft_batch, understand_batch

    assert worker_settings.gen_pool == "threads" and worker_settings.batch_priority == 9
    assert worker_settings.responder_slots == 4
    jobs = []
    for chunk in range(6):
        tickets = [{"id": f"{chunk}-{i}", "text": f"How do I top up my account by bank transfer? ({chunk}, {i})"}
                   for i in range(4)]
        jobs.append((tickets, chain(understand_batch.s(tickets).set(priority=9),
                                    draft_batch.s().set(priority=9)).apply_async()))

    def every_thread_drafts() -> bool:
        active = [t for tasks in (app.control.inspect(timeout=1).active() or {}).values() for t in tasks]
        return sum(t["name"] == "tandem.draft_batch" for t in active) == 4 and queued_tasks(redis_client, "gen") > 0

    wait_until(every_thread_drafts, 120, "the job's chunks on all four threads")
    reply_id = submit_message("How long does card delivery take?", use_cache=False)
    first = next(kind for _, kind, _ in stream_reply(redis_client, reply_id, timeout_s=180) if kind in ("token", "done"))
    finished_first = [job.id for _, job in jobs if job.ready()]
    results = [(tickets, job.get(timeout=300)) for tickets, job in jobs]
    assert first == "token"
    assert not finished_first, f"the chat waited for a chunk to finish: {finished_first}"
    for tickets, rows in results:
        assert [row["id"] for row in rows] == [t["id"] for t in tickets]
        assert all(row.get("reply") and "error" not in row and "understanding" not in row for row in rows)


def test_a_chat_goes_ahead_of_the_chunks_a_batch_job_queued(workers, worker_settings, redis_client):
    """A job queues its chunks at TANDEM_BATCH_PRIORITY (9), here all at once: a chat sent after
    them is taken before them. With the worker stopped while both are queued, the chat's
    reply starts with at most a chunk or two of the 1,000 tickets done, not all of them."""
    from workers.app import queued_tasks, workers_idle
    from workers.batch import process_chunks

    assert worker_settings.batch_priority == 9
    # The chat's reply needs a gen thread: start once earlier tests' chunks, and their copies
    # redelivered after the 5 s visibility timeout of these workers, have all run.
    wait_until(lambda: workers_idle(redis_client) and (time.sleep(1) or workers_idle(redis_client)), 600,
               "the workers idle")
    workers.kill("nlu")  # the job's 40 chunks and the chat both wait for the next nlu worker
    try:
        tickets = [{"id": str(i), "text": f"Where is the card I ordered last week? ({i})"} for i in range(1000)]
        progress_key = "tandem:test:priority:progress"
        chunks = length_sorted_chunks(tickets, 25)
        thread, box = run_in_thread(lambda: [row for rows in process_chunks(chunks, False, progress_key,
                                                                            priority=worker_settings.batch_priority,
                                                                            in_flight=len(chunks))
                                             for row in rows])
        wait_until(lambda: queued_tasks(redis_client, "nlu") == len(chunks), 30, "the job queued")
        reply_id = submit_message("I lost my card", use_cache=False)
    finally:  # once the chat is queued; on a failure before, still, for the tests after this one
        workers.start("nlu", wait=False)
    try:
        # The counter only grows: read just after the reply's first event, it bounds what was done before.
        # A blocking read returns as that event lands; polling every 0.2 s let the job's chunks (tens of
        # ms each on the ONNX encoder) run on meanwhile and count against the chat.
        assert redis_client.xread({STREAM_KEY.format(reply_id): "0-0"}, count=1, block=180_000), "no reply"
        done_first = int(redis_client.get(progress_key) or 0)
        thread.join(120)
    finally:
        workers.wait_ready("nlu")
    assert "error" not in box, box.get("error")
    assert sorted(int(row["id"]) for row in box["result"]) == list(range(1000))
    assert done_first <= 3 * 25, f"{done_first} of 1000 tickets were done before the chat was answered"
