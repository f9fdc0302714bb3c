"""Ticket jobs for the HTTP API: state and results in Redis, chunks run by the workers.

``tandem:job:{id}`` is a hash (state, total, processed, errors, drafts, created),
``tandem:job:{id}:order`` the ticket ids in input order and ``tandem:job:{id}:results``
a hash of ticket id -> result row. Everything expires with ``result_ttl_s``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import redis

from pipeline.errors import TandemError
from pipeline.settings import Settings
from workers.batch import length_sorted_chunks, process_chunks

TERMINAL_STATES = {"done", "failed", "cancelled"}


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
        for part in ("", "order", "results"):
            pipe.expire(self._key(job_id, part), ttl)
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
            self.client.hset(self._key(job_id), "state", "cancelled")
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

    def run(self, job_id: str, tickets: list[dict]) -> None:
        """Drive a job to the end (called in a background thread of the API process)."""
        status = self.status(job_id)
        if status is None or status["state"] in TERMINAL_STATES:
            return
        self.client.hset(self._key(job_id), "state", "running")
        todo = [t for t in tickets if "error" not in t]
        chunks = length_sorted_chunks(todo, self.settings.batch_chunk_size)
        try:
            for rows in process_chunks(chunks, status["drafts"], None, outage_s=60,
                                       cancelled=lambda: self.status(job_id)["state"] == "cancelled"):
                pipe = self.client.pipeline()
                pipe.hset(self._key(job_id, "results"), mapping={r["id"]: json.dumps(r, ensure_ascii=False) for r in rows})
                pipe.hincrby(self._key(job_id), "processed", len(rows))
                pipe.hincrby(self._key(job_id), "errors", sum("error" in r for r in rows))
                pipe.execute()
        except TandemError:
            self.client.hset(self._key(job_id), "state", "failed")
            return
        if self.status(job_id)["state"] != "cancelled":
            self.client.hset(self._key(job_id), "state", "done")
