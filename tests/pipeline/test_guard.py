import random

import numpy as np
import pytest

from pipeline.guard import (
    GroundingGuard,
    durations_in,
    last_sentence_end,
    lead,
    numbers_in,
    off_track,
    sentences,
    specifics,
    unsupported_numbers,
    unwrapped,
)
from pipeline.knowledge import Passage, load_articles
from pipeline.settings import PACKAGE_DATA


def passage(text: str) -> Passage:
    return Passage(article_id="fees", title="Fees", url="", text=text, score=1.0)


def test_numbers_are_read_with_their_kind_and_normalised():
    assert numbers_in("£1,000.50 within 3–5 days, 0.50%") == {"£1000.5", "3", "5", "0.5%"}
    assert numbers_in("by 10 p.m. or 07:30, £5.00, £15k, 2 per cent, the 1st") == {
        "10pm", "7:30", "£5", "£15000", "2%", "1"}
    assert numbers_in("3D Secure, Q4, 6-digit") == {"6"}  # a number glued to letters is a name
    assert numbers_in("1. Open the app\n2) Tap Cards. 3. Tap Freeze. It takes 2. Then") == {"2"}  # steps are marks
    assert numbers_in("no digits") == set()
    assert numbers_in("Freeze it. 1. ") == numbers_in("1.") == set()  # a second draft's first step, as it streams


@pytest.mark.parametrize("reply, unsupported", [
    ("We charge a £10 replacement fee.", ["£10"]),  # the 10 is of days, not pounds
    ("Exchange is free until Friday 10am.", ["10am"]),
    ("It costs £5.00 and 0.50% above that.", []),
    ("It costs 5 pounds.", []),  # a plain number may stand for an amount the source gives
    ("Allow 10%.", ["10%"]),
    ("1. Open the app.\n2. Tap Cards.\n3. Tap Replace.", []),
    ("Report it after seven working days.", ["7", "7 days"]),  # a count in words is read as its digits are
    ("You have 30 days to return it.", []),
])
def test_numbers_must_be_given_as_the_same_kind(reply, unsupported):
    source = ("If it has not arrived after 10 working days, tell us by 10pm on Friday. A card costs £5, "
              "then 0.5% a month. You have a 30-day window.")
    assert unsupported_numbers(reply, source) == unsupported


@pytest.mark.parametrize("reply, unsupported", [
    ("You get one free replacement a year.", ["1"]),  # the passage gives two
    ("You get two free replacements a year.", []),
    ("A disposable card is for one payment.", ["1"]),
    ("Use the one you ordered, or ask one of our team.", []),  # not counts
    ("Freeze the old one in the app.", []),
])
def test_one_is_a_count_before_a_thing_counted(reply, unsupported):
    assert unsupported_numbers(reply, "You get two free replacements a year; freeze a lost card in the app.") == unsupported


def test_no_help_article_is_unsupported_against_itself():
    articles = load_articles(PACKAGE_DATA / "helpcentre")
    assert len(articles) == 77
    assert [a.id for a in articles if unsupported_numbers(f"{a.title}\n{a.body}", f"{a.title}\n{a.body}")] == []


def test_durations_are_read_with_their_ranges():
    assert durations_in("3–5 working days, 2 hours, 1 to 2 weeks; 3. Tap Cards") == {
        ("3", "5", "day"), ("2", "", "hour"), ("1", "2", "week")}
    assert durations_in("one to two days, a seven-day window") == {("1", "2", "day"), ("7", "", "day")}
    assert durations_in("within twenty-five days") == {("25", "", "day")}  # one count, not the range 20–5
    assert unsupported_numbers("It takes twenty-five days.", "It takes 25 days.") == []


@pytest.mark.parametrize("reply, unsupported", [
    ("It arrives in 3 days.", ["3 days"]),  # the passage says 3–5: the draft understates it
    ("It arrives in 3 to 5 days.", []),
    ("It can take up to 5 working days.", []),
    ("It arrives in 4–5 days.", ["4", "4–5 days"]),
    ("Most arrive within 2 hours.", []),
    ("Most arrive within 2 days.", ["2 days"]),
])
def test_a_duration_must_be_one_the_passage_gives(reply, unsupported):
    source = "Standard delivery takes 3–5 working days. Transfers arrive within 2 hours. 3. Tap Cards."
    assert unsupported_numbers(reply, source) == unsupported


def test_sentences_skip_headings_and_fragments():
    assert sentences("## Fees\nIt costs £5 to order.\n- ok\nYou can pay by card. Thanks!") == \
        ["It costs £5 to order.", "You can pay by card."]
    assert sentences("- **Wrong code:** each card has its own code.") == ["Wrong code: each card has its own code."]


@pytest.fixture(scope="module")
def guard(encoder):
    return GroundingGuard(encoder.embed, similarity_threshold=0.45)


