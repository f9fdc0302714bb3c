from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from pipeline.errors import ModelLoadError, ResponderError
from pipeline.knowledge import Passage
from pipeline.llama_cpp_backend import weights_for_plain_llama_cpp
from pipeline.responder import (
    GenerationLimits,
    LlamaCppBackend,
    OpenAICompatibleBackend,
    Responder,
    TransformersBackend,
    _stop_position,
    build_messages,
    make_backend,
)

from ..helpers import free_port, wait_until

PASSAGE = Passage(article_id="card-delivery-estimate", title="How long card delivery takes", url="",
                  text="## Delivery\nStandard delivery takes 3–5 working days in the UK. Express delivery costs £5.",
                  score=1.0)
MESSAGES = build_messages("How long will my card take to arrive?", "card_delivery_estimate", [PASSAGE])
LIMITS = GenerationLimits(max_tokens=24, temperature=0.0, stop=["\nCustomer:"], timeout_s=60)


def test_prompt_puts_the_article_in_the_user_message_without_markdown():
    system, user = MESSAGES
    assert system["role"] == "system" and "3–5 working days" not in system["content"]
    assert user["role"] == "user" and "3–5 working days" in user["content"]
    assert "Delivery:" in user["content"] and "##" not in user["content"]
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert build_messages("q", "i", [PASSAGE], history)[1:3] == history
    two = build_messages("q", "i", [PASSAGE, PASSAGE], max_passages=2)[-1]["content"]
    assert two.count("How long card delivery takes") == 2


def test_stop_position():
    assert _stop_position("abc\nCustomer: x", ["\nCustomer:"]) == 3
    assert _stop_position("abc", ["zz", ""]) is None


@pytest.fixture(scope="module")
def llama(settings):
    backend = LlamaCppBackend(settings.responder_model, threads=1, slots=2, ctx_per_slot=512)
    backend.warm_up()
    return backend


def test_llama_cpp_streams_pieces(llama):
    pieces = list(llama.stream(MESSAGES, LIMITS))
    assert len(pieces) > 3, "tokens arrive one by one"
    assert "".join(pieces).strip()


def test_llama_cpp_enforces_the_timeout(llama):
    with pytest.raises(ResponderError, match="timed out"):
        list(llama.stream(MESSAGES, GenerationLimits(max_tokens=200, timeout_s=0.0)))


def test_the_cpu_weights_and_kv_cache_settings_reach_the_backend_and_the_reply_cache_key(settings):
    from pipeline.llama_cpp_backend import cpu_weights_for_this_machine

    auto = make_backend(settings)
    assert auto.cpu_weights == cpu_weights_for_this_machine() and auto.copies_dir == settings.data_dir / "models"
    kinds = ("bf16", "q8_0", "iq4_nl", "file")
    backends = [make_backend(settings.model_copy(update={"responder_cpu_weights": kind})) for kind in kinds]
    assert [b.cpu_weights for b in backends] == list(kinds)
    # Replies cached from one must not be served for another.
    assert len({Responder(b, LIMITS).identity for b in backends}) == len(kinds)
    quantized_kv = make_backend(settings.model_copy(update={"responder_kv_cache": "q8_0"}))
    assert quantized_kv.kv_cache == "q8_0" and auto.kv_cache == "f16"
    assert Responder(quantized_kv, LIMITS).identity != Responder(auto, LIMITS).identity
    penalised = GenerationLimits(max_tokens=24, temperature=0.0, stop=["\nCustomer:"], timeout_s=60, repeat_penalty=1.15)
    assert Responder(auto, LIMITS).identity != Responder(auto, penalised).identity


def test_missing_gguf_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no GGUF file"):
        LlamaCppBackend(str(tmp_path / "nope.gguf")).warm_up()


@pytest.fixture(scope="module")
def openai_server(settings):
    """llama.cpp's own OpenAI-compatible server on the bundled model: a real server, a private port."""
    port = free_port()
    model = weights_for_plain_llama_cpp(settings.responder_model, settings.data_dir / "models")
    process = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", model,
                                "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until(lambda: httpx.get(f"{base}/models", timeout=1).status_code == 200, 60, "llama.cpp server")
        yield base
    finally:
        process.terminate()
        process.wait(10)


def test_openai_compatible_server_streams(openai_server):
    backend = OpenAICompatibleBackend(openai_server, model="smollm2")
    pieces = list(backend.stream(MESSAGES, LIMITS))
    assert len(pieces) > 3 and "".join(pieces).strip()


def test_openai_backend_reports_http_errors(openai_server):
    backend = OpenAICompatibleBackend(openai_server + "/does-not-exist", model="x")
    with pytest.raises(ResponderError, match="answered 404"):
        list(backend.stream(MESSAGES, LIMITS))


def test_openai_backend_unreachable_server():
    backend = OpenAICompatibleBackend(f"http://127.0.0.1:{free_port()}/v1", model="x")
    with pytest.raises(ResponderError, match="cannot reach"):
        list(backend.stream(MESSAGES, LIMITS))


