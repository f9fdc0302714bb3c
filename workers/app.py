"""The Celery app. Two queues so the BERT and GPT stages scale apart:
``nlu`` (classify, retrieve, understand_batch) and ``gen`` (respond, draft_batch).

JSON only: a pickle from the broker is refused. Tasks are acknowledged after they
finish and re-queued if their worker dies, so a killed worker loses nothing; a task
taken by a dead worker returns to the queue after ``visibility_timeout_s``.
"""

from __future__ import annotations

from celery import Celery

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


def configure(settings: Settings | None = None) -> Celery:
    settings = settings or Settings()
    url = settings.resolved_redis_url
    app.conf.update(
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
        result_backend_always_retry=True,
        result_backend_max_retries=60,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,  # Flower and `celery events` can watch the workers
        task_send_sent_event=True,
    )
    return app


configure()
