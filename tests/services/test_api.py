"""The HTTP API against a real redis-server and real workers; the official openai client."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi.testclient import TestClient

from pipeline.settings import Settings

from ..helpers import free_port, wait_until
from .conftest import KEY, OpenAPIDocument, start_api, stop_api


def auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def test_openai_client_non_streamed(api):
    from openai import OpenAI

    client = OpenAI(base_url=f"{api}/v1", api_key=KEY)
    completion = client.chat.completions.create(model="tandem", messages=[
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "How long does card delivery take?"}])
    assert completion.choices[0].message.content.strip()
    assert completion.choices[0].finish_reason == "stop"
    extension = completion.model_extra["tandem"]
    assert extension["intent"] == "card_delivery_estimate"
    assert extension["sources"] and isinstance(extension["grounded"], bool)
    assert [m.id for m in client.models.list()] == ["tandem"]


def test_openai_client_streamed(api):
    from openai import OpenAI

    client = OpenAI(base_url=f"{api}/v1", api_key=KEY)
    stream = client.chat.completions.create(model="tandem", stream=True, max_tokens=40, messages=[
        {"role": "user", "content": "Can I use Apple Pay with my card?"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 5 and text.strip()
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].model_extra["tandem"]["intent"] == "apple_pay_or_google_pay"


def test_a_chat_completion_matches_the_openapi_document(api, openapi):
    body = {"messages": [{"role": "user", "content": "How long does card delivery take?"}], "max_tokens": 16}
    completion = openapi.check(httpx.post(f"{api}/v1/chat/completions", json=body, headers=auth(), timeout=120)).json()
    assert completion["choices"][0]["message"]["content"].strip() and completion["tandem"]["intent"]
    with httpx.stream("POST", f"{api}/v1/chat/completions", json={**body, "stream": True}, headers=auth(),
                      timeout=120) as streamed:
        assert openapi.check(streamed).headers["content-type"].startswith("text/event-stream")
        assert list(streamed.iter_lines())[-2:] == ["data: [DONE]", ""]


def test_the_openapi_check_refuses_what_the_document_does_not_state():
    from services.api import create_app

    openapi = OpenAPIDocument(create_app(Settings()).openapi())

    def response(method: str, path: str, status: int, body) -> httpx.Response:
        return httpx.Response(status, json=body, request=httpx.Request(method, f"http://api{path}"))

    error = {"error": {"message": "no job x", "type": "invalid_request_error", "code": "not_found"}}
    openapi.check(response("GET", "/v1/jobs/x", 404, error))
    refused = [
        response("GET", "/v1/jobs/x", 418, error),  # a status the route does not state
        response("POST", "/v1/search", 422, {"detail": [{"loc": ["body"], "msg": "x", "type": "x"}]}),  # FastAPI's own shape
        response("GET", "/v1/jobs/x", 200, {"id": "x", "state": "lost"}),  # a body off its schema
        response("GET", "/v1/nowhere", 200, {}),  # a route the document does not have
    ]
    for wrong in refused:
        with pytest.raises(AssertionError):
            openapi.check(wrong)


def test_openai_client_sees_auth_errors(api):
    from openai import AuthenticationError, OpenAI

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{api}/v1", api_key="wrong").models.list()


@pytest.mark.parametrize("body, status, code", [
    ({"messages": [{"role": "user", "content": "x" * 100_000}]}, 413, "message_too_long"),
    ({"messages": [{"role": "user", "content": "hi"}] * 60}, 413, "too_many_messages"),
    ({"messages": []}, 422, "validation"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 422, "no_user_message"),
    ({"messages": [{"role": "user", "content": "   "}]}, 422, "bad_input"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 422, "validation"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": 1}, 422, "validation"),  # a bool, not a number
    # numbers, not a bool or a string (pydantic's lax mode had read them as 1.0 and 64)
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": True}, 422, "validation"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "64"}, 422, "validation"),
])
def test_chat_request_limits(api, openapi, body, status, code):
    response = openapi.check(httpx.post(f"{api}/v1/chat/completions", json=body, headers=auth()))
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


def test_openapi_document_states_the_message_rules(api):
    schemas = httpx.get(f"{api}/openapi.json").json()["components"]["schemas"]
    stated_rules = [schemas["ReplyRequest"]["properties"]["message"], schemas["SearchRequest"]["properties"]["query"],
                    schemas["ClassifyRequest"]["properties"]["texts"]["items"]]
    for stated in stated_rules:
        assert stated["minLength"] == 1 and "TANDEM_MAX_MESSAGE_CHARS" in stated["description"], stated
    # and the API does what it states: a blank message is refused with 422
    response = httpx.post(f"{api}/v1/replies", json={"message": " \x00 "}, headers=auth())
    assert response.status_code == 422 and "empty" in response.json()["error"]["message"]


def test_the_request_examples_in_the_openapi_document_are_accepted(api, openapi):
    """Each JSON request body's example, as /docs offers it, sent as it stands to the running API."""
    document = httpx.get(f"{api}/openapi.json").json()
    schemas = document["components"]["schemas"]
    sent = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            schema = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            for example in schemas.get(schema.get("$ref", "").rsplit("/", 1)[-1], {}).get("examples", []):
                response = openapi.check(httpx.request(method, f"{api}{path}", json=example, headers=auth(), timeout=120))
                assert response.is_success, (path, response.status_code, response.text)
                sent.append(path)
    assert sorted(sent) == ["/v1/chat/completions", "/v1/classify", "/v1/replies", "/v1/search"]


