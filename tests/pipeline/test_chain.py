from __future__ import annotations

import json

import pytest

from pipeline.chain import (
    HANDOFF_OPENING,
    HANDOFF_REPLY,
    OOS_REPLY,
    UNSURE_REPLY,
    Done,
    Meta,
    Token,
    Understanding,
    clean_message,
    handoff_under_threshold,
)
from pipeline.errors import InputError
from pipeline.evaluation import grounding_eval, load_questions, retrieval_recall
from pipeline.knowledge import Passage
from pipeline.responder import ANSWER, STEPS
from pipeline.settings import PACKAGE_DATA

RESULT_KEYS = {"intent", "confidence", "top_intents", "passages", "reply", "grounded", "escalate", "timings_ms"}


@pytest.mark.parametrize("message, error", [
    ("", "empty"), ("   \n\t ", "empty"), ("x" * 100_000, "100000 characters"),
    (b"caf\xe9", "not valid UTF-8"), (None, "must be text"),
])
def test_bad_messages_are_rejected_clearly(message, error):
    with pytest.raises(InputError, match=error):
        clean_message(message, 4000)


def test_control_characters_are_dropped():
    assert clean_message("hi\x00 there\x1b", 100) == "hi there"


def test_the_generation_settings_reach_the_responder(pipeline, settings):
    limits = pipeline.responder.limits
    assert (limits.max_tokens, limits.temperature, limits.stop, limits.timeout_s, limits.repeat_penalty) == (
        settings.max_tokens, settings.temperature, settings.stop, settings.timeout_s, settings.repeat_penalty)
    assert (pipeline.guard.similarity_threshold, pipeline.guard.complete_sentences) == (
        settings.guard_similarity, settings.guard_complete_sentences)


def test_lost_card_streams_a_grounded_reply(pipeline):
    events = list(pipeline.stream("I lost my card"))
    assert isinstance(events[0], Meta) and isinstance(events[-1], Done)
    tokens = [e for e in events if isinstance(e, Token)]
    assert len(tokens) > 3
    result = events[-1].result
    assert set(result.to_dict()) >= RESULT_KEYS
    assert result.intent == "lost_or_stolen_card" and not result.escalate
    assert "lost-or-stolen-card" in result.sources
    assert all({"article_id", "score", "text"} <= set(p) for p in result.passages)
    assert result.reply.strip()
    assert {"encode", "classify", "retrieve", "first_token", "generate", "guard", "total"} <= set(result.timings_ms)
    # Issue 2's demo. The first draft ("I'm sorry for your loss, but I'm unable to assist you")
    # fails the guard; the second, asked for the article's steps, passes it (Q4_1, Q8_0 and BF16 weights alike).
    assert result.grounded
    assert "Cards → Security" in result.reply
    assert result.reply == since_last_restart(tokens)


def since_last_restart(tokens: list[Token]) -> str:
    """What a client shows: the tokens from the last second-draft restart on, joined."""
    start = max((i for i, t in enumerate(tokens) if t.restart), default=0)
    return "".join(t.text for t in tokens[start:]).strip()


DELIVERY_QUESTION = "How long does card delivery take?"


def _stream_with_draft(pipeline, monkeypatch, *pieces: str) -> list:
    # The generator is replaced by a fixed draft: these test the guard's step, not the model.
    monkeypatch.setattr(pipeline.responder, "stream", lambda *a, **k: (p for p in pieces))
    return list(pipeline.stream(DELIVERY_QUESTION))


def test_a_vague_grounded_reply_is_completed_with_the_facts_it_left_out(pipeline, monkeypatch):
    events = _stream_with_draft(pipeline, monkeypatch, "We will post your new card ", "to your address. ")
    tokens, result = [e for e in events if isinstance(e, Token)], events[-1].result
    assert "card-delivery-estimate" in result.sources
    assert result.grounded and tokens[-1].from_guard and not any(t.from_guard for t in tokens[:-1])
    draft, added = result.reply.split("\n\n")
    assert draft.strip() == "We will post your new card to your address."
    assert "3–5 working days" in added  # the fact the draft left out
    assert result.reply == "".join(t.text for t in tokens).strip()


def test_a_reply_that_already_says_the_facts_is_left_as_drafted(pipeline, monkeypatch):
    understanding = pipeline.understand([DELIVERY_QUESTION])[0]
    answer = pipeline.guard.extractive_answer(DELIVERY_QUESTION, understanding.passages[:1])
    events = _stream_with_draft(pipeline, monkeypatch, answer)
    assert events[-1].result.reply == answer and events[-1].result.grounded
    assert not any(isinstance(e, Token) and e.from_guard for e in events)


