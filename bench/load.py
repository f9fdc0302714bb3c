"""Concurrent streaming chats against a running Tandem API: ``python -m bench.load``.

Each client loops for ``--seconds``: send a chat with ``stream=true``, read the SSE
chunks, and check that the stream is whole (ends with a finish chunk and [DONE]) and
is its own (every chunk carries its completion id). Without ``--url`` it starts
``tandem up`` on private ports and stops it afterwards. Results go to
``bench/results/load.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import psutil

from bench.__main__ import count, free_port, percentile, result_name, save
from pipeline.settings import Settings


async def one_chat(client: httpx.AsyncClient, url: str, message: str) -> dict:
    started = time.perf_counter()
    first = None
    ids, tokens, finished, done = set(), 0, False, False
    async with client.stream("POST", f"{url}/v1/chat/completions", timeout=300,
                             json={"model": "tandem", "stream": True,
                                   "messages": [{"role": "user", "content": message}]}) as response:
        if response.status_code != 200:
            return {"error": f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            ids.add(chunk["id"])
            choice = chunk["choices"][0]
            if choice["delta"].get("content"):
                tokens += 1
                first = first or time.perf_counter()
            finished = finished or choice["finish_reason"] == "stop"
    return {"ttft_ms": (first - started) * 1000 if first else None, "tokens": tokens,
            "seconds": time.perf_counter() - started, "whole": finished and done, "own": len(ids) == 1}


async def client_loop(url: str, messages: list[str], offset: int, until: float, results: list) -> None:
    """One chat at a time until ``until``; client ``offset`` takes messages offset, offset+50, ..."""
    async with httpx.AsyncClient() as client:
        n = offset
        while time.monotonic() < until:
            try:
                results.append(await one_chat(client, url, messages[n % len(messages)]))
            except httpx.HTTPError as exc:
                results.append({"error": f"{type(exc).__name__}: {exc}"})
            n += 50  # clients never share a message, so replies come from the generator, not the cache


def tree_rss_mb(pid: int) -> dict[str, float]:
    """RSS of `tandem up` and each child (workers, API, Redis), by command."""
    out = {}
    try:
        parent = psutil.Process(pid)
        for proc in [parent, *parent.children(recursive=True)]:
            cmd = " ".join(proc.cmdline()[2:5]) or proc.name()
            out[f"{proc.pid} {cmd}"] = round(proc.memory_info().rss / 2**20, 1)
    except psutil.Error:
        pass
    return out


_NOT_PASSED_ON = {f"TANDEM_{name}" for name in ("REDIS_URL", "DATA_DIR", "API_HOST", "API_PORT", "EMBEDDED_REDIS_PORT",
                                                 "API_KEYS", "API_KEYS_FILE", "RATE_LIMIT_PER_MINUTE")}


async def run(args) -> None:
    from pipeline.data_io import read_labelled_csv
    from pipeline.settings import PACKAGE_DATA

    messages, _ = read_labelled_csv(PACKAGE_DATA / "banking77" / "test.csv", "text", "category")
    up = None
    url = args.url
    if not url:
        api_port = free_port()
        # The caller's settings reach `tandem up` (TANDEM_GEN_POOL=solo is how `make bench` runs the
        # solo pool), except those that would point it at another Redis, folder or port, or
        # make its API refuse the clients' unauthenticated requests.
        env = {k: v for k, v in os.environ.items() if k not in _NOT_PASSED_ON}
        env.update(TANDEM_DATA_DIR=tempfile.mkdtemp(prefix="tandem-load-"), TANDEM_API_PORT=str(api_port),
                   TANDEM_EMBEDDED_REDIS_PORT=str(free_port()), HF_HUB_OFFLINE="1", TANDEM_REQUEST_TIMEOUT_S="300")
        up = subprocess.Popen([sys.executable, "-m", "services.cli", "up"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{api_port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or up.poll() is not None:
                up.send_signal(signal.SIGINT)
                up.wait(60)
                raise SystemExit(f"tandem up was not ready at {url} within 300 s (exit code {up.poll()})")
            await asyncio.sleep(1)
    try:
        results: list[dict] = []
        memory = []
        until = time.monotonic() + args.seconds
        clients = [asyncio.create_task(client_loop(url, messages, i, until, results)) for i in range(args.clients)]
        started = time.monotonic()
        while not all(c.done() for c in clients):
            if up:
                memory.append({"t": round(time.monotonic() - started), "rss_mb": tree_rss_mb(up.pid)})
            await asyncio.sleep(5)
        await asyncio.gather(*clients)
        elapsed = time.monotonic() - started
    finally:
        if up:
            up.send_signal(signal.SIGINT)
            up.wait(60)
    ok = [r for r in results if "error" not in r]
    ttft = sorted(r["ttft_ms"] for r in ok if r["ttft_ms"] is not None)

    gen_pool = None if args.url else Settings().gen_pool  # the pool `tandem up` started with; a --url server's own
    save(args.out, {
        "clients": args.clients, "seconds": args.seconds, "wall_seconds": round(elapsed, 1),
        "chats": len(results), "errors": len(results) - len(ok),
        "error_samples": [r["error"] for r in results if "error" in r][:5],
        "truncated": sum(not r["whole"] for r in ok), "interleaved": sum(not r["own"] for r in ok),
        "first_token_ms_p50": percentile(ttft, 0.5), "first_token_ms_p95": percentile(ttft, 0.95),
        "chunks_per_s": round(sum(r["tokens"] for r in ok) / elapsed, 1),
        "chat_seconds_p50": round(statistics.median(r["seconds"] for r in ok), 1) if ok else None,
        "memory_samples": memory[:: max(1, len(memory) // 6)] + memory[-1:],
        "gen_pool": gen_pool,
        "note": {None: "the gen worker's pool is the server's own",
                 "threads": "the gen worker's thread pool hands concurrent chats to the batcher together",
                 "solo": "the solo gen worker takes one chat at a time (the threads pool batches them)"}[gen_pool],
    })


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.load")
    parser.add_argument("--url", help="a running API (default: start `tandem up` on private ports)")
    parser.add_argument("--clients", type=count, default=50)
    parser.add_argument("--seconds", type=count, default=60)
    parser.add_argument("--out", type=result_name, default="load", help="result name under bench/results/")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