PASSAGES = [passage("A replacement card costs £5. Standard delivery takes 3–5 working days in the UK."),
            passage("Express delivery costs £5 and takes 1–2 working days.")]


def test_supported_reply_passes(guard):
    verdict = guard.check("A replacement card costs £5 and arrives in 3–5 working days.", PASSAGES)
    assert verdict.supported and verdict.unsupported_numbers == []


def test_invented_number_fails(guard):
    verdict = guard.check("A replacement card costs £12 and arrives in 3–5 working days.", PASSAGES)
    assert not verdict.supported and verdict.unsupported_numbers == ["£12"]


def test_misstated_duration_fails(guard):
    verdict = guard.check("A replacement card costs £5 and arrives in 3 days.", PASSAGES)
    assert not verdict.supported and verdict.unsupported_numbers == ["3 days"]


def test_unrelated_sentence_fails(guard):
    verdict = guard.check("Our headquarters has a lovely rooftop garden with tomatoes.", PASSAGES)
    assert not verdict.supported and verdict.min_similarity < 0.45


def test_empty_reply_fails(guard):
    assert not guard.check("   ", PASSAGES).supported


def test_extractive_answer_quotes_the_passages(guard):
    answer = guard.extractive_answer("How long does express delivery take?", PASSAGES, max_sentences=1)
    assert answer in {"Express delivery costs £5 and takes 1–2 working days.",
                      "Standard delivery takes 3–5 working days in the UK."}
    assert guard.check(answer, PASSAGES).supported
    assert guard.extractive_answer("anything", []) == ""


DELIVERY = [passage("A replacement card costs £5. Express delivery takes 1–2 working days. "
                    "Our cards are made from recycled plastic.")]


def test_missing_sentences_are_the_closest_ones_the_reply_leaves_out(encoder):
    guard = GroundingGuard(encoder.embed, complete_sentences=1)
    question = "How fast is express delivery?"
    assert guard.missing_sentences("We can send it to you quickly.", question, DELIVERY) == \
        ["Express delivery takes 1–2 working days."]
    assert guard.missing_sentences("Express delivery takes 1 to 2 working days.", question, DELIVERY) == []
    assert GroundingGuard(encoder.embed, complete_sentences=2).missing_sentences(
        "Express delivery takes 1–2 working days.", question, DELIVERY) == ["A replacement card costs £5."]
    assert GroundingGuard(encoder.embed, complete_sentences=0).missing_sentences("Hi there friend.", question,
                                                                                 DELIVERY) == []


ARTICLE_START = ("Express delivery costs £5. It takes 1–2 working days.\n\n## Recycling\n"
                 "Our cards are made from recycled plastic. Return an old card to any branch for recycling.")


def test_lead_is_the_opening_prose_of_a_passage_that_begins_its_article():
    opening = Passage("cards", "Cards", "", ARTICLE_START, 1.0, opens_article=True)
    assert lead(opening) == "Express delivery costs £5. It takes 1–2 working days."
    assert lead(Passage("cards", "Cards", "", ARTICLE_START, 1.0)) == ""  # from further into the article
    for text in ("## Delivery\nIt takes 1–2 days.", "- Standard: free\n- Express: £5"):
        assert lead(Passage("cards", "Cards", "", text, 1.0, opens_article=True)) == ""


def test_completion_says_the_lead_first_then_the_sentences_closest_to_the_question(encoder):
    """A help article opens with its answer: a reply should say that whatever the question's
    wording is closest to, then fill up with the closest sentences."""
    question = "Can I recycle my old card?"
    opening = [Passage("cards", "Cards", "", ARTICLE_START, 1.0, opens_article=True)]
    further = [Passage("cards", "Cards", "", ARTICLE_START, 1.0)]
    guard = GroundingGuard(encoder.embed, complete_sentences=3)
    assert guard.completion_sentences(question, opening, 3) == [
        "Express delivery costs £5.", "It takes 1–2 working days.", "Return an old card to any branch for recycling."]
    assert guard.completion_sentences(question, opening, 1) == ["Express delivery costs £5."]
    assert "Express delivery costs £5." not in guard.completion_sentences(question, further, 2)
    # what the reply already says with its specifics is not said again
    assert guard.missing_sentences("Express costs £5. It takes 1–2 working days.", question, opening) == \
        ["Return an old card to any branch for recycling."]
    assert guard.extractive_answer(question, opening, 2) == "Express delivery costs £5. It takes 1–2 working days."


def test_specifics_are_numbers_and_app_path_steps():
    assert specifics('Go to Account -> Statements → "Download PDF" within 30 days.') == \
        {"account→statements", "statements→download", "30"}