def _recorded_draft(pipeline, monkeypatch, pieces: list[str], second: list[str] | None = None) -> tuple[list, dict]:
    """Streams DELIVERY_QUESTION with a fixed draft; also says how much of it was read and whether it was
    closed. Without ``second`` there is no second draft; with it, the second draft is those pieces."""
    record = {"read": 0, "closed": False, "instructions": []}
    if second is None:
        monkeypatch.setattr(pipeline.settings, "guard_second_draft", False)

    def draft(*args, instruction: str = ANSWER, **kwargs):
        record["instructions"].append(instruction)
        try:
            for piece in pieces if instruction == ANSWER else second:
                record["read"] += 1
                yield piece
        except GeneratorExit:
            record["closed"] = True
            raise

    monkeypatch.setattr(pipeline.responder, "stream", draft)
    return list(pipeline.stream(DELIVERY_QUESTION)), record


# The first sentence fails on its number; the pieces after it would cost decoding for nothing.
REJECTED_DRAFT = ["Delivery takes 9 working days. We", " post it ", "to your address. ", "It is free."]


def test_generation_stops_at_the_first_sentence_the_guard_rejects(pipeline, monkeypatch):
    events, record = _recorded_draft(pipeline, monkeypatch, REJECTED_DRAFT)
    assert record == {"read": 1, "closed": True, "instructions": [ANSWER]}
    result = events[-1].result
    assert not result.grounded
    assert result.reply == pipeline.guard.extractive_answer(DELIVERY_QUESTION, result_passages(pipeline))
    drafted = "".join(e.text for e in events if isinstance(e, Token) and not e.quoted)
    assert drafted == "Delivery takes 9 working days. "  # not "We"


def test_stopping_early_changes_how_much_is_decoded_not_the_reply(pipeline, monkeypatch):
    early, _ = _recorded_draft(pipeline, monkeypatch, REJECTED_DRAFT)
    identity = pipeline.reply_identity
    monkeypatch.setattr(pipeline.settings, "guard_stop_early", False)
    assert pipeline.reply_identity != identity  # a cached reply replays the tokens streamed
    late, record = _recorded_draft(pipeline, monkeypatch, REJECTED_DRAFT)
    assert record == {"read": 4, "closed": False, "instructions": [ANSWER]}
    assert early[-1].result.reply == late[-1].result.reply and not late[-1].result.grounded


def test_sentences_the_guard_passes_stream_on(pipeline, monkeypatch):
    pieces = ["Standard delivery takes 3–5 working days in the UK.", "\n\n", "It is free for your first card. "]
    events, record = _recorded_draft(pipeline, monkeypatch, pieces)
    assert record == {"read": 3, "closed": False, "instructions": [ANSWER]} and events[-1].result.grounded


def test_held_sentences_stream_only_once_the_guard_has_passed_them(pipeline, monkeypatch):
    identity = pipeline.reply_identity
    monkeypatch.setattr(pipeline.settings, "guard_hold_sentences", True)
    assert pipeline.reply_identity != identity
    passing = ["Standard delivery takes ", "3–5 working days in the UK. ", "It is free for ", "your first card."]
    events, _ = _recorded_draft(pipeline, monkeypatch, passing)
    drafted = [e.text for e in events if isinstance(e, Token) and not e.from_guard]
    assert drafted == ["Standard delivery takes 3–5 working days in the UK. ", "It is free for your first card."]
    assert events[-1].result.grounded and "first_token" in events[-1].result.timings_ms

    events, record = _recorded_draft(pipeline, monkeypatch, [*passing[:2], *REJECTED_DRAFT])
    tokens = [e for e in events if isinstance(e, Token)]
    assert [t.text for t in tokens[:-1]] == [passing[0] + passing[1]]  # not a word of the rest
    assert record == {"read": 3, "closed": True, "instructions": [ANSWER]} and not events[-1].result.grounded
    assert tokens[-1].quoted and tokens[-1].restart  # the quoted answer withdraws the sentence shown


# A greedy small model going round: the same sentence again, until max_tokens.
LOOPING_DRAFT = ["Standard delivery takes ", "3–5 working days in the UK. ", "It is free for ", "your first card. ",
                 "Standard ", "delivery takes ", "3–5 working days in the UK. ", "Standard delivery"]


