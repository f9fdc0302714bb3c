"""The Celery app. Two queues so the BERT and GPT stages scale apart:
``nlu`` (classify, retrieve, understand_batch) and ``gen`` (respond, draft_batch).

JSON only: a pickle from the broker is refused. Tasks are acknowledged after they
finish and re-queued if their worker dies, so a killed worker loses nothing; a task
taken by a dead worker returns to the queue after ``visibility_timeout_s``.
"""

from __future__ import annotations

import json

import redis
from celery import Celery
from kombu.transport import redis as kombu_redis

from pipeline.settings import Settings

app = Celery("tandem", include=["workers.tasks"])

QUEUES = ("nlu", "gen")
ROUTES = {
    "tandem.classify": {"queue": "nlu"},
    "tandem.retrieve": {"queue": "nlu"},
    "tandem.understand_batch": {"queue": "nlu"},
    "tandem.respond": {"queue": "gen"},
    "tandem.draft_batch": {"queue": "gen"},
    "tandem.report_failure": {"queue": "nlu"},
    "tandem.search": {"queue": "nlu"},
}


def queue_keys(queue: str) -> list[str]:
    """The Redis lists that hold a queue's waiting tasks: kombu keeps one per priority level
    (batch jobs' tasks wait in a lower one than chats', TANDEM_BATCH_PRIORITY)."""
    return [queue, *(f"{queue}{kombu_redis.Channel.sep}{p}" for p in kombu_redis.PRIORITY_STEPS if p)]


def queued_tasks(client: redis.Redis, queue: str) -> int:
    """Tasks waiting in ``queue``, at every priority."""
    return sum(client.llen(key) for key in queue_keys(queue))


def workers_idle(client: redis.Redis) -> bool:
    """No task waits in any queue and no worker runs one (a worker that does not answer counts as busy)."""
    if sum(queued_tasks(client, queue) for queue in QUEUES):
        return False
    return not any((app.control.inspect(timeout=1).active() or {"": [1]}).values())


def waiting_ahead(client: redis.Redis, queue: str, priority: int) -> int:
    """Tasks waiting in ``queue`` that a worker takes before one of ``priority``: those in
    kombu's lists for lower priority numbers (a chat's 0 ahead of a batch job's 9)."""
    keys = queue_keys(queue)
    own = max(i for i, step in enumerate(kombu_redis.PRIORITY_STEPS) if step <= priority)
    return sum(client.llen(key) for key in keys[:own])


def tasks_in_broker() -> set[str]:
    """Ids of the tasks the broker holds: waiting in one of our queues (at any priority), or
    taken by a worker and not yet acknowledged (kombu's ``unacked`` hash, from which a dead
    worker's tasks return). A task that is in neither and has no result has been lost."""
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        client = channel.client
        payloads = [json.loads(item) for queue in QUEUES for key in queue_keys(queue)
                    for item in client.lrange(key, 0, -1)]
        payloads += [json.loads(item)[0] for item in client.hvals(channel.unacked_key)]
    return {(payload.get("headers") or {}).get("id") for payload in payloads} - {None}


def declare_queues() -> None:
    """Declare our queues and their bindings. Workers declare them when they connect; a Redis
    that came back empty has none until they reconnect, and kombu files a task sent to a queue
    without a binding under its dead-letter list, where no worker looks."""
    with app.connection_for_write() as connection:
        for name in QUEUES:
            app.amqp.queues[name](connection.default_channel).declare()


class _BrokerChannel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> dict:
        # When Redis drops while a threads-pool worker holds unacknowledged tasks, Celery
        # 5.7 closes the broken connection twice; the second close asks this channel for a
        # client after the first detached it, and kombu's AttributeError killed the worker
        # ("Unrecoverable error"). A connection error is what Celery rides out: it
        # reconnects, and the unacknowledged tasks come back after the visibility timeout.
        if self.connection.client is None:
            raise redis.exceptions.ConnectionError("the broker connection is already closed")
        return super()._connparams(asynchronous)


class BrokerTransport(kombu_redis.Transport):
    """kombu's Redis transport, with the channel above."""

    Channel = _BrokerChannel


def configure(settings: Settings | None = None) -> Celery:
    settings = settings or Settings()
    url = settings.resolved_redis_url
    app.conf.update(
        # rediss:// and sentinel URLs keep kombu's own transport (and its TLS defaults).
        broker_transport="workers.app:BrokerTransport" if url.startswith("redis://") else None,
        broker_url=url,
        result_backend=url,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a generation task can take seconds: never hoard them
        result_expires=settings.result_ttl_s,
        task_routes=ROUTES,
        task_default_queue="nlu",
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # keep reconnecting while Redis is away
        # A task running when the broker connection drops carries on (its Redis writes ride
        # out the outage, workers.streams.connect); its ack then fails on the dead connection,
        # it comes back after the visibility timeout and `respond` sees its stream is finished.
        # Set here because Celery 6 turns the default around.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        result_backend_always_retry=True,
        result_backend_max_retries=60,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,  # Flower and `celery events` can watch the workers
        task_send_sent_event=True,
    )
    return app


configure()
