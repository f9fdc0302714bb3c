"""Logic of the draft chunks' hand-back to chats, without a worker (tests/workers/test_workers.py runs it in one)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import redis

from workers import tasks


def test_a_draft_waits_for_a_slot_and_stops_waiting_once_a_chat_waits(monkeypatch):
    chat = threading.Event()
    monkeypatch.setattr(tasks, "_chat_waits", lambda priority: chat.is_set())
    gate, yielded = threading.BoundedSemaphore(1), threading.Event()
    assert tasks._draft_turn(gate, 9, yielded), "a free slot is taken"
    turn: list[bool] = []
    waiting = threading.Thread(target=lambda: turn.append(tasks._draft_turn(gate, 9, yielded)))
    waiting.start()
    time.sleep(0.8)
    assert waiting.is_alive() and not turn, "the second draft waits for the slot the first holds"
    chat.set()
    waiting.join(30)  # a bound for a hang: it sees the chat within half a second of an idle machine
    assert turn == [False] and yielded.is_set()
    gate.release()
    chat.clear()
    assert not tasks._draft_turn(gate, 9, yielded), "a chunk that yielded starts no more drafts"


def test_one_answer_about_waiting_chats_serves_every_draft_thread_for_a_moment(monkeypatch):
    asked: list[int] = []
    # A clock the test moves: on two loaded cores, 50 calls may not fit in the real quarter second.
    now = [1000.0]
    monkeypatch.setattr(tasks, "time", SimpleNamespace(monotonic=lambda: now[0], time=time.time, sleep=time.sleep))
    monkeypatch.setattr(tasks, "_redis", lambda: None)
    monkeypatch.setattr(tasks, "_chat_seen", (0.0, -1, False))
    monkeypatch.setattr(tasks, "waiting_ahead", lambda client, queue, priority: asked.append(priority) or 1)
    assert all(tasks._chat_waits(9) for _ in range(50))
    now[0] += 0.2
    assert tasks._chat_waits(9)
    assert asked == [9]
    assert tasks._chat_waits(5) and asked == [9, 5], "another priority is asked about afresh"
    now[0] += 0.3
    assert tasks._chat_waits(5) and asked == [9, 5, 5], "and the answer expires"


def test_a_redis_that_cannot_be_asked_lets_the_chunk_carry_on(monkeypatch):
    def down(client, queue, priority):
        raise redis.ConnectionError("gone")

    monkeypatch.setattr(tasks, "_redis", lambda: None)
    monkeypatch.setattr(tasks, "_chat_seen", (0.0, -1, True))
    monkeypatch.setattr(tasks, "waiting_ahead", down)
    assert tasks._chat_waits(9) is False
