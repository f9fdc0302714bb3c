"""The report's blocks: which weights decode served, the Q8_0 copy against the file, grounding's columns,
NLU's rows against the naive loop."""

from __future__ import annotations

from bench.report import decode_table, grounding_table, nlu_table, priority_table


def _decode(weights: str, with_ab: bool) -> dict:
    workload = {"pairs": [{"llama_cpp_alone": 80.0, "batcher": 88.0}],
                "rows": [{"streams": 1, "tokens_per_s": 88.0, "first_token_ms_p50": 70.0},
                         {"streams": 16, "tokens_per_s": 150.0, "first_token_ms_p50": 300.0}],
                "ratios": {"single_over_llama_cpp_alone": 1.1}}
    if with_ab:
        workload["weights"] = {"served": "bf16", "levels": {
            "streams_1": {"runs": [], "served_over": {"file": 1.12, "q8_0": 0.97}},
            "streams_16": {"runs": [], "served_over": {"file": 2.31, "q8_0": 1.85}}}}
    return {"weights": weights, "threads": 2, "max_tokens": 64, "machine": {"date": "2026-11-22 20:23 UTC", "cores": 2},
            "workloads": {"short": workload}}


def test_the_decode_block_names_the_copy_served_and_its_gain():
    text = "\n".join(decode_table(_decode("SmolLM2.Q4_1.abc.bf16.gguf", with_ab=True)))
    assert "served from its BF16 copy" in text
    assert "The BF16 copy against the Q4_1 file and against the Q8_0 copy" in text
    assert "short 1 stream 1.12× and 0.97×, 16 streams 2.31× and 1.85×" in text
    assert "| short | 16 | 150.0 | 1.70× |" in text
    assert "served from its Q8_0 copy" in "\n".join(decode_table(_decode("SmolLM2.Q4_1.abc.q8_0.gguf", with_ab=False)))


def test_the_decode_block_gives_the_length_fair_single_stream():
    decode = _decode("SmolLM2.Q4_1.abc.q8_0.gguf", with_ab=False)
    decode["llama_cpp_alone_weights"] = "SmolLM2.Q4_1.gguf"
    decode["workloads"]["short"]["ratios"].update({
        "single_over_llama_cpp_alone_same_weights": 0.9,
        "single_first_token_speed_over_llama_cpp_alone": 1.2, "single_after_first_over_llama_cpp_alone": 1.3,
        "single_equal_length_over_llama_cpp_alone": 1.25,
        "single_first_token_speed_over_llama_cpp_alone_same_weights": 0.91,
        "single_after_first_over_llama_cpp_alone_same_weights": 1.08,
        "single_equal_length_over_llama_cpp_alone_same_weights": 1.04})
    text = "\n".join(decode_table(decode))
    assert ("against llama.cpp alone on the Q4_1 file: short 1.20×, 1.30× and 1.25×; "
            "against llama.cpp alone on the same Q8_0 copy: short 0.91×, 1.08× and 1.04×.") in text
    assert "phase by phase" not in "\n".join(decode_table(_decode("SmolLM2.Q4_1.gguf", with_ab=False)))


def test_a_file_served_as_it_is_gets_no_copy_line():
    text = "\n".join(decode_table(_decode("SmolLM2.Q4_1.gguf", with_ab=False)))
    assert "Q8_0" not in text


def test_the_decode_block_gives_the_prefix_cache_against_none():
    decode = _decode("SmolLM2.Q4_1.gguf", with_ab=False)
    run = {"tokens_per_s": 60.0, "first_token_ms_p50": 200.0, "prompt_tokens_reused": 5000}
    decode["workloads"]["short"]["prefix_cache"] = {
        "streams_16": {"on": run, "off": {**run, "tokens_per_s": 40.0, "first_token_ms_p50": 500.0,
                                          "prompt_tokens_reused": 0}, "on_over_off": 1.5}}
    text = "\n".join(decode_table(decode))
    assert "short 16 streams 1.50× tokens/s, first token p50 200 ms against 500 ms (5,000 prompt tokens reused)" in text


def test_the_hardware_block_weighs_prompt_and_reply_tokens_against_the_prompts_alone_rate():
    from bench.report import computed_table

    rows = [{"streams": 1, "tokens_per_s": 32.0, "computed_tokens_per_s": 158.0, "of_prefill_rate": 0.35},
            {"streams": 16, "tokens_per_s": 80.0, "computed_tokens_per_s": 400.0, "of_prefill_rate": 0.889}]
    text = "\n".join(computed_table({"computed": {"grounded": {"prefill_only_tokens_per_s": 450.0, "rows": rows}}}))
    assert "| grounded | prompts alone | | 450.0 | 100% |" in text
    assert "| grounded | 16 | 80.0 | 400.0 | 88.9% |" in text
    # 3 x 32 generated tokens/s at 400 / 80 computed per generated: 480, 1.07x the prompts-alone rate
    assert "grounded 480 tokens computed/s, 1.07× the prompts-alone rate" in text


