"""workers.app's reads of kombu's queue lists, against the tests' private redis-server."""

from __future__ import annotations

import uuid

from workers.app import queue_keys, queued_tasks, waiting_ahead


def test_waiting_ahead_counts_only_the_lists_a_worker_takes_first(redis_client):
    queue = f"test-{uuid.uuid4().hex[:8]}"  # not nlu or gen: the session's workers would take these
    chats, step_3, step_6, jobs = queue_keys(queue)  # kombu's lists for priorities 0, 3, 6 and 9
    try:
        redis_client.rpush(chats, "a", "b")
        redis_client.rpush(step_6, "c")
        redis_client.rpush(jobs, "d", "e", "f")
        assert waiting_ahead(redis_client, queue, 9) == 3
        assert waiting_ahead(redis_client, queue, 7) == 2  # kombu files priority 7 under 6
        assert waiting_ahead(redis_client, queue, 6) == 2
        assert waiting_ahead(redis_client, queue, 3) == 2
        assert waiting_ahead(redis_client, queue, 0) == 0
        assert queued_tasks(redis_client, queue) == 6
    finally:
        redis_client.delete(chats, step_3, step_6, jobs)
