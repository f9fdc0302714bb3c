"""Render bench/results/*.json: the README's "Measured" section on stdout, and
bench/results/REPORT.md with its plots (PNG): ``python -m bench report``."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def grounding_table(grounding: dict) -> list[str]:
    out = [f"**Grounding**, {grounding['questions']} questions with key facts (`pipeline/data/eval/grounding.jsonl`), "
           "`python -m bench grounding`:\n"]
    out.append("| backend | key-fact recall before guard | after guard | replies with an unsupported number before | after "
               "| replies that say a sentence twice | second drafts | replaced by the guard | completed by the guard "
               "| seconds, one question at a time | measured |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for backend, r in grounding["backends"].items():
        repeating = pct(r["replies_repeating_a_sentence"]) if "replies_repeating_a_sentence" in r else "n/a"
        out.append(f"| {backend} | {pct(r['key_fact_recall_before_guard'])} | {pct(r['key_fact_recall_after_guard'])} "
                   f"| {pct(r['unsupported_number_rate_before_guard'])} | {pct(r['unsupported_number_rate_after_guard'])} "
                   f"| {repeating} | {pct(r['second_drafts']) if 'second_drafts' in r else 'n/a'} "
                   f"| {pct(r['guard_replaced'])} | {pct(r['guard_completed']) if 'guard_completed' in r else 'n/a'} "
                   f"| {r.get('seconds', 'n/a')} | {r.get('measured', grounding['machine']['date'])} |")
    out.append("\n\"Before guard\" reads each reply's first draft in full (`bench grounding` runs with "
               "`TANDEM_GUARD_STOP_EARLY` off), up to where it goes off track (repeats an earlier sentence or "
               "narrates), if it does; "
               "\"after\" reads the reply.\n")
    return out


def main() -> None:
    out: list[str] = []
    any_result = next((r for r in map(load, ["intents", "retrieval", "grounding", "latency"]) if r), None)
    if any_result:
        m = any_result["machine"]
        # The CPU's vector extensions differ from block to block (the README's intro says which ran where).
        out.append(f"Machine: {m['cores']} cores, {m['cpu'].split(' (')[0]}, Python {m['python']}; no GPU except where a "
                   "block names one. Each block names its command and when it ran; raw results are in `bench/results/`.\n")
    intents = load("intents")
    if intents:
        out.append(f"**Intent accuracy**, BANKING77 test (3,080), `python -m bench intents` ({intents['machine']['date']}):\n")
        out.append("| encoder training | + n-gram model | accuracy | before the oos threshold | sent to oos | macro-F1 | ECE "
                   "| train time |\n|---|---|---|---|---|---|---|---|")
        for row in intents["rows"]:
            out.append(f"| {row['method']} | {'yes (weight ' + str(row['lexical_weight']) + ')' if row['lexical'] else 'no'} "
                       f"| {pct(row['accuracy'])} | {pct(row.get('accuracy_before_threshold'))} | {pct(row.get('rejected'))} "
                       f"| {row['macro_f1']:.3f} | {row['ece']:.3f} | {row['train_seconds']:.0f} s |")
        shipped = intents["shipped_model"]
        out.append(f"\nThe shipped model (`tandem eval-intents pipeline/data/banking77/test.csv --label-col category`): "
                   f"accuracy {100 * shipped['accuracy']:.2f}%, macro-F1 {shipped['macro_f1']:.3f}, ECE {shipped['ece']:.3f}"
                   + (f"; {100 * shipped['rejected']:.2f}% of the messages fall under the confidence threshold and are "
                      f"answered as out of scope, and the winning intent before that threshold is right for "
                      f"{100 * shipped['accuracy_before_threshold']:.2f}%" if "rejected" in shipped else "") + ".\n")
    retrieval = load("retrieval")
    if retrieval:
        out.append(f"**Retrieval**, `python -m bench retrieval` ({retrieval['machine']['date']}): recall@3 of the article written "
                   f"for the message's intent, over all {retrieval['n']} BANKING77 test messages: "
                   f"{pct(retrieval['recall_routed'])} as the pipeline retrieves (similarity fused with the intent "
                   f"probability), {pct(retrieval['recall_vector_only'])} from the vector search alone.\n")
    oos = load("oos")
    if oos:
        out.append(f"**Out of scope**, `python -m bench oos` ({oos['machine']['date']}): share of messages answered as out "
                   f"of scope by the intent model alone and with the gate on the nearest passage "
                   + (f"(`TANDEM_OOS_MIN_SIMILARITY`={oos['threshold']}; in this run {pct(oos['in_scope_share'])} of "
                      f"{oos['calibrated_on']} fall under {oos['calibrated']}):\n" if "calibrated" in oos else
                      f"(`TANDEM_OOS_MIN_SIMILARITY`={oos['threshold']}, the similarity under which "
                      f"{pct(oos['in_scope_share'])} of {oos['calibrated_on']} fall):\n"))
        suggested = all("handed_off_under_threshold" in row for row in oos["rows"])  # counted since 2026-12-07
        alone = all("handed_off_under_threshold_alone" in row for row in oos["rows"])  # since that afternoon
        out.append("| messages | n | intent model alone | with the gate |"
                   + (" articles suggested (unsure) | their intent's article among them | handed off under the threshold |"
                      if suggested else "")
                   + (" the same, each message alone |" if suggested and alone else "")
                   + "\n|" + "---|" * (4 + 3 * suggested + (suggested and alone)))
        for row in oos["rows"]:
            line = f"| {row['set']} | {row['n']} | {pct(row['intent_model_alone'])} | {pct(row['with_gate'])} |"
            if suggested:
                found, unsure = row["unsure_with_their_article_suggested"], row["unsure"]
                line += f" {unsure} | {'–' if found is None else f'{found} of {unsure}'} | {row['handed_off_under_threshold']} |"
                if alone:
                    line += f" {row['handed_off_under_threshold_alone']} |"
            out.append(line)
        out.append("")
    grounding = load("grounding")
    if grounding:
        out.extend(grounding_table(grounding))
    latency = load("latency")
    if latency:
        out.append(f"**Time to first token** after the models are loaded, in-process, `python -m bench latency` "
                   f"({latency['machine']['date']}): p50 {latency['first_token_ms_p50']:.0f} ms, p95 "
                   f"{latency['first_token_ms_p95']:.0f} ms over {latency['n']} messages (loading took "
                   f"{latency['model_load_seconds']} s)"
                   + (f"; {latency['first_text_in_the_final_reply']} of them streamed no token (the guard replaced a "
                      f"draft that streamed nothing) and count the final reply" if "first_text_in_the_final_reply"
                      in latency else "") + ".\n")
        held = latency.get("held_sentences")
        if held:
            out.append(f"The first text the customer sees, with sentences streamed as generated and held until the guard "
                       f"passes them (`TANDEM_GUARD_HOLD_SENTENCES`), the same messages alternating: p50 "
                       f"{held['off']['first_text_ms_p50']:.0f} ms against {held['on']['first_text_ms_p50']:.0f} ms held, "
                       f"p95 {held['off']['first_text_ms_p95']:.0f} ms against {held['on']['first_text_ms_p95']:.0f} ms.\n")
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
        if quoted := distributed.get("first_text_in_the_final_reply"):
            out.append(f"A message whose reply streams no token (the guard replaced a draft that streamed nothing) "
                       f"counts the final reply as its first text: {quoted['in_process']} in-process, "
                       f"{quoted['celery']} through workers.\n")
    load_result = load("load")
    if load_result:
        r = load_result
        out.append(f"**Load**, `python -m bench.load` ({r['machine']['date']}): {r['clients']} concurrent streaming chats for "
                   f"{r['seconds']} s against `tandem up`: {r['chats']} chats, {r['errors']} errors, {r['truncated']} "
                   f"truncated, {r['interleaved']} interleaved; first token p50 {r['first_token_ms_p50']} ms, p95 "
                   f"{r['first_token_ms_p95']} ms; {r['chunks_per_s']} streamed chunks/s in all. {r['note']}.")
        solo = load("load_solo")
        if solo:
            out.append(f"With `TANDEM_GEN_POOL=solo` (`python -m bench.load --out load_solo`, "
                       f"{solo['machine']['date']}): {solo['chats']} chats, {solo['errors']} errors, first token "
                       f"p50 {solo['first_token_ms_p50']} ms, p95 {solo['first_token_ms_p95']} ms; "
                       f"{solo['chunks_per_s']} streamed chunks/s.")
        samples = [(m["t"], sum(m["rss_mb"].values())) for m in r.get("memory_samples", [])]
        if len(samples) > 2:
            out.append(f"Memory of `tandem up` and its children: {samples[1][1]:.0f} MB at {samples[1][0]} s, "
                       f"{samples[-1][1]:.0f} MB at {samples[-1][0]} s.\n")
    out.extend(performance())
    print("\n".join(out))
    (RESULTS / "REPORT.md").write_text("# Tandem benchmark report\n\nWritten by `python -m bench report` from "
                                       "`bench/results/*.json`.\n\n" + "\n".join(out) + "\n" + plots())


def ms(x: float | None) -> str:
    return "–" if x is None else f"{x:,.0f} ms"


def performance() -> list[str]:
    """Issue 5's figures: ours against the peers measured in the same run."""
    out: list[str] = []
    nlu = load("nlu")
    if nlu:
        out.extend(nlu_table(nlu))
    for name in ("decode", "decode_avx2", "decode_gpu"):
        decode = load(name)
        if decode:
            out.extend(decode_table(decode, name))
    e2e = load("e2e")
    if e2e:
        r = e2e["rows"]
        out.append(f"**End to end**, classify + retrieve + a {e2e['max_tokens']}-token draft, `python -m bench e2e` "
                   f"({e2e['machine']['date']}):\n")
        out.append("| pipeline | tickets/min | tickets |\n|---|---|---|")
        for key in ("ours", "naive", "haystack"):
            if key in r:
                out.append(f"| {key} | {r[key]['tickets_per_min']} | {r[key]['n']} |")
        out.append("\n" + ", ".join(f"{k.replace('_', ' ')}: {v}×" for k, v in e2e["ratios"].items()) + ".\n")
        cache = e2e.get("prefix_cache_random_tickets")
        if cache:
            out.append(f"{cache['on']['n']} tickets drawn at random from the test split ({cache['intents']} intents among "
                       f"them), drafted with the prompt-prefix cache on and off (alternating, best of two, each run "
                       f"starting with only the system prompt cached): {cache['on']['tickets_per_min']} against "
                       f"{cache['off']['tickets_per_min']} tickets/min, {cache['on_over_off']}×; "
                       f"{cache['on']['prompt_tokens_reused']:,} prompt tokens reused.\n")
        stop = e2e.get("guard_stop_early")
        if stop:
            tokens = (f"; {stop['on']['tokens_per_ticket']} against {stop['off']['tokens_per_ticket']} tokens decoded per "
                      f"ticket" if "tokens_per_ticket" in stop["on"] else "")
            out.append(f"The first row's {stop['on']['n']} tickets with the guard stopping a draft at the first sentence it rejects "
                       f"(`TANDEM_GUARD_STOP_EARLY`) and without (alternating, best of two, each run starting with only the "
                       f"system prompt cached): "
                       f"{stop['on']['tickets_per_min']} against {stop['off']['tickets_per_min']} tickets/min, "
                       f"{stop['on_over_off']}×{tokens}. Final replies the same: {stop['same_replies_on_off']:.1%} "
                       f"(between the two runs without: {stop['same_replies_off_off']:.1%}).\n")
        second = e2e.get("guard_second_draft")
        if second:
            out.append(f"The same tickets with a second draft after one the guard rejects (`TANDEM_GUARD_SECOND_DRAFT`) "
                       f"and without (alternating, best of two, each run starting with only the system prompt cached): "
                       f"{second['on']['tickets_per_min']} against {second['off']['tickets_per_min']} tickets/min, "
                       f"{second['on_over_off']}×; {second['on']['tokens_per_ticket']} against "
                       f"{second['off']['tokens_per_ticket']} tokens decoded per ticket; replies not replaced by quoted "
                       f"sentences {second['on']['grounded']} against {second['off']['grounded']} of {second['on']['n']} "
                       f"(hand-offs and requests to rephrase among them).\n")
    serving = load("serving")
    if serving:
        out.append(f"**Serving** through Redis and the real workers (nlu + gen with `TANDEM_GEN_POOL=threads`, "
                   f"{serving['slots']} reply slots, {serving['max_tokens']}-token replies), `python -m bench serving` "
                   f"({serving['machine']['date']}):\n")
        # The same run on the Q4_1 file as it ships, beside the copy the gen worker serves.
        q4_1 = {row["concurrent_chats"]: row for row in (load("serving_q4_1") or {}).get("rows", [])}
        extra = " | Q4_1 file: p50 | p95 |" if q4_1 else " |"
        out.append("| concurrent chats | chats | failed | first token p50 | p95" + extra + "\n|---|---|---|---|---|"
                   + ("---|---|" if q4_1 else ""))
        for row in serving["rows"]:
            other = q4_1.get(row["concurrent_chats"])
            out.append(f"| {row['concurrent_chats']} | {row['chats']} | {row['failed']} | {ms(row['first_token_ms_p50'])} "
                       f"| {ms(row['first_token_ms_p95'])} |" + (f" {ms(other['first_token_ms_p50'])} | "
                                                                  f"{ms(other['first_token_ms_p95'])} |" if other else ""))
        if q4_1:
            copy = _COPIES.get(serving.get("cpu_weights", "q8_0"))
            out.append(f"\nThe last two columns serve the GGUF as it ships (`TANDEM_RESPONDER_CPU_WEIGHTS=file python -m bench "
                       f"serving --out serving_q4_1`, {load('serving_q4_1')['machine']['date']}); the others "
                       + (f"its {copy}." if copy else "the file too."))
        no_cache = load("serving_no_prefix_cache")
        if no_cache:
            out.append("\nWithout the prompt-prefix cache (`TANDEM_RESPONDER_PREFIX_CACHE_MB=0 python -m bench serving --out "
                       f"serving_no_prefix_cache`, {no_cache['machine']['date']}), first token p50 / p95: " + ", ".join(
                           f"{row['concurrent_chats']} chat{'s' if row['concurrent_chats'] > 1 else ''} "
                           f"{ms(row['first_token_ms_p50'])} / {ms(row['first_token_ms_p95'])}" for row in no_cache["rows"])
                       + f"; peak RSS of the gen worker {no_cache['peak_rss_mb']['gen_worker']} MB.")
        rss = serving["peak_rss_mb"]
        out.append(f"\nPeak RSS: gen worker {rss['gen_worker']} MB (limit 1,536), nlu worker {rss['nlu_worker']} MB "
                   "(limit 800).\n")
    out.extend(priority_table([d for name in PRIORITY_RUNS if (d := load(name))]))
    hardware = load("hardware")
    if hardware:
        e = hardware["encoder"]
        out.append(f"**Against the hardware**, `python -m bench hardware` ({hardware['machine']['date']}; SIMD: "
                   f"{', '.join(hardware['simd']) or 'unknown'}): a 2048² fp32 GEMM reaches {hardware['gemm_fp32_gflops']} "
                   f"GFLOP/s and a 512 MiB copy {hardware['memory_bandwidth_gb_s']} GB/s. The encoder runs at {e['gflops']} "
                   f"GFLOP/s ({pct(e['of_gemm_peak'])} of that GEMM peak; {e['sentences_per_s']} sentences/s, "
                   f"{e['mean_tokens']} tokens each).")
        if hardware["decode"]["rows"]:
            d = hardware["decode"]
            kind = _served_copy(d.get("weights", "")) or "Q4_1"
            out.append(f"\nThe decoder has {d['params'] / 1e6:.0f} M parameters ({d['model_bytes_mb']} MB as its {kind}): at the "
                       f"fp32 GEMM peak, no batching in fp32 could pass {d['compute_ceiling_tokens_per_s']} tokens/s on this machine"
                       + (" (llama.cpp's bfloat16 kernels can)" if kind == "BF16 copy" else "") + ".\n")
            out.append("| decode streams (short prompts) | generated tokens/s | GFLOP/s on them (prefill not counted) | of GEMM peak "
                       "| weight bytes per token | of memory bandwidth |"
                       "\n|---|---|---|---|---|---|")
            for row in d["rows"]:
                out.append(f"| {row['streams']} | {row['tokens_per_s']} | {row['gflops']} | {pct(row['of_gemm_peak'])} "
                           f"| {row['weight_bytes_per_token_mb']} MB | {pct(row['of_bandwidth'])} |")
        if hardware["decode"].get("computed"):
            out.extend(computed_table(hardware["decode"]))
        out.append("")
    peft = load("peft")
    if peft:
        rows = peft["rows"]
        command = peft.get("settings", {}).get("command") or (
            f"python -m bench.peft --epochs {rows[0].get('epochs') or 1} --train-rows "
            f"{rows[0]['train_rows'] + rows[0]['val_rows']}")
        out.append(f"**Parameter-efficient tuning** of the intent classifier, BANKING77 test (3,080), `{command}` "
                   f"({peft['machine']['date']}); every method trains on the same {rows[0]['train_rows']:,} rows, with no "
                   "n-gram fusion:\n")
        out.append("| method | trainable parameters | of all | accuracy | macro-F1 | peak RSS | train time | epochs | "
                   "load average during run |\n|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            out.append(f"| {r['method']} | {r['trainable_params']:,} | {r['trainable_pct']}% | {pct(r['accuracy'])} "
                       f"| {r['macro_f1']:.3f} | {r['peak_rss_mb']:,.0f} MB | {r['train_seconds']:,.0f} s | {r['epochs']} "
                       f"| {r.get('load_average_1m_at_end', '–')} |")
        for failure in peft.get("failures", []):
            out.append(f"| {failure['method']} | failed (exit code {failure['returncode']}) | | | | | | | |")
        out.append("")
    return out


