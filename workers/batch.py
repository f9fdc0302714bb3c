"""Batch tickets through the workers: read, fan out in chunks, collect, write in input order.

Resumable and idempotent by ticket id: results land in ``<out>.partial`` as each chunk
finishes, a rerun skips every id already answered without error, and the final file
is written once, in input order, with each ticket exactly once.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import redis
from celery import chain
from kombu.exceptions import OperationalError

from pipeline.chain import clean_message
from pipeline.errors import InputError, TandemError
from pipeline.settings import Settings

Progress = Callable[[int, int], None]
log = logging.getLogger(__name__)


def read_tickets(path: Path) -> list[dict]:
    """Tickets as ``{"id", "text"}`` from a .csv or .jsonl file; see ``parse_tickets``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.suffix not in (".csv", ".jsonl"):
        raise InputError(f"{path}: tickets must be .csv (id,text) or .jsonl")
    return parse_tickets(path.read_bytes(), path.suffix[1:], str(path))


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_tickets(raw: bytes, kind: str, source: str = "tickets") -> list[dict]:
    """Tickets from CSV (``id,text``) or JSONL bytes. A malformed JSONL line becomes a ticket
    with an ``error`` (never dropped); an unreadable file or a repeated id is an InputError."""
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError(f"{source}: not valid UTF-8 (line {line})") from None
    tickets: list[dict] = []
    if kind == "jsonl":
        for n, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                tickets.append({"id": f"line-{n}", "text": line[:200], "error": f"line {n} is not a JSON object ({exc})"})
                continue
            ticket = {"id": str(row.get("id") if row.get("id") is not None else f"line-{n}"),
                      "text": row.get("text") if isinstance(row.get("text"), str) else ""}
            if not _is_unicode(ticket["id"] + ticket["text"]):  # "\ud800": Redis cannot store it
                ticket = {"id": f"line-{n}", "text": line[:200],
                          "error": f"line {n} is not valid Unicode (half of a UTF-16 surrogate pair)"}
            tickets.append(ticket)
    elif kind == "csv":
        try:
            reader = csv.DictReader(io.StringIO(content, newline=""))
            if "text" not in (reader.fieldnames or []):
                raise InputError(f"{source}: no 'text' column (found {', '.join(reader.fieldnames or []) or 'no header'})")
            for n, row in enumerate(reader, 2):
                tickets.append({"id": row.get("id") or f"row-{n}", "text": row.get("text") or ""})
        except csv.Error as exc:
            raise InputError(f"{source}: malformed CSV ({exc})") from None
    else:
        raise InputError(f"{source}: tickets must be CSV (id,text) or JSONL")
    seen: dict[str, int] = {}
    for n, ticket in enumerate(tickets):
        if ticket["id"] in seen:
            raise InputError(f"{source}: ticket id {ticket['id']!r} appears twice (tickets {seen[ticket['id']] + 1} and {n + 1})")
        seen[ticket["id"]] = n
    if not tickets:
        raise InputError(f"{source}: no tickets")
    return tickets


def _read_results(path: Path) -> dict[str, dict]:
    results: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: its ticket is simply done again
            if isinstance(row, dict) and "id" in row:
                results[str(row["id"])] = row
    return results


def _answers(row: dict, ticket: dict, drafts: bool, settings: Settings) -> bool:
    """Whether a row written by an earlier run answers this ticket as this run would."""
    if "error" in row or "error" in ticket or (drafts and "reply" not in row):
        return False
    try:  # rows carry the text the workers read: the ticket's, cleaned
        return row.get("text") == clean_message(ticket["text"], settings.max_message_chars)
    except InputError:
        return False


