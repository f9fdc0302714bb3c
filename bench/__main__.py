"""Tandem's measurements: ``python -m bench [intents|retrieval|grounding|latency ...]``.

Each writes ``bench/results/<name>.json`` with the machine and date it ran on; the
README quotes these files. Run on the machine you want figures for; nothing here is
a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    cpu = ""
    if Path("/proc/cpuinfo").is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def save(name: str, payload: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    payload = {"machine": machine(), **payload}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False))
    summary = {k: v for k, v in payload.items() if k != "rows"}
    print(json.dumps(summary, indent=2, ensure_ascii=False))


def quiet() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def bench_intents(args) -> None:
    """BANKING77 test accuracy for the training methods that fit this machine's time budget."""
    from pipeline.classifier import IntentClassifier, TrainConfig, evaluate
    from pipeline.data_io import read_labelled_csv
    from pipeline.encoder import SentenceEncoder
    from pipeline.settings import PACKAGE_DATA, Settings

    settings = Settings()
    train = read_labelled_csv(PACKAGE_DATA / "banking77" / "train.csv", "text", "category")
    test = read_labelled_csv(PACKAGE_DATA / "banking77" / "test.csv", "text", "category")
    rows = []
    for method, lexical in [("head", False), ("head", True), *[(m, True) for m in args.encoder_methods]]:
        encoder = SentenceEncoder(settings.encoder)
        started = time.perf_counter()
        model = IntentClassifier.train(encoder, *train, TrainConfig(method=method, lexical=lexical, epochs=args.epochs))
        seconds = time.perf_counter() - started
        report, _ = evaluate(model, encoder, *test)
        rows.append({"method": method, "lexical": lexical, "train_seconds": round(seconds, 1),
                     "lexical_weight": model.lexical_weight, **report})
        print(rows[-1], flush=True)
    shipped, _ = evaluate(IntentClassifier.load(settings.resolved_intent_model), SentenceEncoder(settings.encoder), *test)
    save("intents", {"dataset": "BANKING77 test (3,080)", "shipped_model": shipped, "rows": rows})


def _pipeline(**overrides):
    from pipeline.chain import HybridPipeline
    from pipeline.settings import Settings

    return HybridPipeline.from_settings(Settings(**overrides))


def bench_retrieval(args) -> None:
    from pipeline.data_io import read_labelled_csv
    from pipeline.evaluation import retrieval_recall
    from pipeline.settings import PACKAGE_DATA

    texts, labels = read_labelled_csv(PACKAGE_DATA / "banking77" / "test.csv", "text", "category")
    pipeline = _pipeline()
    save("retrieval", {"dataset": "BANKING77 test (3,080)", "articles": len(pipeline.index.articles),
                       **retrieval_recall(pipeline, texts, labels, k=3)})


def bench_grounding(args) -> None:
    """Key-fact recall and unsupported numbers per backend, before and after the guard."""
    from pipeline.evaluation import grounding_eval, load_questions
    from pipeline.settings import PACKAGE_DATA, Settings

    questions = load_questions(PACKAGE_DATA / "eval" / "grounding.jsonl")[: args.limit]
    results = {}
    for backend in args.backends:
        server = None
        overrides: dict = {"responder_backend": backend}
        if backend == "openai":  # llama.cpp's OpenAI-compatible server on the same GGUF
            port = 8765
            server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", Settings().responder_model,
                                       "--port", str(port), "--n_ctx", "2048"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            overrides.update(openai_base_url=f"http://127.0.0.1:{port}/v1", responder_model="smollm2")
            _wait_http(f"http://127.0.0.1:{port}/v1/models")
        try:
            pipeline = _pipeline(**overrides)
            started = time.perf_counter()
            report = grounding_eval(pipeline, questions)
            report["seconds"] = round(time.perf_counter() - started, 1)
        finally:
            if server:
                server.terminate()
        results[backend] = report
        print(backend, {k: v for k, v in report.items() if k != "rows"}, flush=True)
    save("grounding", {"questions": len(questions), "backends": {b: {k: v for k, v in r.items() if k != "rows"}
                                                                  for b, r in results.items()},
                       "rows": {b: r["rows"] for b, r in results.items()}})


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


def bench_latency(args) -> None:
    """Time to first token after the models are loaded, over messages of different intents."""
    from pipeline.chain import Token
    from pipeline.data_io import read_labelled_csv
    from pipeline.settings import PACKAGE_DATA

    texts, _ = read_labelled_csv(PACKAGE_DATA / "banking77" / "test.csv", "text", "category")
    started = time.perf_counter()
    pipeline = _pipeline()
    load_seconds = time.perf_counter() - started
    pipeline.run("warm up")
    first_tokens, understand = [], []
    for text in ["I lost my card", *texts[:: len(texts) // args.n][: args.n - 1]]:
        t0 = time.perf_counter()
        u = pipeline.understand([text])[0]
        understand.append((time.perf_counter() - t0) * 1000)
        for event in pipeline.respond(u):
            if isinstance(event, Token):
                first_tokens.append((time.perf_counter() - t0) * 1000)
                break
    q = statistics.quantiles(first_tokens, n=20)
    save("latency", {"n": len(first_tokens), "model_load_seconds": round(load_seconds, 1),
                     "understand_ms_p50": round(statistics.median(understand), 1),
                     "first_token_ms_p50": round(statistics.median(first_tokens), 1), "first_token_ms_p95": round(q[18], 1),
                     "first_token_ms_max": round(max(first_tokens), 1)})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    sub = parser.add_subparsers(dest="name", required=True)
    p = sub.add_parser("intents")
    p.add_argument("--encoder-methods", nargs="*", default=[], help="also train finetune / lora (slow on CPU)")
    p.add_argument("--epochs", type=int, default=4)
    p = sub.add_parser("retrieval")
    p = sub.add_parser("grounding")
    p.add_argument("--backends", nargs="+", default=["llama_cpp", "transformers", "openai"])
    p.add_argument("--limit", type=int, default=None)
    p = sub.add_parser("latency")
    p.add_argument("-n", type=int, default=30)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet()
    {"intents": bench_intents, "retrieval": bench_retrieval, "grounding": bench_grounding,
     "latency": bench_latency}[args.name](args)


if __name__ == "__main__":
    main()