# Result names of `make bench`'s priority runs: the default (threads) pool, solo, and a job larger
# than the threads pool's task slots (16 chunks of 32), with the job behind chats only.
PRIORITY_RUNS = ("priority", "priority_solo", "priority_large")


def priority_table(runs: list[dict]) -> list[str]:
    """Chats sent while a ticket job's drafts are queued: the job behind chats, and in line with them."""
    out: list[str] = []
    if not runs:
        return out
    first = runs[0]
    # Runs from before TANDEM_BATCH_CHUNKS_IN_FLIGHT queued every chunk at once and record no window.
    window = next((d["chunks_in_flight"] for d in runs if "chunks_in_flight" in d), None)
    which = f" (at most the {window} chunks it keeps in flight)" if window else ""
    out.append(f"**Chats during a ticket job**, `python -m bench priority`, `TANDEM_GEN_POOL=solo python -m bench priority "
               "--out priority_solo` and `python -m bench priority --tickets 1024 --no-in-line --out priority_large`: a job "
               f"with {first['max_tokens']}-token drafts (chunks of {first['chunk_size']}) is queued; once its tickets{which} "
               f"are understood and its drafts wait for the gen worker, {first['rows'][0]['chats']} chats are sent at once. "
               "The job's tasks behind chats (`TANDEM_BATCH_PRIORITY=9`, shipped) and in line with them (`0`):\n")
    out.append("| gen pool | job's tasks | chats | failed | first token p50 | p95 | job's drafts in finished chunks before a chat's "
               "first token | ran |\n|---|---|---|---|---|---|---|---|")
    for d in runs:
        for r in d["rows"]:
            where = "behind chats (9)" if r["batch_priority"] == 9 else "in line (0)"
            drafted = r["job_tickets_drafted_before_first_token"]
            span = "–" if not drafted else str(min(drafted)) if min(drafted) == max(drafted) else f"{min(drafted)}–{max(drafted)}"
            out.append(f"| {d['gen_pool']} | {where} | {r['chats']} | {r['failed']} | {ms(r['first_token_ms_p50'])} "
                       f"| {ms(r['first_token_ms_p95'])} | {span} of {r['job_tickets']} | {d['machine']['date']} |")
    out.append("\nChats' first token p50 with the job behind them, against in line: " + "; ".join(
        f"{d['gen_pool']} pool, {d['rows'][0]['job_tickets']} tickets, {d['first_token_p50_in_line_over_behind']}× sooner"
        for d in runs if d.get("first_token_p50_in_line_over_behind")) + ".\n")
    return out


