"""Redis structures the workers share with clients: reply streams, the reply cache,
conversation memory and leases.

A reply streams through ``tandem:reply:{reply_id}`` as events ``meta``, ``token``...,
then ``done`` or ``error``; each entry holds ``event`` and a JSON ``data`` field. A token
with ``"restart": true`` begins a second draft after the guard rejected the first, or the
answer the guard quoted from the help centre after it rejected every draft (that token also
carries ``"quoted": true``): a client replaces the text it showed. The tokens from the last
restart on, joined, are the reply ``done`` carries. A consumer resumes after the last id it saw, so a reconnect
loses nothing and repeats nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import Iterator

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from pipeline.errors import TandemError

STREAM_KEY = "tandem:reply:{}"
TERMINAL = {"done", "error"}
CHUNK_LEASE_KEY = "tandem:chunk:{}:lease"  # held by the worker drafting a batch chunk (task id)
WRITING = "tandem:replies:writing"  # ids of the replies workers have begun and not finished
# An XADD that only the reply's latest writer may make (ReplyStream.claim); nil for any other.
# A Redis that lost its data (restarted without persistence) has no writer: the first to
# write claims the reply again rather than every writer stopping. Each event carries its
# writer's sequence number (ARGV[6]): when Redis went down after the XADD but before its reply
# reached the worker, the client's retry finds the event already last and adds nothing, where
# it had written a token twice ("Activatingivating", a Redis restart in the test suite).
_FENCED_XADD = """
local writer = redis.call('get', KEYS[2])
if writer and writer ~= ARGV[1] then return false end
local last = redis.call('xrevrange', KEYS[1], '+', '-', 'COUNT', 1)[1]
if last then
  local fields = last[2]
  for i = 1, #fields, 2 do
    if fields[i] == 'seq' and fields[i + 1] == ARGV[6] then return last[1] end
  end
end
local id = redis.call('xadd', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'event', ARGV[3], 'data', ARGV[4],
                      'seq', ARGV[6])
