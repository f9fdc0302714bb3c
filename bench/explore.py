"""The exploratory A/Bs of 2026-12-06 and 07 behind figures the README quotes as exploratory: each prints
its figures and saves nothing. ``python -m bench.explore NAME``; none is part of ``make bench``.

- ``prefill-chunk``: one grounded stream through the batcher with 128- and 512-token prefill
  chunks, against llama.cpp alone on the same weights, four alternating rounds.
- ``passages N``: the grounding set with N passages in the prompt (llama_cpp), as `bench grounding` measures it.
- ``fusion-weight``: top-1 and top-3 article of the grounding questions as the intent probability's
  weight in the retrieval fusion goes from 1 to 0, on the set's two halves.
- ``faq-training``: the shipped intent recipe trained on BANKING77 train alone and with the help
  centre's "Common questions" lines as extra rows: BANKING77 test and grounding-set intent accuracy.
- ``onnx-optimizer``: the int8 encoder graph with and without ONNX Runtime's transformer
  optimizer: messages/s on 1,024 BANKING77 test messages, three alternating rounds.
- ``flash-attention``: the batcher with flash attention auto, off and on, at 1 and 16 streams.
- ``stream-rounds``: 1, 8 and 16 short streams, one round each against four.
- ``single-stream-phases``: one grounded stream through the batcher against llama.cpp alone on the
  same weights, split into time to first token (the prompt read) and tokens/s after it, with the
  tokens each generated: greedy replies from the two differ, so whole-reply tokens/s compares
  replies of different lengths.
- ``prefill-params``: the same grounded prompts' reads (all after the system prompt) decoded
  straight through llama.cpp's context API, no scheduler, under the batcher's context settings
  and under plain llama.cpp's, alternating: whether a setting, not the batcher, costs the time
  to first token.
- ``iq4-nl-e2e``: 64 BANKING77 test tickets drafted end to end (as `bench e2e` drafts them, 64-token
  drafts) with the gen worker's Q8_0 copy and with the IQ4_NL copy, alternating, two rounds.
- ``first-token-split``: one grounded stream's time to first token through the batcher against
  the time llama_decode spent on its prompt before it: what the scheduler adds.
- ``query-likelihood``: the grounding questions' fused top 3 articles reranked by the decoder's
  likelihood of the question given each one's passage (UPR), against the fused ranking: how often
  the question's own article comes first, on the set's two halves, with two prompt wordings.
- ``worker-memory``: a gen worker's memory as it is built, stage by stage (imports, the BERT side,
  the generator, then 16 concurrent grounded replies twice), resident and of it anonymous and
  file-backed (the GGUF copy is mapped from disk): where the **Serving** block's peak RSS goes.
- ``kv-cache``: the batcher with an f16 and a q8_0 KV cache (``TANDEM_RESPONDER_KV_CACHE``), in
  alternation at 1, 8 and 16 short and grounded streams: tokens/s, the resident memory each
  context added when it was built, and how many of the 16 grounded replies the two write alike.
- ``one-as-count``: the guard's reading of "one" as a count before a counted thing, replayed on the
  same saved drafts and replies: how many of each it changes the verdict on, per backend.
- ``static-int8``: the encoder with static int8 activations (scales calibrated once on 512 BANKING77
  train messages: MinMax in QDQ format, Percentile in QDQ and in QOperator format) against the
  shipped dynamic int8 one, whose activation scale is computed per batch: BANKING77 test accuracy
  with the shipped head, batched and with each message alone, how many messages are served another
  intent alone than batched, and encoder messages/s on 1,024 test messages, three alternating rounds.
- ``kv-cache-grounding``: the grounding set (llama_cpp, drafts in full, as `bench grounding` runs it)
  with an f16 and a q8_0 KV cache: key-fact recall and unsupported numbers before and after the guard.
- ``number-binding``: a check the guard does not make, tried on the drafts and replies `bench grounding`
  saved: a number said with the words that follow it in the passage beside another number of its
  kind ("0.5% at weekends" where the passage says "1% at weekends"), i.e. two given numbers swapped.
  How many drafts and final replies it flags, per backend, and whether it flags any article against itself.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from bench.__main__ import _pipeline, banking77_test
from pipeline.settings import PACKAGE_DATA, Settings

QUESTIONS = PACKAGE_DATA / "eval" / "grounding.jsonl"


def _questions() -> list[dict]:
    return [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]


def _batcher(**kwargs):
    from pipeline.llama_cpp_backend import LlamaCppBackend

    settings = Settings()
    engine = LlamaCppBackend(settings.responder_model, threads=os.cpu_count(), slots=16,
                             ctx_per_slot=settings.responder_ctx_per_slot, cpu_weights=settings.responder_cpu_weights,
                             copies_dir=settings.data_dir / "models", **kwargs)
    engine.warm_up()
    return engine


def prefill_chunk(args) -> None:
    from llama_cpp import Llama

    from bench.perf import _engine_run, _llama_cpp_alone, _prompts, _replies

    prompts = _prompts(16)["grounded"]
    sizes = SimpleNamespace(alone_replies=8, rounds=2)
    engines = {chunk: _batcher(prefill_chunk=chunk) for chunk in (128, 512)}
    llm = Llama(model_path=engines[128].weights_path, n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
    runs: dict = {"alone": [], 128: [], 512: []}
    for _ in range(4):
        runs["alone"].append(_llama_cpp_alone(llm, _replies(prompts, 1, sizes), 64)["tokens_per_s"])
        for chunk, engine in engines.items():
            runs[chunk].append(_engine_run(engine, _replies(prompts, 1, sizes), 1, 64)["tokens_per_s"])
    print("weights", engines[128].weights_path, {str(k): v for k, v in runs.items()})
    for chunk in (128, 512):
        print(chunk, "over llama.cpp alone (median of rounds):",
              round(statistics.median(a / b for a, b in zip(runs[chunk], runs["alone"])), 3))


def passages(args) -> None:
    from pipeline.evaluation import grounding_eval

    report = grounding_eval(_pipeline(max_passages_in_prompt=args.n), _questions())
    report.pop("rows")
    print(args.n, json.dumps(report))


def fusion_weight(args) -> None:
    pipeline = _pipeline(load_responder=False)
    questions = _questions()
    for half in ("ga", "gb"):
        part = [q for q in questions if q["id"].startswith(half)]
        messages = [q["question"] for q in part]
        understood, vectors = pipeline.classify(messages), pipeline._encode(messages)
        for weight in (1, 0.7, 0.5, 0.3, 0.2, 0.1, 0):
            tops = [[{**t, "confidence": t["confidence"] * weight} for t in u.top_intents] for u in understood]
            found = pipeline.retrieve_many(vectors, tops)
            top1 = np.mean([bool(f) and f[0].article_id == q["article_id"] for f, q in zip(found, part)])
            top3 = np.mean([q["article_id"] in [p.article_id for p in f] for f, q in zip(found, part)])
            print(half, len(part), "weight", weight, "top-1", round(float(top1), 4), "top-3", round(float(top3), 4))


def faq_training(args) -> None:
    from pipeline.chain import DEFAULT_TRAINING, serving_encoder
    from pipeline.classifier import IntentClassifier, TrainConfig, evaluate
    from pipeline.data_io import read_labelled_csv
    from pipeline.knowledge import load_articles

    settings = Settings()
    encoder = serving_encoder(settings)
    texts, labels = read_labelled_csv(PACKAGE_DATA / "banking77" / "train.csv", "text", "category")
    extra = [(q, a.intents[0]) for a in load_articles(PACKAGE_DATA / "helpcentre") for q in a.questions
             if len(a.intents) == 1]
    test_texts, test_labels = banking77_test()
    questions = _questions()
    pipeline = _pipeline(load_responder=False)
    for name, (x, y) in {"banking77": (texts, labels),
                         "banking77 + help centre questions": (texts + [q for q, _ in extra],
                                                               labels + [i for _, i in extra])}.items():
        model = IntentClassifier.train(encoder, x, y, TrainConfig(**DEFAULT_TRAINING))
        report, _ = evaluate(model, encoder, test_texts, test_labels)
        pipeline.classifier = model
        understood = pipeline.understand([q["question"] for q in questions])
        grounding = np.mean([u.intent == q["intent"] for u, q in zip(understood, questions)])
        print(f"{name} ({len(x)} rows): BANKING77 test {report['accuracy']}, grounding intent {grounding:.4f}")


def onnx_optimizer(args) -> None:
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer

    from pipeline.encoder import SentenceEncoder, activation_products, onnx_session

    settings = Settings()
    encoder = SentenceEncoder(settings.encoder, max_length=settings.encoder_max_length,
                              batch_size=settings.encoder_batch_size, batch_tokens=settings.encoder_batch_tokens)
    encoder.warm_up()
    folder = Path(tempfile.mkdtemp(prefix="tandem-onnx-"))
    fp32 = folder / "fp32.onnx"
    encoder.export_onnx(fp32)

    def int8(source: Path, target: Path) -> Path:  # as SentenceEncoder._export_int8 quantizes
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=activation_products(source),
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        return target

    fused = optimizer.optimize_model(str(fp32), model_type="bert", num_heads=12, hidden_size=encoder.dim, opt_level=1)
    print(fused.get_fused_operator_statistics())
    fused.save_model_to_file(str(folder / "fused.onnx"))
    graphs = {"shipped": int8(fp32, folder / "shipped.int8.onnx"),
              "optimized": int8(folder / "fused.onnx", folder / "fused.int8.onnx")}
    texts, _ = banking77_test()
    random.Random(0).shuffle(texts)
    batches = encoder.batches(texts[:1024])
    pool = ThreadPoolExecutor(os.cpu_count())
    speeds: dict[str, list[float]] = {name: [] for name in graphs}
    for _ in range(3):
        for name, path in graphs.items():
            run = onnx_session(path, 1).run
            started = time.perf_counter()
            list(pool.map(lambda batch, run=run: run(None, batch[1]), batches))
            speeds[name].append(round(1024 / (time.perf_counter() - started)))
    print("messages/s", speeds, "optimized over shipped per round:",
          [round(a / b, 2) for a, b in zip(speeds["optimized"], speeds["shipped"])])


def flash_attention(args) -> None:
    import llama_cpp
    from llama_cpp import _internals

    from bench.perf import _engine_run, _prompts, _replies

    workloads = _prompts(32)
    sizes = SimpleNamespace(alone_replies=8, rounds=2)
    default = _internals.LlamaContext.default_params
    engines = {}
    for name, kind in (("auto", llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO), ("off", llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED),
                       ("on", llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED)):
        def params(kind=kind):
            chosen = default()
            chosen.flash_attn_type = kind
            return chosen
        _internals.LlamaContext.default_params = staticmethod(params)
        try:
            engines[name] = _batcher()
        finally:
            _internals.LlamaContext.default_params = default
    for workload in ("short", "grounded"):
        for level in (1, 16):
            runs = {name: [_engine_run(engine, _replies(workloads[workload], level, sizes), level, 64)["tokens_per_s"]
                           for _ in range(2)] for name, engine in engines.items()}
            print(workload, level, "streams, tokens/s", runs)


def stream_rounds(args) -> None:
    from bench.perf import _engine_run, _prompts

    prompts = _prompts(64)["short"]
    engine = _batcher()
    for _ in range(2):
        print({f"{level} streams x {rounds} rounds": _engine_run(engine, prompts[:level * rounds], level, 64)["tokens_per_s"]
               for level, rounds in ((1, 8), (8, 1), (16, 1), (8, 4), (16, 4))})


def single_stream_phases(args) -> None:
    from llama_cpp import Llama

    from bench.perf import _engine_run, _llama_cpp_alone, _prompts, _replies

    prompts = _replies(_prompts(16)["grounded"], 1, SimpleNamespace(alone_replies=8, rounds=2))
    engine = _batcher()
    llm = Llama(model_path=engine.weights_path, n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
    for round_ in range(4):  # the phases bench decode keeps for each of its pairs
        a = _llama_cpp_alone(llm, prompts, 64)["phases"]
        b = _engine_run(engine, prompts, 1, 64)["phases"]
        first_a, first_b = a["first_token_ms_p50"], b["first_token_ms_p50"]
        after_a, after_b = a["tokens_per_s_after_first"], b["tokens_per_s_after_first"]
        print(f"round {round_}: first token {first_a:.0f} ms alone, {first_b:.0f} ms batcher ({first_a / first_b:.2f}x); "
              f"after it {after_a:.1f} and {after_b:.1f} tokens/s ({after_b / after_a:.2f}x); "
              f"tokens {a['tokens']} and {b['tokens']}")


def prefill_params(args) -> None:
    import llama_cpp
    from llama_cpp import _internals

    from bench.perf import _prompts, _replies

    engine = _batcher()  # for its weights, tokenizer and chat template; its own context stays idle
    prompts = _replies(_prompts(16)["grounded"], 1, SimpleNamespace(alone_replies=8, rounds=2))
    system = len(engine.tokenize_chat(prompts[0][:1], engine._system_formatter))
    tokenized = [engine.tokenize_chat(prompt) for prompt in prompts]
    batch = llama_cpp.llama_batch_init(512, 0, 1)

    def context(**settings):
        params = _internals.LlamaContext.default_params()
        params.n_threads = params.n_threads_batch = engine.threads
        params.n_batch = params.n_ubatch = 512
        for key, value in settings.items():
            setattr(params, key, value)
        return _internals.LlamaContext(model=engine._model, params=params, verbose=False)

    def decode(ctx, tokens: list[int], start: int, chunk: int) -> None:
        for low in range(start, len(tokens), chunk):
            batch.n_tokens = 0
            for i in range(low, min(low + chunk, len(tokens))):
                n = batch.n_tokens
                batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = tokens[i], i, 1, i == len(tokens) - 1
                batch.seq_id[n][0] = 0
                batch.n_tokens = n + 1
            if llama_cpp.llama_decode(ctx.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")

    batcher = {"n_seq_max": 16, "n_ctx": 16 * engine.ctx_per_slot, "kv_unified": False}
    plain = {"n_ctx": 2048, "flash_attn_type": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}  # as Llama() sets them
    variants = {  # name -> (context, prefill chunk)
        "plain llama.cpp, whole": (context(**plain), 512),
        "batcher settings, 128-token chunks": (context(**batcher), 128),
        "batcher settings, whole": (context(**batcher), 512),
        "batcher settings, flash attention off, 128-token chunks": (
            context(**batcher, flash_attn_type=llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED), 128),
        "plain llama.cpp, 128-token chunks": (context(**plain), 128)}
    for ctx, _ in variants.values():  # the system prompt stays in the cache, as both serve it
        decode(ctx, tokenized[0][:system], 0, 512)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (ctx, chunk) in variants.items():
            started = time.perf_counter()
            for tokens in tokenized:
                llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx.ctx), 0, system, -1)
                decode(ctx, tokens, system, chunk)
            seconds[name].append(time.perf_counter() - started)
    base = statistics.median(seconds["plain llama.cpp, whole"])
    reads = sum(len(t) - system for t in tokenized)
    print(f"{len(tokenized)} prompt reads of {reads} tokens after a {system}-token system prompt, "
          f"median of {args.rounds} alternating rounds:")
    for name, runs in seconds.items():
        median = statistics.median(runs)
        print(f"  {name}: {median * 1000 / len(tokenized):.0f} ms a prompt, {reads / median:.0f} tokens/s, "
              f"{base / median:.2f}x plain llama.cpp's speed (rounds {', '.join(f'{r:.2f}' for r in runs)} s)")


def iq4_nl_e2e(args) -> None:
    from bench.perf import _draft_tickets, _only_system_prompt_cached
    from pipeline.responder import SYSTEM_PROMPT

    texts, _ = banking77_test(64)
    pipelines = {kind: _pipeline(max_tokens=64, responder_cpu_weights=kind) for kind in ("q8_0", "iq4_nl")}
    for pipeline in pipelines.values():
        pipeline.run("warm up")
    for round_ in range(2):
        for kind, pipeline in pipelines.items():
            engine = pipeline.responder.backend
            _only_system_prompt_cached(engine, {"role": "system", "content": SYSTEM_PROMPT})
            pipeline._vectors.clear()  # both understand every ticket afresh
            generated = engine.tokens_generated
            row = _draft_tickets(pipeline, texts)
            print(f"round {round_} {kind}: {row['tickets_per_min']} tickets/min, "
                  f"{(engine.tokens_generated - generated) / len(texts):.1f} tokens decoded a ticket, "
                  f"{row['grounded']} of {row['n']} grounded", flush=True)


def first_token_split(args) -> None:
    import llama_cpp

    from bench.perf import _only_system_prompt_cached, _prompts, _replies
    from pipeline.responder import GenerationLimits

    decoding: list[float] = []
    decode = llama_cpp.llama_decode  # the batcher calls it through the module, so it can be timed there

    def timed(ctx, batch) -> int:
        started = time.perf_counter()
        try:
            return decode(ctx, batch)
        finally:
            decoding.append(time.perf_counter() - started)

    prompts = _replies(_prompts(16)["grounded"], 1, SimpleNamespace(alone_replies=8, rounds=2))
    engine = _batcher()
    llama_cpp.llama_decode = timed
    try:
        for round_ in range(4):
            _only_system_prompt_cached(engine, prompts[0][0])
            first, in_decode = [], []
            for prompt in prompts:
                decoding.clear()
                started = time.perf_counter()
                next(iter(engine.stream(prompt, GenerationLimits(max_tokens=1, timeout_s=600))))
                first.append(time.perf_counter() - started)
                in_decode.append(sum(decoding))
            outside = statistics.median(f - d for f, d in zip(first, in_decode))
            print(f"round {round_}: first token p50 {statistics.median(first) * 1000:.0f} ms, of which llama_decode "
                  f"{statistics.median(in_decode) * 1000:.0f} ms; outside it {outside * 1000:.1f} ms")
    finally:
        llama_cpp.llama_decode = decode


def query_likelihood(args) -> None:
    from llama_cpp import Llama

    from pipeline.classifier import _log_softmax
    from pipeline.llama_cpp_backend import weights_for_plain_llama_cpp

    settings = Settings()
    pipeline = _pipeline(load_responder=False)
    llm = Llama(model_path=weights_for_plain_llama_cpp(settings.responder_model, settings.data_dir / "models"),
                n_ctx=1024, logits_all=True, n_threads=os.cpu_count(), verbose=False)
    prompts = {"plain": "Help article:\n{passage}\n\nA customer question this article answers:",
               "chat": "<|im_start|>user\nRead this help article and write a question a customer might ask that "
                       "it answers.\n\n{passage}<|im_end|>\n<|im_start|>assistant\n"}

    def log_likelihood(prefix: str, question: str) -> float:
        head = llm.tokenize(prefix.encode(), add_bos=False, special=True)
        asked = llm.tokenize((" " + question).encode(), add_bos=False)
        llm.reset()
        llm.eval(head + asked)
        logits = np.asarray(llm.scores[len(head) - 1:len(head) + len(asked) - 1], dtype=np.float64)
        return float(_log_softmax(logits)[np.arange(len(asked)), asked].sum())

    questions = _questions()
    for half in ("ga", "gb"):
        part = [q for q in questions if q["id"].startswith(half)]
        understood = pipeline.understand([q["question"] for q in part])
        found = [(u.passages, q) for u, q in zip(understood, part) if u.passages]
        fused = np.mean([passages[0].article_id == q["article_id"] for passages, q in found])
        for name, prompt in prompts.items():
            first = [max(passages, key=lambda p: log_likelihood(prompt.format(passage=p.text), q["question"]))
                     for passages, q in found]
            reranked = np.mean([p.article_id == q["article_id"] for p, (_, q) in zip(first, found)])
            print(f"{half} ({len(found)} questions): first is the question's article: fused {fused:.3f}, "
                  f"reranked by query likelihood ({name} prompt) {reranked:.3f}", flush=True)


def _memory_mb() -> dict[str, int]:
    """This process's memory by kind ("Rss", "Anonymous", ...), in MB, from /proc/self/smaps_rollup."""
    sizes = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        key, *value = line.split()
        sizes[key.rstrip(":")] = int(value[0]) // 1024 if value and value[0].isdigit() else 0
    return sizes