def test_the_grounding_block_gives_the_share_of_replies_that_say_a_sentence_twice():
    figures = {"key_fact_recall_before_guard": 0.3, "key_fact_recall_after_guard": 0.6, "second_drafts": 0.25,
               "unsupported_number_rate_before_guard": 0.1, "unsupported_number_rate_after_guard": 0.0,
               "replies_repeating_a_sentence": 0.5,
               "guard_replaced": 0.5, "guard_completed": 0.5, "seconds": 9.0, "measured": "2026-12-01 02:06 UTC"}
    grounding = {"questions": 2, "backends": {"llama_cpp": figures}, "machine": {"date": "2026-12-01 02:06 UTC"}}
    text = "\n".join(grounding_table(grounding))
    assert "| llama_cpp | 30.0% | 60.0% | 10.0% | 0.0% | 50.0% | 25.0% | 50.0% | 50.0% | 9.0 | 2026-12-01 02:06 UTC |" in text
    # A run from before the column existed says so rather than a figure no one measured.
    del figures["replies_repeating_a_sentence"]
    assert "| 0.0% | n/a | 25.0% |" in "\n".join(grounding_table(grounding))


def test_the_nlu_block_sets_each_row_against_the_naive_loop_and_the_encoder_against_its_old_schedule():
    row = {"accuracy": 0.93, "n": 1024}
    nlu = {"machine": {"date": "2026-12-01 05:12 UTC", "cores": 2, "cpu": "Xeon"},
           "rows": {"ours": {**row, "tickets_per_s": 175.5}, "ours_one_batch_at_a_time": {**row, "tickets_per_s": 139.3},
                    "naive": {**row, "tickets_per_s": 28.46, "n": 200}},
           "ratios": {"ours_over_naive": 6.17, "ours_over_haystack": 15.05, "side_by_side_over_one_at_a_time": 1.26}}
    text = "\n".join(nlu_table(nlu))
    assert "| Tandem as shipped (batched, ONNX Runtime, int8 weights) | 175.5 | 6.2× | 93.0% | 1024 |" in text
    assert "one encoder batch of 16 at a time on every core (before 2026-12-01) | 139.3 | 4.9× |" in text
    assert "Encoder batches side by side, one thread each: 1.26× one batch at a time" in text
    older = {**nlu, "ratios": {"ours_over_naive": 7.88, "ours_over_haystack": 14.52}}  # a run before the A/B row
    assert "side by side" not in "\n".join(nlu_table(older))


def test_the_nlu_block_reports_the_token_budget_against_batches_cut_by_count():
    row = {"accuracy": 0.93, "n": 1024}
    nlu = {"machine": {"date": "2026-12-02 13:15 UTC", "cores": 2, "cpu": "Xeon"},
           "rows": {"ours": {**row, "tickets_per_s": 515.4}, "ours_batches_by_count": {**row, "tickets_per_s": 483.9},
                    "naive": {**row, "tickets_per_s": 49.61, "n": 200}},
           "ratios": {"ours_over_naive": 10.39, "ours_over_haystack": 19.51, "token_budget_over_by_count": 1.07},
           "sample_tickets_encoder": {"n": 200, "token_budget": 666.7, "by_count": 317.4, "ratio": 2.1}}
    text = "\n".join(nlu_table(nlu))
    assert "encoder batches of 8 messages whatever their length (before 2026-12-02) | 483.9 | 9.8× |" in text
    assert "under a budget of padded tokens: 1.07× batches cut by count alone" in text
    assert "666.7 messages/s under the token budget against 317.4 by count (2.1×)" in text
    del nlu["sample_tickets_encoder"]  # a run from before the measurement says nothing of it
    assert "sample tickets" not in "\n".join(nlu_table(nlu))


def test_the_priority_block_sets_chats_behind_a_job_against_in_line_for_each_pool():
    def row(priority: int, p50: float, drafted: list[int]) -> dict:
        return {"batch_priority": priority, "job_tickets": 128, "chats": 4, "failed": 0, "first_token_ms_p50": p50,
                "first_token_ms_p95": p50 * 1.2, "job_tickets_drafted_before_first_token": drafted}

    runs = [{"machine": {"date": "2026-12-02 16:10 UTC"}, "gen_pool": pool, "max_tokens": 64, "chunk_size": 32,
             "rows": [row(9, 50_000.0, [32, 32, 32, 32]), row(0, 200_000.0, [128, 128, 128, 128])],
             "first_token_p50_in_line_over_behind": 4.0} for pool in ("solo", "threads")]
    text = "\n".join(priority_table(runs))
    assert "| solo | behind chats (9) | 4 | 0 | 50,000 ms | 60,000 ms | 32 of 128 |" in text
    assert "| threads | in line (0) | 4 | 0 | 200,000 ms |" in text
    assert "against in line: solo pool, 128 tickets, 4.0× sooner; threads pool, 128 tickets, 4.0× sooner." in text
    behind_only = {**runs[1], "rows": [row(9, 5_000.0, [0, 0, 0, 0])], "first_token_p50_in_line_over_behind": None}
    text = "\n".join(priority_table([*runs, behind_only]))
    assert "| threads | behind chats (9) | 4 | 0 | 5,000 ms |" in text
    assert text.count("× sooner") == 2, "a run without the job in line has no ratio"
    assert priority_table([]) == []