redis.call('set', KEYS[2], ARGV[1], 'EX', ARGV[5])
redis.call('expire', KEYS[1], ARGV[5])
return id
"""
# ReplyLeases: KEYS are the lease, the task, the takeover mark and the WRITING set; ARGV[1]
# the owner. A lease that another owner holds is left as it is (0).
_HOLD_LEASE = """
local holder = redis.call('get', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('set', KEYS[2], ARGV[3], 'EX', ARGV[4])
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('del', KEYS[3])
redis.call('sadd', KEYS[4], ARGV[5])
return 1
"""
_RELEASE_LEASE = """
local holder = redis.call('get', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('del', KEYS[1], KEYS[2], KEYS[3])
redis.call('srem', KEYS[4], ARGV[2])
return 1
"""
# Extend or drop a Lease only while its holder still holds it.
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
_RETRY_CAP_S = 2.0  # the longest wait between two reconnection attempts


def connect(url: str, outage_s: float = 30.0) -> redis.Redis:
    """A client that rides out a Redis restart of up to about ``outage_s`` seconds.

    redis-py's default retries give up after about 5 s, so a reply being written while
    Redis restarted failed with an error event; with this budget its tokens carry on
    where they stopped."""
    retries = int(outage_s / _RETRY_CAP_S) + 4  # the first few waits are short
    retry = Retry(ExponentialBackoff(cap=_RETRY_CAP_S, base=0.05), retries)
    # The socket timeout must outlast XREAD's BLOCK (redis-py's default of 5 s does not).
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=10, socket_timeout=30,
                                socket_connect_timeout=5, retry=retry,
                                retry_on_error=[redis.ConnectionError, redis.TimeoutError])


class Superseded(Exception):
    """Another worker has taken this reply over: the one that raised this must stop writing it.

    Not a TandemError: the reply has not failed, so no error event may be written for it."""


class ReplyStream:
    """The writing end of one reply's stream."""

    def __init__(self, client: redis.Redis, reply_id: str, maxlen: int = 2000, ttl_s: int = 3600):
        self.client = client
        self.key = STREAM_KEY.format(reply_id)
        self.maxlen = maxlen
        self.ttl_s = ttl_s
        self.writer: int | None = None  # set by claim
        self.sequence = 0  # events this writer has published: with ``writer``, what makes a retry idempotent
        self._fenced_xadd = None  # the script a claimed writer publishes through, made once by claim

    def claim(self) -> None:
        """Become the reply's only writer: any writer that claimed it before can no longer
        publish (Superseded), so a worker taken for dead that wakes up again cannot interleave
        its text with its successor's."""
        pipe = self.client.pipeline()
        pipe.incr(f"{self.key}:writer")
        pipe.expire(f"{self.key}:writer", self.ttl_s)
        self.writer = pipe.execute()[0]
        self._fenced_xadd = self.client.register_script(_FENCED_XADD)

    def publish(self, event: str, data: dict | str) -> str:
        payload = json.dumps(data, ensure_ascii=False)
        if self._fenced_xadd is not None:
            self.sequence += 1
            event_id = self._fenced_xadd(keys=[self.key, f"{self.key}:writer"],
                                         args=[self.writer, self.maxlen, event, payload, self.ttl_s,
                                               f"{self.writer}:{self.sequence}"])
            if event_id is None:
                raise Superseded(f"{self.key} has a newer writer")
            return event_id
        pipe = self.client.pipeline()
        pipe.xadd(self.key, {"event": event, "data": payload}, maxlen=self.maxlen, approximate=True)
        pipe.expire(self.key, self.ttl_s)
        return pipe.execute()[0]

    def finished(self) -> bool:
        """True when the stream already ends in done or error (a redelivered task must not write twice)."""
        last = self.client.xrevrange(self.key, count=1)
        return bool(last) and last[0][1].get("event") in TERMINAL

    def sent_so_far(self) -> str | None:
        """The token text already in the stream; None when the stream is empty."""
        entries = self.client.xrange(self.key)
        if not entries:
            return None
        return "".join(json.loads(f["data"])["text"] for _, f in entries if f.get("event") == "token")


class ResumeError(TandemError):
    """A redelivered reply whose new text does not continue what the client already has."""


class ResumingWriter:
    """Writes a reply's events; after a redelivery, only what the client does not have yet.

    A worker that dies mid-reply leaves `meta` and some tokens in the stream, and its task
    comes back (acks_late) to write the reply again. Greedy decoding writes the same text,
    so the stream carries on where it stopped instead of starting the reply a second time.
    Text that differs (sampling, another model) cannot be taken back: that is an error."""

    def __init__(self, stream: ReplyStream):
        self.stream = stream
        self.sent = stream.sent_so_far()
        self.produced = ""

    @property
    def resumed(self) -> bool:
        return self.sent is not None

    def meta(self, data: dict) -> None:
        if not self.resumed:
            self.stream.publish("meta", data)

    def token(self, text: str, restart: bool = False, quoted: bool = False) -> None:
        """Resuming compares all the token text written so far, both drafts' (a retry that
        replays the same drafts writes the restart at the same place)."""
        start = len(self.produced)
        self.produced += text
        flag = {**({"restart": True} if restart else {}), **({"quoted": True} if quoted else {})}
        if not self.resumed:
            self.stream.publish("token", {"text": text, **flag})
            return
        overlap = min(len(self.produced), len(self.sent))
        if self.produced[start:overlap] != self.sent[start:overlap]:  # what came before was checked already
            raise ResumeError(_DIVERGED)
        if len(self.produced) > len(self.sent):
            # A restart already in the stream was sent with the text before it.
            self.stream.publish("token", {"text": self.produced[max(start, len(self.sent)):],
                                          **(flag if start >= len(self.sent) else {})})

    def done(self, result: dict) -> None:
        if self.resumed and len(self.produced) < len(self.sent):
            raise ResumeError(_DIVERGED)
        self.stream.publish("done", result)


_DIVERGED = "the worker writing this reply stopped, and its retry wrote a different reply; ask again"


class Lease:
    """A key one holder owns at a time, for ``lease_s`` after it last renewed it: a job's driver
    (workers.jobs) and a draft chunk's worker (workers.tasks) hold one while they work, so a
    second copy of their work stops at the start, and the key lapses if its holder dies."""

    def __init__(self, client: redis.Redis, key: str, lease_s: float):
        self.client = client
        self.key = key
        self.lease_ms = int(lease_s * 1000)
        self.token = uuid.uuid4().hex

    def take(self) -> bool:
        """Hold the key, unless someone else does."""
        return bool(self.client.set(self.key, self.token, nx=True, px=self.lease_ms))

    def renew(self) -> bool:
        """Extend the lease; False if it lapsed or another holder has it now."""
        return bool(self.client.eval(_RENEW, 1, self.key, self.token, self.lease_ms))

    def release(self) -> None:
        self.client.eval(_RELEASE, 1, self.key, self.token)


class ReplyLeases:
    """Which replies live workers are writing, so that one whose worker died is handed to
    another within seconds rather than when the broker's visibility timeout (minutes) would
    redeliver its task.

    A worker holds a lease on each reply it writes, keeps the task's arguments beside it and
    renews the lease while it works. A reply whose lease lapsed before its stream ended is an
    orphan; ``orphans`` hands each one to a single caller, which queues its task again.

    A lease names its ``owner`` (one per worker process), so that a copy of the task that
    reaches another worker while the lease is live (the broker redelivers what it thinks
    unacknowledged) is turned away instead of taking the reply over."""

    def __init__(self, client: redis.Redis, lease_s: float, ttl_s: int, takeover_s: float, owner: str = ""):
        self.client = client
        self.lease_ms = int(lease_s * 1000)
        self.ttl_s = ttl_s
        # A handed-over task waits in the queue this long before it may be handed over again.
        self.takeover_ms = int(takeover_s * 1000)
        self.owner = owner
        self._hold = client.register_script(_HOLD_LEASE)
        self._release = client.register_script(_RELEASE_LEASE)

    @staticmethod
    def _key(reply_id: str, part: str) -> str:
        return f"{STREAM_KEY.format(reply_id)}:{part}"

    def hold(self, tasks: dict[str, dict]) -> set[str]:
        """Take or renew the lease on each reply id of ``tasks``, whose values are the keyword
        arguments that write that reply again; return the ids whose live lease another owner
        holds, which are left alone. Renewing writes everything again, so a Redis that lost
        its data meanwhile knows these replies once more."""
        if not tasks:
            return set()
        pipe = self.client.pipeline()
        for reply_id, task in tasks.items():
            self._hold(keys=self._keys(reply_id), client=pipe,
                       args=[self.owner, self.lease_ms, json.dumps(task, ensure_ascii=False), self.ttl_s, reply_id])
        return {reply_id for reply_id, held in zip(tasks, pipe.execute()) if not held}

    def release(self, reply_id: str) -> None:
        """Forget the reply, unless another owner holds its lease now (it took the reply over)."""
        self._release(keys=self._keys(reply_id), args=[self.owner, reply_id])

    def _keys(self, reply_id: str) -> list[str]:
        return [self._key(reply_id, "lease"), self._key(reply_id, "task"), self._key(reply_id, "takeover"), WRITING]

    def orphans(self, skip: set[str] = frozenset()) -> list[tuple[str, dict]]:
        """Replies whose writer stopped renewing before the end, each with its task's arguments,
        each handed to one caller only; ``skip``: the replies the caller is writing itself."""
        found = []
        # Every gen worker scans every lease/3 s: one round trip for all the leases, whatever their number.
        writing = sorted(self.client.smembers(WRITING) - set(skip))
        with self.client.pipeline(transaction=False) as pipe:
            for reply_id in writing:
                pipe.exists(self._key(reply_id, "lease"))
            held = pipe.execute()
        for reply_id in (r for r, leased in zip(writing, held) if not leased):
            task = self.client.get(self._key(reply_id, "task"))
            if task is None or ReplyStream(self.client, reply_id).finished():
                self.release(reply_id)  # ended (or expired) without saying so
                continue
            if self.client.set(self._key(reply_id, "takeover"), 1, nx=True, px=self.takeover_ms):
                found.append((reply_id, json.loads(task)))
        return found


def stream_reply(client: redis.Redis, reply_id: str, last_id: str | None = None, block_ms: int = 2000,
                 timeout_s: float = 120.0) -> Iterator[tuple[str, str, dict | str]]:
    """Yield ``(event_id, event, data)`` after ``last_id`` until ``done`` or ``error``.

    Raises TimeoutError when nothing arrives for ``timeout_s`` (a worker that died
    before writing its first event)."""
    key = STREAM_KEY.format(reply_id)
    cursor = last_id or "0-0"
    quiet_since = time.monotonic()
    while True:
        response = client.xread({key: cursor}, block=block_ms, count=100)
        if not response:
            if time.monotonic() - quiet_since > timeout_s:
                raise TimeoutError(f"no event on reply {reply_id} for {timeout_s:.0f} s")
            continue
        quiet_since = time.monotonic()
        for event_id, fields in response[0][1]:
            cursor = event_id
            event = fields.get("event", "")
            yield event_id, event, json.loads(fields.get("data", "null"))
            if event in TERMINAL:
                return


def normalise_message(message: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s£$€%.]", " ", message.lower())).strip(" .")


class ReplyCache:
    """Final replies keyed by what produced them; a new index version makes old entries unreachable."""

    def __init__(self, client: redis.Redis, ttl_s: int):
        self.client = client
        self.ttl_s = ttl_s

    @staticmethod
    def key(message: str, intent: str, index_version: str, identity: str) -> str:
        """``identity``: the generator and guard settings that shaped the reply."""
        digest = hashlib.sha256(json.dumps([normalise_message(message), intent, index_version, identity]).encode())
        return f"tandem:cache:{digest.hexdigest()}"

    def get(self, key: str) -> dict | None:
        value = self.client.get(key)
        return json.loads(value) if value else None

    def put(self, key: str, value: dict) -> None:
        self.client.set(key, json.dumps(value, ensure_ascii=False), ex=self.ttl_s)


# The turn's marker and the turn go in together, or neither does.
_APPEND_ONCE = """
if not redis.call('SET', KEYS[2], 1, 'NX', 'EX', ARGV[4]) then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[1], ARGV[2])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""


class ConversationMemory:
    """The last N turns of a session, oldest first, as chat messages."""

    def __init__(self, client: redis.Redis, turns: int, ttl_s: int):
        self.client = client
        self.turns = turns
        self.ttl_s = ttl_s
        self._append_once = client.register_script(_APPEND_ONCE)  # sends nothing to Redis yet

    def history(self, session_id: str) -> list[dict]:
        return [json.loads(item) for item in self.client.lrange(f"tandem:session:{session_id}", 0, -1)]

    def append(self, session_id: str, user: str, assistant: str, turn_id: str) -> bool:
        """Add a turn once per ``turn_id`` (the reply's id): a worker taken for dead that wakes up
        and finishes the reply its successor also wrote does not add it twice."""
        key = f"tandem:session:{session_id}"
        turn = [json.dumps({"role": "user", "content": user}), json.dumps({"role": "assistant", "content": assistant})]
        return bool(self._append_once(keys=[key, f"{key}:turn:{turn_id}"], args=[*turn, 2 * self.turns, self.ttl_s]))