def worker_memory(args) -> None:
    import threading

    def resident(stage: str) -> None:
        sizes = _memory_mb()
        print(f"{stage:<34} RSS {sizes['Rss']:>5} MB  anonymous {sizes['Anonymous']:>5} MB  files "
              f"{sizes['Rss'] - sizes['Anonymous']:>4} MB  torch imported: {'torch' in sys.modules}", flush=True)

    resident("python, bench.explore")
    import workers.tasks  # noqa: F401 (what a worker imports before it loads models)

    resident("workers.tasks imported")
    pipeline = _pipeline(load_responder=False)
    resident("encoder, intent model, index")
    pipeline.responder.warm_up()
    resident("generator (weights, KV cache)")
    understood = pipeline.understand([q["question"] for q in _questions()[:32]])

    def reply(understanding) -> None:
        for _ in pipeline.respond(understanding):
            pass

    for round_, rows in enumerate((understood[:16], understood[16:])):
        threads = [threading.Thread(target=reply, args=(u,)) for u in rows]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        resident(f"16 concurrent replies, round {round_ + 1}")


def kv_cache(args) -> None:
    from bench.perf import _engine_run, _prompts, _replies
    from pipeline.responder import GenerationLimits

    workloads = _prompts(32)
    sizes = SimpleNamespace(alone_replies=8, rounds=2)
    engines, added = {}, {}
    for kind in ("f16", "q8_0"):
        before = _memory_mb()["Anonymous"]
        engines[kind] = _batcher(kv_cache=kind)
        added[kind] = _memory_mb()["Anonymous"] - before
    print("anonymous memory each batcher added (MB):", added, flush=True)
    limits = GenerationLimits(max_tokens=64)
    texts = {kind: ["".join(engine.stream(p, limits)) for p in workloads["grounded"][:16]]
             for kind, engine in engines.items()}
    print("grounded replies alike:", sum(a == b for a, b in zip(texts["f16"], texts["q8_0"])), "of 16", flush=True)
    for workload in ("short", "grounded"):
        for level in (1, 8, 16):
            runs: dict[str, list[float]] = {kind: [] for kind in engines}
            for _ in range(args.rounds):
                for kind, engine in engines.items():
                    runs[kind].append(_engine_run(engine, _replies(workloads[workload], level, sizes), level, 64)["tokens_per_s"])
            ratio = statistics.median(a / b for a, b in zip(runs["q8_0"], runs["f16"]))
            print(workload, level, "streams, tokens/s", runs, "q8_0 over f16 (median of rounds):", round(ratio, 3), flush=True)


