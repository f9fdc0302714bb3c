"""What a chat backend calls: queue one message through the chain, then read its stream."""

from __future__ import annotations

import time
import uuid

from celery import chain

from pipeline.chain import clean_message
from pipeline.settings import Settings
from workers.tasks import classify, report_failure, respond, retrieve


def submit_message(message: str | bytes, session_id: str | None = None, use_cache: bool = True,
                   reply_id: str | None = None, settings: Settings | None = None,
                   history: list[dict] | None = None, limits: dict | None = None) -> str:
    """Queue classify -> retrieve -> respond; returns the reply id whose stream carries the events.

    The message is checked here first, so a bad one fails at once with InputError
    instead of as an event. A reply no gen worker has begun within TANDEM_REQUEST_TIMEOUT_S
    of now, when its reader has given up, ends with an ``expired`` error instead of being
    written (``respond``)."""
    settings = settings or Settings()
    message = clean_message(message, settings.max_message_chars)
    reply_id = reply_id or uuid.uuid4().hex
    deadline = time.time() + settings.request_timeout_s
    workflow = chain(classify.s(message), retrieve.s(),
                     respond.s(reply_id, session_id, use_cache, history, limits, deadline))
    workflow.apply_async(link_error=report_failure.si(reply_id))
    return reply_id