def test_malformed_json_and_missing_key(api, openapi):
    response = openapi.check(httpx.post(f"{api}/v1/chat/completions", content=b"{not json",
                                        headers={**auth(), "Content-Type": "application/json"}))
    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith("the body is not valid JSON (Expecting property name")
    latin1 = '{"messages": [{"role": "user", "content": "caf\u00e9 card"}]}'.encode("latin-1")
    response = openapi.check(httpx.post(f"{api}/v1/chat/completions", content=latin1,
                                        headers={**auth(), "Content-Type": "application/json"}))
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_encoding"
    assert "not valid UTF-8 (byte 0xe9 at offset 46)" in response.json()["error"]["message"]
    for response in (httpx.get(f"{api}/v1/nowhere", headers=auth()), httpx.put(f"{api}/v1/classify", headers=auth())):
        assert response.status_code in (404, 405) and response.json()["error"]["message"] in ("Not Found", "Method Not Allowed")
    # found by schemathesis: a path served by two routes named only the first one's methods
    response = httpx.put(f"{api}/v1/jobs/x", headers=auth())
    assert response.status_code == 405 and response.headers["allow"] == "DELETE, GET, HEAD"
    response = openapi.check(httpx.post(f"{api}/v1/replies", json={"message": "hi", "use_cache": 0}, headers=auth()))
    assert response.status_code == 422 and "use_cache" in response.json()["error"]["message"]
    response = openapi.check(httpx.post(f"{api}/v1/replies", json={"message": "hi"}))
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_reply_events_resume_from_last_event_id(api, openapi):
    created = openapi.check(httpx.post(f"{api}/v1/replies", json={"message": "How do I change my PIN?",
                                                                   "use_cache": False}, headers=auth()))
    assert created.status_code == 202
    events_url = f"{api}{created.json()['events']}"

    def read(headers: dict, stop_after: int | None = None) -> list[dict]:
        events = []
        with httpx.stream("GET", events_url, headers={**auth(), **headers}, timeout=120) as response:
            openapi.check(response)
            current: dict = {}
            for line in response.iter_lines():
                if line.startswith("id: "):
                    current["id"] = line[4:]
                elif line.startswith("event: "):
                    current["event"] = line[7:]
                elif line.startswith("data: "):
                    current["data"] = json.loads(line[6:])
                elif not line and current:
                    events.append(current)
                    current = {}
                    if stop_after and len(events) == stop_after:
                        break
        return events

    first = read({}, stop_after=3)
    rest = read({"Last-Event-ID": first[-1]["id"]})
    everything = read({})
    assert [e["id"] for e in first + rest] == [e["id"] for e in everything]
    assert everything[0]["event"] == "meta" and everything[-1]["event"] == "done"