def kv_cache_grounding(args) -> None:
    from pipeline.evaluation import grounding_eval

    for kind in ("f16", "q8_0"):
        pipeline = _pipeline(responder_kv_cache=kind, guard_stop_early=False)
        started = time.perf_counter()
        report = grounding_eval(pipeline, _questions())
        report.pop("rows")
        print(kind, round(time.perf_counter() - started, 1), "s", json.dumps(report), flush=True)


def number_binding(args) -> None:
    import re

    from pipeline.guard import _NUMBER, _STEP_NUMBER, in_digits, numbers_in

    def bound(text: str) -> list[tuple[str, tuple[str, ...]]]:
        """Each number (with its kind, as the guard reads it) and the two words after it in its clause."""
        text = _STEP_NUMBER.sub(" ", in_digits(text, but=("one",)))
        out = []
        for match in _NUMBER.finditer(text):
            clause = re.split(r"[.,;:!?()\n–—-]", text[match.end(): match.end() + 40])[0]
            words = tuple(re.findall(r"[a-z]+(?:'[a-z]+)?", clause.lower())[:2])
            if len(words) == 2 and (value := numbers_in(match.group(0))):
                out.append((value.pop(), words))
        return out

    def kind(value: str) -> str:
        """What a number is without its digits: "£", "%", "pm", or "" for a plain count."""
        return re.sub(r"[\d.,:]", "", value)

    def swapped(reply: str, source: str) -> list[str]:
        given = bound(source)
        flags = []
        for value, words in bound(reply):
            beside = {v for v, w in given if w == words}
            if beside and value not in beside and any(kind(v) == kind(value) for v in beside):
                flags.append(f"{value} {' '.join(words)} (the passage: {', '.join(sorted(beside))})")
        return flags

    _replay_saved_drafts(swapped)


