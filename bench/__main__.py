"""Tandem's measurements: ``python -m bench [intents|retrieval|grounding|latency ...]``.

Each writes ``bench/results/<name>.json`` with the machine and date it ran on; the
README quotes these files. Run on the machine you want figures for; nothing here is
a timed test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    cpu, flags = "", set()
    if Path("/proc/cpuinfo").is_file():
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
        flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    # The model name alone ("AMD EPYC") does not tell these machines apart; the widest SIMD does.
    simd = next((f for f in ("avx512_vnni", "avx512f", "avx2") if f in flags), "")
    return {"cpu": f"{cpu} ({simd})" if simd else cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def banking77_test(n: int | None = None) -> tuple[list[str], list[str]]:
    """``n`` BANKING77 test rows spread over every intent (the file is sorted by intent, so
    the first rows would all be one); every row when ``n`` is None."""
    from pipeline.data_io import read_labelled_csv
    from pipeline.settings import PACKAGE_DATA

    texts, labels = read_labelled_csv(PACKAGE_DATA / "banking77" / "test.csv", "text", "category")
    if n is None or n >= len(texts):
        return texts, labels
    step = len(texts) / n
    picks = [int(i * step) for i in range(n)]
    return [texts[i] for i in picks], [labels[i] for i in picks]


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0.5, 0.95) as the latency and distributed figures take it: the median,
    else Python's ``statistics.quantiles`` (exclusive method); None without values."""
    if not values:
        return None
    if len(values) == 1 or q == 0.5:
        return round(statistics.median(values), 1)
    return round(statistics.quantiles(values, n=100)[round(q * 100) - 1], 1)


def save(name: str, payload: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    payload = {"machine": machine(), **payload}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False))
    summary = {k: v for k, v in payload.items() if k != "rows"}
    print(json.dumps(summary, indent=2, ensure_ascii=False))


def result_name(value: str) -> str:
    """``--out``: a file name under bench/results/, checked before a long run rather than after it."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value) or value.endswith(".json"):
        raise argparse.ArgumentTypeError(f"{value!r}: a plain name such as serving_q4_1 (letters, digits, _ . -; "
                                         "no folder, no .json)")
    return value


def count(value: str) -> int:
    """A number of tickets, chats, rounds, tokens or the like: a whole number of at least 1,
    checked before a long run (0 or less would measure nothing, or divide by zero at the end)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: a whole number of at least 1") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: a whole number of at least 1")
    return number


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def private_redis(prefix: str, **env: str) -> Iterator[Path]:
    """A redis-server of our own on a free port, and a scratch data dir, for this process and
    the workers it starts (through the environment); yields the scratch folder."""
    from workers.redis_server import EmbeddedRedis

    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    server = EmbeddedRedis(workdir / "redis", free_port())
    os.environ.update(TANDEM_REDIS_URL=server.start(), TANDEM_DATA_DIR=str(workdir / "data"), **env)
    try:
        yield workdir
    finally:
        server.stop()


