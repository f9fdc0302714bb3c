"""Checks that a generated reply says only what the passages say.

A small generator will sometimes invent a fee or a number of days. A reply fails the
check when any of its numbers (amounts, days, dates, percentages) is absent from the
passages or misstates a duration they give, or when one of its sentences is not similar
enough to any passage sentence.
A failed reply is replaced by the passage sentences a reply should say: the article's lead
(a help article opens with its answer) when the best passage begins the article, then those
closest to the question. A reply that passes but leaves some of those sentences unsaid is
completed with them: the small generator often answers vaguely ("a small fee that can vary")
where the article names it, so a sentence counts as said only when the reply also gives its
specifics (its numbers and app paths such as "Cards → Security"), however close the reply's
wording comes to it.
A draft that starts saying an earlier sentence again is going round in a loop (greedy decoding
of a small model does, until max_tokens), and one that starts talking about "the customer" has
stopped answering: ``off_track`` finds where, so the draft ends there.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.encoder import VectorCache
from pipeline.knowledge import LIST_MARK, Passage

Embed = Callable[[list[str]], np.ndarray]

# A number with what makes it an amount, a share or a time ("£10", "0.5%", "10pm"), so "£10" is not
# taken as supported by "10 working days". Not one glued to letters ("3D Secure", "Q4") but
# ordinals ("1st"); a step's number is a list mark, read as none (``_STEP_NUMBER``).
_NUMBER = re.compile(r"(?<![\w.,:])([£$€]\s?)?(\d+(?:[.,:]\d+)*)(\s?%|\s?per ?cent\b|\s?[ap]\.?m\b\.?|k\b)?"
                     r"(?![.,:]?\d)(?=st\b|nd\b|rd\b|th\b|[^\w]|$)", re.IGNORECASE)
# A step's number: at a line's start, or after the end of the step before it ("… app. 2. Check …").
_STEP_NUMBER = re.compile(r"(?:^|(?<=[.!?…:])\s)\s*\d+[.)](?:\s+|$)", re.MULTILINE)  # "$": a step streamed so far
_NUMBER_WORDS = {w: str(i) for i, w in enumerate([
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"])} | {
    w: str(30 + 10 * i) for i, w in enumerate(["thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"])}
_UNITS = [w for w, n in _NUMBER_WORDS.items() if 1 <= int(n) <= 9]
_TENS = [w for w, n in _NUMBER_WORDS.items() if int(n) >= 20]
# "twenty-five" is one count, not 20 and 5.
_NUMBER_WORD = re.compile(rf"\b(?:({'|'.join(_TENS)})[\s-]({'|'.join(_UNITS)})|({'|'.join(_NUMBER_WORDS)}))\b",
                          re.IGNORECASE)
# "One" is read as a count only before a thing the help centre counts ("one free replacement",
# "for one payment", "in one go"): elsewhere a reply says "the one you used" or "one of our team".
_ONE_AS_COUNT = re.compile(
    r"\bone(?=\s+(?:(?:free|extra|spare|new|single|more|further|physical|virtual|disposable|main|failed|wrong|"
    r"working|business|calendar)\s+)?(?:payments?|cards?|accounts?|attempts?|tr(?:y|ies)|times?|transfers?|top-ups?|"
    r"withdrawals?|replacements?|currenc(?:y|ies)|countr(?:y|ies)|purchases?|payees?|passcodes?|spares?|charges?|"
    r"fees?|go|devices?|phones?|transactions?|requests?|codes?|minutes?|hours?|days?|weeks?|months?|years?)\b)",
    re.IGNORECASE)
_COUNT = r"\d+(?:[.,]\d+)*"  # counts in words are read as digits first (``in_digits``)
_DURATION = re.compile(rf"\b({_COUNT})(?:\s*(?:–|—|-|to)\s*({_COUNT}))?[\s-]*"
                       r"(?:working |business |calendar )?(minute|hour|day|week|month|year)s?\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_APP_PATH_STEP = re.compile(r"([\w'’]+)[\"”]?\s*(?:→|->)\s*(?=[\"“]?([\w'’]+))")
# A passage sentence counts as already said when a reply sentence is this close to it. On the
# grounding set 0.8 and 0.9 gave the same key-fact recall; 0.8 repeats less.
_ALREADY_SAID = 0.8
# Two sentences of one reply that open with the same eight words are the model going round again:
# of the grounding set's llama_cpp first drafts (2026-12-01), the 8 that this or an exact repeat
# cuts were all loops, none two different facts.
_LOOP_WORDS = 8
# A reply speaks to the customer. A small model at times narrates instead ("The customer is asking
# about a lost card.", "The user should...", "A customer asked about a card that wasn't working, and
# the answer was a bit misleading.") or writes a role label ("Customer answer:"), and what follows
# is no longer an answer.
_NARRATION_OPENINGS = ("the customer", "the user", "a customer", "a user", "customer", "user")
_NARRATION = re.compile(r"(?:(?:the|a) )?(?:customer|user)(?:'s|s)?\b(?!-| service| support)")


def _value(number: str) -> str:
    """A number as its value is written: thousands separators, leading zeros and a decimal part's
    trailing zeros dropped ("1,000.50" -> "1000.5", "£5.00" -> "5", "07:30" -> "7:30")."""
    number = re.sub(r",(?=\d{3}(?!\d))", "", number)
    if ":" in number:
        hours, _, minutes = number.partition(":")
        return f"{int(hours)}:{minutes}" if hours.isdigit() else number
    whole, dot, fraction = number.partition(".")
    whole = whole.lstrip("0") or "0"
    fraction = fraction.rstrip("0")
    return f"{whole}.{fraction}" if dot and fraction else whole


def numbers_in(text: str) -> set[str]:
    """The text's numbers, each with its kind: "£1,000.50 by 10pm, 0.50% or 7:30" ->
    {"£1000.5", "10pm", "0.5%", "7:30"}; a plain count is its value alone ("3 days" -> "3")."""
    found = set()
    for currency, number, suffix in _NUMBER.findall(_STEP_NUMBER.sub(" ", text)):
        value = _value(number)
        suffix = suffix.lower().replace(" ", "").replace(".", "")
        if suffix == "k":  # "£15k"
            value, suffix = _value(str(float(value) * 1000).removesuffix(".0")), ""
        if suffix in ("am", "pm"):
            value = value.removesuffix(":00") + suffix
        elif suffix:  # "%", "percent", "per cent"
            value += "%"
        found.add(currency.strip() + value)
    return found


def in_digits(text: str, but: tuple[str, ...] = ()) -> str:
    """The text with its counts in words written in digits ("twenty-five" -> "25"), except the
    words in ``but``."""
    def digits(match: re.Match) -> str:
        tens, unit, word = match.groups()
        if word:
            return match.group(0) if word.lower() in but else _NUMBER_WORDS[word.lower()]
        return str(int(_NUMBER_WORDS[tens.lower()]) + int(_NUMBER_WORDS[unit.lower()]))
    return _NUMBER_WORD.sub(digits, text)


def durations_in(text: str) -> set[tuple[str, str, str]]:
    """Durations as (from, to, unit), ``to`` empty for a single one, counts in words read as
    digits: "3–5 working days" -> ("3", "5", "day"), "seven days" -> ("7", "", "day"),
    "twenty-five days" -> ("25", "", "day"), not the range 20–5 it was read as when durations
    read their words apart from ``in_digits``."""
    return {(_value(a), _value(b) if b else "", unit.lower()) for a, b, unit in _DURATION.findall(in_digits(text))}


def _supported(number: str, given: set[str]) -> bool:
    """A number of a kind ("£10", "10pm") must be given as that kind; a plain one as any kind
    ("10" is how a reply may say "£10")."""
    if number in given:
        return True
    return number.isascii() and re.fullmatch(r"[\d.:]+", number) is not None and \
        number in {re.sub(r"^[£$€]|%$|[ap]m$", "", g) for g in given}


def unsupported_numbers(reply: str, source: str) -> list[str]:
    """The reply's numbers that the source does not give (as the same kind: "£10" is not
    supported by "10 working days"), and its durations that misstate one: "3 days" where the
    source says "3–5 working days" understates it. A single duration must be one the source
    gives alone or as the top of a range ("up to 5 days"); a range must match."""
    given_numbers = numbers_in(in_digits(source))
    # Counts in words too ("up to three cards"), and "one" where it counts something (_ONE_AS_COUNT).
    counted = in_digits(_ONE_AS_COUNT.sub("1", reply), but=("one",))
    missing = sorted(n for n in numbers_in(counted) if not _supported(n, given_numbers))
    given = durations_in(source)
    for start, end, unit in sorted(durations_in(reply)):
        if end and (start, end, unit) in given:
            continue
        if not end and any(u == unit and (start == b or (start == a and not b)) for a, b, u in given):
            continue
        missing.append(f"{start}–{end} {unit}s" if end else f"{start} {unit}s")
    return missing


def specifics(text: str) -> set[str]:
    """What a customer acts on: the numbers (in digits or words: "six-digit" gives "6"), and each
    step of an app path ("Cards → Security" -> "cards→security")."""
    steps = {f"{a}→{b}".lower().replace("’", "'") for a, b in _APP_PATH_STEP.findall(text)}
    return numbers_in(in_digits(text)) | steps


def last_sentence_end(text: str) -> int:
    """Where the text's last complete sentence ends (after the break that follows it), 0 if none.
    ``sentences`` splits the text before it as it splits the whole text, so a reply whose
    beginning fails ``check`` fails it whole."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return ends[-1] if ends else 0