def one_as_count(args) -> None:
    import re

    from pipeline import guard

    def changed(text: str, source: str) -> list[str]:
        """The numbers whose verdict reading "one" as a count before a counted thing changes."""
        with_rule = set(guard.unsupported_numbers(text, source))
        rule, guard._ONE_AS_COUNT = guard._ONE_AS_COUNT, re.compile(r"(?!)")  # "one" left unread, as before
        try:
            return sorted(with_rule ^ set(guard.unsupported_numbers(text, source)))
        finally:
            guard._ONE_AS_COUNT = rule

    _replay_saved_drafts(changed)


def _replay_saved_drafts(check) -> None:
    """``check(text, source)`` (what it flags) on each help article against itself, then on every
    first draft and final reply `bench grounding` saved, against the passages shown for its question."""
    pipeline = _pipeline(load_responder=False)
    questions = _questions()
    sources = {q["id"]: "\n".join(f"{p.title}\n{p.text}" for p in u.passages[: pipeline.settings.max_passages_in_prompt])
               for q, u in zip(questions, pipeline.understand([q["question"] for q in questions]))}
    print("articles flagged against themselves:",
          sum(bool(check(f"{a.title}\n{a.body}", f"{a.title}\n{a.body}")) for a in pipeline.index.articles.values()))
    saved = json.loads((Path(__file__).parent / "results" / "grounding.json").read_text())
    for backend, rows in saved["rows"].items():
        drafts = replies = 0
        for row in rows:
            in_draft, in_reply = check(row["draft"], sources[row["id"]]), check(row["reply"], sources[row["id"]])
            drafts, replies = drafts + bool(in_draft), replies + bool(in_reply)
            if in_draft or in_reply:
                print(f"  {backend} {row['id']}: draft {in_draft}, reply {in_reply}")
        print(f"{backend}: {drafts} drafts and {replies} final replies flagged of {len(rows)}", flush=True)