def test_a_draft_that_goes_round_again_or_narrates_ends_there_and_shows_none_of_it(pipeline, monkeypatch):
    events, record = _recorded_draft(pipeline, monkeypatch, LOOPING_DRAFT)
    assert record == {"read": 7, "closed": True, "instructions": [ANSWER]}  # decoding stops at the repeat
    drafted = "".join(e.text for e in events if isinstance(e, Token) and not e.from_guard)
    assert drafted.strip() == "Standard delivery takes 3–5 working days in the UK. It is free for your first card."
    result = events[-1].result
    assert result.grounded and result.reply.split("\n\n")[0].strip() == drafted.strip()  # then the guard's completion

    # A sentence that begins like an earlier one streams once it turns out to be another.
    different = [*LOOPING_DRAFT[:4], "Standard ", "delivery is ", "free for your first card."]
    events, _ = _recorded_draft(pipeline, monkeypatch, different)
    tokens = [e.text for e in events if isinstance(e, Token) and not e.from_guard]
    assert tokens[-2:] == ["Standard delivery is ", "free for your first card."] and "".join(tokens) == "".join(different)

    # Narration ends a draft too, and none of it streams.
    narrated = [*LOOPING_DRAFT[:4], "The ", "customer is ", "asking about delivery."]
    events, record = _recorded_draft(pipeline, monkeypatch, narrated)
    assert record == {"read": 6, "closed": True, "instructions": [ANSWER]}
    assert "".join(e.text for e in events if isinstance(e, Token) and not e.from_guard) == drafted

    # A draft whose last sentence, ended by the end of the stream, is a repeat.
    events, record = _recorded_draft(pipeline, monkeypatch, [*LOOPING_DRAFT[:4], "It is free ", "for your first card."])
    assert record["closed"] is False and events[-1].result.reply.split("\n\n")[0].strip() == drafted.strip()


PASSING_DRAFT = ["Standard delivery takes ", "3–5 working days in the UK. ", "It is free for ", "your first card."]


def test_a_rejected_draft_gets_a_second_draft_that_restarts_the_stream(pipeline, monkeypatch):
    assert pipeline.settings.guard_second_draft, "on by default"
    identity = pipeline.reply_identity
    events, record = _recorded_draft(pipeline, monkeypatch, REJECTED_DRAFT, PASSING_DRAFT)
    assert record["instructions"] == [ANSWER, STEPS] and record["read"] == 1 + len(PASSING_DRAFT)
    tokens = [e for e in events if isinstance(e, Token)]
    assert tokens[0].text == "Delivery takes 9 working days. " and not tokens[0].restart
    assert tokens[1].text == PASSING_DRAFT[0] and tokens[1].restart
    assert not any(t.restart for t in tokens[2:])
    result = events[-1].result
    assert result.grounded and result.reply.startswith("".join(PASSING_DRAFT))
    assert result.reply == since_last_restart(tokens)

    drafted = [t for t in tokens if not t.from_guard]  # the guard's completion is neither draft's
    assert [t.second_draft for t in drafted] == [False] + [True] * (len(drafted) - 1)

    # A first draft that narrates from its first word streams nothing, so no restart marks the
    # second; its tokens still say which draft wrote them (bench grounding's "before the guard").
    narrated = ["A ", "customer asked ", "about delivery. ", *PASSING_DRAFT]
    events, record = _recorded_draft(pipeline, monkeypatch, narrated, PASSING_DRAFT)
    assert record["instructions"] == [ANSWER, STEPS]
    tokens = [e for e in events if isinstance(e, Token) and not e.from_guard]
    assert tokens and all(t.second_draft and not t.restart for t in tokens)
    assert "".join(t.text for t in tokens) == "".join(PASSING_DRAFT)

    monkeypatch.setattr(pipeline.settings, "guard_second_draft", False)
    assert pipeline.reply_identity != identity
    events, record = _recorded_draft(pipeline, monkeypatch, REJECTED_DRAFT, PASSING_DRAFT)
    assert record["instructions"] == [ANSWER] and not events[-1].result.grounded


def test_when_both_drafts_fail_the_reply_quotes_the_article(pipeline, monkeypatch):
    events, record = _recorded_draft(pipeline, monkeypatch, REJECTED_DRAFT, REJECTED_DRAFT)
    assert record["instructions"] == [ANSWER, STEPS] and record["read"] == 2
    result = events[-1].result
    assert not result.grounded
    assert result.reply == pipeline.guard.extractive_answer(DELIVERY_QUESTION, result_passages(pipeline))
    # The quoted answer streams, withdrawing the rejected drafts the client was shown.
    tokens = [e for e in events if isinstance(e, Token)]
    assert [t.quoted for t in tokens] == [False, False, True]
    assert tokens[-1].restart and tokens[-1].from_guard and tokens[-1].text == result.reply
    assert result.reply == since_last_restart(tokens)
    assert result.timings_ms["first_token"] < result.timings_ms["total"]