def sentences(text: str) -> list[str]:
    """The text's sentences of three words or more, without list marks or Markdown bold: a
    reply quotes them, and "Wrong code:** each card…" is what a bold list label leaves behind."""
    parts = (s.replace("**", "").strip(" -*•\t") for s in _SENTENCE_END.split(text))
    return [s for s in parts if len(s.split()) >= 3 and not s.startswith("#")]


def unwrapped(text: str) -> str:
    """Passage text with the line breaks inside a paragraph joined, so an article hard-wrapped at
    a fixed width splits into its sentences, not its lines; a heading, a list item or a table row
    keeps its own line."""
    lines = text.split("\n")
    out = lines[:1]
    for line in lines[1:]:
        before = out[-1].strip()
        if before and line.strip() and not before.startswith(("#", "|")) and \
                not re.match(r"\s*(?:[-*•#|]|\d+[.)]\s)", line):
            out[-1] = f"{out[-1].rstrip()} {line.strip()}"
        else:
            out.append(line)
    return "\n".join(out)


def lead(passage: Passage) -> str:
    """The article's opening paragraph, when the passage begins its article and opens with prose
    rather than a heading or a list: help articles open with the answer, then the detail."""
    if not passage.opens_article:
        return ""
    first = unwrapped(re.split(r"\n\s*\n", passage.text.strip(), maxsplit=1)[0])
    return "" if first.startswith("#") or LIST_MARK.match(first) else first