_COPIES = {"bf16": "BF16 copy", "q8_0": "Q8_0 copy", "iq4_nl": "IQ4_NL copy"}  # TANDEM_RESPONDER_CPU_WEIGHTS -> how the text names it


def _served_copy(weights: str) -> str | None:
    """"BF16 copy", "Q8_0 copy" or "IQ4_NL copy" for the file name of a copy of the GGUF (weights_copy names it
    ``*.{kind}.gguf``), None for the file itself."""
    return next((name for kind, name in _COPIES.items() if weights.endswith(f".{kind}.gguf")), None)


def computed_table(d: dict) -> list[str]:
    """Tokens computed per second, the prompts' and the replies', against the batcher's rate on
    prompts alone: the gain left to batching, and what 3x one stream's generated tokens/s would take."""
    out = ["\nEvery token a forward pass computes costs the same dense FLOPs, a prompt's as a reply's; the "
           "fp32 GEMM peak is no ceiling for llama.cpp's bfloat16 and int8 kernels, but its rate on prompts alone "
           "is (**Decode throughput**'s runs; prompt tokens reused from the prefix cache not counted):\n",
           "| workload | decode streams | generated tokens/s | tokens computed/s (prompt + reply) | of the prompts-alone rate |"
           "\n|---|---|---|---|---|"]
    needs = []
    for name, w in d["computed"].items():
        rate, rows = w["prefill_only_tokens_per_s"], w["rows"]
        out.append(f"| {name} | prompts alone | | {rate} | 100% |")
        for row in rows:
            out.append(f"| {name} | {row['streams']} | {row['tokens_per_s']} | {row['computed_tokens_per_s']} "
                       f"| {pct(row['of_prefill_rate'])} |")
        single, most = rows[0], rows[-1]
        if most["streams"] > 1:  # at the widest batch's mix of prompt and reply tokens
            need = 3 * single["tokens_per_s"] * most["computed_tokens_per_s"] / most["tokens_per_s"]
            needs.append(f"{name} {need:,.0f} tokens computed/s, {need / rate:.2f}× the prompts-alone rate")
    if needs:
        out.append(f"\nThree times one stream's generated tokens/s, with the {most['streams']}-stream runs' tokens computed "
                   "per token generated, would take: " + "; ".join(needs) + ".")
    return out


