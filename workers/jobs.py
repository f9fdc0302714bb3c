"""Ticket jobs for the HTTP API: state and results in Redis, chunks run by the workers.

``tandem:job:{id}`` is a hash (state, total, processed, errors, drafts, created),
``tandem:job:{id}:order`` the ticket ids in input order, ``tandem:job:{id}:tickets`` the
tickets still to answer and ``tandem:job:{id}:results`` a hash of ticket id -> result row.
Every key expires ``result_ttl_s`` after the job's last change: each chunk written and the
job's end renew them all, so a long job keeps its keys and a finished one keeps its results
for that long. A job whose keys have expired (or were deleted) is not written again.

A job is driven by one API process at a time, which holds ``tandem:job:{id}:driver`` as a
lease and renews it while it waits on the workers. If that process dies, the lease lapses and
any API process's ``JobStore.resume_orphans`` (run every half lease) takes the job over and
sends the tickets with no result yet. Rows are written once (HSETNX), so a ticket answered
twice across a takeover is counted once, and in the same step as their count.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import redis

from pipeline.errors import TandemError
from pipeline.settings import Settings
from workers.batch import length_sorted_chunks, process_chunks
from workers.streams import Lease

TERMINAL_STATES = {"done", "failed", "cancelled"}
OPEN_JOBS = "tandem:jobs:open"  # ids of jobs not yet in a terminal state
log = logging.getLogger(__name__)

# A chunk's rows and their count go in together. Written as two round trips, a driver killed
# between them left rows that no one counted: the next driver skips answered tickets, and the
# job ended "done" short of its total (seen once in CI, 1,975 of 2,000).
# KEYS: results, job, order, tickets; ARGV: the TTL in seconds, then (id, row, is_error) triples.
# The results hash is first created here, so its TTL is set here too: an EXPIRE at create
# time found no key, and every job's rows stayed in Redis after the rest of it expired.
_WRITE_ROWS = """
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
local new, errors = 0, 0
for i = 2, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    new = new + 1
    if ARGV[i + 2] == '1' then errors = errors + 1 end
  end
end
redis.call('HINCRBY', KEYS[2], 'processed', new)
redis.call('HINCRBY', KEYS[2], 'errors', errors)
for _, key in ipairs(KEYS) do redis.call('EXPIRE', key, ARGV[1]) end
return new
"""

# KEYS: job, order, results, tickets, the open-jobs set; ARGV: the state, the TTL in seconds, the job id.
# On a job that has expired, an HSET would create a hash with a state and nothing else.
_END = """
redis.call('SREM', KEYS[5], ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
redis.call('DEL', KEYS[4])
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[2]) end
return 1
"""

# KEYS: job. A cancel that lands between the driver's read of the state and its write of
# "running" must not be overwritten.
_START = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' and state ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'running')
return 1
"""


