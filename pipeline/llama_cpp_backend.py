"""llama.cpp with continuous batching: concurrent replies decode together in one batch.

One scheduler thread owns the llama.cpp context. Each step it builds one batch holding
the next token of every reply that is decoding plus a chunk of the prompt of replies
being admitted (chunked prefill, as vLLM does), runs one ``llama_decode`` and samples a
token for each reply from its own sampler chain. Replies join between steps and leave
when done, so a short reply never waits for a long one. A free slot goes to the waiting
reply of lowest ``priority`` (chats 0, a batch job's drafts TANDEM_BATCH_PRIORITY), then
to the earliest, and drafts leave ``chat_slots`` of the slots to chats. Callers see a
plain iterator of text pieces; the scheduler hands them over through a queue per reply.

Each reply owns a KV-cache sequence (a "slot"). Prompts that begin alike share the KV
state of that beginning instead of recomputing it (prefix caching): the system prompt,
which every reply has, and most of the help article, which every question routed to it
has (see ``_plan_prefix``). With a single reply active a step is one token, the same work
llama.cpp's own loop does, so the single-stream speed stays llama.cpp's.

On a CPU the GGUF is served from a copy made once (see ``weights_copy``), because batches
(prompts, many replies at once) go through llama.cpp's tiled matrix kernels (llamafile's
sgemm), which do not take Q4_1: a BF16 copy where the CPU computes in bfloat16 (AVX512-BF16),
else a Q8_0 one (README, Measured). An IQ4_NL copy, which llama.cpp repacks for its AVX2
kernels, is faster still there, but moves the weights, so it is asked for, not chosen.
"""

from __future__ import annotations

import atexit
import codecs
import contextlib
import ctypes
import hashlib
import heapq
import itertools
import logging
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import ModelLoadError, ResponderError

_DONE = object()  # end-of-reply marker in a reply's queue
# GGUF file types (llama.h LLAMA_FTYPE_*) that need no copy of each kind: a Q8_0 copy is made
# only of files below 8 bits (F32, F16, Q8_0 and BF16 are served as they are), a BF16 copy of
# anything but BF16, an IQ4_NL copy of anything but IQ4_NL.
_NO_COPY = {"q8_0": {0, 1, 7, 32}, "bf16": {32}, "iq4_nl": {25}}
CPU_WEIGHTS = ("auto", "bf16", "q8_0", "iq4_nl", "file")
KV_CACHE_TYPES = ("f16", "q8_0")
_RECENT_PROMPTS = 64  # prompts remembered (as tokens) to find the beginnings they share
log = logging.getLogger(__name__)


def gguf_file_type(model_path: str) -> int:
    """The file's ``general.file_type`` (llama.h LLAMA_FTYPE_*), -1 when it names none."""
    from llama_cpp import _internals

    params = _internals.LlamaModel.default_params()
    params.vocab_only = True  # the header and vocabulary: enough to read the file type
    try:
        probe = _internals.LlamaModel(path_model=model_path, params=params, verbose=False)
    except ValueError as exc:
        raise ModelLoadError(f"cannot load GGUF {model_path!r}: {exc}") from None
    try:
        return int(probe.metadata().get("general.file_type", -1))
    finally:
        probe.close()


def cpu_weights_for_this_machine() -> str:
    """"bf16" where this llama.cpp build runs bfloat16 kernels (AVX512-BF16), else "q8_0".

    On the bundled SmolLM2 with 2 cores (AVX512-BF16, bench decode, 2026-11-23): one stream ran
    at 0.94-1.06x the Q8_0 copy and 16 streams at 1.64-1.65x; without bfloat16 instructions
    llama.cpp converts every weight, and Q8_0 is the faster copy."""
    import llama_cpp

    return "bf16" if "AVX512_BF16 = 1" in llama_cpp.llama_print_system_info().decode() else "q8_0"


def extra_buffers_safe() -> bool:
    """Whether llama.cpp may hold weights in its extra CPU buffers (AMX tiles, repacked layouts).

    Not where this llama.cpp build runs AMX: on a Xeon with AMX (2026-12-02) its first decode of
    the Q4_1 file, or of the Q8_0 copy, crashed the process (SIGSEGV), llama-cpp-python's own
    ``Llama`` too. Without them the same weights decode, and the BF16 copy, which AMX does not
    take, ran as fast either way (52.3 against 52.8 tokens/s, one stream, 2 threads)."""
    import llama_cpp

    return "AMX_INT8 = 1" not in llama_cpp.llama_print_system_info().decode()