def nlu_table(nlu: dict) -> list[str]:
    r, out = nlu["rows"], []
    out.append(f"**NLU throughput** (classify + retrieve), `python -m bench nlu` ({nlu['machine']['date']}, "
               f"{nlu['machine']['cores']} cores, {nlu['machine']['cpu']}):\n")
    out.append("| pipeline | tickets/s | × naive | accuracy (same intent model, its tickets) | tickets |\n|---|---|---|---|---|")
    naive = r["naive"]["tickets_per_s"]
    names = {"ours": "Tandem as shipped (batched, ONNX Runtime, int8 weights)",
             "ours_length_sorted": "the same, tickets length-sorted into chunks as a batch job cuts them",
             "ours_batches_by_count": "the same, encoder batches of 8 messages whatever their length (before 2026-12-02)",
             "ours_one_batch_at_a_time": "the same, one encoder batch of 16 at a time on every core (before 2026-12-01)",
             "ours_int8_attention": "Tandem (batched, torch, attention in int8)", "ours_fp32": "Tandem (batched, torch fp32)",
             "ours_int8": "Tandem (batched, torch, int8 dynamic everywhere)",
             "ours_on_peer_tickets": "Tandem as shipped, on the peers' tickets",
             "naive": "naive (transformers `pipeline` per ticket)", "haystack": "Haystack 2 (per ticket)"}
    for key, name in names.items():
        if key in r:
            out.append(f"| {name} | {r[key]['tickets_per_s']} | {r[key]['tickets_per_s'] / naive:.1f}× "
                       f"| {pct(r[key]['accuracy'])} | {r[key]['n']} |")
    ratios = nlu["ratios"]
    out.append(f"\nTandem over naive: {ratios['ours_over_naive']}×; over Haystack: {ratios['ours_over_haystack']}×.")
    if "length_sorted_over_arrival" in ratios:
        out.append(f" A batch job's length-sorted chunks: {ratios['length_sorted_over_arrival']}× arrival order, "
                   f"{ratios['length_sorted_over_naive']}× naive.")
    if "token_budget_over_by_count" in ratios:
        out.append(f" Encoder batches under a budget of padded tokens: {ratios['token_budget_over_by_count']}× "
                   "batches cut by count alone.")
    if nlu.get("sample_tickets_encoder"):
        t = nlu["sample_tickets_encoder"]
        out.append(f" The encoder alone on the {t['n']} sample tickets (lengths up to the 128-token limit), chunks of 64: "
                   f"{t['token_budget']} messages/s under the token budget against {t['by_count']} by count ({t['ratio']}×).")
    if "side_by_side_over_one_at_a_time" in ratios:
        out.append(f" Encoder batches side by side, one thread each: {ratios['side_by_side_over_one_at_a_time']}× "
                   "one batch at a time on every core.")
    if nlu.get("full_test_accuracy"):
        a = nlu["full_test_accuracy"]
        out.append(" On all 3,080 test messages: " + ", ".join(f"{k} {pct(v)}" for k, v in a.items()) + ".")
    out.append("")
    return out