def test_a_quoted_answer_after_held_drafts_that_showed_nothing_is_the_only_token(pipeline, monkeypatch):
    monkeypatch.setattr(pipeline.settings, "guard_hold_sentences", True)
    events, _ = _recorded_draft(pipeline, monkeypatch, REJECTED_DRAFT, REJECTED_DRAFT)
    tokens = [e for e in events if isinstance(e, Token)]
    result = events[-1].result
    assert len(tokens) == 1 and tokens[0].quoted and not tokens[0].restart
    assert not result.grounded and tokens[0].text == result.reply
    assert "first_token" in result.timings_ms


def test_a_held_rejected_draft_showed_nothing_so_the_second_does_not_restart(pipeline, monkeypatch):
    monkeypatch.setattr(pipeline.settings, "guard_hold_sentences", True)
    events, _ = _recorded_draft(pipeline, monkeypatch, REJECTED_DRAFT, PASSING_DRAFT)
    tokens = [e for e in events if isinstance(e, Token) and not e.from_guard]
    assert [t.text for t in tokens] == ["Standard delivery takes 3–5 working days in the UK. ",
                                        "It is free for your first card."]
    assert not any(t.restart for t in tokens) and events[-1].result.grounded


def test_the_bundled_model_gives_the_same_reply_with_and_without_stopping_early(pipeline, monkeypatch):
    understanding = pipeline.understand(["I lost my card"])[0]
    early = list(pipeline.respond(understanding))
    monkeypatch.setattr(pipeline.settings, "guard_stop_early", False)
    late = list(pipeline.respond(understanding))
    assert early[-1].result.reply == late[-1].result.reply
    assert early[-1].result.grounded == late[-1].result.grounded
    early_draft, late_draft = (first_draft([e for e in run if isinstance(e, Token)]) for run in (early, late))
    # Stopped early, the rejected draft streams no more than its beginning. How much shorter it
    # is depends on where the model's draft fails: the Q8_0 copy's failed in its first sentence
    # (cut short), the BF16 copy's in its last (nothing left to cut); the cut itself is tested
    # on a fixed draft above.
    assert early_draft and late_draft and late_draft.startswith(early_draft)


def first_draft(tokens: list[Token]) -> str | None:
    """The text streamed before a second draft restarted the reply; None when none did."""
    restarts = [i for i, t in enumerate(tokens) if t.restart]
    return "".join(t.text for t in tokens[: restarts[0]]) if restarts else None


def result_passages(pipeline) -> list:
    return pipeline.understand([DELIVERY_QUESTION])[0].passages[:1]


def test_completion_can_be_turned_off(pipeline, monkeypatch):
    identity = pipeline.reply_identity
    monkeypatch.setattr(pipeline.guard, "complete_sentences", 0)
    assert pipeline.reply_identity != identity  # cached completed replies are not served
    events = _stream_with_draft(pipeline, monkeypatch, "We will post your new card to your address.")
    assert events[-1].result.reply == "We will post your new card to your address."


def test_out_of_scope_gets_a_rephrase_request_without_generation(pipeline, monkeypatch):
    def no_generation(*args, **kwargs):
        raise AssertionError("the generator must not run for out-of-scope messages")

    monkeypatch.setattr(pipeline.responder, "stream", no_generation)
    result = pipeline.run("asdkjh qwe zzzz")
    assert result.intent == "oos" and result.reply == OOS_REPLY
    assert result.passages == [] and result.sources == [] and not result.escalate

    # A banking question the intent model cannot place (confidence under its threshold, a passage
    # near) gets the articles retrieval found for it, still without generation.
    message = "I'm on the free plan – can I make a single-use card number for online shopping?"
    understanding = pipeline.understand([message])[0]
    assert understanding.out_of_scope and understanding.unsure and understanding.passages
    assert understanding.top_intents[0]["intent"] == "get_disposable_virtual_card"
    result = pipeline.run(message)
    assert result.intent == "oos" and result.grounded and not result.escalate
    suggested = understanding.passages[:3]
    assert result.reply.startswith(UNSURE_REPLY + "".join(f"\n- {p.title}: {p.url}" for p in suggested) + "\n\n")
    # The first article's lead, word for word, answers the question as asked.
    assert result.reply.endswith('From "How to get a disposable virtual card": Disposable virtual cards are included '
                                 "with the Plus and Premium plans. Create one in Cards → Add card → Disposable virtual "
                                 "card; its number changes automatically after every payment, and you can create up "
                                 "to 20 a day.")
    assert result.sources[0] == "get-disposable-virtual-card" and len(result.sources) == 3
    assert "https://help.northwind.example/articles/get-disposable-virtual-card" in result.reply