def weights_for_plain_llama_cpp(model_path: str, cache_dir: Path) -> str:
    """The GGUF a plain llama.cpp (its ``Llama`` or its server, which keep the extra buffers) can
    run on this machine: the file, or where those buffers crash it, its BF16 copy."""
    return model_path if extra_buffers_safe() else weights_copy(model_path, cache_dir, "bf16")


def weights_copy(model_path: str, cache_dir: Path, kind: str, threads: int = 0) -> str:
    """The GGUF with its weights re-encoded as ``kind`` ("q8_0", "bf16" or "iq4_nl"), made once
    and kept in ``cache_dir``; a file that needs no such copy (``_NO_COPY``) comes back as it is.

    Q8_0 and BF16 hold the bundled Q4_1 weights closely (BF16 to about 3 significant digits; Q8_0
    to half a step of 1/127 of each block's largest weight), so the replies stay the original's
    in substance (README, Measured: Grounding). IQ4_NL is another 4-bit code, which llama.cpp
    repacks for its AVX2 batch kernels; re-encoding 4-bit weights into it moves them, so it is
    not the default (README, Measured: Decode). The copies are 1.5x (Q8_0), 2.8x (BF16) and 0.9x
    (IQ4_NL) the Q4_1 file. Where a copy cannot be made, the original is served and a warning logged."""
    import llama_cpp

    file_type = gguf_file_type(model_path)
    if file_type in _NO_COPY[kind] or file_type < 0:
        return model_path
    source = Path(model_path).resolve()
    stat = source.stat()
    digest = hashlib.sha256(f"{source}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = Path(cache_dir) / f"{source.stem}.{digest}.{kind}.gguf"
    if target.is_file():
        return str(target)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        quantize = llama_cpp.llama_model_quantize_default_params()
        quantize.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "bf16": llama_cpp.LLAMA_FTYPE_MOSTLY_BF16,
                          "iq4_nl": llama_cpp.LLAMA_FTYPE_MOSTLY_IQ4_NL}[kind]
        quantize.allow_requantize = True
        quantize.nthread = threads
        if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(quantize)) != 0:
            raise OSError("llama_model_quantize failed")
        os.replace(partial, target)  # whole or not at all: workers starting together race here safely
    except OSError as exc:
        with contextlib.suppress(OSError):  # the folder itself may be what failed
            partial.unlink(missing_ok=True)
        log.warning("serving %s as it is: no %s copy in %s (%s)", model_path, kind, cache_dir, exc)
        return model_path
    return str(target)


@dataclass
class _Reply:
    prompt: list[int]
    max_tokens: int
    temperature: float
    repeat_penalty: float
    stop: list[str]
    timeout_s: float
    priority: int = 0
    # timeout_s after admission, then after each token: waiting for a slot is not generating, and
    # a reply that keeps streaming on a loaded machine is slow, not stalled
    deadline: float = float("inf")
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: bool = False
    slot: int = -1
    fed: int = 0  # prompt tokens already in the KV cache
    cuts: list[int] = field(default_factory=list)  # where the prompt's prefill chunks end
    save_at: int = 0  # keep the KV state once this many prompt tokens are in (0: don't)
    next_token: int = -1  # sampled, not yet decoded
    n_generated: int = 0
    sampler: object = None
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    text: str = ""  # everything generated so far
    emitted: int = 0  # characters of ``text`` handed to the caller


