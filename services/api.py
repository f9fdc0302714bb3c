"""Tandem's HTTP API (FastAPI). Routes are thin: they validate, queue work on the Celery
workers and relay Redis streams; no model runs in this process.

Errors are JSON in OpenAI's shape, ``{"error": {"message", "type", "code"}}``, so the
official client and OpenAI-compatible front ends surface them as they would OpenAI's.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Literal

import redis
import redis.asyncio as aioredis
from celery.exceptions import TimeoutError as CeleryTimeoutError
from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from kombu.exceptions import OperationalError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.chain import clean_message
from pipeline.errors import InputError, TandemError
from pipeline.settings import Settings
from workers.streams import STREAM_KEY, TERMINAL

STATIC = Path(__file__).parent / "static"
MODEL_ID = "tandem"
JOB_ID = re.compile(r"[0-9a-f]{32}")  # JobStore.create's uuid4 hex
REPLY_ID = re.compile(r"[\w-]{1,128}", re.ASCII)  # ours are uuid4 hex; a chat backend may pass its own
TIMED_OUT = {"worker_timeout", "expired"}  # error codes of a reply no gen worker wrote in time


# ---------------------------------------------------------------------- request bodies

_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def without_lone_surrogates(text: str) -> str:
    """JSON may escape half of a UTF-16 pair ("\\ud800"), which no UTF-8 encoder, Redis's
    included, will take: drop it, as clean_message drops other characters that are not text."""
    return _LONE_SURROGATE.sub("", text)


class ContentPart(BaseModel):
    """An OpenAI content part: text parts are read, other kinds (images, audio) are ignored."""
    model_config = ConfigDict(extra="allow")
    type: StrictStr
    text: StrictStr | None = None

    @model_validator(mode="after")
    def _text_parts_have_text(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a content part of type 'text' needs a 'text' string")
        return self


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI content parts: keep the text ones
            return without_lone_surrogates(" ".join(part.text or "" for part in self.content if part.type == "text"))
        return without_lone_surrogates(self.content or "")


class ChatRequest(BaseModel):
    # Examples in the OpenAPI document: /docs offers them, and schemathesis's examples phase sends them.
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": MODEL_ID, "messages": [{"role": "user", "content": "How long will my new card take to arrive?"}],
         "stream": False, "max_tokens": 64}]})
    model: str = MODEL_ID
    messages: list[ChatMessage] = Field(min_length=1)
    stream: StrictBool = False
    # Strict: pydantic's lax mode took `true` as 1 and "0.5" as 0.5, numbers the document does not allow
    # (schemathesis's coverage phase sent them, 2026-12-07).
    max_tokens: int | None = Field(default=None, ge=1, le=4096, strict=True)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, strict=True)
    user: str | None = None


# What checked_message accepts, stated in the OpenAPI document (only stated: an over-long
# message gets 413, not the validation error that max_length would give).
MESSAGE_RULES = ("Text with at least one printable character (control characters are dropped), at most "
                 "TANDEM_MAX_MESSAGE_CHARS characters (413 beyond). An empty one gets 422.")


class ReplyRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"message": "I lost my card", "session_id": "chat-42"}]})
    message: str = Field(description=MESSAGE_RULES, json_schema_extra={"minLength": 1})
    session_id: str | None = Field(default=None, max_length=200)
    use_cache: StrictBool = True


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"texts": ["I forgot my PIN", "my card payment was declined"]}]})
    texts: list[Annotated[str, Field(description=MESSAGE_RULES, json_schema_extra={"minLength": 1})]] = \
        Field(min_length=1, max_length=256)


class SearchRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"query": "how much is express delivery", "k": 2, "intents": ["card_delivery_estimate"]}]})
    query: str = Field(description=MESSAGE_RULES, json_schema_extra={"minLength": 1})
    k: int = Field(default=3, ge=1, le=50, strict=True)
    intents: list[str] | None = Field(default=None, description=(
        "Only passages of articles tagged with one of these intents. An intent that neither the intent model "
        "nor any article knows is refused (422), with the closest known one named."))


class TicketIn(BaseModel):
    id: StrictStr | StrictInt  # not a bool, which pydantic would otherwise take as 0 or 1
    text: str

    @field_validator("id", "text")
    @classmethod
    def _unicode(cls, value: str | int) -> str | int:
        # The id keys the job's results in Redis, which cannot store half a UTF-16 pair.
        if isinstance(value, str) and _LONE_SURROGATE.search(value):
            raise ValueError("is not valid Unicode (half of a UTF-16 surrogate pair)")
        return value


# ---------------------------------------------------------------------- response bodies
# Stated in the OpenAPI document, so a client generated from it reads what is sent; the API
# tests check real responses against the document.

class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


ERRORS = {
    400: "The body is not UTF-8 (bad_encoding); the message names the first bad byte.",
    401: "Missing or invalid API key.",
    404: "No such job.",
    413: "Over a size limit (message length, message count, tickets per job).",
    415: "The body is neither JSON nor a multipart upload.",
    422: "Invalid request: the message says which field and why.",
    429: "Rate limit reached; Retry-After says when to try again.",
    502: "Generation failed.",
    503: "Redis or the task queue is unreachable; the request was not taken. Retry-After says when to try again.",
    504: "No worker answered in time.",
}


def errors(*statuses: int) -> dict[int | str, dict]:
    """The error responses a route can give, each in the one error body; every route behind
    an API key can also answer 401, 429 and 503."""
    return {status: {"model": ErrorBody, "description": ERRORS[status]} for status in sorted({401, 429, 503, *statuses})}


def streamed(media_type: str, description: str, schema: dict | None = None) -> dict[int | str, dict]:
    return {200: {"content": {media_type: {"schema": schema or {"type": "string"}}}, "description": description}}


def sse_event(events: list[str] | None = None) -> dict:
    """One server-sent event as schemathesis and OpenAPI 3.2 read a stream: its fields."""
    return {"type": "object", "required": ["data"], "properties": {
        "event": {"enum": events} if events else {"type": "string"}, "id": {"type": "string"},
        "data": {"type": "string", "contentMediaType": "application/json"}}}


def link(operation_id: str, parameter: str, field: str) -> dict:
    return {"operationId": operation_id, "parameters": {parameter: f"$response.body#/{field}"}}


class IntentScore(BaseModel):
    intent: str
    confidence: float


class PassageOut(BaseModel):
    article_id: str
    title: str
    url: str
    text: str
    score: float
    intents: list[str] = []
    opens_article: bool = False


class Source(BaseModel):
    article_id: str
    title: str | None = None
    url: str | None = None


class TandemFields(BaseModel):
    """Tandem's own fields on an OpenAI response (``tandem``)."""
    reply_id: str | None = None
    intent: str | None = None
    confidence: float | None = None
    sources: list[Source] = []
    grounded: bool | None = None
    escalate: bool | None = None
    cached: bool | None = None
    reply: str | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: None = None
    tandem: TandemFields


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ReplyCreated(BaseModel):
    reply_id: str
    events: str = Field(description="Server-sent events of the reply: token, done or error.")