def _length_fair(decode: dict, file_name: str, copy: str) -> list[str]:
    """The single-stream comparison phase by phase, where the run kept the pairs' phases."""
    ratios = {name: w["ratios"] for name, w in decode["workloads"].items()}
    if not all("single_equal_length_over_llama_cpp_alone" in r for r in ratios.values()):
        return []  # a run from before bench decode kept phases
    sides = [("", file_name)] + ([("_same_weights", f"the same {copy or 'weights'}")]
                                 if all("single_equal_length_over_llama_cpp_alone_same_weights" in r
                                        for r in ratios.values()) else [])
    length = decode["max_tokens"]
    return [f"The same pairs phase by phase, which the two sides' different reply lengths do not tilt (medians "
            f"over the pairs: the batcher's speed to the first token, its tokens/s after it, and the time for a "
            f"{length}-token reply from the two, each as a multiple of llama.cpp alone's): " + "; ".join(
                f"against llama.cpp alone{' on ' + where if where else ''}: " + ", ".join(
                    f"{name} {r['single_first_token_speed_over_llama_cpp_alone' + suffix]:.2f}×, "
                    f"{r['single_after_first_over_llama_cpp_alone' + suffix]:.2f}× and "
                    f"{r['single_equal_length_over_llama_cpp_alone' + suffix]:.2f}×" for name, r in ratios.items())
                for suffix, where in sides) + ".\n"]