@pytest.fixture
def scripted_server():
    """A server that answers every chat completion with the SSE lines it is given: what a real
    one sends when it fails after its 200, which a healthy llama.cpp server cannot be made to do."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    script: list[str | float] = []  # a float: pause this many seconds

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for line in script:
                if isinstance(line, float):
                    time.sleep(line)
                    continue
                self.wfile.write(f"{line}\n\n".encode())
                self.wfile.flush()
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1", script
    server.shutdown()


def chunk(text: str = "", finish: str | None = None) -> str:
    return "data: " + json.dumps({"choices": [{"delta": {"content": text}, "finish_reason": finish}]})


@pytest.mark.parametrize("lines, message", [
    ([chunk("Your card "), 'data: {"error": {"message": "engine died"}}', "data: [DONE]"], "engine died"),
    ([chunk("Your card "), "event: error", 'data: {"message": "out of memory"}'], "failed mid-stream"),
    ([chunk("Your card ")], "ended the stream before the reply"),
    ([chunk("Your card "), "data: 5"], "malformed event"),
])
def test_openai_backend_reports_a_server_that_fails_mid_stream(scripted_server, lines, message):
    # Read as a reply that ended there: cut short, or replaced by the guard, with no word in any log.
    url, script = scripted_server
    script[:] = lines
    pieces: list[str] = []
    with pytest.raises(ResponderError, match=message):
        pieces.extend(OpenAICompatibleBackend(url, model="x").stream(MESSAGES, LIMITS))
    assert pieces == ["Your card "]


def test_openai_backend_ends_on_a_finish_reason_or_done(scripted_server):
    url, script = scripted_server
    script[:] = [chunk("Your card "), chunk("arrives in 3 days.", finish="stop")]  # no [DONE]
    assert list(OpenAICompatibleBackend(url, model="x").stream(MESSAGES, LIMITS)) == ["Your card ", "arrives in 3 days."]


def test_openai_timeout_limits_the_time_without_a_token_not_the_whole_reply(scripted_server):
    url, script = scripted_server
    script[:] = [x for i in range(12) for x in (0.25, chunk(f"{i} "))] + ["data: [DONE]"]  # 3 s in all
    limits = GenerationLimits(max_tokens=24, timeout_s=2.0)
    assert "".join(OpenAICompatibleBackend(url, model="x").stream(MESSAGES, limits)).split() == [str(i) for i in range(12)]


@pytest.mark.parametrize("stall", [
    [0.25, ": keep-alive"] * 12,  # a server that is up but produces nothing
    [3.0],  # or sends nothing at all
], ids=["keep-alive lines", "silence"])
def test_openai_timeout_fails_a_stalled_server(scripted_server, stall):
    url, script = scripted_server
    script[:] = [chunk("Your card "), *stall, chunk("arrives."), "data: [DONE]"]
    pieces: list[str] = []
    with pytest.raises(ResponderError, match="no new token for 1 s"):
        pieces.extend(OpenAICompatibleBackend(url, model="x").stream(MESSAGES, GenerationLimits(timeout_s=1.0)))
    assert pieces == ["Your card "]


@pytest.mark.slow
def test_transformers_backend_on_the_bundled_gguf(settings, capfd):
    """Loads SmolLM2 through transformers (dequantised from the GGUF) and streams with a stop string."""
    backend = TransformersBackend(settings.responder_model)
    backend.warm_up()
    assert "de-quantizing" not in capfd.readouterr().err  # transformers' own bar stays off the terminal
    responder = Responder(backend, GenerationLimits(max_tokens=16, stop=["."], timeout_s=120))
    pieces = list(responder.stream("How long will my card take?", "card_delivery_estimate", [PASSAGE]))
    text = "".join(pieces)
    assert pieces and text.strip()
    assert "." not in text, "the stop string ends the reply and is not emitted"


@pytest.mark.slow
def test_transformers_generation_stops_when_the_reader_closes_the_stream(settings):
    """The chain closes a draft the guard rejects; generate must stop too, not run on to max_tokens."""
    import threading

    backend = TransformersBackend(settings.responder_model)
    backend.warm_up()
    lengths: list[int] = []
    generate = backend._model.generate
    backend._model.generate = lambda **kw: lengths.append(generate(**kw).shape[1] - kw["input_ids"].shape[1])
    stream = Responder(backend, GenerationLimits(max_tokens=64, timeout_s=120)).stream(
        "How long will my card take?", "card_delivery_estimate", [PASSAGE])
    for _, _piece in zip(range(3), stream):
        pass
    stream.close()
    for thread in threading.enumerate():
        if thread.name == "transformers-generate":
            thread.join(timeout=60)
    assert lengths and lengths[0] < 12, f"generate ran on for {lengths} tokens after the stream was closed"