def test_ticket_jobs_json_csv_results_and_cancel(api, openapi):
    tickets = [{"id": f"t{i}", "text": text} for i, text in enumerate(
        ["my card has not arrived", "what is your exchange rate", "", "I want to close my account"])]
    created = openapi.check(httpx.post(f"{api}/v1/tickets?drafts=false", json=tickets, headers=auth()))
    assert created.status_code == 202
    job = created.json()["job_id"]
    wait_until(lambda: httpx.get(f"{api}/v1/jobs/{job}", headers=auth()).json()["state"] == "done", 120, "job")
    status = openapi.check(httpx.get(f"{api}/v1/jobs/{job}", headers=auth())).json()
    assert status["total"] == status["processed"] == 4 and status["errors"] == 1 and status["progress"] == 1.0
    results = openapi.check(httpx.get(f"{api}/v1/jobs/{job}/results", headers=auth()))
    rows = [json.loads(line) for line in results.text.splitlines()]
    assert [r["id"] for r in rows] == ["t0", "t1", "t2", "t3"]
    assert rows[0]["intent"] == "card_arrival" and "empty" in rows[2]["error"]

    upload = openapi.check(httpx.post(f"{api}/v1/tickets?drafts=false", headers=auth(), files={
        "file": ("t.csv", b"id,text\na,my pin is blocked\nb,top up failed\n", "text/csv")}))
    assert upload.status_code == 202
    big = [{"id": i, "text": f"where is my card {i}"} for i in range(3000)]
    job = httpx.post(f"{api}/v1/tickets?drafts=false", json=big, headers=auth()).json()["job_id"]
    cancelled = openapi.check(httpx.delete(f"{api}/v1/jobs/{job}", headers=auth())).json()
    assert cancelled["state"] == "cancelled"
    assert openapi.check(httpx.get(f"{api}/v1/jobs/nope", headers=auth())).status_code == 404


def test_a_job_outlives_the_api_process_that_took_it(workers, tmp_path):
    """kill -9 the API process mid-job: a new API process takes the job over once the lease
    lapses, and every ticket is answered, and counted, exactly once."""
    env = {"TANDEM_JOB_LEASE_S": "2"}
    first, url = start_api(tmp_path / "first.log", env)
    messages = ["my card has not arrived", "what is your exchange rate", "I want to close my account",
                "why was I charged a fee", "my top up failed"]
    tickets = [{"id": f"k{i}", "text": f"{messages[i % 5]} ({i})"} for i in range(2000)]
    try:
        job = httpx.post(f"{url}/v1/tickets?drafts=false", json=tickets, headers=auth()).json()["job_id"]
        wait_until(lambda: httpx.get(f"{url}/v1/jobs/{job}", headers=auth()).json()["processed"] > 0, 60, "first rows")
    finally:
        first.kill()  # no shutdown: its lease is left to lapse
        first.wait(10)
    second, url = start_api(tmp_path / "second.log", env)
    try:
        status = lambda: httpx.get(f"{url}/v1/jobs/{job}", headers=auth()).json()  # noqa: E731
        taken_over_at = status()["processed"]
        assert taken_over_at < len(tickets), "the job finished before its API process was killed"
        wait_until(lambda: status()["state"] == "done", 180, "job taken over")
        final = status()
        assert final["processed"] == final["total"] == len(tickets) and final["errors"] == 0
        rows = [json.loads(line) for line in httpx.get(f"{url}/v1/jobs/{job}/results", headers=auth()).text.splitlines()]
        assert [r["id"] for r in rows] == [t["id"] for t in tickets]
        assert rows[0]["intent"] == "card_arrival"
    finally:
        stop_api(second)


@pytest.mark.parametrize("body, code", [
    ([], "bad_tickets"), ({"id": 1}, "bad_tickets"), ([{"id": 1}], "bad_tickets"),
    ([{"id": True, "text": "a"}], "bad_tickets"),  # found by schemathesis: taken as id 1
    ([{"id": 1, "text": "a"}, {"id": 1, "text": "b"}], "duplicate_ids"),
])
def test_bad_ticket_bodies(api, openapi, body, code):
    response = openapi.check(httpx.post(f"{api}/v1/tickets", json=body, headers=auth()))
    assert response.status_code == 422 and response.json()["error"]["code"] == code