class JobCreated(BaseModel):
    job_id: str
    status: str
    results: str


class JobStatus(BaseModel):
    id: str
    state: Literal["queued", "running", "done", "failed", "cancelled"]
    total: int
    processed: int
    errors: int
    progress: float
    drafts: bool


class Classification(BaseModel):
    """One text's intent; a text that could not be read has only ``error``."""
    intent: str | None = None
    confidence: float | None = None
    top_intents: list[IntentScore] | None = None
    escalate: bool | None = None
    article_ids: list[str] | None = None
    error: str | None = None


class Classifications(BaseModel):
    results: list[Classification]


class SearchResults(BaseModel):
    passages: list[PassageOut]


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    redis: bool
    workers: dict[str, int] = Field(description="Live workers per queue (nlu, gen).")
    index_version: str | None
    error: str | None = None


# ---------------------------------------------------------------------- metrics

class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("tandem_http_requests_total", "HTTP requests", ["route", "method", "status"],
                                registry=self.registry)
        self.latency = Histogram("tandem_http_request_seconds", "HTTP request latency", ["route", "method"],
                                 registry=self.registry)
        self.stage = Histogram("tandem_stage_seconds", "pipeline stage latency, from finished replies", ["stage"],
                               buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=self.registry)
        self.cache = Counter("tandem_reply_cache_total", "replies by cache outcome", ["outcome"], registry=self.registry)
        self.tokens = Counter("tandem_generated_tokens_total", "token events relayed", registry=self.registry)
        self.generation_seconds = Counter("tandem_generation_seconds_total", "time spent generating",
                                          registry=self.registry)
        self.queue_depth = Gauge("tandem_queue_depth", "messages waiting per Celery queue", ["queue"],
                                 registry=self.registry)

    def reply_done(self, result: dict, tokens: int) -> None:
        for stage, ms in (result.get("timings_ms") or {}).items():
            self.stage.labels(stage).observe(ms / 1000)
        self.cache.labels("hit" if result.get("cached") else "miss").inc()
        self.tokens.inc(tokens)
        self.generation_seconds.inc((result.get("timings_ms") or {}).get("generate", 0) / 1000)


