"""Job bookkeeping in a real redis-server: the driver's lease, takeover of orphaned jobs,
rows counted once. (Driving a job through real workers is in tests/services/test_api.py.)"""

from __future__ import annotations

import contextlib

import pytest
import redis

from workers.jobs import OPEN_JOBS, JobStore


@pytest.fixture
def redis_client(redis_server):
    """A database of its own, emptied: the open-jobs set is one key per database, which other
    tests' jobs and the session API process's own resume loop (database 0) share."""
    from workers.streams import connect

    client = connect(f"redis://127.0.0.1:{redis_server.port}/8")
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def store(redis_client, worker_settings):
    return JobStore(redis_client, worker_settings)


def tickets(n: int) -> list[dict]:
    return [{"id": f"t{i}", "text": f"where is my card {i}"} for i in range(n)]


def test_a_job_driven_elsewhere_is_left_alone(store, redis_client):
    job = store.create(tickets(3), drafts=False)
    redis_client.set(f"tandem:job:{job}:driver", "another-process", px=10_000)
    store.run(job)  # returns at once: nothing is sent, the state is untouched
    assert store.status(job)["state"] == "queued" and store.status(job)["processed"] == 0
    assert redis_client.get(f"tandem:job:{job}:driver") == "another-process"


def test_orphaned_jobs_are_resumed_and_ended_ones_forgotten(store, redis_client):
    orphan, driven, cancelled, expired = (store.create(tickets(2), drafts=False) for _ in range(4))
    redis_client.set(f"tandem:job:{driven}:driver", "alive", px=10_000)
    store.cancel(cancelled)
    redis_client.sadd(OPEN_JOBS, cancelled)  # as if the cancel had raced a resume
    redis_client.delete(f"tandem:job:{expired}")
    started: list[str] = []
    # Exactly: this database holds no job but these four.
    assert store.resume_orphans(started.append) == started == [orphan]
    open_jobs = redis_client.smembers(OPEN_JOBS)
    assert {orphan, driven} <= open_jobs and not {cancelled, expired} & open_jobs


def test_rows_written_twice_are_counted_once(store):
    job = store.create([*tickets(3), {"id": "bad", "error": "the text is empty"}], drafts=False)
    store._write(job, [{"id": "t0", "intent": "card_arrival"}, {"id": "t1", "error": "worker failed"}])
    store._write(job, [{"id": "t1", "intent": "card_arrival"}, {"id": "t2", "intent": "card_arrival"}])  # t1 again
    status = store.status(job)
    assert status["processed"] == 4 and status["errors"] == 2  # "bad" and the first t1
    assert [r["id"] for r in store.results(job)] == ["t0", "t1", "t2", "bad"]
    assert [t["id"] for t in store._unanswered(job)] == []


class _DiesAfterFirstRoundTrip:
    """The store's Redis client for a driver killed right after its first round trip to Redis."""

    def __init__(self, client: redis.Redis):
        self.client, self.round_trips = client, 0

    def _round_trip(self) -> None:
        self.round_trips += 1
        if self.round_trips > 1:
            raise redis.ConnectionError("the driver was killed")

    def pipeline(self, *args, **kwargs):
        pipe = self.client.pipeline(*args, **kwargs)
        execute = pipe.execute

        def once_alive(*a, **k):
            self._round_trip()
            return execute(*a, **k)
        pipe.execute = once_alive
        return pipe

    def eval(self, *args):
        self._round_trip()
        return self.client.eval(*args)


def test_a_driver_killed_while_writing_leaves_no_row_uncounted(store, redis_client):
    # Rows written without their count were skipped by the next driver, and the job ended
    # "done" short of its total.
    job = store.create(tickets(3), drafts=False)
    store.client = _DiesAfterFirstRoundTrip(redis_client)
    with contextlib.suppress(redis.ConnectionError):
        store._write(job, [{"id": "t0", "intent": "card_arrival"}, {"id": "t1", "error": "worker failed"}])
    store.client = redis_client
    status = store.status(job)
    assert status["processed"] == redis_client.hlen(f"tandem:job:{job}:results") == 2 and status["errors"] == 1


def job_keys(job: str) -> list[str]:
    return [f"tandem:job:{job}{part}" for part in ("", ":order", ":results")]


def test_every_key_of_a_job_expires_and_its_end_renews_them(store, redis_client, worker_settings):
    # The results hash is created by the first chunk's rows: an EXPIRE at create time found
    # no key, and every job's rows outlived the rest of it for good.
    job = store.create(tickets(2), drafts=False)
    store._write(job, [{"id": "t0", "intent": "card_arrival"}])
    for key in job_keys(job):
        redis_client.expire(key, 50)  # as if the job had run for almost all of result_ttl_s
    store._write(job, [{"id": "t1", "intent": "card_arrival"}])
    ttls = [redis_client.ttl(key) for key in job_keys(job)]
    assert all(worker_settings.result_ttl_s - 5 <= ttl <= worker_settings.result_ttl_s for ttl in ttls), ttls
    for key in job_keys(job):
        redis_client.expire(key, 50)
    store._end(job, "done")
    ttls = [redis_client.ttl(key) for key in job_keys(job)]
    assert all(worker_settings.result_ttl_s - 5 <= ttl <= worker_settings.result_ttl_s for ttl in ttls), ttls
    assert not redis_client.exists(f"tandem:job:{job}:tickets")


def test_a_job_that_expired_is_not_written_again(store, redis_client):
    # Its rows or its end would make a hash without a total, which status() cannot read.
    job = store.create(tickets(2), drafts=False)
    redis_client.delete(*job_keys(job))
    assert store._write(job, [{"id": "t0", "intent": "card_arrival"}]) == -1
    store._end(job, "done")
    assert not any(redis_client.exists(key) for key in job_keys(job))
    assert store.status(job) is None and job not in redis_client.smembers(OPEN_JOBS)


def test_a_cancel_that_lands_while_the_driver_starts_stands(store, redis_client, monkeypatch):
    # The driver read "queued", then the job was cancelled, then the driver would have set
    # "running" over it and ended the job "done".
    job = store.create(tickets(2), drafts=False)
    store._write(job, [{"id": "t0", "intent": "card_arrival"}, {"id": "t1", "intent": "card_arrival"}])
    queued = store.status(job)
    store.cancel(job)
    monkeypatch.setattr(store, "status", lambda job_id: dict(queued))
    store.run(job)
    assert redis_client.hget(f"tandem:job:{job}", "state") == "cancelled"