def test_a_close_sentence_without_its_specifics_is_not_said(encoder):
    """A vague paraphrase ("a few working days") embeds close to the article's sentence but
    leaves out what the customer needs from it."""
    guard = GroundingGuard(encoder.embed, complete_sentences=1)
    assert guard.missing_sentences("Express delivery takes a few working days.", "How fast is express delivery?",
                                   DELIVERY) == ["Express delivery takes 1–2 working days."]
    security = [passage("Freeze the card in the app under Cards → Security. We never ask for your PIN.")]
    question = "Where do I freeze my card?"
    assert guard.missing_sentences("Freeze the card in the app under Security.", question, security) == \
        ["Freeze the card in the app under Cards → Security."]
    assert guard.missing_sentences("Open Cards -> Security in the app and freeze the card.", question, security) == []


def test_a_whole_reply_without_a_sentence_is_compared_as_it_stands(guard):
    """ "No." says nothing the passages give; while a reply streams, "Sure!" waits for what follows."""
    verdict = guard.check("No.", PASSAGES)
    assert not verdict.supported and verdict.min_similarity is not None
    assert guard.check("Sure!", PASSAGES, whole=False).supported
    assert not guard.check("It costs £9!", PASSAGES, whole=False).supported
    assert not guard.check("A replacement card costs £5.", [passage("Fees")]).supported  # nothing to compare with


def test_specifics_read_counts_in_words():
    assert specifics("Enter the six-digit code.") == specifics("Enter the 6-digit code.") == {"6"}
    assert specifics("Twenty-five payments, forty two cards") == {"25", "42"}


@pytest.mark.parametrize("reply, unsupported", [
    ("You can hold up to three cards.", ["3"]),  # outside a duration, where it used to pass unseen
    ("You can hold up to five cards.", []),
    ("You can hold up to 5 cards.", []),
    ("Twenty-five payments a month are free.", []),
    ("Twenty payments a month are free.", ["20"]),
    ("Use the one you ordered last, or ask one of our team.", []),  # "one" is rarely a count
    ("I provided the answer in two sentences.", ["2"]),  # a draft narrating itself (grounding set, gb17)
])
def test_counts_in_words_must_be_ones_the_source_gives(reply, unsupported):
    assert unsupported_numbers(reply, "You can hold 5 cards at once. 25 payments a month are free.") == unsupported
    assert unsupported_numbers(reply, "You can hold five cards at once. Twenty-five payments a month are free.") == \
        unsupported  # the source's counts in words are read too


def test_a_hard_wrapped_passage_splits_into_sentences_not_lines(encoder):
    wrapped = ("If your card hasn't arrived after 10 working\ndays, report it in the app. Before then it is\n"
               "most likely in the post.\n\n## Fees\nA replacement is free.\n- Express: £5\n- Standard: free")
    assert sentences(unwrapped(wrapped)) == [
        "If your card hasn't arrived after 10 working days, report it in the app.",
        "Before then it is most likely in the post.", "A replacement is free."]
    opening = [Passage("card-arrival", "Card arrival", "", wrapped, 1.0, opens_article=True)]
    assert GroundingGuard(encoder.embed).completion_sentences("My card has not come", opening, 1) == [
        "If your card hasn't arrived after 10 working days, report it in the app."]


def test_guard_identity_names_what_changes_a_reply(encoder):
    assert GroundingGuard(encoder.embed, 0.45, 3).identity != GroundingGuard(encoder.embed, 0.45, 0).identity
    assert GroundingGuard(encoder.embed, 0.45, 3).identity != GroundingGuard(encoder.embed, 0.5, 3).identity


def test_guard_uses_the_embedder_it_is_given():
    calls = []

    def embed(texts):
        calls.append(texts)
        return np.eye(len(texts), 4, dtype=np.float32)

    GroundingGuard(embed).check("One sentence here.", [passage("Another sentence there.")])
    assert calls == [["One sentence here.", "Another sentence there."]]


def test_passage_sentences_are_embedded_once_and_read_back_unchanged(encoder):
    calls = []

    def embed(texts):
        calls.append(list(texts))
        return encoder.embed(texts)

    guard = GroundingGuard(embed)
    first = guard.check("Express delivery is quick.", DELIVERY)
    second = guard.check("Express delivery is quick.", DELIVERY)
    guard.check("Delivery by express is fast.", DELIVERY)
    assert calls[1:] == [["Delivery by express is fast."]]  # the passage's sentences were not embedded again
    assert first.min_similarity == second.min_similarity


@pytest.mark.parametrize("text, end", [
    ("", 0), ("No break yet", 0), ("One sentence. Half of the next", 14), ("Two. Done. ", 11),
    ("A line\nthen more", 7), ("Costs £1.50 a month", 0),
])
def test_last_sentence_end(text, end):
    assert last_sentence_end(text) == end
    assert sentences(text[:end]) + sentences(text[end:]) == sentences(text)