def static_int8(args) -> None:
    import csv
    import shutil
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    from pipeline.encoder import SentenceEncoder, activation_products, onnx_session

    pipeline = _pipeline(load_responder=False)
    encoder = pipeline.encoder
    shipped = encoder._onnx
    work = Path(tempfile.mkdtemp(prefix="static-int8-"))
    fp32 = work / "fp32.onnx"
    SentenceEncoder(pipeline.settings.encoder, max_length=encoder.max_length).export_onnx(fp32)
    products = activation_products(fp32)
    train = [row["text"] for row in csv.DictReader((PACKAGE_DATA / "banking77" / "train.csv").open())]
    calibration = [train[i] for i in np.random.default_rng(0).choice(len(train), 512, replace=False)]

    class Reader(CalibrationDataReader):
        def __init__(self, fixed_shape: bool):
            batches = [batch for _, batch in encoder.batches(calibration)]
            if fixed_shape:  # a histogram takes one shape across batches: 8 messages padded to 64 tokens
                padded = []
                for batch in (b for b in batches if len(b["input_ids"]) == 8):
                    ids, mask = np.full((8, 64), encoder._pad_id, np.int64), np.zeros((8, 64), np.int64)
                    width = min(64, batch["input_ids"].shape[1])
                    ids[:, :width], mask[:, :width] = batch["input_ids"][:, :width], batch["attention_mask"][:, :width]
                    padded.append({"input_ids": ids, "attention_mask": mask})
                batches = padded
            self.batches = iter(batches)

        def get_next(self):
            return next(self.batches, None)

    sessions = {"dynamic (shipped)": shipped}
    for method, form in (("MinMax", "QDQ"), ("Percentile", "QDQ"), ("Percentile", "QOperator")):
        out = work / f"{method}.{form}.onnx"
        quantize_static(str(fp32), str(out), Reader(method != "MinMax"), quant_format=getattr(QuantFormat, form),
                        per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        op_types_to_quantize=["MatMul"], nodes_to_exclude=products,
                        calibrate_method=getattr(CalibrationMethod, method))
        sessions[f"static, {method}, {form}"] = onnx_session(out, 1)

    texts, labels = banking77_test()
    for name, session in sessions.items():
        encoder._onnx = session
        batched = encoder.encode(texts)
        alone = np.concatenate([encoder.encode([t]) for t in texts])
        served = {way: [p.intent for p in pipeline.classifier.predict(vectors, texts, k=3)]
                  for way, vectors in (("batched", batched), ("alone", alone))}
        accuracy = {way: np.mean([i == y for i, y in zip(intents, labels)]) for way, intents in served.items()}
        print(f"{name}: accuracy batched {accuracy['batched']:.2%}, alone {accuracy['alone']:.2%}; served another "
              f"intent alone than batched: {sum(a != b for a, b in zip(served['batched'], served['alone']))} of "
              f"{len(texts)}", flush=True)
    speed: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(3):
        for name, session in sessions.items():
            encoder._onnx = session
            encoder.encode(texts[:16])
            started = time.perf_counter()
            encoder.encode(texts[:1024])
            speed[name].append(1024 / (time.perf_counter() - started))
    best = max(speed["dynamic (shipped)"])
    for name, runs in speed.items():
        print(f"{name}: {max(runs):.0f} messages/s, best of three ({max(runs) / best:.2f}x shipped)")
    shutil.rmtree(work)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.explore", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="name", required=True)
    for name in ("prefill-chunk", "fusion-weight", "faq-training", "onnx-optimizer", "flash-attention", "stream-rounds",
                 "single-stream-phases", "first-token-split", "iq4-nl-e2e", "worker-memory", "query-likelihood",
                 "kv-cache-grounding", "number-binding", "static-int8", "one-as-count"):
        sub.add_parser(name)
    sub.add_parser("kv-cache").add_argument("--rounds", type=int, default=3)
    sub.add_parser("passages").add_argument("n", type=int, choices=(1, 2, 3))
    sub.add_parser("prefill-params").add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    getattr(sys.modules[__name__], args.name.replace("-", "_"))(args)


if __name__ == "__main__":
    main()