def test_possible_fraud_under_the_confidence_threshold_still_goes_to_a_person(pipeline):
    # A BANKING77 test message (direct_debit_payment_not_recognised) whose top intent is a hand-off
    # one, under the threshold that would otherwise send it to out-of-scope.
    message = ("im so mad right now. theres several charges that I think my x boyfriend made on my card. the companys "
               "on the website wouldn't refund me my money, they told me to contact my bank. DO something please.")
    understanding = pipeline.understand([message])[0]
    assert understanding.confidence < pipeline.classifier.oos_threshold
    assert understanding.intent == understanding.top_intents[0]["intent"] in pipeline.settings.handoff_intents
    assert understanding.escalate and not understanding.out_of_scope and not understanding.unsure
    assert pipeline.run_understood(understanding).reply.startswith(HANDOFF_OPENING)

    # Sample ticket T0038 leans to a card intent under the threshold, but its nearest passage is
    # the compromised-card article: retrieval's word for fraud is enough.
    message = ("My wallet was stolen on the tube this morning and there are already contactless payments on my card "
               "I didn't make. Block it and refund me please!")
    understanding = pipeline.understand([message])[0]
    assert understanding.confidence < pipeline.classifier.oos_threshold
    assert understanding.top_intents[0]["intent"] not in pipeline.settings.handoff_intents
    assert understanding.escalate and understanding.intent == "compromised_card" and not understanding.unsure
    # Its confidence is the model's for compromised_card, not for the intent it leaned to.
    assert understanding.confidence < understanding.top_intents[-1]["confidence"]

    # A weak lean to a fraud intent with no fraud article among the nearest passages is a question
    # the model is unsure of, not fraud: its articles are suggested.
    message = "I am on the free plan, can I make a single-use card number for online shopping?"
    understanding = pipeline.understand([message])[0]
    assert understanding.top_intents[0]["intent"] in pipeline.settings.handoff_intents
    assert not understanding.escalate and understanding.out_of_scope and understanding.unsure
    assert "get_disposable_virtual_card" in understanding.passages[0].intents


def test_which_hand_off_an_under_threshold_message_gets():
    def near(*intents: str) -> list[Passage]:
        return [Passage(i, i, "", "", 0.6 - n / 100, [i]) for n, i in enumerate(intents)]

    handoff = {"compromised_card", "card_payment_not_recognised"}
    # The lean, where its article is among the nearest passages.
    assert handoff_under_threshold("compromised_card", near("lost_or_stolen_card", "compromised_card"), handoff) == \
        "compromised_card"
    # The nearest passage's hand-off intent, whatever the lean.
    assert handoff_under_threshold("contactless_not_working", near("card_payment_not_recognised", "compromised_card"),
                                   handoff) == "card_payment_not_recognised"
    # A hand-off lean that retrieval does not back, a hand-off article that is not the nearest, nothing near.
    assert handoff_under_threshold("compromised_card", near("get_disposable_virtual_card", "card_acceptance"),
                                   handoff) is None
    assert handoff_under_threshold("contactless_not_working", near("contactless_not_working", "compromised_card"),
                                   handoff) is None
    assert handoff_under_threshold("compromised_card", [], handoff) is None


def test_an_oos_class_that_wins_suggests_no_articles(pipeline, monkeypatch):
    # A model trained with `oos` rows says so itself: that is not a question it is unsure of.
    predict = pipeline.classifier.predict

    def oos_wins(vectors, texts, k=3):
        predictions = predict(vectors, texts, k)
        for p in predictions:
            p.intent, p.top_intents = "oos", [{"intent": "oos", "confidence": 0.9}, *p.top_intents[:2]]
        return predictions

    monkeypatch.setattr(pipeline.classifier, "predict", oos_wins)
    understanding = pipeline.understand(["I'm on the free plan – can I make a single-use card number?"])[0]
    assert understanding.out_of_scope and not understanding.unsure and understanding.passages == []
    assert pipeline.run_understood(understanding).reply == OOS_REPLY