def decode_table(decode: dict, stem: str = "decode") -> list[str]:
    where = (f"all layers on one {decode['gpu']}, {decode['machine']['cores']} CPU cores" if decode.get("gpu")
             else f"{decode['threads']} threads")
    if stem not in ("decode", "decode_gpu"):  # another machine's run beside the main one: name it
        where += f" on {decode['machine']['cpu']}"
    copy = _served_copy(decode.get("weights", ""))
    served = f" served from its {copy}" if copy else ""
    out = [f"**Decode throughput**, SmolLM2-135M Q4_1{served}, {where}, up to {decode['max_tokens']} tokens per reply, "
           f"`python -m bench decode{' --gpu-layers -1' if decode.get('gpu') else ''}"
           f"{'' if stem in ('decode', 'decode_gpu') else ' --out ' + stem}` ({decode['machine']['date']}). "
           "Aggregate generated tokens/s, prompt prefill included; `short` is the customer's question alone, "
           "`grounded` the pipeline's prompt with the help article:\n",
           "| workload | concurrent streams | aggregate tokens/s | × single stream | first token p50 |\n|---|---|---|---|---|"]
    best = "repeats" in decode  # rows are the best of their runs, llama.cpp alone's too
    file_name = "the Q4_1 file" if "Q4_1" in decode.get("llama_cpp_alone_weights", "") else "the file"
    for name, w in decode["workloads"].items():
        pick = max if best else statistics.median
        alone = (pick(p["llama_cpp_alone"] for p in w["pairs"]) if "pairs" in w
                 else w["llama_cpp_alone"]["tokens_per_s"])
        if best and any("llama_cpp_alone_same_weights" in p for p in w["pairs"]):
            out.append(f"| {name} | llama.cpp alone (1), {file_name} | {alone:.1f} | | |")
            out.append(f"| {name} | llama.cpp alone (1), the {copy or 'same weights'} | "
                       f"{max(p['llama_cpp_alone_same_weights'] for p in w['pairs']):.1f} | | |")
        else:
            out.append(f"| {name} | llama.cpp alone (1) | {alone:.1f} | | |")
        single = w["rows"][0]["tokens_per_s"]
        for row in w["rows"]:
            out.append(f"| {name} | {row['streams']} | {row['tokens_per_s']} | {row['tokens_per_s'] / single:.2f}× "
                       f"| {ms(row['first_token_ms_p50'])} |")
    pairs = len(next(iter(decode["workloads"].values())).get("pairs", []))
    how = f"median of {pairs} alternating pairs" if pairs else "one run each"
    if best:
        out.append(f"\nEach row is the best of its runs: {pairs} for one stream and llama.cpp alone, "
                   f"{decode['repeats']} at each other level (`runs_tokens_per_s` in `bench/results/{stem}.json`).")
    same = all("single_over_llama_cpp_alone_same_weights" in w["ratios"] for w in decode["workloads"].values())
    out.append(f"\nSingle stream through the batcher against llama.cpp alone{' on ' + file_name if same else ''} "
               f"({how}): " + ", ".join(f"{name} {w['ratios']['single_over_llama_cpp_alone']:.2f}×"
                                        for name, w in decode["workloads"].items())
               + ("; against llama.cpp alone on the same " + (copy or "weights") + ": " + ", ".join(
                   f"{name} {w['ratios']['single_over_llama_cpp_alone_same_weights']:.2f}×"
                   for name, w in decode["workloads"].items()) if same else "") + ".\n")
    out.extend(_length_fair(decode, file_name if same else "", copy))
    ab = {name: w["weights"] for name, w in decode["workloads"].items() if "weights" in w}
    if ab:
        first = next(iter(ab.values()))
        against = list(next(iter(first["levels"].values()))["served_over"])
        names = {"file": "the Q4_1 file", "q8_0": "the Q8_0 copy"}
        out.append(f"The {_served_copy(decode.get('weights', '')) or 'file'} against "
                   + " and against ".join(names[a] for a in against)
                   + ", same batcher, alternating runs (median ratio of aggregate tokens/s"
                   + (", in that order" if len(against) > 1 else "") + "): " + "; ".join(
                       f"{name} " + ", ".join(f"{key.split('_')[1]} stream{'s' if key != 'streams_1' else ''} "
                                              + " and ".join(f"{v['served_over'][a]:.2f}×" for a in against)
                                              for key, v in runs["levels"].items())
                       for name, runs in ab.items()) + ".\n")
    cache = {name: w["prefix_cache"] for name, w in decode["workloads"].items() if "prefix_cache" in w}
    if cache:
        out.append("The prompt-prefix cache on against off (`TANDEM_RESPONDER_PREFIX_CACHE_MB=0`), same batcher and "
                   "prompts, alternating, best of two; each run starts with only the system prompt cached when on, and "
                   "a run's questions share an article only where two were routed to the same one: " + "; ".join(
                       f"{name} " + ", ".join(
                           f"{key.split('_')[1]} stream{'s' if key != 'streams_1' else ''} "
                           f"{v['on_over_off']:.2f}× tokens/s, first token p50 {ms(v['on']['first_token_ms_p50'])} "
                           f"against {ms(v['off']['first_token_ms_p50'])} "
                           f"({v['on']['prompt_tokens_reused']:,} prompt tokens reused)"
                           for key, v in runs.items())
                       for name, runs in cache.items()) + ".\n")
    return out