@contextlib.contextmanager
def running_workers(envs: dict[str, dict[str, str]]) -> Iterator[dict[str, subprocess.Popen]]:
    """One worker per queue, each with its own environment, stopped on the way out."""
    workers = {queue: subprocess.Popen([sys.executable, "-m", "services.cli", "worker", "--queues", queue], env=env,
                                       cwd=Path(__file__).resolve().parent.parent,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for queue, env in envs.items()}
    try:
        yield workers
    finally:
        for worker in workers.values():
            worker.terminate()
        for worker in workers.values():
            worker.wait(30)


def wait_for_queues(names: set[str], timeout: float = 300) -> None:
    from pipeline.settings import Settings
    from workers.app import app, configure

    configure(Settings())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queues = app.control.inspect(timeout=1).active_queues() or {}
        if {q["name"] for qs in queues.values() for q in qs} >= names:
            return
    # Timing workers that never came up would measure nothing, or hang.
    raise TimeoutError(f"no worker consumed {sorted(names)} within {timeout:.0f} s")


def quiet() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def bench_intents(args) -> None:
    """BANKING77 test accuracy for the training methods that fit this machine's time budget."""
    from pipeline.chain import load_intent_model, serving_encoder
    from pipeline.classifier import IntentClassifier, TrainConfig, evaluate
    from pipeline.data_io import read_labelled_csv
    from pipeline.settings import PACKAGE_DATA, Settings

    settings = Settings()
    train = read_labelled_csv(PACKAGE_DATA / "banking77" / "train.csv", "text", "category")
    test = read_labelled_csv(PACKAGE_DATA / "banking77" / "test.csv", "text", "category")
    rows = []
    for method, lexical in [("head", False), ("head", True), *[(m, True) for m in args.encoder_methods]]:
        encoder = serving_encoder(settings, method)  # what the pipeline would serve this model with
        started = time.perf_counter()
        model = IntentClassifier.train(encoder, *train, TrainConfig(method=method, lexical=lexical, epochs=args.epochs))
        seconds = time.perf_counter() - started
        report, _ = evaluate(model, encoder, *test)
        rows.append({"method": method, "lexical": lexical, "train_seconds": round(seconds, 1),
                     "lexical_weight": model.lexical_weight, **report})
        print(rows[-1], flush=True)
    encoder = serving_encoder(settings)  # the shipped model as `tandem eval-intents` measures it
    shipped, _ = evaluate(load_intent_model(settings, encoder), encoder, *test)
    save("intents", {"dataset": "BANKING77 test (3,080)", "shipped_model": shipped, "rows": rows})


def _pipeline(load_responder: bool = True, **overrides):
    from pipeline.chain import HybridPipeline
    from pipeline.settings import Settings

    return HybridPipeline.from_settings(Settings(**overrides), load_responder=load_responder)


def bench_retrieval(args) -> None:
    from pipeline.data_io import read_labelled_csv
    from pipeline.evaluation import retrieval_recall
    from pipeline.settings import PACKAGE_DATA

    texts, labels = read_labelled_csv(PACKAGE_DATA / "banking77" / "test.csv", "text", "category")
    pipeline = _pipeline()
    save("retrieval", {"dataset": "BANKING77 test (3,080)", "articles": len(pipeline.index.articles),
                       **retrieval_recall(pipeline, texts, labels, k=3)})


def bench_oos(args) -> None:
    """The out-of-scope gate (TANDEM_OOS_MIN_SIMILARITY): what the intent model alone and with the
    gate send to out-of-scope among hand-written out-of-scope messages and in-scope ones, and the
    similarity to the nearest passage under which a share of in-scope training messages falls."""
    import numpy as np

    from pipeline.chain import SUGGESTED_ARTICLES
    from pipeline.data_io import read_labelled_csv
    from pipeline.evaluation import load_questions
    from pipeline.settings import PACKAGE_DATA, Settings

    pipeline = _pipeline(load_responder=False, oos_min_similarity=0.0)
    train, _ = read_labelled_csv(PACKAGE_DATA / "banking77" / "train.csv", "text", "category")

    def nearest(texts: list[str]) -> np.ndarray:
        return np.array([found[0].score for found in pipeline.index.search_many(pipeline.encoder.encode(texts), 1)])

    # The gate as configured (the shipped value unless TANDEM_OOS_MIN_SIMILARITY says otherwise),
    # and the value its definition gives with this run's vectors, which move slightly with the
    # machine's int8 kernels and the encoder's batches.
    threshold = Settings().oos_min_similarity
    calibrated = round(float(np.quantile(nearest(train), args.in_scope_share)), 3)
    grounding = load_questions(PACKAGE_DATA / "eval" / "grounding.jsonl")
    sets = {"out_of_scope (hand-written)": ([r["text"] for r in load_questions(PACKAGE_DATA / "eval" / "out_of_scope.jsonl")], None),
            "BANKING77 test": banking77_test(),
            "grounding questions": ([q["question"] for q in grounding], [q["intent"] for q in grounding]),
            "sample tickets": ([r["text"] for r in load_questions(PACKAGE_DATA / "tickets.jsonl")], None)}
    under_threshold = pipeline.classifier.oos_threshold
    rows = []
    for name, (texts, labels) in sets.items():
        alone = [u.out_of_scope for u in pipeline.classify(texts)]
        pipeline.settings.oos_min_similarity = threshold
        gated = pipeline.understand(texts)
        # Each message alone too, as a chat sends it: the int8 encoder's vectors move slightly
        # with their batch-mates, and a borderline message with them.
        pipeline._vectors.clear()
        one_by_one = [pipeline.understand([text])[0] for text in texts]
        pipeline._vectors.clear()
        pipeline.settings.oos_min_similarity = 0.0
        # Messages out of scope only for the intent model's low confidence get up to three articles
        # suggested; for labelled in-scope ones, how often their intent's article is among them.
        unsure = [i for i, u in enumerate(gated) if u.unsure]
        found = (sum(any(labels[i] in p.intents for p in gated[i].passages[:SUGGESTED_ARTICLES]) for i in unsure)
                 if labels else None)
        rows.append({"set": name, "n": len(texts), "intent_model_alone": round(float(np.mean(alone)), 4),
                     "with_gate": round(float(np.mean([u.out_of_scope for u in gated])), 4),
                     "unsure": len(unsure), "unsure_with_their_article_suggested": found,
                     # possible fraud under the confidence threshold, handed to a person, not out of scope
                     "handed_off_under_threshold": sum(u.escalate and u.confidence < under_threshold for u in gated),
                     "handed_off_under_threshold_alone": sum(u.escalate and u.confidence < under_threshold
                                                             for u in one_by_one)})
    save("oos", {"in_scope_share": args.in_scope_share, "threshold": threshold, "calibrated": calibrated,
                 "calibrated_on": f"BANKING77 train ({len(train):,})", "rows": rows})


def bench_grounding(args) -> None:
    """Key-fact recall and unsupported numbers per backend, before and after the guard."""
    from pipeline.evaluation import grounding_eval, load_questions
    from pipeline.llama_cpp_backend import weights_for_plain_llama_cpp
    from pipeline.settings import PACKAGE_DATA, Settings

    questions = load_questions(PACKAGE_DATA / "eval" / "grounding.jsonl")[: args.limit]
    results = {}
    for backend in args.backends:
        server = None
        # Drafts in full: "before the guard" reads the streamed draft, which stopping early would cut.
        overrides: dict = {"responder_backend": backend, "guard_stop_early": False}
        if backend == "openai":  # llama.cpp's OpenAI-compatible server on the same GGUF
            port = free_port()
            model = weights_for_plain_llama_cpp(Settings().responder_model, Settings().data_dir / "models")
            server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", model,
                                       "--port", str(port), "--n_ctx", "2048"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            overrides.update(openai_base_url=f"http://127.0.0.1:{port}/v1", responder_model="smollm2")
            _wait_http(f"http://127.0.0.1:{port}/v1/models")
        try:
            pipeline = _pipeline(**overrides)
            # The default backend also runs without second drafts, on the same pipeline in the
            # same run: what they cost in time, and what they change in the replies.
            runs = {backend: True, f"{backend}, no second draft": False} if backend == "llama_cpp" else {backend: True}
            for name, second_draft in runs.items():
                pipeline.settings.guard_second_draft = second_draft
                started = time.perf_counter()
                report = grounding_eval(pipeline, questions)
                report["seconds"] = round(time.perf_counter() - started, 1)
                report["measured"] = machine()["date"]
                report["machine"] = machine()  # backends kept from an earlier run keep their own
                results[name] = report
                print(name, {k: v for k, v in report.items() if k != "rows"}, flush=True)
        finally:
            if server:
                server.terminate()
    previous = RESULTS / "grounding.json"
    merged = json.loads(previous.read_text()) if previous.is_file() else {"backends": {}, "rows": {}}
    if merged.get("questions") != len(questions):  # a different question set: start afresh
        merged = {"backends": {}, "rows": {}}
    for backend, report in results.items():
        merged["backends"][backend] = {k: v for k, v in report.items() if k != "rows"}
        merged["rows"][backend] = report["rows"]
    merged.pop("machine", None)
    save("grounding", {"questions": len(questions), **merged})


def _wait_http(url: str, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise TimeoutError(url)


def bench_distributed(args) -> None:
    """Issue 3's figures: NLU tickets/s and time to first token, in-process against through
    Celery and Redis, on the same machine in the same run."""
    from pipeline.chain import Done, Token
    from pipeline.settings import Settings

    texts, _ = banking77_test(args.tickets)
    # Chats spread over the intents: the test file is sorted by intent, and its first rows, all
    # card_arrival, had shared one help article in the prompt-prefix cache.
    chats, _ = banking77_test(args.messages)
    with private_redis("tandem-bench-") as workdir:
        # In-process first, alone on the machine.
        pipeline = _pipeline(data_dir=workdir / "data")
        pipeline.understand([f"warm up {i}" for i in range(64)])  # not the measured texts: their vectors are kept
        from workers.batch import length_sorted_chunks

        # The same chunks as run_batch below cuts, so the two differ only by Celery and Redis.
        chunks = length_sorted_chunks([{"text": t} for t in texts], 32)
        started = time.perf_counter()
        for chunk in chunks:
            pipeline.understand([t["text"] for t in chunk])
        in_process_tps = len(texts) / (time.perf_counter() - started)
        # The first text the customer sees: a token, or, where none streamed (the guard replaced
        # a draft that streamed nothing), the reply that ends the stream. Counting only tokens
        # would leave out the slowest replies.
        in_process_ttft, quoted_only = [], {"in_process": 0, "celery": 0}
        for text in chats:
            t0 = time.perf_counter()
            for event in pipeline.stream(text + " (in-process)"):
                if isinstance(event, Token | Done):
                    in_process_ttft.append((time.perf_counter() - t0) * 1000)
                    quoted_only["in_process"] += isinstance(event, Done)
                    break
        del pipeline

        from workers.batch import run_batch
        from workers.client import submit_message
        from workers.streams import connect, stream_reply

        with running_workers({"nlu": dict(os.environ), "gen": dict(os.environ)}):
            wait_for_queues({"nlu", "gen"}, timeout=180)
            tickets = workdir / "tickets.jsonl"
            tickets.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
            # Warm up on other texts: the worker remembers recent vectors, and the measured run must not hit them.
            warm = workdir / "warm.jsonl"
            warm.write_text("".join(json.dumps({"id": str(i), "text": f"warm up {i}"}) + "\n" for i in range(256)))
            run_batch(warm, workdir / "warm-out.jsonl", drafts=False, chunk_size=32)
            started = time.perf_counter()
            run_batch(tickets, workdir / "out.jsonl", drafts=False, chunk_size=32)
            celery_tps = len(texts) / (time.perf_counter() - started)
            client = connect(Settings().resolved_redis_url)
            celery_ttft = []
            for text in chats:
                t0 = time.perf_counter()
                reply_id = submit_message(text + " (through workers)", use_cache=False)
                for _, kind, _ in stream_reply(client, reply_id):
                    if kind in ("token", "done"):
                        celery_ttft.append((time.perf_counter() - t0) * 1000)
                        quoted_only["celery"] += kind == "done"
                        break
                    if kind == "error":
                        raise RuntimeError(f"the reply to {text!r} ended in an error through the workers")
                # drain the rest so the next message does not queue behind it
                for _ in stream_reply(client, reply_id):
                    pass

    save("distributed", {
        "tickets": len(texts), "messages": len(celery_ttft), "first_text_in_the_final_reply": quoted_only,
        "nlu_tickets_per_s": {"in_process": round(in_process_tps, 1), "celery": round(celery_tps, 1),
                              "celery_over_in_process": round(celery_tps / in_process_tps, 3)},
        "first_token_ms": {"in_process_p50": percentile(in_process_ttft, 0.5),
                           "in_process_p95": percentile(in_process_ttft, 0.95),
                           "celery_p50": percentile(celery_ttft, 0.5), "celery_p95": percentile(celery_ttft, 0.95),
                           "added_p50": round(statistics.median(celery_ttft) - statistics.median(in_process_ttft), 1)},
    })


def bench_latency(args) -> None:
    """Time to first token after the models are loaded, over messages of different intents
    (to the final reply where the guard replaced a draft that streamed nothing)."""
    from pipeline.chain import Done, Token
    from pipeline.data_io import read_labelled_csv
    from pipeline.settings import PACKAGE_DATA

    texts, _ = read_labelled_csv(PACKAGE_DATA / "banking77" / "test.csv", "text", "category")
    started = time.perf_counter()
    pipeline = _pipeline()
    load_seconds = time.perf_counter() - started
    pipeline.run("warm up")
    first_tokens, understand, quoted_only = [], [], 0
    messages = ["I lost my card", *texts[:: len(texts) // args.n][: args.n - 1]]
    for text in messages:
        t0 = time.perf_counter()
        u = pipeline.understand([text])[0]
        understand.append((time.perf_counter() - t0) * 1000)
        for event in pipeline.respond(u):
            if isinstance(event, Token | Done):
                first_tokens.append((time.perf_counter() - t0) * 1000)
                quoted_only += isinstance(event, Done)
                break
    save("latency", {"n": len(first_tokens), "first_text_in_the_final_reply": quoted_only,
                     "model_load_seconds": round(load_seconds, 1),
                     "understand_ms_p50": round(statistics.median(understand), 1),
                     "first_token_ms_p50": percentile(first_tokens, 0.5), "first_token_ms_p95": percentile(first_tokens, 0.95),
                     "first_token_ms_max": round(max(first_tokens), 1),
                     "held_sentences": _held_sentences_ab(pipeline, messages)})


def _held_sentences_ab(pipeline, messages: list[str]) -> dict:
    """When the customer sees the first text of a reply, with sentences streamed as generated
    and held until the guard passes them (TANDEM_GUARD_HOLD_SENTENCES), alternating per message.
    A held draft rejected at its first sentence shows nothing until the quoted answer. Each
    run starts with only the system prompt cached: the second run of a message would
    otherwise find the whole prompt cached by the first."""
    from bench.perf import _only_system_prompt_cached
    from pipeline.chain import Done, Token
    from pipeline.responder import SYSTEM_PROMPT

    engine = pipeline.responder.backend
    seen: dict[str, list[float]] = {"off": [], "on": []}
    for message in messages:
        understanding = pipeline.understand([message])[0]
        for state in seen:
            if hasattr(engine, "forget_prefixes"):
                _only_system_prompt_cached(engine, {"role": "system", "content": SYSTEM_PROMPT})
            pipeline.settings.guard_hold_sentences = state == "on"
            started = time.perf_counter()
            try:
                for event in pipeline.respond(understanding):
                    if isinstance(event, Token | Done):
                        seen[state].append((time.perf_counter() - started) * 1000)
                        break
            finally:
                pipeline.settings.guard_hold_sentences = False
    return {state: {"first_text_ms_p50": percentile(v, 0.5), "first_text_ms_p95": percentile(v, 0.95)}
            for state, v in seen.items()}


PERFORMANCE_SUITE = ["nlu", "decode", "e2e", "serving", "hardware"]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    sub = parser.add_subparsers(dest="name")  # none: the whole performance suite, then the report
    p = sub.add_parser("intents")
    p.add_argument("--encoder-methods", nargs="*", default=[], help="also train finetune / lora (slow on CPU)")
    p.add_argument("--epochs", type=count, default=4)
    p = sub.add_parser("retrieval")
    p = sub.add_parser("oos")
    p.add_argument("--in-scope-share", type=float, default=0.005, help="share of in-scope training messages the gate may reject")
    p = sub.add_parser("grounding")
    p.add_argument("--backends", nargs="+", default=["llama_cpp", "transformers", "openai"])
    p.add_argument("--limit", type=count, default=None)
    p = sub.add_parser("distributed")
    p.add_argument("--tickets", type=count, default=2000)
    p.add_argument("--messages", type=count, default=30)
    p = sub.add_parser("latency")
    p.add_argument("-n", type=count, default=30)
    # Issue 5: bench/perf.py
    p = sub.add_parser("nlu")
    p.add_argument("--tickets", type=count, default=1024)
    p.add_argument("--peer-tickets", type=count, default=200, help="the per-ticket peers are slow; a smaller spread sample")
    p.add_argument("--full-accuracy", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", type=result_name, default="nlu", help="result name under bench/results/")
    p = sub.add_parser("decode")
    p.add_argument("--levels", type=count, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--rounds", type=count, default=2, help="replies per stream at each level")
    p.add_argument("--alone-replies", type=count, default=8)
    p.add_argument("--pairs", type=count, default=3, help="alternating llama.cpp-alone / single-stream runs")
    p.add_argument("--repeats", type=count, default=2, help="runs at each level above one stream; the best is reported")
    p.add_argument("--max-tokens", type=count, default=64)
    p.add_argument("--threads", type=count, default=None)
    p.add_argument("--gpu-layers", type=int, default=0, help="offload to the GPU (-1: all layers; CUDA build)")
    p.add_argument("--prompts", type=Path, default=None,
                   help="JSON of the prompt workloads: read if it exists, else written (lets a GPU host without "
                        "the BERT side run the same prompts)")
    p.add_argument("--out", type=result_name, default="decode", help="result name under bench/results/")
    p = sub.add_parser("e2e")
    p.add_argument("--tickets", type=count, default=64)
    p.add_argument("--peer-tickets", type=count, default=8)
    p.add_argument("--max-tokens", type=count, default=64)
    p = sub.add_parser("serving")
    p.add_argument("--levels", type=count, nargs="+", default=[1, 8, 32])
    p.add_argument("--rounds", type=count, default=2)
    p.add_argument("--max-tokens", type=count, default=64)
    p.add_argument("--out", type=result_name, default="serving", help="result name under bench/results/")
    p = sub.add_parser("priority")
    p.add_argument("--tickets", type=count, default=128, help="tickets in the job (drafted)")
    p.add_argument("--chats", type=count, default=4, help="chats sent at once while the job's drafts are queued")
    p.add_argument("--rounds", type=count, default=1)
    p.add_argument("--max-tokens", type=count, default=64)
    p.add_argument("--in-line", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the job in line with chats (priority 0); a large job then takes many minutes")
    p.add_argument("--out", type=result_name, default="priority", help="result name under bench/results/")
    sub.add_parser("hardware")
    sub.add_parser("report")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.name is None:
        # Each in a fresh process: one bench's models and threads must not weigh on the next.
        for name in PERFORMANCE_SUITE:
            subprocess.run([sys.executable, "-m", "bench", name], check=True)
        # The same serving run on the GGUF as it ships, to weigh the copy the gen worker serves.
        subprocess.run([sys.executable, "-m", "bench", "serving", "--out", "serving_q4_1"], check=True,
                       env={**os.environ, "TANDEM_RESPONDER_CPU_WEIGHTS": "file"})
        # Chats during a ticket job, on each gen pool.
        subprocess.run([sys.executable, "-m", "bench", "priority"], check=True)
        subprocess.run([sys.executable, "-m", "bench", "priority", "--out", "priority_solo"], check=True,
                       env={**os.environ, "TANDEM_GEN_POOL": "solo"})
        subprocess.run([sys.executable, "-m", "bench", "priority", "--tickets", "1024", "--no-in-line", "--out",
                        "priority_large"], check=True)
        subprocess.run([sys.executable, "-m", "bench.peft"], check=True)
        subprocess.run([sys.executable, "-m", "bench", "report"], check=True)
        return
    if args.name != "decode":
        # decode needs no torch, and keeping it out lets a CUDA build of llama.cpp load: beside
        # the H100 host's torch 2.11 it segfaulted in llama.cpp's tokenizer set-up.
        quiet()
    from bench import perf, report

    {"intents": bench_intents, "retrieval": bench_retrieval, "oos": bench_oos, "grounding": bench_grounding,
     "latency": bench_latency, "distributed": bench_distributed, "nlu": perf.bench_nlu, "decode": perf.bench_decode,
     "e2e": perf.bench_e2e, "serving": perf.bench_serving, "priority": perf.bench_priority, "hardware": perf.bench_hardware,
     "report": lambda _: report.main()}[args.name](args)


if __name__ == "__main__":
    main()