def run_batch(tickets_path: Path, out: Path, drafts: bool = True, settings: Settings | None = None,
              progress: Progress | None = None, chunk_size: int | None = None, outage_s: float = 60.0) -> dict:
    """Process every ticket not yet answered; returns counts. Raises TandemError if Redis
    stays away for ``outage_s`` (what finished is kept; a rerun resumes)."""
    from workers.app import configure

    settings = settings or Settings()
    configure(settings)
    out = Path(out)
    if out.is_dir() or not out.parent.is_dir():
        raise InputError(f"--out {out}: " + ("a folder; name a file in it" if out.is_dir() else
                                            f"no folder {out.parent} to write it in"))
    tickets = read_tickets(tickets_path)
    partial = out.with_name(out.name + ".partial")
    # A row from an earlier run is reused only for the same ticket, text included, and with a
    # draft where drafts are asked for: ids alone took another file's rows (CSVs without an id
    # column share row-2, row-3...), and a --no-drafts run's rows for a run with drafts.
    earlier = {**_read_results(out), **_read_results(partial)}
    done = {t["id"]: earlier[t["id"]] for t in tickets
            if t["id"] in earlier and _answers(earlier[t["id"]], t, drafts, settings)}
    results: dict[str, dict] = dict(done)
    todo = [t for t in tickets if t["id"] not in done]
    for ticket in todo:
        if "error" in ticket:  # unreadable lines are answered at once, never dropped
            results[ticket["id"]] = ticket
    todo = [t for t in todo if "error" not in t]
    chunks = length_sorted_chunks(todo, chunk_size or settings.batch_chunk_size)
    batch_id = uuid.uuid4().hex
    progress_key = f"tandem:batch:{batch_id}:progress"
    steps = len(todo) * (2 if drafts else 1)
    client = redis.Redis.from_url(settings.resolved_redis_url)

    with partial.open("a", encoding="utf-8") as sink:
        for rows in process_chunks(chunks, drafts, progress_key, outage_s, priority=settings.batch_priority,
                                   in_flight=settings.batch_chunks_in_flight):
            for row in rows:
                results[row["id"]] = row
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            sink.flush()
            os.fsync(sink.fileno())
            if progress:
                count = _retry(lambda: client.get(progress_key), outage_s)
                progress(min(int(count or 0), steps), steps)

    ordered = [results[t["id"]] for t in tickets]
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered), encoding="utf-8")
    os.replace(tmp, out)
    partial.unlink(missing_ok=True)
    return {"tickets": len(tickets), "skipped": len(done), "processed": len(todo),
            "errors": sum("error" in r for r in ordered)}


def length_sorted_chunks(tickets: list[dict], size: int) -> list[list[dict]]:
    """Chunks of ``size`` tickets, shortest tickets first. The encoder pads each batch to its
    longest message; tickets of like length in one chunk leave it little padding to compute.
    Rows are keyed by ticket id and written in input order, so the order here costs nothing."""
    ordered = sorted(tickets, key=lambda ticket: len(ticket["text"]))
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def _revoke_chain(result) -> None:
    """Revoke a chunk's every step: its result is the chain's last (the drafts), and revoking
    that alone left the understand step to run for a job already cancelled."""
    while result is not None:
        result.revoke()
        result = result.parent


