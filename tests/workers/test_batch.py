"""Which of a job's chunks count as lost (logic only; the broker side runs for real in
test_workers.py's Redis-comes-back-empty test)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import workers.app
from workers import batch


@dataclass
class Step:
    """What ``_lost`` reads of a Celery AsyncResult: its id, the chain step before it, its state."""

    id: str
    parent: Step | None = None
    state: str = "PENDING"
    result: object = None

    def failed(self) -> bool:
        return self.state == "FAILURE"

    def ready(self) -> bool:
        return self.state in ("SUCCESS", "FAILURE")

    def get(self, disable_sync_subtasks: bool = True) -> object:
        return self.result


@pytest.fixture
def drafting(monkeypatch) -> set[str]:
    """The chunks whose draft lease a worker holds."""
    leased: set[str] = set()
    monkeypatch.setattr(batch, "_drafting", lambda task_id: task_id in leased)
    return leased


@pytest.fixture
def broker(monkeypatch, drafting) -> list[set[str]]:
    """The ids the broker holds at each of ``_lost``'s two looks, in order."""
    looks: list[set[str]] = []
    monkeypatch.setattr(workers.app, "tasks_in_broker", lambda: looks.pop(0))
    monkeypatch.setattr(batch.time, "sleep", lambda seconds: None)
    return looks


def test_a_chunk_nowhere_in_the_broker_and_without_a_result_is_lost(broker):
    broker += [{"other"}, {"other"}]
    assert batch._lost([Step("a")]) == ["a"]


def test_a_chunk_queued_or_held_at_either_look_is_not_lost(broker):
    broker += [{"a"}, set()]
    assert batch._lost([Step("a"), Step("b")]) == ["b"]
    broker += [set(), {"b"}]
    assert batch._lost([Step("a"), Step("b")]) == ["a"]


def test_a_chain_whose_first_step_the_broker_holds_is_not_lost(broker):
    understand = Step("understand")
    broker += [{"understand"}, set()]
    assert batch._lost([Step("draft", parent=understand)]) == []


def test_a_chunk_with_a_result_or_an_error_is_not_lost(broker):
    done = Step("done", state="SUCCESS", result=[{"id": "t1"}])
    failed_first_step = Step("draft", parent=Step("understand", state="FAILURE", result=ValueError("bad")))
    broker += [set(), set()]
    assert batch._lost([done, failed_first_step, Step("lost")]) == ["lost"]


def test_a_chunk_a_worker_drafts_under_its_lease_is_not_lost(broker, drafting):
    # A copy the broker handed out again acknowledged the task's message and stopped; the
    # worker that holds the lease still drafts the chunk.
    drafting.add("a")
    broker += [set(), set()]
    assert batch._lost([Step("a"), Step("b")]) == ["b"]


def test_a_jsonl_line_that_is_not_valid_unicode_is_a_ticket_with_an_error():
    # JSON may escape half a surrogate pair; Redis, which keys a job's results by id, cannot store it.
    raw = b'{"id": 1, "text": "hi"}\n{"id": 2, "text": "hi \\ud800"}\n{"id": "\\udc00", "text": "hi"}\n'
    tickets = batch.parse_tickets(raw, "jsonl")
    assert [t["id"] for t in tickets] == ["1", "line-2", "line-3"]
    assert "error" not in tickets[0]
    assert all("not valid Unicode" in t["error"] and t["text"].encode() for t in tickets[1:])


def test_a_cancelled_chunk_revokes_every_step_of_its_chain():
    # A chunk's result is its chain's last step (the drafts): revoking that alone left the
    # understand step to run for a job already cancelled.
    revoked: list[str] = []

    @dataclass
    class Result:  # what _revoke_chain reads of a Celery AsyncResult
        id: str
        parent: Result | None = None

        def revoke(self) -> None:
            revoked.append(self.id)

    batch._revoke_chain(Result("draft", Result("understand")))
    assert revoked == ["draft", "understand"]