class JobStore:
    def __init__(self, client: redis.Redis, settings: Settings):
        self.client = client
        self.settings = settings

    def _key(self, job_id: str, part: str = "") -> str:
        return f"tandem:job:{job_id}{':' + part if part else ''}"

    def create(self, tickets: list[dict], drafts: bool) -> str:
        job_id = uuid.uuid4().hex
        ttl = self.settings.result_ttl_s
        pipe = self.client.pipeline()
        pipe.hset(self._key(job_id), mapping={"state": "queued", "total": len(tickets), "processed": 0, "errors": 0,
                                              "drafts": int(drafts), "created": time.time()})
        pipe.rpush(self._key(job_id, "order"), *[t["id"] for t in tickets])
        broken = {t["id"]: json.dumps(t) for t in tickets if "error" in t}
        if broken:  # unreadable tickets are answered at once
            pipe.hset(self._key(job_id, "results"), mapping=broken)
            pipe.hincrby(self._key(job_id), "processed", len(broken))
            pipe.hincrby(self._key(job_id), "errors", len(broken))
        todo = {t["id"]: json.dumps(t, ensure_ascii=False) for t in tickets if "error" not in t}
        if todo:
            pipe.hset(self._key(job_id, "tickets"), mapping=todo)
        for part in ("", "order", "results", "tickets"):
            pipe.expire(self._key(job_id, part), ttl)
        pipe.sadd(OPEN_JOBS, job_id)
        pipe.execute()
        return job_id

    def status(self, job_id: str) -> dict | None:
        raw = self.client.hgetall(self._key(job_id))
        if not raw:
            return None
        total, processed = int(raw["total"]), int(raw["processed"])
        return {"id": job_id, "state": raw["state"], "total": total, "processed": processed,
                "errors": int(raw["errors"]), "progress": round(processed / total, 4) if total else 1.0,
                "drafts": bool(int(raw["drafts"]))}

    def cancel(self, job_id: str) -> dict | None:
        status = self.status(job_id)
        if status and status["state"] not in TERMINAL_STATES:
            self._end(job_id, "cancelled")
            status["state"] = "cancelled"
        return status

    def results(self, job_id: str, batch: int = 500) -> Iterator[dict]:
        """Finished rows in input order (tickets not yet processed are left out)."""
        length = self.client.llen(self._key(job_id, "order"))
        for start in range(0, length, batch):
            ids = self.client.lrange(self._key(job_id, "order"), start, start + batch - 1)
            for row in self.client.hmget(self._key(job_id, "results"), ids):
                if row:
                    yield json.loads(row)

    # -- driving ---------------------------------------------------------------------------
    def drive_in_background(self, job_id: str) -> None:
        """``run`` in a thread of its own: a job waits on the workers for minutes, and must not
        hold one of the threads the API's routes run on."""
        threading.Thread(target=self.run, args=(job_id,), daemon=True, name=f"job-{job_id[:8]}").start()

    def run(self, job_id: str) -> None:
        """Drive a job to the end, if no other process drives it (called in a background thread
        of an API process). Sends only the tickets that have no result yet."""
        lease = Lease(self.client, self._key(job_id, "driver"), self.settings.job_lease_s)
        if not lease.take():
            return
        try:
            status = self.status(job_id)
            if status is None or not self.client.eval(_START, 1, self._key(job_id)):
                return  # expired, or ended (a cancel may have come since the read)
            todo = self._unanswered(job_id)
            held = self._lease_keeper(job_id, lease)

            def stop() -> bool:  # "running" alone goes on: cancelled, ended elsewhere or expired stop
                return not held() or self.client.hget(self._key(job_id), "state") != "running"
            try:
                for rows in process_chunks(length_sorted_chunks(todo, self.settings.batch_chunk_size),
                                           status["drafts"], None, outage_s=60, cancelled=stop,
                                           priority=self.settings.batch_priority,
                                           in_flight=self.settings.batch_chunks_in_flight):
                    if self._write(job_id, rows) < 0:
                        log.warning("job %s expired or was deleted while it ran; it stops", job_id)
                        return
            except TandemError:
                self._end(job_id, "failed")
                return
            if not stop():
                self._end(job_id, "done")
        finally:
            lease.release()

    def _unanswered(self, job_id: str) -> list[dict]:
        tickets = self.client.hgetall(self._key(job_id, "tickets"))
        answered = set(self.client.hkeys(self._key(job_id, "results")))
        order = self.client.lrange(self._key(job_id, "order"), 0, -1)
        return [json.loads(tickets[i]) for i in order if i in tickets and i not in answered]

    def _lease_keeper(self, job_id: str, lease: Lease) -> Callable[[], bool]:
        """A check that renews the lease (at most every second) and says whether it is still held."""
        renewed = [time.monotonic()]
        held = [True]

        def check() -> bool:
            if held[0] and time.monotonic() - renewed[0] >= 1.0:
                held[0] = lease.renew()
                renewed[0] = time.monotonic()
                if not held[0]:
                    log.warning("job %s: lease lost; another process drives it now", job_id)
            return held[0]
        return check

    def _write(self, job_id: str, rows: list[dict]) -> int:
        """Write a chunk's rows; returns how many were new, or -1 if the job is gone."""
        args = [x for row in rows for x in (row["id"], json.dumps(row, ensure_ascii=False), int("error" in row))]
        keys = [self._key(job_id, part) for part in ("results", "", "order", "tickets")]
        return self.client.eval(_WRITE_ROWS, len(keys), *keys, self.settings.result_ttl_s, *args)

    def _end(self, job_id: str, state: str) -> None:
        keys = [self._key(job_id, part) for part in ("", "order", "results", "tickets")]
        self.client.eval(_END, len(keys) + 1, *keys, OPEN_JOBS, state, self.settings.result_ttl_s, job_id)

    def resume_orphans(self, start: Callable[[str], None]) -> list[str]:
        """Call ``start(job_id)`` for each open job that no process drives (its driver died);
        forget open jobs that ended or expired. Returns the ids started."""
        started = []
        for job_id in self.client.smembers(OPEN_JOBS):
            state = self.client.hget(self._key(job_id), "state")
            if state is None or state in TERMINAL_STATES:
                self.client.srem(OPEN_JOBS, job_id)
            elif not self.client.exists(self._key(job_id, "driver")):
                start(job_id)
                started.append(job_id)
        return started


def keep_resuming(store: JobStore, stopping: threading.Event) -> None:
    """Every half lease, take over jobs whose driver died (an API process's background thread)."""
    while not stopping.wait(store.settings.job_lease_s / 2):
        try:
            store.resume_orphans(store.drive_in_background)
        except redis.RedisError as exc:  # Redis away: try again next round
            log.warning("resuming jobs: %s", exc)