class LlamaCppBackend:
    """A GGUF model served with continuous batching; ``slots`` replies decode at once."""

    name = "llama_cpp"

    def __init__(self, model_path: str, threads: int | None = None, slots: int = 16, ctx_per_slot: int = 1024,
                 prefill_chunk: int = 128, prefix_cache_mb: int = 128, gpu_layers: int = 0,
                 cpu_weights: str = "file", copies_dir: Path | None = None, chat_slots: int = 0,
                 kv_cache: str = "f16"):
        if cpu_weights not in CPU_WEIGHTS:
            raise ValueError(f"cpu_weights must be one of {CPU_WEIGHTS}, not {cpu_weights!r}")
        if kv_cache not in KV_CACHE_TYPES:
            raise ValueError(f"kv_cache must be one of {KV_CACHE_TYPES}, not {kv_cache!r}")
        self.kv_cache = kv_cache
        self.model_path = model_path
        # What a CPU serves: "bf16" or "q8_0" (a copy of the file in copies_dir), or "file". On a
        # GPU llama.cpp's own 4-bit kernels batch well, and a copy would take more of its memory.
        if gpu_layers != 0 or copies_dir is None:
            cpu_weights = "file"
        self.cpu_weights = cpu_weights_for_this_machine() if cpu_weights == "auto" else cpu_weights
        self.copies_dir = copies_dir
        self.weights_path = model_path  # the file served: model_path or its copy
        self.threads = threads or os.cpu_count() or 1
        self.slots = slots
        # Slots that replies of priority above 0 (a batch job's drafts) leave to chats, so a chat
        # need not wait for a draft to finish; at least one slot stays open to drafts.
        self.chat_slots = max(0, min(chat_slots, slots - 1))
        self.draft_slots = slots - self.chat_slots  # how many drafts decode at once
        self.ctx_per_slot = ctx_per_slot
        self.prefill_chunk = prefill_chunk
        self.prefix_cache_bytes = prefix_cache_mb * 2**20
        self.gpu_layers = gpu_layers
        # Re-entrant: a reply that fails while being admitted (lock held) frees its slot too.
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._waiting: list[tuple[int, int, _Reply]] = []  # a heap: (priority, arrival, reply)
        self._arrivals = itertools.count()
        self._active: list[_Reply] = []
        self._free = list(range(slots))  # a heap of free sequence ids
        # Shared prompt beginnings (tokens) -> their saved KV state, least recently used first.
        self._prefixes: OrderedDict[tuple[int, ...], ctypes.Array] = OrderedDict()
        self._recent: deque[tuple[int, ...]] = deque(maxlen=_RECENT_PROMPTS)
        self.prefix_tokens_reused = 0  # for tests and benchmarks
        self._model = None
        self._batcher: threading.Thread | None = None
        self._closing = False
        self.max_batch_seen = 0  # for tests and benchmarks
        self.tokens_generated = 0

    # -- loading ---------------------------------------------------------------------------
    def warm_up(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            self._load()
        from pipeline.responder import GenerationLimits  # imported here: responder imports this module

        # First decode allocates llama.cpp's compute buffers; do it before the first customer.
        for _ in self.stream([{"role": "user", "content": "hi"}], GenerationLimits(max_tokens=1)):
            pass

    def _load(self) -> None:
        if not os.path.isfile(self.model_path):
            raise ModelLoadError(f"no GGUF file at {self.model_path!r} (set TANDEM_RESPONDER_MODEL)")
        import llama_cpp
        from llama_cpp import _internals
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if self.cpu_weights != "file":
            self.weights_path = weights_copy(self.model_path, self.copies_dir, self.cpu_weights, self.threads)
        model_params = _internals.LlamaModel.default_params()
        model_params.n_gpu_layers = self.gpu_layers  # ignored by a CPU-only build
        model_params.use_extra_bufts = extra_buffers_safe()
        try:
            model = _internals.LlamaModel(path_model=self.weights_path, params=model_params, verbose=False)
        except ValueError as exc:
            raise ModelLoadError(f"cannot load GGUF {self.weights_path!r}: {exc}") from None
        params = _internals.LlamaContext.default_params()
        params.n_seq_max = self.slots
        params.n_ctx = self.ctx_per_slot * self.slots
        params.n_batch = params.n_ubatch = max(self.prefill_chunk + self.slots, 512)
        params.n_threads = params.n_threads_batch = self.threads
        # One KV stream per sequence, so attention reads only its own reply's cells. llama.cpp
        # then puts in one ubatch only sequences with consecutive ids, in increasing order, so
        # slots are handed out lowest first and each step adds its tokens in slot order:
        # scattered slots had decoded one ubatch per reply, with no batching at all. On 16
        # grounded replies this beat a unified cache by 1.25x (whose attention reads every
        # reply's cells), and matched it on short ones (2 cores, 2026-11-22).
        params.kv_unified = False
        if self.kv_cache == "q8_0":
            # llama.cpp reads a quantized V cache only inside flash attention: asked for, not left to "auto".
            params.type_k = params.type_v = llama_cpp.GGML_TYPE_Q8_0
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        self._ctx = _internals.LlamaContext(model=model, params=params, verbose=False)
        self._llama = llama_cpp
        self._memory = llama_cpp.llama_get_memory(self._ctx.ctx)
        self._batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
        self._n_batch = params.n_batch
        self._internals = _internals
        meta = model.metadata()
        template = meta.get("tokenizer.chat_template")
        if not template:
            raise ModelLoadError(f"{self.model_path!r} carries no chat template")
        eos, bos = model.token_get_text(model.token_eos()), model.token_get_text(model.token_bos())
        self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        self._system_formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos,
                                                     add_generation_prompt=False)
        self._piece = ctypes.create_string_buffer(64)
        self._model = model
        self._batcher = threading.Thread(target=self._run, name="llama-cpp-batcher", daemon=True)
        self._batcher.start()
        atexit.register(self._stop_batcher)

    def _stop_batcher(self) -> None:
        """End the batcher after its current step, before the interpreter exits. A reader that
        stops early (the guard ends a draft that goes off track) leaves it decoding one more
        step, and one still running on llama.cpp's threads when exit destroys llama.cpp's static
        state crashed the process after the reply was out: `tandem ask` exited with SIGSEGV (in
        ggml_cpu_extra_compute_forward) in 4 of 8 runs on a Xeon with AMX (2026-12-07)."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._batcher is not None and self._batcher is not threading.current_thread():
            self._batcher.join(timeout=30)

    # -- the caller's side -----------------------------------------------------------------
    def stream(self, messages: list[dict], limits) -> Iterator[str]:
        """Text pieces of the reply to ``messages``; ``limits`` is a GenerationLimits."""
        self.warm_up()
        prompt = self.tokenize_chat(messages)
        if len(prompt) + limits.max_tokens > self.ctx_per_slot:
            raise ResponderError(f"the prompt is {len(prompt)} tokens; with {limits.max_tokens} to generate it exceeds the "
                                 f"{self.ctx_per_slot}-token context of a slot (raise TANDEM_RESPONDER_CTX_PER_SLOT)")
        timeout = limits.timeout_s
        reply = _Reply(prompt=prompt, max_tokens=limits.max_tokens, temperature=limits.temperature,
                       repeat_penalty=limits.repeat_penalty, stop=list(limits.stop), timeout_s=timeout,
                       priority=limits.priority)
        reply.cuts = self._chunk_ends(messages, prompt)
        with self._wake:
            heapq.heappush(self._waiting, (limits.priority, next(self._arrivals), reply))
            self._wake.notify()
        try:
            while True:
                try:
                    item = reply.out.get(timeout=timeout + 5)
                except queue.Empty:
                    if reply.slot < 0:  # still waiting for a slot (behind other replies): the limit starts then
                        continue
                    raise ResponderError.timed_out(timeout) from None
                if item is _DONE:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            reply.cancelled = True  # a caller that stops reading frees the slot at the next step

    def tokenize_chat(self, messages: list[dict], formatter=None) -> list[int]:
        formatted = (formatter or self._formatter)(messages=messages)
        return self._model.tokenize(formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True)

    def _chunk_ends(self, messages: list[dict], prompt: list[int]) -> list[int]:
        """Where the prompt's prefill chunks end: after the system message, then every
        ``prefill_chunk`` tokens, then at the prompt's end. They depend on the prompt alone, so
        a reply starting from a cached beginning (always one of these points) computes the same
        chunks, and gets the same numbers, as one that prefills it all: a redelivered reply
        (workers.streams.ResumingWriter) must write the text its first try did."""
        start = 0
        if messages and messages[0].get("role") == "system":
            system = self.tokenize_chat(messages[:1], self._system_formatter)
            if prompt[:len(system)] == system and len(system) < len(prompt):
                start = len(system)
        ends = [*range(self.prefill_chunk, start, self.prefill_chunk), start] if start else []
        ends += range(start + self.prefill_chunk, len(prompt), self.prefill_chunk)
        return [*ends, len(prompt)]

    def forget_prefixes(self) -> None:
        """Drop every cached prompt beginning (benchmarks start each run cold)."""
        with self._lock:
            self._prefixes.clear()
            self._recent.clear()

    @property
    def busy(self) -> int:
        return len(self._active) + len(self._waiting)

    # -- the scheduler ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._active and not self._closing:
                    self._wake.wait()
                if self._closing:
                    return
                self._admit()
            try:
                self._step()
            except Exception as exc:  # a failed decode fails the replies in it, not the worker
                for reply in list(self._active):
                    self._finish(reply, ResponderError(f"generation failed: {exc}"))

    def _admit(self) -> None:
        while self._waiting and self._free:
            reply = self._waiting[0][2]  # lowest priority first: a draft on top means no chat waits
            if (reply.priority > 0 and not reply.cancelled
                    and sum(r.priority > 0 for r in self._active) >= self.draft_slots):
                return
            heapq.heappop(self._waiting)
            if reply.cancelled:
                continue
            reply.slot = heapq.heappop(self._free)
            reply.deadline = time.monotonic() + reply.timeout_s
            self._active.append(reply)
            try:
                reply.sampler = self._make_sampler(reply)
                if self.prefix_cache_bytes > 0:
                    self._plan_prefix(reply)
            except Exception as exc:  # fails this reply alone; the scheduler goes on
                self._finish(reply, ResponderError(f"generation failed: {exc}"))

    def _plan_prefix(self, reply: _Reply) -> None:
        """Start the reply from the longest cached beginning of its prompt, and mark the
        furthest chunk end up to which it shares its prompt with a recent one, to be kept.

        Nothing needs to know the prompt's layout: the system prompt becomes a cached beginning
        once two prompts have shared it, and the help article's first chunks once two questions
        routed to it have. Each is saved from the slot of the reply that reached it, so no
        extra decoding is done. (Copying KV cells between slots with ``llama_memory_seq_cp``
        copies a whole per-sequence stream, and measured slower than decoding again.)"""
        prompt = tuple(reply.prompt)
        points = reply.cuts[:-1]  # the last chunk stays the reply's own: it yields the first logits
        cached = max((p for p in self._prefixes if len(p) in points and prompt[:len(p)] == p), key=len, default=())
        if cached and self._llama.llama_state_seq_set_data(self._ctx.ctx, self._prefixes[cached],
                                                           len(self._prefixes[cached]), reply.slot):
            self._prefixes.move_to_end(cached)
            reply.fed = len(cached)
            self.prefix_tokens_reused += len(cached)
        shared = max((_common_length(prompt, p) for p in self._recent), default=0)
        reply.save_at = max((point for point in points if reply.fed < point <= shared), default=0)
        self._recent.append(prompt)

    def _keep_prefix(self, reply: _Reply) -> None:
        """Save the slot's KV state, which holds exactly the first ``save_at`` prompt tokens."""
        llama, ctx = self._llama, self._ctx.ctx
        size = llama.llama_state_seq_get_size(ctx, reply.slot)
        state = (ctypes.c_uint8 * size)()
        llama.llama_state_seq_get_data(ctx, state, size, reply.slot)
        self._prefixes[tuple(reply.prompt[:reply.save_at])] = state
        reply.save_at = 0
        while sum(len(s) for s in self._prefixes.values()) > self.prefix_cache_bytes:
            self._prefixes.popitem(last=False)

    def _make_sampler(self, reply: _Reply):
        sampler = self._internals.LlamaSampler()
        # Same chain as llama-cpp-python's own sampling, so replies match the single-stream ones.
        sampler.add_penalties(n_vocab=self._model.n_vocab(), penalty_last_n=64, penalty_repeat=reply.repeat_penalty,
                              penalty_freq=0.0, penalty_present=0.0)
        if reply.temperature <= 0:
            sampler.add_greedy()
        else:
            sampler.add_top_k(40)
            sampler.add_top_p(0.95, 1)
            sampler.add_min_p(0.05, 1)
            sampler.add_temp(reply.temperature)
            sampler.add_dist(int.from_bytes(os.urandom(4), "little"))
        return sampler

    def _step(self) -> None:
        now = time.monotonic()
        for reply in list(self._active):
            if reply.cancelled:
                self._finish(reply, None)
            elif now > reply.deadline:
                self._finish(reply, ResponderError.timed_out(reply.timeout_s))
        batch = self._batch
        batch.n_tokens = 0
        sampled: list[tuple[_Reply, int]] = []
        # Every decoding reply gets its next token; replies being admitted share what is left
        # of the batch for prompt chunks, chats' prompts first (lowest priority, then slot), so
        # a chat's prompt is not prefilled after those of a batch of drafts admitted with it.
        budget = self._n_batch - sum(reply.fed == len(reply.prompt) for reply in self._active)
        chunks: dict[int, int] = {}  # slot -> prompt tokens it feeds this step
        for reply in sorted(self._active, key=lambda r: (r.priority, r.slot)):
            # a whole chunk or none: chunks must end where _chunk_ends puts them
            if reply.fed < len(reply.prompt) and (take := next(e for e in reply.cuts if e > reply.fed) - reply.fed) <= budget:
                chunks[reply.slot] = take
                budget -= take
        for reply in sorted(self._active, key=lambda r: r.slot):  # tokens go in slot order (see ``_load``)
            if reply.fed == len(reply.prompt):
                self._add(reply.next_token, reply.fed + reply.n_generated - 1, reply.slot, True)
                sampled.append((reply, batch.n_tokens - 1))
            elif take := chunks.get(reply.slot, 0):
                for i in range(reply.fed, reply.fed + take):
                    self._add(reply.prompt[i], i, reply.slot, i == len(reply.prompt) - 1)
                reply.fed += take
                if reply.fed == len(reply.prompt):
                    sampled.append((reply, batch.n_tokens - 1))
        if not batch.n_tokens:
            return
        status = self._llama.llama_decode(self._ctx.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        self.max_batch_seen = max(self.max_batch_seen, len(sampled))
        for reply in self._active:
            if reply.save_at and reply.fed == reply.save_at:
                self._keep_prefix(reply)
        for reply, index in sampled:
            token = reply.sampler.sample(self._ctx, index)
            self._emit(reply, token)

    def _emit(self, reply: _Reply, token: int) -> None:
        if self._llama.llama_vocab_is_eog(self._model.vocab, token):
            return self._finish(reply, None)
        reply.next_token = token
        reply.n_generated += 1
        reply.deadline = time.monotonic() + reply.timeout_s
        self.tokens_generated += 1
        n = self._llama.llama_token_to_piece(self._model.vocab, token, self._piece, len(self._piece), 0, False)
        reply.text += reply.decoder.decode(self._piece.raw[:max(n, 0)])
        cut = next((reply.text.find(s) for s in reply.stop if s and s in reply.text), None)
        if cut is not None:
            reply.text = reply.text[:cut]
            return self._finish(reply, None)
        # Hold back a tail that could still become a stop string.
        hold = max((k for s in reply.stop for k in range(1, len(s)) if reply.text.endswith(s[:k])), default=0)
        if len(reply.text) - hold > reply.emitted:
            reply.out.put(reply.text[reply.emitted:len(reply.text) - hold])
            reply.emitted = len(reply.text) - hold
        if reply.n_generated >= reply.max_tokens:
            self._finish(reply, None)

    def _finish(self, reply: _Reply, error: Exception | None) -> None:
        if error is None and len(reply.text) > reply.emitted:
            reply.out.put(reply.text[reply.emitted:])
        reply.out.put(error if error is not None else _DONE)
        self._active.remove(reply)
        self._memory_rm(reply.slot)
        if reply.sampler is not None:
            reply.sampler.close()
        with self._lock:
            heapq.heappush(self._free, reply.slot)

    # -- llama.cpp plumbing ----------------------------------------------------------------
    def _add(self, token: int, pos: int, seq: int, logits: bool) -> None:
        batch, i = self._batch, self._batch.n_tokens
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
        batch.seq_id[i][0] = seq
        batch.n_tokens = i + 1

    def _memory_rm(self, seq: int) -> None:
        self._llama.llama_memory_seq_rm(self._memory, seq, -1, -1)


def _common_length(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n  # a[:low] == b[:low], a[:high] != b[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle
    return low