def _normalised(sentence: str) -> str:
    return " ".join(LIST_MARK.sub("", sentence.strip()).lower().split()).rstrip(".!?:;,")


def off_track(draft: str) -> tuple[int | None, int]:
    """Where a draft stops being a reply, and how much of it may stream meanwhile.

    The first value is the start of the first sentence that says an earlier one again (whole;
    cut short: a finished sentence of three words or more that is the beginning of an earlier
    one; or from the same first eight words), or that begins by talking about the customer
    instead of to them ("The customer is asking about a lost card."); None while there is none.
    The second is where the text that may stream ends: before an unfinished last sentence that
    so far could become either, so the customer sees no word of it."""
    bounds = [0, *(m.end() for m in _SENTENCE_END.finditer(draft))]
    earlier: list[list[str]] = []
    for i, start in enumerate(bounds):
        finished = i + 1 < len(bounds)
        text = _normalised(draft[start: bounds[i + 1] if finished else len(draft)])
        words = text.split()
        if not words:
            continue
        if narration := _NARRATION.match(text):
            if not finished and narration.end() == len(text):
                return None, start  # "The customer" may yet become "The customer service team ..."
            return start, start
        for before in earlier:
            if finished and len(words) >= 3 and before[: len(words)] == words:
                return start, start
            # An unfinished sentence's last word may be cut: count only the words before it.
            if len(words) >= _LOOP_WORDS + (not finished) and before[:_LOOP_WORDS] == words[:_LOOP_WORDS]:
                return start, start
        if not finished and any(opening.startswith(text) for opening in [*_NARRATION_OPENINGS,
                                                                         *(" ".join(b) for b in earlier)]):
            return None, start
        earlier.append(words)
    return None, len(draft)