def test_a_message_far_from_every_passage_is_out_of_scope_whatever_intent_the_model_picks(pipeline, monkeypatch):
    # The intent model alone gives this a banking intent with high confidence (bench oos).
    message = "Can you recommend a good home insurance policy?"
    gated = pipeline.understand([message])[0]
    assert gated.intent == "oos" and gated.out_of_scope and gated.passages == []
    monkeypatch.setattr(pipeline.settings, "oos_min_similarity", 0.0)
    alone = pipeline.understand([message])[0]
    assert alone.intent != "oos" and alone.confidence >= 0.5 and alone.passages


def test_the_gate_on_the_hand_written_out_of_scope_set_and_a_banking77_sample(pipeline, banking77_test):
    oos = [row["text"] for row in load_questions(PACKAGE_DATA / "eval" / "out_of_scope.jsonl")]
    in_scope = banking77_test[0][::10]
    assert len(oos) == 100 and len(in_scope) == 308
    assert sum(u.out_of_scope for u in pipeline.understand(oos)) >= 85  # 91 in `bench oos`; 57 without the gate
    assert sum(u.out_of_scope for u in pipeline.understand(in_scope)) <= 8  # 1.1% of all 3,080 in `bench oos`


def test_the_gate_leaves_hand_offs_and_in_scope_messages_alone(pipeline, monkeypatch):
    understood = pipeline.understand(["I lost my card", "There is a payment on my card I did not make"])
    assert [u.out_of_scope for u in understood] == [False, False] and understood[1].escalate
    monkeypatch.setattr(pipeline.settings, "oos_min_similarity", 0.99)  # every message is now far
    lost, fraud = pipeline.understand(["I lost my card", "There is a payment on my card I did not make"])
    assert lost.out_of_scope and lost.intent == "oos"
    assert fraud.escalate and not fraud.out_of_scope  # a person still sees possible fraud


def test_handoff_intent_escalates_without_generation(pipeline, monkeypatch):
    monkeypatch.setattr(pipeline.responder, "stream", lambda *a, **k: (p for p in ()))
    result = pipeline.run("There's an ATM withdrawal from yesterday that I never made. What do I do?")
    assert result.intent == "cash_withdrawal_not_recognised"
    # The holding reply quotes the lead of the article written for the intent: the steps to take now.
    assert result.escalate and result.grounded and result.sources == ["cash-withdrawal-not-recognised"]
    assert result.reply.startswith(HANDOFF_OPENING + " While you wait: If you see an ATM withdrawal you didn't make")
    assert "Freeze card" in result.reply and "120 days" in result.reply
    assert result.reply.removeprefix(HANDOFF_OPENING + " While you wait: ") in result.passages[0]["text"]


def test_a_handoff_without_its_article_gets_the_general_holding_reply(pipeline):
    understanding = pipeline.understand(["There's an ATM withdrawal from yesterday that I never made."])[0]
    assert understanding.escalate
    understanding.passages = [p for p in understanding.passages if understanding.intent not in p.intents]
    result = pipeline.run_understood(understanding)
    assert result.reply == HANDOFF_REPLY and result.sources == [] and result.escalate
    understanding.passages = []
    assert pipeline.run_understood(understanding).reply == HANDOFF_REPLY


def test_batch_understanding_matches_single(pipeline):
    messages = ["How do I change my PIN?", "What is the exchange rate?", "My top up failed"]
    batch = pipeline.understand(messages)
    single = [pipeline.understand([m])[0] for m in messages]
    assert [b.intent for b in batch] == [s.intent for s in single]
    assert [b.passages[0].article_id for b in batch] == [s.passages[0].article_id for s in single]


def test_retrieval_recall_on_a_banking77_sample(pipeline, banking77_test):
    texts, labels = banking77_test
    report = retrieval_recall(pipeline, texts[::10], labels[::10], k=3)
    assert report["n"] == 308
    assert report["recall_routed"] >= 0.95
    assert report["recall_vector_only"] >= 0.75


def test_guard_leaves_no_unsupported_numbers_on_a_grounding_sample(pipeline):
    questions = load_questions(PACKAGE_DATA / "eval" / "grounding.jsonl")
    assert len(questions) >= 60
    report = grounding_eval(pipeline, questions[::12])
    assert report["unsupported_number_rate_after_guard"] == 0.0
    assert report["key_fact_recall_after_guard"] >= report["key_fact_recall_before_guard"]