def process_chunks(chunks: list[list[dict]], drafts: bool, progress_key: str | None, outage_s: float = 60.0,
                   cancelled: Callable[[], bool] = lambda: False, *, priority: int, in_flight: int,
                   lost_check_s: float = 30.0) -> Iterator[list[dict]]:
    """Fan chunks out to the workers; yield each chunk's rows as it finishes (any order).
    Chunks are queued at broker ``priority`` (TANDEM_BATCH_PRIORITY), behind chats, at most
    ``in_flight`` at a time (TANDEM_BATCH_CHUNKS_IN_FLIGHT): the next is queued as one finishes.

    When no chunk has finished for ``lost_check_s``, the chunks the broker no longer holds
    (see ``_lost``) are queued again, so a lost task message cannot stall the job for ever."""
    from workers.app import declare_queues
    from workers.tasks import draft_batch, understand_batch

    def submit(chunk: list[dict]):
        signature = understand_batch.s(chunk, progress_key).set(priority=priority)
        if drafts:
            signature = chain(signature, draft_batch.s(progress_key).set(priority=priority))
        return _retry(lambda: signature.apply_async(), outage_s)

    waiting = deque(chunks)
    pending = {}

    def top_up() -> None:
        while waiting and len(pending) < in_flight:
            chunk = waiting.popleft()
            submitted = submit(chunk)
            pending[submitted.id] = (submitted, chunk, 0)

    top_up()
    last_finished = time.monotonic()
    while pending:
        if cancelled():
            for submitted, _, _ in pending.values():
                _revoke_chain(submitted)
            return
        if time.monotonic() - last_finished > lost_check_s:
            lost = _retry(lambda: _lost([submitted for submitted, _, _ in pending.values()]), outage_s)
            if lost:
                log.warning("%d of %d waiting chunks are gone from the broker with no result "
                            "(did Redis restart without its data?); queueing them again", len(lost), len(pending))
                _retry(declare_queues, outage_s)
            for task_id in lost:
                _, chunk, attempts = pending.pop(task_id)
                again = submit(chunk)
                pending[again.id] = (again, chunk, attempts)
            last_finished = time.monotonic()
        for task_id, (submitted, chunk, attempts) in list(pending.items()):
            result = _retry(lambda r=submitted: _poll(r), outage_s)
            if result is None:
                continue
            del pending[task_id]
            last_finished = time.monotonic()
            if not isinstance(result, list) and _transient(result) and attempts < 3:
                again = submit(chunk)  # the worker lost Redis mid-chunk: the tickets are fine, run them again
                pending[again.id] = (again, chunk, attempts + 1)
                continue
            rows = result if isinstance(result, list) else [{**t, "error": f"worker failed: {result}"} for t in chunk]
            for row in rows:
                row.pop("understanding", None)
            top_up()
            yield rows
        if pending:
            time.sleep(0.2)


def _lost(submitted: list) -> list[str]:
    """Ids of the chunks (their last step's task) that neither wait in a queue, nor are held
    by a worker (unacknowledged, or drafting under the chunk's lease), nor have a result: a
    Redis that restarted without its data, or a task taken by a worker in the instant Redis
    went down, before kombu noted it as taken. Each step is looked for twice, a second apart,
    so a task in that instant now is not counted."""
    from workers.app import tasks_in_broker

    held = tasks_in_broker()
    time.sleep(1.0)
    held |= tasks_in_broker()

    def steps(result) -> set[str]:
        return {result.id, *steps(result.parent)} if result is not None else set()

    # Polled after the second look: a chain's next step is queued before its first step's
    # result is stored, and a task's result before its acknowledgement.
    return [r.id for r in submitted if not steps(r) & held and _poll(r) is None and not _drafting(r.id)]


def _drafting(task_id: str) -> bool:
    """Whether a worker holds the draft chunk's lease: it drafts the chunk though a copy that
    the broker handed out again (past the visibility timeout) took the task's message away."""
    from workers.app import app
    from workers.streams import CHUNK_LEASE_KEY

    with app.connection_for_write() as connection:
        return bool(connection.default_channel.client.exists(CHUNK_LEASE_KEY.format(task_id)))


def _transient(error: str) -> bool:
    return any(name in error for name in ("ConnectionError", "TimeoutError", "OperationalError", "WorkerLostError"))


def _poll(result):
    """The chunk's rows when finished, the error text when it (or the chain step before it)
    failed, None while running."""
    step = result
    while step is not None:
        if step.failed():
            return repr(step.result)
        step = step.parent
    if not result.ready():
        return None
    return result.get(disable_sync_subtasks=False)


def _retry(call: Callable, outage_s: float):
    """Run ``call``, riding out a Redis outage of up to ``outage_s`` seconds."""
    started = time.monotonic()
    while True:
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError, OperationalError, ConnectionError) as exc:
            if time.monotonic() - started > outage_s:
                raise TandemError(f"Redis unreachable for {outage_s:.0f} s ({exc}); finished tickets are saved, "
                                  "run the same command again to resume") from None
            time.sleep(0.5)