@dataclass
class GuardVerdict:
    supported: bool
    unsupported_numbers: list[str]
    min_similarity: float | None


class GroundingGuard:
    def __init__(self, embed: Embed, similarity_threshold: float = 0.45, complete_sentences: int = 3):
        self.embed = embed
        # Passage sentences come back reply after reply (and twice within one): each is
        # embedded once, then read from here.
        self._embed = VectorCache(embed, 8192)
        self.similarity_threshold = similarity_threshold
        self.complete_sentences = complete_sentences

    @property
    def identity(self) -> str:
        """What a cached reply depends on in the guard; the version moves when its rules do."""
        return f"guard9:{self.similarity_threshold}:{self.complete_sentences}"

    def check(self, reply: str, passages: list[Passage], whole: bool = True) -> GuardVerdict:
        """Whether the passages support ``reply``. A ``whole`` reply with no sentence of three
        words is compared as it stands ("No." is not an answer the passages give); a part of a
        reply being streamed ("Sure!") is judged on its numbers alone, its sentences to come."""
        source = "\n".join(f"{p.title}\n{unwrapped(p.text)}" for p in passages)
        unsupported = unsupported_numbers(reply, source)
        reply_sentences = sentences(reply) or ([reply.strip()] if whole and reply.strip() else [])
        passage_sentences = sentences(source)
        min_similarity = None
        if reply_sentences and passage_sentences:
            vectors = self._embed(reply_sentences + passage_sentences)
            similarity = vectors[: len(reply_sentences)] @ vectors[len(reply_sentences):].T
            min_similarity = round(float(similarity.max(axis=1).min()), 4)
        compared = min_similarity is not None or not reply_sentences  # no passage sentence: nothing supports it
        supported = (bool(reply.strip()) and not unsupported and compared and
                     (min_similarity is None or min_similarity >= self.similarity_threshold))
        return GuardVerdict(supported, unsupported, min_similarity)

    def extractive_answer(self, question: str, passages: list[Passage], max_sentences: int = 3) -> str:
        """The passage sentences a reply should say, in reading order."""
        chosen = self.completion_sentences(question, passages, max_sentences)
        if not chosen:
            return passages[0].text.strip() if passages else ""
        return " ".join(chosen)

    def missing_sentences(self, reply: str, question: str, passages: list[Passage]) -> list[str]:
        """Of the ``complete_sentences`` passage sentences a reply should say, those the reply
        does not already say, in reading order: none of its sentences is close to them, or the
        reply leaves out one of their specifics."""
        chosen = self.completion_sentences(question, passages, self.complete_sentences)
        said = sentences(reply) or ([reply.strip()] if reply.strip() else [])
        if not chosen or not said:
            return chosen
        vectors = self._embed(said + chosen)
        similarity = vectors[len(said):] @ vectors[: len(said)].T
        given = specifics(reply)
        return [s for s, row in zip(chosen, similarity) if row.max() < _ALREADY_SAID or not specifics(s) <= given]

    def completion_sentences(self, question: str, passages: list[Passage], n: int) -> list[str]:
        """The ``n`` passage sentences a reply should say, in reading order: the best passage's
        lead first, then the sentences closest to the question. A paraphrased question is often
        closest to sentences that do not answer it; lead first took key-fact recall after the
        guard from 69% to 72% on the grounding set (README, "Reading these figures"). The best
        passage's sentences get a small head start too: retrieval ranked it first for a reason."""
        candidates = [(rank, sentence) for rank, p in enumerate(passages) for sentence in sentences(unwrapped(p.text))]
        if not candidates or n <= 0:
            return []
        opening = set(sentences(lead(passages[0])))
        chosen = [i for i, (rank, sentence) in enumerate(candidates) if rank == 0 and sentence in opening][:n]
        if len(chosen) < n:
            vectors = self._embed([question, *(s for _, s in candidates)])
            scores = vectors[1:] @ vectors[0] + np.array([0.1 if rank == 0 else 0.0 for rank, _ in candidates])
            chosen += [i for i in np.argsort(-scores).tolist() if i not in chosen][: n - len(chosen)]
        return [candidates[i][1] for i in sorted(chosen)]
