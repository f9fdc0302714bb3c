"""Celery tasks: the pipeline's stages, for one message (a chain) or a chunk of tickets.

A worker loads its models once, when it starts (``worker_init``), never per task.
Tasks take and return small JSON: texts, ids, intents, passages; never tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

import redis
from celery.exceptions import Ignore
from celery.signals import worker_init

from pipeline.chain import Done, HybridPipeline, Meta, Token, Understanding, clean_message
from pipeline.errors import TandemError
from pipeline.settings import Settings
from workers.app import app, waiting_ahead
from workers.streams import (
    CHUNK_LEASE_KEY,
    ConversationMemory,
    Lease,
    ReplyCache,
    ReplyLeases,
    ReplyStream,
    ResumingWriter,
    Superseded,
    connect,
)

log = logging.getLogger(__name__)
_pipeline: HybridPipeline | None = None
_lock = threading.Lock()
_writing: dict[str, dict] = {}  # the replies this process is writing (id -> task arguments), whose leases it renews
_writing_lock = threading.Lock()


def get_pipeline(with_responder: bool = True) -> HybridPipeline:
    global _pipeline
    with _lock:
        if _pipeline is None:
            _pipeline = HybridPipeline.from_settings(_settings(), load_responder=with_responder)
        elif with_responder:
            _pipeline.responder.warm_up()
    return _pipeline


def worker_queues() -> list[str]:
    return os.environ.get("TANDEM_WORKER_QUEUES", "nlu,gen").split(",")


def load_worker_pipeline() -> HybridPipeline:
    """The models the worker's queues need, loaded once; raises TandemError where they do not load.
    `tandem worker` calls this before Celery starts: Celery logs and swallows an error raised in
    a worker_init handler, and the worker would report ready and fail every task."""
    queues = worker_queues()
    if _pipeline is None:  # the worker_init handler calls this again, on the models already loaded
        log.info("loading models for queues %s", queues)
    pipeline = get_pipeline(with_responder="gen" in queues)
    # ONNX Runtime takes the thread count from the pipeline; only an encoder on torch needs torch
    # told, and importing torch for nothing would cost the worker 280 MB.
    if _settings().encoder_threads and pipeline.encoder.runtime != "onnxruntime-int8":
        import torch

        torch.set_num_threads(_settings().encoder_threads)
    return pipeline


@worker_init.connect
def load_models(**_) -> None:
    queues = worker_queues()
    pipeline = load_worker_pipeline()
    threading.Thread(target=_heartbeat, args=(queues, pipeline), daemon=True).start()
    if _settings().index_reload_s:
        threading.Thread(target=_watch_index, args=(pipeline,), daemon=True).start()
    if "gen" in queues:
        threading.Thread(target=_watch_replies, daemon=True).start()


def _heartbeat(queues: list[str], pipeline: HybridPipeline) -> None:
    """Tell /readyz this worker is up, which queues it serves and which index it serves."""
    name = f"{socket.gethostname()}:{os.getpid()}"
    while True:
        try:
            client = _redis()
            for queue in queues:
                client.set(f"tandem:worker:{queue}:{name}", json.dumps({"index_version": pipeline.index.version}),
                           ex=30)
        except Exception as exc:  # Redis away: /readyz will say so; keep trying
            log.warning("heartbeat failed: %s", exc)
        time.sleep(10)


def _watch_index(pipeline: HybridPipeline) -> None:
    """Serve the help centre as `tandem index` last saved it. Both queues' workers reload: the
    nlu side retrieves from the index, and the gen side keys cached replies by its version."""
    while True:
        time.sleep(_settings().index_reload_s)
        try:
            if pipeline.reload_index():
                log.info("knowledge index reloaded: version %s", pipeline.index.version)
        except Exception as exc:  # a broken folder: keep serving the index already loaded
            log.warning("knowledge index not reloaded: %s", exc)


def _watch_replies() -> None:
    """Renew the leases of the replies this process writes, and queue again those whose
    worker died (ReplyLeases): their streams go on where they stopped."""
    while True:
        try:
            with _writing_lock:
                mine = dict(_writing)
            leases = _leases()
            for reply_id in leases.hold(mine):  # its writer here finds out at its next piece (Superseded)
                log.warning("reply %s was taken over by another worker", reply_id)
            for reply_id, task in leases.orphans(skip=set(mine)):
                log.warning("reply %s lost its worker; queueing it again", reply_id)
                respond.apply_async(kwargs=task)
        except Exception as exc:  # Redis away: the leases lapse, and whoever is up takes over
            log.warning("reply leases not renewed: %s", exc)
        time.sleep(_settings().reply_lease_s / 3)


def _leases() -> ReplyLeases:
    settings = _settings()
    return ReplyLeases(_redis(), settings.reply_lease_s, settings.reply_stream_ttl_s, settings.visibility_timeout_s,
                       owner=f"{socket.gethostname()}:{os.getpid()}:{_BOOT}")


# With the pid, tells this process's leases from those of a worker that died and was started
# again in a container that gave it the same name and pid.
_BOOT = secrets.token_hex(4)


@functools.cache
def _settings() -> Settings:
    """Read once per worker process: the environment does not change under a running worker."""
    return Settings()


@functools.cache
def _redis():
    """One connection pool per worker process, not one per task."""
    return connect(_settings().resolved_redis_url)


def _progress(key: str | None, n: int) -> None:
    """Best effort: a progress bar must not fail the work it reports on (Redis may be restarting)."""
    if not key:
        return
    try:
        client = _redis()
        client.incrby(key, n)
        client.expire(key, _settings().result_ttl_s)
    except redis.RedisError as exc:
        log.warning("progress update lost: %s", exc)


# ------------------------------------------------------------------ one message

@app.task(name="tandem.classify")
def classify(message: str) -> dict:
    return get_pipeline(False).classify([message])[0].to_dict()


@app.task(name="tandem.retrieve")
def retrieve(understanding: dict) -> dict:
    return get_pipeline(False).add_passages([Understanding.from_dict(understanding)])[0].to_dict()


@app.task(name="tandem.search")
def search(query: str, k: int = 3, intents: list[str] | None = None) -> list[dict]:
    return [p.to_dict() for p in get_pipeline(False).search(query, k, intents)]


@app.task(name="tandem.respond")
def respond(understanding: dict, reply_id: str, session_id: str | None = None, use_cache: bool = True,
            history: list[dict] | None = None, limits: dict | None = None, deadline: float | None = None) -> dict:
    """Write the reply's events to its Redis stream; return the final result.

    ``history`` holds earlier turns the caller sent (an OpenAI-style request);
    ``session_id`` adds those Redis remembers. ``deadline`` (epoch seconds): when the reply's
    reader stops waiting for its first event."""
    settings = _settings()
    client = _redis()
    stream = ReplyStream(client, reply_id, settings.reply_stream_maxlen, settings.reply_stream_ttl_s)
    if stream.finished():  # redelivered after a worker died past the end: the client already has it
        return {"reply_id": reply_id, "redelivered": True}
    if deadline is not None and time.time() > deadline and not client.exists(stream.key):
        # No one reads it any more. After a gen worker outage, replies queued meanwhile would
        # otherwise be written first, each making new chats wait past their own deadline, and
        # a session's memory would gain turns its user never saw. A begun reply (redelivered,
        # or queued again after a takeover, which passes no deadline) is finished whatever the time.
        log.warning("reply %s waited past its deadline for a gen worker; not written", reply_id)
        stream.publish("error", {"message": "no gen worker took this reply up before its client stopped waiting; "
                                            "send it again", "code": "expired"})
        return {"reply_id": reply_id, "expired": True}
    task = {"understanding": understanding, "reply_id": reply_id, "session_id": session_id, "use_cache": use_cache,
            "history": history, "limits": limits}
    with _writing_lock:
        if reply_id in _writing:
            # Delivered again while this process still writes it: after a broker reconnect, kombu
            # restores tasks left unacknowledged past the visibility timeout. The writer here
            # finishes the reply; a second one would decode beside other replies, in another
            # batch, and greedy decoding is not bit-for-bit the same across batches, so its text
            # could part from what the client has (CI, threads pool, Redis restarted mid-reply).
            log.warning("reply %s delivered again while this worker writes it; the duplicate stops", reply_id)
            return {"reply_id": reply_id, "duplicate": True}
        _writing[reply_id] = task
    leases = _leases()
    try:
        if leases.hold({reply_id: task}):
            # A copy delivered to this worker while another one, alive, writes the reply.
            log.warning("reply %s is being written by another worker; the duplicate stops", reply_id)
            return {"reply_id": reply_id, "duplicate": True}
        stream.claim()  # before ResumingWriter reads what is already written: no one else adds to it now
        result = _write_reply(stream, understanding, reply_id, session_id, use_cache, history, limits)
    except Superseded:  # taken for dead and handed to another worker, which writes the rest
        log.warning("reply %s was handed to another worker; this one stops", reply_id)
        return {"reply_id": reply_id, "superseded": True}
    except Exception:
        # Not one of the pipeline's own errors, which end the stream in _write_reply. End it
        # here, since a task queued again after a takeover has no errback to do so, and release
        # the lease: left to lapse, it would have the task queued again and again.
        with contextlib.suppress(Exception):
            if not stream.finished():
                stream.publish("error", {"message": "the request failed in a worker; try again"})
        leases.release(reply_id)
        raise
    finally:
        with _writing_lock:
            _writing.pop(reply_id, None)
    leases.release(reply_id)
    return result


def _write_reply(stream: ReplyStream, understanding: dict, reply_id: str, session_id: str | None, use_cache: bool,
                 history: list[dict] | None, limits: dict | None) -> dict:
    settings = _settings()
    client = stream.client
    pipeline = get_pipeline()
    u = Understanding.from_dict(understanding)
    memory = ConversationMemory(client, settings.memory_turns, settings.memory_ttl_s)
    history = [*(memory.history(session_id) if session_id else []), *(history or [])]
    cache = ReplyCache(client, settings.cache_ttl_s)
    key = ReplyCache.key(u.message, u.intent, u.index_version or pipeline.index.version, pipeline.reply_identity)
    generation = None
    if limits:  # per-request max_tokens / temperature; such replies are not cached
        base = pipeline.responder.limits
        generation = dataclasses.replace(
            base, max_tokens=min(int(limits.get("max_tokens") or base.max_tokens), base.max_tokens * 4),
            temperature=float(limits.get("temperature", base.temperature)))
        use_cache = False
    # A reply that depends on earlier turns is not reusable for the same message elsewhere.
    cached = cache.get(key) if use_cache and not history else None
    writer = ResumingWriter(stream)
    try:
        if cached:
            writer.meta(_meta(u, cached=True))
            for piece in cached["tokens"]:
                writer.token(piece["text"], piece.get("restart", False), piece.get("quoted", False))
            result = {**cached["result"], "cached": True}
        else:
            tokens: list[dict] = []
            result = {}
            # Closed at once if a writer that has been superseded stops: that frees its decode slot.
            with contextlib.closing(pipeline.respond(u, history, generation)) as events:
                for event in events:
                    if isinstance(event, Meta):
                        writer.meta(_meta(u, cached=False))
                    elif isinstance(event, Token):
                        tokens.append({"text": event.text, **({"restart": True} if event.restart else {}),
                                       **({"quoted": True} if event.quoted else {})})
                        writer.token(event.text, event.restart, event.quoted)
                    elif isinstance(event, Done):
                        result = {**event.result.to_dict(), "cached": False}
            if use_cache and not history:
                cache.put(key, {"tokens": tokens, "result": result})
        result["reply_id"] = reply_id
        if writer.resumed:
            result["resumed"] = True
        if session_id:  # before "done": a client's next message must see this turn; once, whoever writes it
            memory.append(session_id, u.message, result["reply"], turn_id=reply_id)
        writer.done(result)
    except TandemError as exc:
        stream.publish("error", {"message": str(exc)})
        return {"reply_id": reply_id, "error": str(exc)}
    return result


def _meta(u: Understanding, cached: bool) -> dict:
    return {"intent": u.intent, "confidence": u.confidence, "top_intents": u.top_intents, "escalate": u.escalate,
            "sources": [{"article_id": p.article_id, "title": p.title, "url": p.url, "score": p.score}
                        for p in u.passages], "cached": cached}


# ------------------------------------------------------------------ batches

@app.task(name="tandem.understand_batch")
def understand_batch(tickets: list[dict], progress_key: str | None = None) -> list[dict]:
    """Classify and retrieve a chunk of tickets in one batched encoder pass.

    Returns one row per ticket, in order; a bad ticket gets an ``error`` and the rest go on."""
    pipeline = get_pipeline(False)
    rows: list[dict] = [{"id": t["id"], "text": t.get("text", "")} for t in tickets]
    good = []
    for row in rows:
        try:
            row["text"] = clean_message(row["text"], pipeline.settings.max_message_chars)
            good.append(row)
        except TandemError as exc:
            row["error"] = str(exc)
    if good:
        for row, u in zip(good, pipeline.understand([r["text"] for r in good])):
            row.update(intent=u.intent, confidence=u.confidence, top_intents=u.top_intents, escalate=u.escalate,
                       article_ids=list(dict.fromkeys(p.article_id for p in u.passages)), understanding=u.to_dict())
    _progress(progress_key, len(rows))
    return rows


@app.task(name="tandem.draft_batch", bind=True)
def draft_batch(self, rows: list[dict], progress_key: str | None = None) -> list[dict]:
    """Draft a reply for each understood ticket of a chunk.

    A chat that arrives while chunks draft would wait for a whole chunk: on the solo pool for
    the task, on the threads pool for a thread, all of which a large job's chunks can hold. A
    chunk queued behind chats then starts no more drafts and, once those under way end, hands
    the rest (its finished rows kept) back to the queue behind the chat, under the same task id.

    The broker hands a task out again once it has gone unacknowledged for the visibility
    timeout, and a chunk can draft for longer than that (behind other chunks at the draft
    gate, on a busy worker). The copy finds the chunk's lease held, or its result stored, and
    stops without a result of its own (Ignore), so the chunk is drafted once."""
    pipeline, settings = get_pipeline(), _settings()
    lease = Lease(_redis(), CHUNK_LEASE_KEY.format(self.request.id), settings.reply_lease_s)
    if self.AsyncResult(self.request.id).successful() or not lease.take():
        log.warning("draft chunk %s delivered again while it is drafted or after it finished; the copy stops",
                    self.request.id)
        raise Ignore()
    # Behind chats for a reply slot too, at the priority the chunk was queued with (TANDEM_BATCH_PRIORITY).
    priority = int((self.request.delivery_info or {}).get("priority") or 0)
    limits = dataclasses.replace(pipeline.responder.limits, priority=priority)
    yield_to_chats = priority > 0
    yielded = threading.Event()
    at_once = settings.responder_slots
    if yield_to_chats:
        # No more drafts at once, over every chunk this worker runs, than may decode (llama_cpp
        # leaves chat slots free): a draft started beyond that only waits for a slot, and a
        # chunk whose drafts all wait can hand back at once.
        at_once = getattr(pipeline.responder.backend, "draft_slots", at_once)
        gate = _draft_gate(at_once)

    def draft(row: dict) -> None:
        if row.get("understanding") is None:  # failed understanding, or drafted before the chunk was handed back
            return
        if yield_to_chats and not _draft_turn(gate, priority, yielded):
            return
        understanding = row.pop("understanding")
        try:
            result = pipeline.run_understood(Understanding.from_dict(understanding), limits=limits)
            row.update(reply=result.reply, grounded=result.grounded)
        except TandemError as exc:
            row["error"] = str(exc)
        finally:
            if yield_to_chats:
                gate.release()

    # The chunk's drafts at once (the responder batches their decoding), within the gate.
    with ThreadPoolExecutor(max_workers=at_once) as pool:
        drafts = [pool.submit(draft, row) for row in rows]
        while wait(drafts, timeout=settings.reply_lease_s / 3).not_done:
            _keep(lease)
        for future in drafts:
            future.result()
    undrafted = sum(row.get("understanding") is not None for row in rows)
    if yielded.is_set() and undrafted:
        log.info("draft chunk %s: a chat waits; %d of %d drafts handed back behind it", self.request.id,
                 undrafted, len(rows))
        lease.release()  # the rest comes back under this task id, and must find the chunk free
        return self.replace(draft_batch.s(rows, progress_key).set(priority=priority))
    _progress(progress_key, len(rows))
    # The lease is left to lapse: a copy delivered before this result is stored still finds it held.
    return rows


def _keep(lease: Lease) -> None:
    """Renew a chunk's lease, or take it again where Redis lost it. Best effort: a Redis away
    only means a copy delivered meanwhile may draft the chunk too."""
    try:
        if not lease.renew() and not lease.take():
            log.warning("draft chunk lease %s is held by another worker", lease.key)
    except redis.RedisError as exc:
        log.warning("draft chunk lease not renewed: %s", exc)


_gate: threading.BoundedSemaphore | None = None
_gate_lock = threading.Lock()
_chat_seen = (0.0, -1, False)  # (monotonic time, priority, answer): _chat_waits' last answer
_chat_lock = threading.Lock()


def _draft_gate(size: int) -> threading.BoundedSemaphore:
    """The draft slots every chunk in this process shares."""
    global _gate
    with _gate_lock:
        if _gate is None:
            _gate = threading.BoundedSemaphore(size)
        return _gate


def _draft_turn(gate: threading.BoundedSemaphore, priority: int, yielded: threading.Event) -> bool:
    """Wait for a draft slot; False (and ``yielded`` set) once a chat waits ahead of the chunk."""
    while not yielded.is_set():
        if _chat_waits(priority):
            yielded.set()
        elif gate.acquire(timeout=0.5):
            return True
    return False


def _chat_waits(priority: int) -> bool:
    """Whether a task waits in the gen queue ahead of ``priority``. Every waiting draft thread
    of every chunk asks, so one answer serves them all for a quarter of a second. Best effort:
    a Redis that cannot be asked lets the chunk carry on."""
    global _chat_seen
    with _chat_lock:
        seen_at, seen_for, answer = _chat_seen
        if time.monotonic() - seen_at < 0.25 and seen_for == priority:
            return answer
        try:
            answer = waiting_ahead(_redis(), "gen", priority) > 0
        except redis.RedisError:
            answer = False
        _chat_seen = (time.monotonic(), priority, answer)
        return answer


@app.task(name="tandem.report_failure")
def report_failure(reply_id: str) -> None:
    """Errback of a message's chain: a stage failed outside the pipeline's own error handling."""
    settings = _settings()
    stream = ReplyStream(_redis(), reply_id, settings.reply_stream_maxlen, settings.reply_stream_ttl_s)
    if not stream.finished():
        stream.publish("error", {"message": "the request failed in a worker; try again"})