def test_bad_ticket_upload(api, openapi):
    response = openapi.check(httpx.post(f"{api}/v1/tickets", headers=auth(),
                                        files={"file": ("t.csv", b"id,body\n1,x\n", "text/csv")}))
    assert response.status_code == 422 and "no 'text' column" in response.json()["error"]["message"]
    # found by schemathesis: an empty multipart part named "file" with no filename
    boundary = "b0undary"
    body = f'--{boundary}\r\nContent-Disposition: form-data; name="file"\r\n\r\n\r\n--{boundary}--\r\n'
    empty = httpx.post(f"{api}/v1/tickets", content=body.encode(),
                       headers={**auth(), "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert empty.status_code == 422 and "no file in the upload" in empty.json()["error"]["message"]
    blank = httpx.post(f"{api}/v1/tickets", headers=auth(), files={"file": ("t.jsonl", b"  \n", "application/jsonl")})
    assert blank.status_code == 422 and "empty" in blank.json()["error"]["message"]


def test_bad_ticket_content_and_ids(api, openapi):
    # found in review: a form body (curl -d's default) was read as a form, then as JSON: 500
    form = openapi.check(httpx.post(f"{api}/v1/tickets", content=b'[{"id": 1, "text": "hi"}]', headers={
        **auth(), "Content-Type": "application/x-www-form-urlencoded"}))
    assert form.status_code == 415 and form.json()["error"]["code"] == "unsupported_media_type"
    # half a surrogate pair is valid JSON, but no UTF-8 encoder, Redis's included, takes it: 500
    for body in (rb'[{"id": "a", "text": "hi \ud800"}]', rb'[{"id": "\udc00", "text": "hi"}]'):
        bad = openapi.check(httpx.post(f"{api}/v1/tickets", content=body, headers={
            **auth(), "Content-Type": "application/json"}))
        assert bad.status_code == 422 and "not valid Unicode" in bad.json()["error"]["message"]
    # ids name Redis keys: "<job>:results" read the results hash as the job's (500), ":writer" a string (503)
    job = httpx.post(f"{api}/v1/tickets?drafts=false", json=[{"id": 1, "text": "my card is lost"}],
                     headers=auth()).json()["job_id"]
    wait_until(lambda: httpx.get(f"{api}/v1/jobs/{job}", headers=auth()).json()["state"] == "done", 120, "job")
    for path in (f"/v1/jobs/{job}:results", f"/v1/jobs/{job}:order", f"/v1/jobs/{job}:order/results"):
        assert openapi.check(httpx.get(f"{api}{path}", headers=auth())).status_code == 404, path
    assert openapi.check(httpx.delete(f"{api}/v1/jobs/{job}:order", headers=auth())).status_code == 404
    events = openapi.check(httpx.get(f"{api}/v1/replies/{job}:writer/events", headers=auth()))
    assert events.status_code == 422 and events.json()["error"]["code"] == "bad_reply_id"


@pytest.mark.parametrize("content", [[{"type": "text", "text": 123}], [{"type": "text"}], [{"type": "text", "text": None}]])
def test_a_text_part_without_text_is_refused(api, openapi, content):
    # found in review: " ".join() met a number or None: 500
    response = openapi.check(httpx.post(f"{api}/v1/chat/completions", headers=auth(),
                                        json={"messages": [{"role": "user", "content": content}]}))
    assert response.status_code == 422 and "text" in response.json()["error"]["message"]


def test_chat_message_text_keeps_text_parts_and_drops_lone_surrogates():
    from services.api import ChatMessage

    message = ChatMessage.model_validate({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}, {"type": "text", "text": "card \ud800lost"}]})
    assert message.text() == "card lost"
    assert ChatMessage(role="assistant", content="ok \udfff").text() == "ok "