def test_edited_knowledge_base_is_picked_up_without_a_rebuild(settings, encoder, tmp_path):
    import shutil

    from pipeline.chain import load_or_build_index

    kb = tmp_path / "kb"
    shutil.copytree(settings.kb_dir, kb)
    local = settings.model_copy(update={"kb_dir": kb, "data_dir": tmp_path / "data"})
    first = load_or_build_index(local, encoder)
    (kb / "age-limit.md").unlink()
    again = load_or_build_index(local, encoder)
    assert "age-limit" not in again.articles and again.version != first.version
    assert len(again.articles) == 76
    # another passage size is not an edit: the index is cut again (it had kept the old size)
    resized = load_or_build_index(local.model_copy(update={"chunk_words": 60}), encoder)
    assert resized.chunk_words == 60 and len(resized) > len(again) and resized.version != again.version


def test_retrieval_recall_at_k_retrieves_k_passages(pipeline, banking77_test):
    texts, labels = banking77_test
    at_3, at_5 = (retrieval_recall(pipeline, texts[::10], labels[::10], k=k) for k in (3, 5))
    assert at_5["recall_routed"] > at_3["recall_routed"]  # recall@5 had been measured on TANDEM_TOP_K (3) passages
    assert len(pipeline.retrieve(pipeline.encoder.encode(texts[:1])[0], k=5)) == 5


def _quantized(model) -> set[str]:
    return {name for name, module in model.named_modules() if type(module).__module__.startswith("torch.ao.nn.quantized")
            and type(module).__name__ == "Linear"}


def test_the_shipped_pipeline_encodes_through_onnx_int8_with_vectors_close_to_fp32(pipeline, encoder):
    assert pipeline.encoder.runtime == "onnxruntime-int8"
    assert not _quantized(encoder.model), "the fp32 encoder beside it is untouched"
    messages = ["I lost my card", "How long does a transfer abroad take?", "Why was I charged a fee?"]
    cosine = (pipeline.encoder.encode(messages) * encoder.encode(messages)).sum(axis=1)
    assert cosine.min() > 0.97
    assert pipeline.encoder.identity == encoder.identity  # indexes built by either serve both


def test_without_onnx_the_attention_runs_in_int8_in_torch_and_that_can_be_turned_off_too(settings):
    from pipeline.chain import HybridPipeline
    from pipeline.settings import Settings

    def build(**changes) -> HybridPipeline:
        return HybridPipeline.from_settings(Settings(**{**settings.model_dump(), **changes}), load_responder=False)

    torch_int8 = build(encoder_onnx_int8=False)
    assert torch_int8.encoder.runtime == "torch-int8-attention"
    quantized = _quantized(torch_int8.encoder.model)
    assert quantized and all(".attention." in f".{name}." for name in quantized)
    plain = build(encoder_onnx_int8=False, encoder_int8_attention=False)
    assert plain.encoder.runtime == "torch" and not _quantized(plain.encoder.model)


def test_the_encoder_served_follows_how_the_intent_model_was_trained(settings, tmp_path):
    """A head reads the int8 encoder's vectors, so it is trained and evaluated on them too; a
    model that changed the encoder's weights runs on torch."""
    import json

    from pipeline.chain import intent_model_method, serving_encoder

    assert intent_model_method(settings) == "head"  # the shipped model
    assert json.loads((PACKAGE_DATA / "models" / "intents-banking77" / "metrics.json").read_text())[
        "encoder_runtime"] == serving_encoder(settings).runtime == "onnxruntime-int8"
    assert serving_encoder(settings, "finetune").runtime == "torch"
    (tmp_path / "config.json").write_text(json.dumps({"method": "lora"}))
    assert intent_model_method(settings.model_copy(update={"intent_model": tmp_path})) == "lora"
    (tmp_path / "config.json").write_text("{broken")
    assert intent_model_method(settings.model_copy(update={"intent_model": tmp_path})) == ""