LOOPING = ("You can close your account under Profile → Account. It takes up to 5 working days. "
           "You can close your account under Profile → Account. It takes")


def test_a_draft_that_says_a_sentence_again_ends_where_the_repeat_begins():
    cut = LOOPING.index("You can close", 1)
    assert off_track(LOOPING) == (cut, cut)
    assert off_track(LOOPING[:cut]) == (None, cut)


@pytest.mark.parametrize("draft, repeat", [
    ("Freeze the card in the app now. Then order a new one.\n\nFreeze the card in\n\n", "Freeze the card in\n"),
    ("1. Tap Cards → Security.\n2. Tap Freeze card.\n3. Tap Cards → Security.\n", "Tap Cards → Security.\n"),
    ("You can also close your Northwind account yourself in the app. "
     "You can also close your Northwind account yourself if you have", "You can also close your Northwind account yourself if"),
])
def test_a_repeat_is_found_whole_cut_short_or_by_its_first_eight_words(draft, repeat):
    cut = draft.rindex(repeat)
    assert off_track(draft) == (cut, cut)
    assert off_track(draft[:cut]) == (None, cut)


def test_an_unfinished_sentence_is_held_while_it_could_still_be_a_repeat():
    first = "Tap Cards → Security to freeze it. "
    assert off_track(first + "Tap Cards") == (None, len(first))  # so far the start of the first sentence
    assert off_track(first + "Tap Cards → Replace") == (None, len(first + "Tap Cards → Replace"))  # it is not
    assert off_track("Tap Cards → Security") == (None, len("Tap Cards → Security"))  # nothing earlier to repeat
    different = "Standard delivery takes 3–5 working days. Express delivery takes 1–2 working days."
    assert off_track(different) == (None, len(different))


def test_a_draft_that_talks_about_the_customer_instead_of_to_them_ends_there():
    answer = "Freeze the card under Cards → Security. "
    narrated = answer + "The customer is asking about a lost card."
    assert off_track(narrated) == (len(answer), len(answer))
    assert off_track("The user should order a new card.") == (0, 0)
    assert off_track(answer + "The cust") == (None, len(answer))  # held: it may be narration
    assert off_track(answer + "The card") == (None, len(answer + "The card"))  # it is not
    ours = answer + "The customer service team can also help."
    assert off_track(ours) == (None, len(ours))
    # streamed a token at a time, "The customer" is held until the next word says which it is
    assert off_track(answer + "The customer") == (None, len(answer))
    assert off_track(answer + "The customer ") == (None, len(answer))
    assert off_track(answer + "The customer service") == (None, len(answer + "The customer service"))
    assert off_track(answer + "The customer is") == (len(answer), len(answer))
    # with "a" too (grounding set, ga15 and gb04, 2026-12-07: both reached the reply)
    asked = "A customer asked about a card that wasn't working, and the answer was a bit misleading. " + answer
    assert off_track(asked) == (0, 0)
    assert off_track("A customer question: The store refunded me last Monday.") == (0, 0)
    assert off_track(answer + "A cust") == (None, len(answer))
    assert off_track(answer + "A card") == (None, len(answer + "A card"))
    # a role label (grounding set, ga11, ga12 and gb13, 2026-12-07)
    assert off_track(answer + "\n\nCustomer answer:\n\nFreeze it.") == (len(answer) + 2, len(answer) + 2)
    assert off_track(answer + "Use the app.") == (None, len(answer + "Use the app."))
    assert off_track(answer + "Us") == (None, len(answer))  # held: it may be "User"
    for ours in ["A customer service agent can help.", "A user-friendly guide is in the app.",
                 "Customer support is open 24/7."]:
        assert off_track(answer + ours) == (None, len(answer + ours))


def test_nothing_streamed_is_ever_cut_off_by_a_later_stop():
    # The promise behind holding text back: what off_track let stream on a shorter draft stays
    # before any stop it finds once the draft grows, so no off-track sentence reaches the customer.
    rng = random.Random(7)
    said = ["Freeze the card in the app.", "Tap Cards → Security.", "Tap Cards → Security → Freeze card.",
            "The customer is asking about a card.", "The card arrives in 3–5 working days.",
            "You can order a new card in the app under Cards.", "1.", "2.", "The user", "A customer asked.", "A card"]
    for _ in range(300):
        draft = "".join(rng.choice(said) + rng.choice([" ", "\n", "\n\n"]) for _ in range(rng.randint(1, 6)))
        shown = 0
        for end in sorted(rng.sample(range(1, len(draft) + 1), min(len(draft), 12))) + [len(draft)]:
            stop, streamable = off_track(draft[:end])
            if stop is not None:
                assert stop >= shown, (draft, end)
                break
            assert streamable >= shown, (draft, end)
            shown = streamable