def test_requests_waiting_on_absent_workers_get_504_and_hold_up_no_other_route(worker_settings, openapi, tmp_path):
    """No worker consumes this API's queues (another Redis database). Requests waiting on
    them time out with 504 in the error body (a Celery TimeoutError was a text/plain 500),
    and while they wait, the job routes answer at once (a blocking wait held one of the six
    threads every route's Redis calls share, on 2 cores)."""
    import threading
    import time

    url_db = worker_settings.redis_url.rsplit("/", 1)[0] + "/7"
    process, url = start_api(tmp_path / "api.log", {"TANDEM_REDIS_URL": url_db, "TANDEM_REQUEST_TIMEOUT_S": "6"})
    try:
        answers: list[tuple[float, httpx.Response]] = []

        def classify(i: int) -> None:
            response = httpx.post(f"{url}/v1/classify", json={"texts": [f"where is my card {i}"]}, headers=auth(),
                                  timeout=60)
            answers.append((time.monotonic(), response))

        waiting = [threading.Thread(target=classify, args=(i,)) for i in range(10)]
        for thread in waiting:
            thread.start()
        time.sleep(1.0)
        job = openapi.check(httpx.get(f"{url}/v1/jobs/{'0' * 32}", headers=auth(), timeout=60))
        job_answered = time.monotonic()
        assert job.status_code == 404
        assert not answers, "the job route waited for the classify requests to end"
        for thread in waiting:
            thread.join(60)
        assert len(answers) == 10 and all(at > job_answered for at, _ in answers)
        for _, response in answers:
            openapi.check(response)
            assert response.status_code == 504 and response.json()["error"]["code"] == "worker_timeout"
        chat = openapi.check(httpx.post(f"{url}/v1/chat/completions", headers=auth(), timeout=60,
                                        json={"messages": [{"role": "user", "content": "where is my card?"}]}))
        assert chat.status_code == 504 and "gen worker" in chat.json()["error"]["message"]
    finally:
        stop_api(process)


def test_bad_last_event_id(api, openapi):
    # found by schemathesis: Redis rejects a malformed stream id after the SSE response has started
    response = openapi.check(httpx.get(f"{api}/v1/replies/x/events", headers={**auth(), "Last-Event-ID": "not-an-id"}))
    assert response.status_code == 422 and response.json()["error"]["code"] == "bad_event_id"


def test_classify_and_search(api, openapi):
    classified = openapi.check(httpx.post(f"{api}/v1/classify", json={"texts": ["I forgot my passcode", "my PIN is blocked"]},
                                          headers=auth(), timeout=60)).json()["results"]
    assert [r["intent"] for r in classified] == ["passcode_forgotten", "pin_blocked"]
    # one bad text among several: the error says which
    blank = openapi.check(httpx.post(f"{api}/v1/classify", json={"texts": ["my PIN is blocked", " \t"]}, headers=auth()))
    assert blank.status_code == 422 and blank.json()["error"]["message"] == "texts[1]: message is empty"
    long = openapi.check(httpx.post(f"{api}/v1/classify", json={"texts": ["x" * 100_000]}, headers=auth()))
    assert long.status_code == 413 and long.json()["error"]["message"].startswith("texts[0]: message is 100000 characters")
    assert openapi.check(httpx.post(f"{api}/v1/search", json={"query": "express delivery", "k": True},
                                    headers=auth())).status_code == 422  # a number, not a bool
    found = openapi.check(httpx.post(f"{api}/v1/search", json={"query": "how much is express delivery", "k": 2},
                                     headers=auth(), timeout=60)).json()["passages"]
    assert len(found) == 2 and {"article_id", "score", "text"} <= set(found[0])
    tagged = openapi.check(httpx.post(f"{api}/v1/search", json={"query": "how much is express delivery",
                                                                "intents": ["card_delivery_estimate"]},
                                      headers=auth(), timeout=60)).json()["passages"]
    assert tagged and all("card_delivery_estimate" in p["intents"] for p in tagged)
    # Raised on the nlu worker, carried back through Celery's result as the same error.
    typo = openapi.check(httpx.post(f"{api}/v1/search", json={"query": "how much is express delivery",
                                                              "intents": ["card_delivery_estimat"]},
                                    headers=auth(), timeout=60))
    assert typo.status_code == 422 and typo.json()["error"] == {
        "message": "unknown intent 'card_delivery_estimat' (did you mean 'card_delivery_estimate'?)",
        "type": "invalid_request_error", "code": "bad_input"}