def test_reload_index_serves_the_folder_as_last_saved_and_keeps_its_index_otherwise(pipeline, tmp_path):
    from pipeline.chain import HybridPipeline
    from pipeline.errors import IndexLoadError
    from pipeline.knowledge import Article, KnowledgeIndex

    folder = tmp_path / "index"
    pipeline.index.save(folder)
    served = HybridPipeline(pipeline.encoder, pipeline.classifier, KnowledgeIndex.load(folder), pipeline.responder,
                            pipeline.guard, pipeline.settings.model_copy(update={"index_dir": folder}))
    assert not served.reload_index(), "nothing changed"
    question = pipeline.encoder.encode(["Does Northwind insure my dog?"])[0]
    assert "pet-insurance" not in {p.article_id for p in served.index.search(question)}

    updated = KnowledgeIndex.load(folder)
    updated.upsert([Article(id="pet-insurance", title="Pet insurance", intents=["pet_insurance"],
                            body="Northwind insures dogs and cats from £7 a month. Add a pet under Insurance → Pets.")],
                   pipeline.encoder.embed)
    updated.save(folder)
    (folder / "meta.json.tmp").write_text("{}")  # another save, caught between its two renames
    assert not served.reload_index() and served.index.version != updated.version
    (folder / "meta.json.tmp").unlink()
    before = served.understand([DELIVERY_QUESTION])[0]
    assert served.reload_index() and served.index.version == updated.version
    assert served.index.search(question)[0].article_id == "pet-insurance"
    after = served.understand([DELIVERY_QUESTION])[0]
    # What a gen worker keys the cached reply by: the index the passages came from.
    assert (before.index_version, after.index_version) == (pipeline.index.version, updated.version)

    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "version": "broken", "chunks": "not chunks"}))
    with pytest.raises(IndexLoadError, match="corrupt"):
        served.reload_index()
    assert served.index.version == updated.version, "a folder that does not load leaves the index served as it was"


def test_unknown_intents_are_named_with_the_closest_known_one():
    from pipeline.chain import unknown_intents

    known = ["lost_or_stolen_card", "card_arrival", "oos"]
    assert unknown_intents(["card_arrival", "oos"], known) == ""
    assert unknown_intents([], known) == ""
    assert unknown_intents(["lost_or_stolen_kard", "card_arrival", "mortgage_rates", "lost_or_stolen_kard"], known) == (
        "unknown intent 'lost_or_stolen_kard' (did you mean 'lost_or_stolen_card'?), 'mortgage_rates'")


def test_search_filters_by_intent_and_refuses_an_intent_nobody_knows(pipeline):
    found = pipeline.search("how long until my card arrives", k=3, intents=["card_arrival"])
    assert found and all("card_arrival" in p.intents for p in found)
    assert {p.article_id for p in pipeline.search("how long until my card arrives", k=3)} > set()
    with pytest.raises(InputError, match=r"'card_arival' \(did you mean 'card_arrival'\?\)"):
        pipeline.search("how long until my card arrives", intents=["card_arival"])
    with pytest.raises(InputError, match="empty"):
        pipeline.search("  ", intents=["card_arrival"])


def test_a_misspelt_handoff_intent_stops_the_pipeline_and_a_default_one_the_model_lacks_is_a_warning(pipeline, caplog):
    import dataclasses

    from pipeline.chain import HybridPipeline
    from pipeline.errors import ModelLoadError

    def build(settings, classifier=pipeline.classifier):
        return HybridPipeline(pipeline.encoder, classifier, pipeline.index, pipeline.responder, pipeline.guard, settings)

    misspelt = pipeline.settings.model_copy(update={"handoff_intents": ["compromised_card", "compromized_card"]})
    with pytest.raises(ModelLoadError, match=r"TANDEM_HANDOFF_INTENTS: unknown intent 'compromized_card' "
                                             r"\(did you mean 'compromised_card'\?\)"):
        build(misspelt)
    build(pipeline.settings.model_copy(update={"handoff_intents": []}))
    # A model trained on other data, with the default list (BANKING77's fraud intents) left as it is.
    other = dataclasses.replace(pipeline.classifier, labels=[f"intent_{i}" for i in pipeline.classifier.labels])
    with caplog.at_level("WARNING", logger="pipeline.chain"):
        build(pipeline.settings, other)
    assert "lacks the default hand-off intents" in caplog.text and "TANDEM_HANDOFF_INTENTS" in caplog.text


def test_an_understanding_from_a_newer_or_older_worker_is_read(pipeline):
    # A rolling upgrade: the nlu and gen workers may run versions a field apart.
    understanding = pipeline.understand(["How do I change my PIN?"])[0]
    data = json.loads(json.dumps(understanding.to_dict()))
    assert Understanding.from_dict(data) == understanding
    newer = {**data, "added_later": 1, "passages": [{**p, "also_added": 2} for p in data["passages"]]}
    assert Understanding.from_dict(newer) == understanding
    older = {k: v for k, v in data.items() if k not in {"unsure", "index_version"}}
    assert Understanding.from_dict(older).passages == understanding.passages