def plots() -> str:
    """PNG plots beside REPORT.md; returns the Markdown that shows them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown: list[str] = []

    def figure(name: str, caption: str, draw) -> None:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        draw(ax)
        fig.tight_layout()
        fig.savefig(RESULTS / f"{name}.png", dpi=120)
        shown.append(f"![{caption}]({name}.png)")

    decode = load("decode")
    if decode:
        def draw_decode(ax) -> None:
            for (name, w), color in zip(decode["workloads"].items(), ("C0", "C1")):
                streams = [r["streams"] for r in w["rows"]]
                ax.plot(streams, [r["tokens_per_s"] for r in w["rows"]], "o-", color=color, label=f"Tandem, {name} prompts")
                ax.axhline(w["llama_cpp_alone"]["tokens_per_s"], color=color, ls="--", label=f"llama.cpp alone, {name}")
            ax.set(xscale="log", xlabel="concurrent streams", ylabel="aggregate tokens/s", title="Decode throughput")
            ax.set_xticks(streams, [str(s) for s in streams])
            ax.legend()

        figure("decode_throughput", "decode throughput", draw_decode)
    serving = load("serving")
    if serving:
        def draw_ttft(ax) -> None:
            for row in serving["rows"]:
                values = row["first_token_ms"]
                ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post",
                        label=f"{row['concurrent_chats']} concurrent chats")
            ax.set(xlabel="time to first token (ms)", ylabel="fraction of chats", title="Time to first token (CDF)")
            ax.legend()

        figure("ttft_cdf", "time to first token CDF", draw_ttft)
    nlu = load("nlu")
    if nlu:
        def draw_nlu(ax) -> None:
            names = list(nlu["rows"])
            ax.barh(names, [nlu["rows"][n]["tickets_per_s"] for n in names])
            ax.set(xscale="log", xlabel="tickets/s (log)", title="NLU throughput (classify + retrieve)")

        figure("nlu_throughput", "NLU throughput", draw_nlu)
    plt.close("all")
    return "\n".join(shown) + "\n"


if __name__ == "__main__":
    main()