def test_health_readiness_metrics_and_page(api, openapi):
    assert openapi.check(httpx.get(f"{api}/healthz")).json() == {"status": "ok"}
    assert openapi.check(httpx.get(f"{api}/v1/models", headers=auth())).json()["data"][0]["id"] == "tandem"
    ready = openapi.check(httpx.get(f"{api}/readyz"))
    assert ready.status_code == 200 and ready.json()["ready"] and ready.json()["workers"]["gen"] >= 1
    metrics = httpx.get(f"{api}/metrics").text
    assert 'tandem_http_requests_total{method="POST",route="/v1/chat/completions"' in metrics
    assert "tandem_stage_seconds_bucket" in metrics and "tandem_queue_depth" in metrics
    page = httpx.get(f"{api}/")
    assert page.status_code == 200 and "<title>Tandem chat</title>" in page.text


def test_rate_limit_per_key(worker_settings):
    settings = worker_settings.model_copy(update={"api_keys": ["rl-key"], "rate_limit_per_minute": 3})
    from services.api import create_app

    app = create_app(settings)
    with TestClient(app) as client:
        codes = [client.get("/v1/models", headers={"Authorization": "Bearer rl-key"}).status_code for _ in range(4)]
        assert codes[:3] == [200, 200, 200] and codes[3] == 429
        limited = OpenAPIDocument(app.openapi()).check(client.get("/v1/models", headers={"Authorization": "Bearer rl-key"}))
        assert limited.json()["error"]["code"] == "rate_limited" and int(limited.headers["Retry-After"]) > 0