# ---------------------------------------------------------------------- errors

def error_body(message: str, kind: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "code": code}}


def _problem(error: dict) -> str:
    """One of pydantic's or FastAPI's validation errors, as a reader wants it."""
    if error.get("type") == "json_invalid":  # its location is a character offset, not a field
        return f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'decode error')} at character " \
               f"{error['loc'][-1]})"
    return f"{'.'.join(str(p) for p in error['loc'][1:]) or 'body'}: {error['msg']}"


def api_error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> HTTPException:
    return HTTPException(status, detail=error_body(message, kind, code))


# ---------------------------------------------------------------------- the app

def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    key_hashes = load_key_hashes(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from workers.app import configure

        configure(settings)
        app.state.redis = aioredis.from_url(settings.resolved_redis_url, decode_responses=True,
                                            socket_connect_timeout=2, socket_timeout=10)
        app.state.sync_redis = redis.Redis.from_url(settings.resolved_redis_url, decode_responses=True,
                                                    socket_connect_timeout=2, socket_timeout=10)
        from workers.jobs import JobStore, keep_resuming

        stopping = threading.Event()  # jobs whose API process died are taken over from here
        threading.Thread(target=keep_resuming, args=(JobStore(app.state.sync_redis, settings), stopping),
                         daemon=True, name="job-resumer").start()
        yield
        stopping.set()
        waits.shutdown(wait=False, cancel_futures=True)
        await app.state.redis.aclose()

    app = FastAPI(title="Tandem", version="0.1.0", lifespan=lifespan,
                  description="Hybrid BERT+GPT customer-service pipeline: intent, retrieval, grounded streaming replies.")
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["*"])

    @app.middleware("http")
    async def measure(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.requests.labels(path, request.method, response.status_code).inc()
        metrics.latency.labels(path, request.method).observe(time.perf_counter() - started)
        return response

    # Starlette's class, not FastAPI's subclass: routing (404, 405) and FastAPI's body parsing
    # raise Starlette's, and those answers must come in the same error body as ours.
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if isinstance(exc.detail, dict) and "error" in exc.detail:
            body = exc.detail
        elif isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI says only "error parsing the body"
            cause = exc.__cause__
            body = error_body(f"the body is not valid UTF-8 (byte 0x{cause.object[cause.start]:02x} at offset "
                              f"{cause.start}); send JSON encoded as UTF-8", "invalid_request_error", "bad_encoding")
        else:
            body = error_body(str(exc.detail), "invalid_request_error")
        headers = exc.headers
        if exc.status_code == 405:
            # Starlette names the methods of the first route on the path; GET and DELETE
            # /v1/jobs/{id} are two routes, and Allow must name every method the path takes.
            allowed = {m for route in request.app.routes if isinstance(route, APIRoute)
                       and route.path_regex.match(request.url.path) for m in route.methods}
            headers = {**(headers or {}), "Allow": ", ".join(sorted(allowed | {"HEAD"} if "GET" in allowed else allowed))}
        return JSONResponse(body, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        problems = "; ".join(_problem(e) for e in exc.errors())
        return JSONResponse(error_body(problems or "invalid request", "invalid_request_error", "validation"), 422)

    @app.exception_handler(InputError)
    async def input_error(request: Request, exc: InputError):
        return JSONResponse(error_body(str(exc), "invalid_request_error", "bad_input"), 422)

    @app.exception_handler(redis.RedisError)
    async def redis_down(request: Request, exc: redis.RedisError):
        return JSONResponse(error_body("Redis is unreachable; the request was not taken. Try again shortly.",
                                       "service_unavailable", "redis_unavailable"), 503, headers={"Retry-After": "5"})

    @app.exception_handler(OperationalError)
    async def broker_down(request: Request, exc: OperationalError):
        return JSONResponse(error_body(f"the task queue is unreachable ({exc}); the request was not taken. Try again "
                                       "shortly.", "service_unavailable", "broker_unavailable"), 503,
                            headers={"Retry-After": "5"})

    @app.exception_handler(TandemError)
    async def tandem_error(request: Request, exc: TandemError):
        return JSONResponse(error_body(str(exc), "server_error"), 500)

    # -------------------------------------------------------------- auth and limits
    async def authorised(request: Request) -> str:
        if not key_hashes:
            return "anonymous"
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        digest = hashlib.sha256(token.encode()).hexdigest()
        if not token or digest not in key_hashes:
            raise api_error(401, "missing or invalid API key (send Authorization: Bearer <key>)",
                            "authentication_error", "invalid_api_key")
        window = int(time.time() // 60)
        bucket = f"tandem:rate:{digest[:16]}:{window}"
        count = await request.app.state.redis.incr(bucket)
        if count == 1:
            await request.app.state.redis.expire(bucket, 120)
        if count > settings.rate_limit_per_minute:
            retry = str(60 - int(time.time()) % 60)
            raise HTTPException(429, detail=error_body(
                f"rate limit of {settings.rate_limit_per_minute} requests a minute reached; retry in {retry} s",
                "rate_limit_error", "rate_limited"), headers={"Retry-After": retry})
        return digest[:16]

    def checked_message(text: str, where: str = "") -> str:
        """``where`` names the text among several (``texts[3]: ``), so a caller can find it."""
        if len(text) > settings.max_message_chars:
            raise api_error(413, f"{where}message is {len(text)} characters; the limit is "
                                 f"{settings.max_message_chars}", code="message_too_long")
        try:
            return clean_message(text, settings.max_message_chars)
        except InputError as exc:
            raise InputError(f"{where}{exc}") from None

    # Waits on workers get threads of their own: on the default executor, whose few threads
    # (6 on 2 cores) run every route's Redis calls too, a handful of requests waiting on a busy
    # or restarting worker held up chats and jobs. A thread is still needed per wait: get()
    # drains the result pub/sub messages, which polling the result would leave to pile up.
    waits = ThreadPoolExecutor(max_workers=64, thread_name_prefix="worker-wait")

    async def worker_result(async_result, what: str):
        deadline = time.monotonic() + settings.request_timeout_s

        def wait():  # the time spent queued for a thread counts against the timeout too
            return async_result.get(timeout=max(deadline - time.monotonic(), 0.001))
        try:
            return await asyncio.get_running_loop().run_in_executor(waits, wait)
        except (TimeoutError, CeleryTimeoutError):  # Celery's is not the built-in one
            raise api_error(504, f"no {what} worker answered within {settings.request_timeout_s:.0f} s",
                            "service_unavailable", "worker_timeout") from None

    # -------------------------------------------------------------- pages and health
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz", operation_id="health")
    async def healthz() -> Health:
        return Health(status="ok")

    not_ready = {"model": Readiness, "description": "Not ready: Redis, a worker queue or the index is missing."}

    @app.get("/readyz", operation_id="readiness", response_model=Readiness, responses={503: not_ready})
    async def readyz(request: Request) -> JSONResponse:
        checks: dict = {"redis": False, "workers": {}, "index_version": None}
        try:
            await request.app.state.redis.ping()
            checks["redis"] = True
            for queue in ("nlu", "gen"):
                keys = [k async for k in request.app.state.redis.scan_iter(f"tandem:worker:{queue}:*")]
                checks["workers"][queue] = len(keys)
                if keys and checks["index_version"] is None:
                    checks["index_version"] = json.loads(await request.app.state.redis.get(keys[0]) or "{}").get(
                        "index_version")
        except redis.RedisError as exc:
            checks["error"] = f"Redis unreachable: {exc}"
        ready = checks["redis"] and all(checks["workers"].get(q) for q in ("nlu", "gen")) and bool(checks["index_version"])
        return JSONResponse({"ready": ready, **checks}, status_code=200 if ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus(request: Request) -> Response:
        from workers.app import QUEUES, queue_keys

        try:
            for queue in QUEUES:
                depth = [await request.app.state.redis.llen(key) for key in queue_keys(queue)]
                metrics.queue_depth.labels(queue).set(sum(depth))
        except redis.RedisError:
            pass  # the scrape still reports the rest
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -------------------------------------------------------------- chat
    @app.get("/v1/models", operation_id="listModels", responses=errors())
    async def models(_: str = Depends(authorised)) -> ModelList:
        return ModelList(data=[ModelCard(id=MODEL_ID, created=0, owned_by="tandem")])

    @app.post("/v1/chat/completions", operation_id="createChatCompletion", response_model=ChatCompletion, responses={
        **errors(400, 413, 422, 502, 504), 200: {"content": {"text/event-stream": {"schema": sse_event()}},
                                       "description": "The completion; with stream=true, OpenAI's chunks as server-sent events."}})
    async def chat_completions(body: ChatRequest, request: Request, _: str = Depends(authorised)):
        if len(body.messages) > settings.max_messages:
            raise api_error(413, f"{len(body.messages)} messages; the limit is {settings.max_messages}",
                            code="too_many_messages")
        turns = [m for m in body.messages if m.role in ("user", "assistant")]
        if not turns or turns[-1].role != "user":
            raise api_error(422, "the last message must come from the user", code="no_user_message")
        message = checked_message(turns[-1].text())
        history = [{"role": m.role, "content": m.text()[: settings.max_message_chars]} for m in turns[:-1]]
        limits = {k: v for k, v in {"max_tokens": body.max_tokens, "temperature": body.temperature}.items()
                  if v is not None}
        await request.app.state.redis.ping()  # fail fast with 503 rather than queue into a dead broker
        reply_id = await asyncio.to_thread(_submit, message, None, True, history, limits or None)
        completion_id = f"chatcmpl-{reply_id}"
        created = int(time.time())
        events = relay(request.app.state.redis, reply_id, None)
        if body.stream:
            return StreamingResponse(openai_chunks(events, completion_id, created, body.model),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, result = "", None
        async for _, kind, data in events:
            if kind == "token":
                text += data["text"]
            elif kind == "done":
                result = data
            elif kind == "error" and data.get("code") in TIMED_OUT:
                raise api_error(504, data["message"], "service_unavailable", "worker_timeout")
            elif kind == "error":
                raise api_error(502, data.get("message", "generation failed"), "server_error", "generation_failed")
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result["reply"]},
                             "finish_reason": "stop"}],
                "usage": None, "tandem": extension(result)}

    async def relay(client, reply_id: str, last_id: str | None) -> AsyncIterator[tuple[str, str, dict]]:
        """The reply's events from Redis, resuming after ``last_id``; records metrics at the end."""
        cursor = last_id or "0-0"
        deadline = time.monotonic() + settings.request_timeout_s
        tokens = 0
        while time.monotonic() < deadline:
            try:
                response = await client.xread({STREAM_KEY.format(reply_id): cursor}, block=1000, count=100)
            except (redis.ConnectionError, redis.TimeoutError):
                # Redis is restarting: the worker writing this reply waits for it too
                # (workers.streams.connect), so wait here rather than cut the reply off.
                await asyncio.sleep(0.5)
                continue
            for _, entries in response or []:
                for event_id, fields in entries:
                    cursor = event_id
                    kind = fields.get("event", "")
                    data = json.loads(fields.get("data", "null"))
                    tokens += kind == "token"
                    if kind == "done":
                        metrics.reply_done(data, tokens)
                    yield event_id, kind, data
                    if kind in TERMINAL:
                        return
                deadline = time.monotonic() + settings.request_timeout_s
        yield "", "error", {"message": f"no reply within {settings.request_timeout_s:.0f} s; is a gen worker running?",
                            "code": "worker_timeout"}

    # -------------------------------------------------------------- Tandem's own reply stream
    @app.post("/v1/replies", status_code=202, operation_id="createReply", responses={
        **errors(400, 413, 422), 202: {"description": "Taken; read the reply from its events.",
                                       "links": {"events": link("replyEvents", "reply_id", "reply_id")}}})
    async def create_reply(body: ReplyRequest, request: Request, _: str = Depends(authorised)) -> ReplyCreated:
        message = checked_message(body.message)
        await request.app.state.redis.ping()
        reply_id = await asyncio.to_thread(_submit, message, body.session_id, body.use_cache, None, None)
        return ReplyCreated(reply_id=reply_id, events=f"/v1/replies/{reply_id}/events")

    @app.get("/v1/replies/{reply_id}/events", operation_id="replyEvents", response_class=StreamingResponse, responses={
        **errors(422), **streamed("text/event-stream", "The reply's events (meta, token, done, error), resumable with "
                                  "Last-Event-ID.", sse_event(["meta", "token", "done", "error"]))})
    async def reply_events(reply_id: str, request: Request, last_event_id: str | None = Query(default=None),
                           _: str = Depends(authorised)):
        if not REPLY_ID.fullmatch(reply_id):  # it names a Redis key: "x:writer" read another key's type
            raise api_error(422, f"{reply_id[:40]!r} is not a reply id (letters, digits, '-' and '_')",
                            code="bad_reply_id")
        resume = request.headers.get("last-event-id") or last_event_id
        if resume is not None and not re.fullmatch(r"\d+(-\d+)?", resume):
            raise api_error(422, f"Last-Event-ID {resume[:40]!r} is not an event id from this stream (like 1700000000000-0)",
                            code="bad_event_id")

        async def sse() -> AsyncIterator[str]:
            async for event_id, kind, data in relay(request.app.state.redis, reply_id, resume):
                yield f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # -------------------------------------------------------------- tickets and jobs
    # The route reads a JSON body itself (a list, or an upload instead): state it beside the upload.
    tickets_body = {"type": "array", "minItems": 1, "items": TicketIn.model_json_schema()}

    @app.post("/v1/tickets", status_code=202, operation_id="createJob", responses={
        **errors(400, 413, 415, 422), 202: {"description": "Taken; the job runs on the workers.", "links": {
            "status": link("getJob", "job_id", "job_id"), "results": link("getJobResults", "job_id", "job_id"),
            "cancel": link("cancelJob", "job_id", "job_id")}}}, openapi_extra={
        "requestBody": {"content": {"application/json": {"schema": tickets_body}}}})
    async def create_job(request: Request, drafts: bool = Query(default=True), _: str = Depends(authorised),
                         file: UploadFile | None = File(default=None)) -> JobCreated:
        from workers.batch import parse_tickets
        from workers.jobs import JobStore

        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if file is None and content_type and content_type not in ("application/json", "multipart/form-data") \
                and not content_type.endswith("+json"):
            # A form (curl -d's default) has been read as one by now, and its body is gone.
            raise api_error(415, f"a {content_type} body; send a JSON list of {{id, text}} objects "
                                 "(Content-Type: application/json) or upload a CSV/JSONL file as 'file'",
                            code="unsupported_media_type")
        if file is None and content_type.startswith("multipart/"):
            raise api_error(422, "no file in the upload; send a CSV (id,text) or JSONL file of tickets as 'file'",
                            code="bad_tickets")
        if file is not None:
            raw = await file.read() if hasattr(file, "read") else b""
            if not raw.strip():
                raise api_error(422, "the uploaded file is empty; send a CSV (id,text) or JSONL file of tickets",
                                code="bad_tickets")
            name = getattr(file, "filename", "") or "upload"
            kind = "csv" if name.endswith(".csv") or getattr(file, "content_type", "") == "text/csv" else "jsonl"
            tickets = parse_tickets(raw, kind, name)
        else:
            try:
                payload = await request.json()
            except ValueError:
                raise api_error(422, "send a JSON list of {id, text} objects, or upload a CSV/JSONL file as 'file'",
                                code="bad_tickets") from None
            if not isinstance(payload, list) or not payload:
                raise api_error(422, "the body must be a non-empty JSON list of {id, text} objects", code="bad_tickets")
            try:
                tickets = [TicketIn.model_validate(t).model_dump() for t in payload]
            except ValueError as exc:
                raise api_error(422, f"bad ticket: {exc}", code="bad_tickets") from None
            tickets = [{"id": str(t["id"]), "text": t["text"]} for t in tickets]
            if len({t["id"] for t in tickets}) != len(tickets):
                raise api_error(422, "ticket ids must be unique", code="duplicate_ids")
        if len(tickets) > settings.max_batch_tickets:
            raise api_error(413, f"{len(tickets)} tickets; the limit is {settings.max_batch_tickets} per job",
                            code="too_many_tickets")
        store = JobStore(request.app.state.sync_redis, settings)
        job_id = await asyncio.to_thread(store.create, tickets, drafts)
        store.drive_in_background(job_id)
        return JobCreated(job_id=job_id, status=f"/v1/jobs/{job_id}", results=f"/v1/jobs/{job_id}/results")

    def job_store(request: Request):
        from workers.jobs import JobStore

        return JobStore(request.app.state.sync_redis, settings)

    async def existing_job(action, job_id: str) -> dict:
        # Checked before it names a Redis key: "<id>:results" read another key as the job's hash.
        status = await asyncio.to_thread(action, job_id) if JOB_ID.fullmatch(job_id) else None
        if status is None:
            raise api_error(404, f"no job {job_id}", code="not_found")
        return status

    @app.get("/v1/jobs/{job_id}", operation_id="getJob", responses=errors(404, 422))
    async def job_status(job_id: str, request: Request, _: str = Depends(authorised)) -> JobStatus:
        return JobStatus.model_validate(await existing_job(job_store(request).status, job_id))

    @app.get("/v1/jobs/{job_id}/results", operation_id="getJobResults", response_class=StreamingResponse, responses={
        **errors(404, 422), **streamed("application/x-ndjson", "The finished rows, one JSON object a line, in input order.")})
    async def job_results(job_id: str, request: Request, _: str = Depends(authorised)):
        store = job_store(request)
        await existing_job(store.status, job_id)

        def lines():
            for row in store.results(job_id):
                yield json.dumps(row, ensure_ascii=False) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.delete("/v1/jobs/{job_id}", operation_id="cancelJob", responses=errors(404, 422))
    async def cancel_job(job_id: str, request: Request, _: str = Depends(authorised)) -> JobStatus:
        return JobStatus.model_validate(await existing_job(job_store(request).cancel, job_id))

    # -------------------------------------------------------------- BERT side only
    @app.post("/v1/classify", operation_id="classify", response_model_exclude_unset=True,
              responses=errors(400, 413, 422, 504))
    async def classify(body: ClassifyRequest, _: str = Depends(authorised)) -> Classifications:
        from workers.tasks import understand_batch

        for i, text in enumerate(body.texts):
            checked_message(text, where=f"texts[{i}]: ")
        tickets = [{"id": str(i), "text": t} for i, t in enumerate(body.texts)]
        rows = await worker_result(await asyncio.to_thread(understand_batch.delay, tickets), "nlu")
        return Classifications(results=[Classification.model_validate(row) for row in rows])

    @app.post("/v1/search", operation_id="search", responses=errors(400, 413, 422, 504))
    async def search(body: SearchRequest, _: str = Depends(authorised)) -> SearchResults:
        from workers.tasks import search as search_task

        query = checked_message(body.query)
        passages = await worker_result(await asyncio.to_thread(search_task.delay, query, body.k, body.intents), "nlu")
        return SearchResults.model_validate({"passages": passages})

    return app


def _submit(message, session_id, use_cache, history, limits) -> str:
    from workers.client import submit_message

    return submit_message(message, session_id=session_id, use_cache=use_cache, history=history, limits=limits)


def extension(result: dict) -> dict:
    """Tandem's own fields on an OpenAI response: one documented object."""
    return {"reply_id": result.get("reply_id"), "intent": result.get("intent"), "confidence": result.get("confidence"),
            "sources": [{"article_id": p["article_id"], "title": p.get("title"), "url": p.get("url")}
                        for p in result.get("passages", []) if p["article_id"] in result.get("sources", [])],
            "grounded": result.get("grounded"), "escalate": result.get("escalate"), "cached": result.get("cached"),
            "reply": result.get("reply")}


async def openai_chunks(events, completion_id: str, created: int, model: str) -> AsyncIterator[str]:
    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    streamed = False
    async for _, kind, data in events:
        if kind == "token":
            text = data["text"]
            # An OpenAI client cannot take back a draft that went out: mark where what replaces it
            # starts. With TANDEM_GUARD_HOLD_SENTENCES none may have: then there is nothing to mark.
            if data.get("restart") and streamed:
                label = "[Correction, quoted from our help centre]" if data.get("quoted") else "[Correction]"
                text = f"\n\n{label} {text.lstrip()}"
            streamed = streamed or bool(data["text"].strip())
            yield chunk({"content": text})
        elif kind == "done":
            yield chunk({}, "stop", tandem=extension(data))
        elif kind == "error":
            yield f"data: {json.dumps(error_body(data.get('message', 'generation failed'), 'server_error'))}\n\n"
    yield "data: [DONE]\n\n"


def load_key_hashes(settings: Settings) -> set[str]:
    """SHA-256 hex digests of the accepted API keys; plain keys are not kept."""
    hashes = {hashlib.sha256(k.encode()).hexdigest() for k in settings.api_keys if k}
    if settings.api_keys_file:
        try:
            lines = settings.api_keys_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise InputError(f"cannot read TANDEM_API_KEYS_FILE {settings.api_keys_file}: {exc}") from None
        for line in (line.strip() for line in lines):
            if not line or line.startswith("#"):
                continue
            is_digest = len(line) == 64 and all(c in "0123456789abcdef" for c in line)
            hashes.add(line if is_digest else hashlib.sha256(line.encode()).hexdigest())
    return hashes
