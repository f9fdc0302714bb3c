"""Render bench/results/*.json as the README's "Measured" section: ``python -m bench.report``."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def main() -> None:
    out: list[str] = []
    any_result = next((r for r in map(load, ["intents", "retrieval", "grounding", "latency"]) if r), None)
    if any_result:
        m = any_result["machine"]
        out.append(f"Machine: {m['cores']} cores, {m['cpu']}, Python {m['python']}; no GPU. Each block names its command "
                   "and when it ran; raw results are in `bench/results/`.\n")
    intents = load("intents")
    if intents:
        out.append(f"**Intent accuracy**, BANKING77 test (3,080), `python -m bench intents` ({intents['machine']['date']}):\n")
        out.append("| encoder training | + n-gram model | accuracy | macro-F1 | ECE | train time |\n|---|---|---|---|---|---|")
        for row in intents["rows"]:
            out.append(f"| {row['method']} | {'yes (weight ' + str(row['lexical_weight']) + ')' if row['lexical'] else 'no'} "
                       f"| {pct(row['accuracy'])} | {row['macro_f1']:.3f} | {row['ece']:.3f} | {row['train_seconds']:.0f} s |")
        shipped = intents["shipped_model"]
        out.append(f"\nThe shipped model (`tandem eval-intents pipeline/data/banking77/test.csv --label-col category`): "
                   f"accuracy {pct(shipped['accuracy'])}, macro-F1 {shipped['macro_f1']:.3f}, ECE {shipped['ece']:.3f}.\n")
    retrieval = load("retrieval")
    if retrieval:
        out.append(f"**Retrieval**, `python -m bench retrieval` ({retrieval['machine']['date']}): recall@3 of the article written "
                   f"for the message's intent, over all {retrieval['n']} BANKING77 test messages: "
                   f"{pct(retrieval['recall_routed'])} as the pipeline retrieves (similarity fused with the intent "
                   f"probability), {pct(retrieval['recall_vector_only'])} from the vector search alone.\n")
    grounding = load("grounding")
    if grounding:
        out.append(f"**Grounding**, {grounding['questions']} questions with key facts (`pipeline/data/eval/grounding.jsonl`), "
                   "`python -m bench grounding`:\n")
        out.append("| backend | key-fact recall before guard | after guard | replies with an unsupported number before | after "
                   "| replaced by the guard | measured |\n|---|---|---|---|---|---|---|")
        for backend, r in grounding["backends"].items():
            out.append(f"| {backend} | {pct(r['key_fact_recall_before_guard'])} | {pct(r['key_fact_recall_after_guard'])} "
                       f"| {pct(r['unsupported_number_rate_before_guard'])} | {pct(r['unsupported_number_rate_after_guard'])} "
                       f"| {pct(r['guard_replaced'])} | {r.get('measured', grounding['machine']['date'])} |")
        out.append("")
    latency = load("latency")
    if latency:
        out.append(f"**Time to first token** after the models are loaded, in-process, `python -m bench latency` "
                   f"({latency['machine']['date']}): p50 {latency['first_token_ms_p50']:.0f} ms, p95 "
                   f"{latency['first_token_ms_p95']:.0f} ms over {latency['n']} messages (loading took "
                   f"{latency['model_load_seconds']} s).\n")
    distributed = load("distributed")
    if distributed:
        n, t = distributed["nlu_tickets_per_s"], distributed["first_token_ms"]
        out.append(f"**Through Celery and Redis**, `python -m bench distributed` ({distributed['machine']['date']}), "
                   f"{distributed['tickets']} tickets and {distributed['messages']} chat messages:\n")
        out.append("| | in-process | through workers | ratio / difference |\n|---|---|---|---|")
        out.append(f"| NLU tickets/s (classify + retrieve, chunks of 32) | {n['in_process']} | {n['celery']} | "
                   f"{n['celery_over_in_process']:.2f}× |")
        out.append(f"| first token p50 | {t['in_process_p50']:.0f} ms | {t['celery_p50']:.0f} ms | {t['added_p50']:+.0f} ms |")
        out.append(f"| first token p95 | {t['in_process_p95']:.0f} ms | {t['celery_p95']:.0f} ms | |\n")
    load_result = load("load")
    if load_result:
        r = load_result
        out.append(f"**Load**, `python -m bench.load` ({r['machine']['date']}): {r['clients']} concurrent streaming chats for "
                   f"{r['seconds']} s against `tandem up`: {r['chats']} chats, {r['errors']} errors, {r['truncated']} "
                   f"truncated, {r['interleaved']} interleaved; first token p50 {r['first_token_ms_p50']} ms, p95 "
                   f"{r['first_token_ms_p95']} ms; {r['chunks_per_s']} streamed chunks/s in all. {r['note']}.")
        samples = [(m["t"], sum(m["rss_mb"].values())) for m in r.get("memory_samples", [])]
        if len(samples) > 2:
            out.append(f"Memory of `tandem up` and its children: {samples[1][1]:.0f} MB at {samples[1][0]} s, "
                       f"{samples[-1][1]:.0f} MB at {samples[-1][0]} s.\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