def test_redis_down_gives_503_with_a_clear_message():
    from services.api import create_app
    from workers.app import configure

    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    try:
        app = create_app(settings)
        openapi = OpenAPIDocument(app.openapi())
        with TestClient(app) as client:
            response = openapi.check(client.post("/v1/replies", json={"message": "hello"}))
            assert response.status_code == 503
            assert "Redis is unreachable" in response.json()["error"]["message"]
            chat = openapi.check(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hello"}]}))
            assert chat.status_code == 503 and chat.headers["Retry-After"] == "5"
            ready = openapi.check(client.get("/readyz"))
            assert ready.status_code == 503 and ready.json()["redis"] is False
            assert client.get("/healthz").status_code == 200
    finally:
        configure(Settings())  # the Celery app is process-wide: point it back for later tests


def test_keys_file_holds_plain_keys_or_digests(tmp_path):
    import hashlib

    from services.api import load_key_hashes

    digest = hashlib.sha256(b"second").hexdigest()
    (tmp_path / "keys").write_text(f"# ops keys\nfirst\n{digest}\n")
    hashes = load_key_hashes(Settings(api_keys_file=tmp_path / "keys"))
    assert hashes == {hashlib.sha256(b"first").hexdigest(), digest}


def test_redis_restart_under_load(api, redis_server):
    """Redis goes away while chats are in flight: new requests get 503s with a clear message,
    /readyz is red, a reply already streaming carries on to `done` once Redis is back, and the
    service takes requests again after Redis returns, by itself."""
    import threading
    import time

    stop = threading.Event()
    outcomes: list[int] = []
    unclear: list[str] = []  # 503 messages that do not say Redis is unreachable
    failures: list[BaseException] = []  # a thread's own errors, raised here: in the thread they fail nothing

    def chat_loop():
        try:
            while not stop.is_set():
                try:
                    response = httpx.post(f"{api}/v1/chat/completions", headers=auth(), timeout=60,
                                          json={"messages": [{"role": "user", "content": "How do I top up by card?"}]})
                except httpx.HTTPError:
                    outcomes.append(-1)
                    continue
                outcomes.append(response.status_code)
                if response.status_code == 503 and "unreachable" not in response.json()["error"]["message"]:
                    unclear.append(response.text)
        except BaseException as exc:
            failures.append(exc)

    in_flight: list[str] = []  # the SSE events of a reply that is streaming when Redis stops
    started = threading.Event()

    def read_reply():
        try:
            reply = httpx.post(f"{api}/v1/replies", json={"message": "How do I activate my card?", "use_cache": False},
                               headers=auth(), timeout=10).json()
            with httpx.stream("GET", f"{api}{reply['events']}", headers=auth(), timeout=120) as events:
                for line in events.iter_lines():
                    if line.startswith("event: "):
                        in_flight.append(line.removeprefix("event: "))
                        if in_flight[-1] == "token":
                            started.set()
        except BaseException as exc:
            failures.append(exc)

    # Daemons, and stopped in `finally`: a failed assertion must not leave them posting chats for good.
    threads = [threading.Thread(target=chat_loop, daemon=True) for _ in range(3)]
    reader = threading.Thread(target=read_reply, daemon=True)
    for thread in [*threads, reader]:
        thread.start()
    try:
        assert started.wait(90), "the reply had begun streaming"
        redis_server.stop()  # at its first token: mid-reply
        try:
            time.sleep(1)
            ready = httpx.get(f"{api}/readyz", timeout=10)
            assert ready.status_code == 503 and ready.json()["redis"] is False
            refused = httpx.post(f"{api}/v1/replies", json={"message": "hello"}, headers=auth(), timeout=10)
            assert refused.status_code == 503 and "Redis is unreachable" in refused.json()["error"]["message"]
            time.sleep(3)
        finally:
            redis_server.start()
        # Bounds for a hang, not a speed: two loaded cores serve three chat loops meanwhile.
        wait_until(lambda: httpx.get(f"{api}/readyz", timeout=2).status_code == 200, 60,
                   "readiness after Redis returned")
        wait_until(lambda: httpx.post(f"{api}/v1/replies", json={"message": "hi there"}, headers=auth(),
                                      timeout=2).status_code == 202, 60, "accepting requests")
    finally:
        stop.set()
        for thread in [*threads, reader]:
            thread.join(120)
    assert not any(thread.is_alive() for thread in [*threads, reader]), "a client thread still running"
    assert not failures, failures
    assert not unclear, unclear
    assert in_flight[0] == "meta" and in_flight[-1] == "done", f"the reply streaming through the outage: {in_flight[-3:]}"
    assert -1 not in outcomes, "no connection was dropped without an answer"
    assert set(outcomes) <= {200, 503}
    recovered = httpx.post(f"{api}/v1/chat/completions", headers=auth(), timeout=120,
                           json={"messages": [{"role": "user", "content": "How do I change my PIN?"}]})
    assert recovered.status_code == 200 and recovered.json()["choices"][0]["message"]["content"].strip()


@pytest.mark.parametrize("tokens, expected", [
    (["We charge £9. ", {"text": "Delivery is free.", "restart": True, "quoted": True}],
     "We charge £9. \n\n[Correction, quoted from our help centre] Delivery is free."),
    # a held draft rejected at its first sentence: nothing to correct
    ([{"text": "Delivery is free.", "quoted": True}], "Delivery is free."),
])
def test_an_unsupported_draft_is_corrected_only_where_it_streamed(tokens, expected):
    assert _openai_content(tokens, {"grounded": False, "reply": "Delivery is free."}) == expected


@pytest.mark.parametrize("tokens, expected", [
    ([{"text": "We charge £9. "}, {"text": "Delivery ", "restart": True}, {"text": "is free."}],
     "We charge £9. \n\n[Correction] Delivery is free."),
    ([{"text": "Delivery ", "restart": True}, {"text": "is free."}], "Delivery is free."),  # nothing to correct
])
def test_a_second_draft_is_marked_as_a_correction_where_the_first_streamed(tokens, expected):
    assert _openai_content(tokens, {"grounded": True, "reply": "Delivery is free."}) == expected


def _openai_content(tokens: list, done: dict) -> str:
    """What an OpenAI client shows of a stream of these token events."""
    import asyncio

    from services.api import openai_chunks

    async def events():
        for token in tokens:
            yield "1", "token", token if isinstance(token, dict) else {"text": token}
        yield "2", "done", done

    async def content() -> str:
        chunks = [c async for c in openai_chunks(events(), "id", 0, "tandem") if c != "data: [DONE]\n\n"]
        return "".join(json.loads(c[5:])["choices"][0]["delta"].get("content", "") for c in chunks)

    return asyncio.run(content())


def test_the_api_process_does_not_import_torch():
    """The API only checks messages and reads Redis: importing torch (through the pipeline's
    encoder module, as it once did) would hold 270 MB in it for nothing."""
    import subprocess
    import sys

    code = "import sys, services.api, services.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout
