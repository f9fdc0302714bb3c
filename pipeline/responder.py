"""The GPT side: a grounded prompt, and generator backends that stream text.

Backends share one small interface (``warm_up`` then ``stream(messages, ...)``):
  llama_cpp    - llama-cpp-python on a GGUF file (the default: fastest on CPU here)
  transformers - any causal LM id or path (optionally a GGUF file inside it), CPU or CUDA
  openai       - any OpenAI-compatible HTTP server (vLLM, TGI, Ollama, llama.cpp server)

The help passages go in the user message, not the system message: measured with the
135M model, a system-message article was ignored while a user-message one was used.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from pipeline.errors import ModelLoadError, ResponderError
from pipeline.knowledge import Passage
from pipeline.llama_cpp_backend import LlamaCppBackend

SYSTEM_PROMPT = "You are a helpful customer-support assistant for a bank. Answer briefly and only with facts from the help article."
ANSWER = "Answer the question in two sentences, using the exact facts and numbers from the help article."
# For a second draft after the guard rejected the first. As the only instruction it lowered
# key-fact recall (58% against 63%), but it turns drafts like "I'm sorry for your loss, but
# I'm unable to assist you" into the article's steps (README, "Measured").
STEPS = "Tell the customer what to do in two sentences, using the exact steps and numbers from the help article."


@dataclass
class GenerationLimits:
    max_tokens: int = 120
    temperature: float = 0.0
    stop: list[str] = field(default_factory=list)
    # The longest a reply may go without a new token (the first one: without its prompt read). Not
    # a limit on the whole reply, which max_tokens bounds: 16 replies decoding together on 2
    # slow cores stream about 2 tokens/s each, and a reply cut at a fixed time was lost whole.
    timeout_s: float = 60.0
    repeat_penalty: float = 1.0  # settings.repeat_penalty says why 1.0
    # llama_cpp: replies waiting for a slot are admitted lowest first, then in arrival order, so a
    # chat (0) does not queue behind a batch job's drafts (TANDEM_BATCH_PRIORITY). Others ignore it.
    priority: int = 0


def build_messages(message: str, intent: str, passages: list[Passage], history: list[dict] | None = None,
                   max_passages: int = 1, instruction: str = ANSWER) -> list[dict]:
    """Chat messages for a grounded answer; ``history`` holds earlier turns as role/content dicts.

    Article first, question and instruction last: on every third question of the grounding
    set (24), this layout with one passage gave the 135M model's drafts 46% key-fact recall,
    against 19% for an instruction-first layout with two passages and 31% for article-first
    with two (measured 2026-11-22 with llama.cpp)."""
    article = "\n\n".join(f"{p.title}\n{_plain(p.text)}" for p in passages[:max_passages])
    user = f"Help article:\n{article}\n\nCustomer question: {message}\n\n{instruction}"
    return [{"role": "system", "content": SYSTEM_PROMPT}, *(history or []), {"role": "user", "content": user}]


def _plain(text: str) -> str:
    """Markdown headings read to a small model as text to copy; make them plain labels."""
    return re.sub(r"^#+\s*(.+?)\s*$", r"\1:", text, flags=re.MULTILINE)


class GenerationBackend(Protocol):
    name: str

    def warm_up(self) -> None: ...

    def stream(self, messages: list[dict], limits: GenerationLimits) -> Iterator[str]: ...


@contextlib.contextmanager
def _no_gguf_progress_bar() -> Iterator[None]:
    """transformers draws a tqdm bar of its own while it de-quantizes a GGUF file, past the
    CLI's rich progress and into every worker's log; its logging switch does not reach it."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf
    except ImportError:  # a transformers without GGUF support draws no such bar
        yield
        return
    bar = getattr(gguf, "tqdm", None)
    if bar is None:
        yield
        return
    gguf.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf.tqdm = bar


class TransformersBackend:
    name = "transformers"

    def __init__(self, model: str, device: str = "cpu", gguf_file: str | None = None):
        self.model_name = model
        self.device = device
        self.gguf_file = gguf_file
        self._model = None
        self._tokenizer = None

    def warm_up(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model_name, gguf = self.model_name, self.gguf_file
        if gguf is None and model_name.endswith(".gguf"):
            model_name, gguf = os.path.dirname(model_name), os.path.basename(model_name)
        kwargs = {"gguf_file": gguf} if gguf else {}
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(model_name, **kwargs)
            with _no_gguf_progress_bar():
                self._model = AutoModelForCausalLM.from_pretrained(model_name, **kwargs).to(self.device).eval()
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load causal LM {self.model_name!r}: {exc}") from None

    def stream(self, messages: list[dict], limits: GenerationLimits) -> Iterator[str]:
        from transformers import StoppingCriteriaList, TextIteratorStreamer
        self.warm_up()
        inputs = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                     return_dict=True).to(self.device)
        streamer = TextIteratorStreamer(self._tokenizer, skip_prompt=True, skip_special_tokens=True,
                                        timeout=limits.timeout_s)
        sampling = {"do_sample": True, "temperature": limits.temperature} if limits.temperature > 0 else {"do_sample": False}
        # No repetition_penalty here: transformers applies it to the prompt's tokens too, which
        # stops the model from copying the article's facts (measured: key-fact recall fell to 6%).
        kwargs = dict(**inputs, streamer=streamer, max_new_tokens=limits.max_tokens,
                      pad_token_id=self._tokenizer.eos_token_id, **sampling)
        if limits.stop:
            kwargs.update(stop_strings=limits.stop, tokenizer=self._tokenizer)
        closed = threading.Event()  # the caller stopped reading: generate stops at its next step
        kwargs["stopping_criteria"] = StoppingCriteriaList([_WhenSet(closed)])
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self._model.generate(**kwargs)
            except BaseException as exc:  # surfaced in the caller's thread below
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, name="transformers-generate", daemon=True)
        thread.start()
        text = ""
        try:
            for piece in streamer:
                text += piece
                cut = _stop_position(text, limits.stop)
                if cut is not None:  # generate stops on the stop string but has already emitted it
                    emitted = len(text) - len(piece)
                    if cut > emitted:
                        yield text[emitted:cut]
                    break
                yield piece
        except Exception as exc:  # queue.Empty from the streamer's timeout
            raise ResponderError.timed_out(limits.timeout_s) from exc
        finally:
            closed.set()
        thread.join()
        if errors:
            raise ResponderError(f"generation failed: {errors[0]}")


class _WhenSet:
    """A transformers stopping criterion that ends generation once ``event`` is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _stop_position(text: str, stops: list[str]) -> int | None:
    positions = [text.find(s) for s in stops if s and s in text]
    return min(positions) if positions else None


class OpenAICompatibleBackend:
    name = "openai"

    def __init__(self, base_url: str, model: str, api_key: str = "none"):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key

    def warm_up(self) -> None:
        """Nothing to load; the server holds the model."""

    def stream(self, messages: list[dict], limits: GenerationLimits) -> Iterator[str]:
        import httpx
        body = {"model": self.model, "messages": messages, "stream": True, "max_tokens": limits.max_tokens,
                "temperature": limits.temperature}
        if limits.stop:
            body["stop"] = limits.stop[:4]  # the OpenAI API accepts at most four
        headers = {"Authorization": f"Bearer {self.api_key}"}
        deadline = time.monotonic() + limits.timeout_s  # pushed on by each token, not by keep-alive lines
        try:
            with httpx.stream("POST", f"{self.base_url}/chat/completions", json=body, headers=headers,
                              timeout=httpx.Timeout(limits.timeout_s, connect=10.0)) as response:
                if response.status_code != 200:
                    detail = response.read().decode("utf-8", "replace")[:300]
                    raise ResponderError(f"{self.base_url} answered {response.status_code}: {detail}")
                # A server that fails after its 200 says so in the stream (OpenAI and vLLM: an event
                # with "error"), or just stops: either was read as a reply that ended there, which
                # the guard then passed cut short or replaced without a word in any log.
                finished = False
                for line in response.iter_lines():
                    if time.monotonic() > deadline:
                        raise ResponderError.timed_out(limits.timeout_s)
                    if line.startswith(("event: error", "error:")):
                        raise ResponderError(f"{self.base_url} failed mid-stream: {line[:300]}")
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        finished = True
                        break
                    text, ended = self._read_event(data)
                    finished |= ended
                    if text:
                        deadline = time.monotonic() + limits.timeout_s
                        yield text
                if not finished:
                    raise ResponderError(f"{self.base_url} ended the stream before the reply (no [DONE] or "
                                         "finish_reason)")
        except httpx.ReadTimeout:  # nothing at all, not even a keep-alive line, for timeout_s
            raise ResponderError.timed_out(limits.timeout_s) from None
        except httpx.HTTPError as exc:
            raise ResponderError(f"cannot reach the generation server at {self.base_url}: {exc}") from None

    def _read_event(self, data: str) -> tuple[str, bool]:
        """One streamed chunk's text, and whether it ends the reply (a finish_reason)."""
        try:
            event = json.loads(data)
        except json.JSONDecodeError:
            event = None
        if not isinstance(event, dict):
            raise ResponderError(f"{self.base_url} sent a malformed event: {data[:200]}")
        if event.get("error"):
            error = event["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            raise ResponderError(f"{self.base_url} failed mid-stream: {str(message)[:300]}")
        choices = event.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        text = delta.get("content")
        return (text if isinstance(text, str) else ""), bool(choice.get("finish_reason"))


def make_backend(settings) -> GenerationBackend:
    if settings.responder_backend == "llama_cpp":
        return LlamaCppBackend(settings.responder_model, threads=settings.responder_threads, slots=settings.responder_slots,
                               ctx_per_slot=settings.responder_ctx_per_slot, gpu_layers=settings.responder_gpu_layers,
                               prefix_cache_mb=settings.responder_prefix_cache_mb,
                               cpu_weights=settings.responder_cpu_weights, copies_dir=settings.data_dir / "models",
                               chat_slots=settings.responder_chat_slots, kv_cache=settings.responder_kv_cache)
    if settings.responder_backend == "transformers":
        return TransformersBackend(settings.responder_model, device=settings.responder_device,
                                   gguf_file=settings.responder_gguf_file)
    return OpenAICompatibleBackend(settings.openai_base_url, settings.responder_model, settings.openai_api_key)


class Responder:
    """Writes a grounded reply from passages and streams it."""

    def __init__(self, backend: GenerationBackend, limits: GenerationLimits, max_passages: int = 1):
        self.backend = backend
        self.limits = limits
        self.max_passages = max_passages

    def warm_up(self) -> None:
        self.backend.warm_up()

    def stream(self, message: str, intent: str, passages: list[Passage], history: list[dict] | None = None,
               limits: GenerationLimits | None = None, instruction: str = ANSWER) -> Iterator[str]:
        messages = build_messages(message, intent, passages, history, self.max_passages, instruction)
        yield from self.backend.stream(messages, limits or self.limits)

    @property
    def identity(self) -> str:
        """What a cached reply depends on besides the message and the index."""
        model = getattr(self.backend, "model_path", None) or getattr(self.backend, "model_name", None) or \
            getattr(self.backend, "model", "")
        # A copy of the weights (llama_cpp) can word a reply differently from the file it was made from.
        if getattr(self.backend, "cpu_weights", "file") != "file":
            model = f"{model}:{self.backend.cpu_weights}"
        # So can a quantized KV cache (14 of 16 grounded replies word for word the same, README, Measured).
        if getattr(self.backend, "kv_cache", "f16") != "f16":
            model = f"{model}:kv-{self.backend.kv_cache}"
        return json.dumps([self.backend.name, os.path.basename(str(model)), self.limits.max_tokens,
                           self.limits.temperature, self.limits.stop, self.max_passages, self.limits.repeat_penalty])
