"""classify -> route -> retrieve -> respond -> guard, for one message or a batch.

One encoder pass per message gives the vector that both the classifier and the retriever read.
Routing: out-of-scope messages (the classifier rejects them, or no passage is near them)
get a short request to rephrase, with the articles retrieval found when only the
classifier's low confidence kept a message near a passage out; hand-off intents get a
holding reply, with the lead of the article written for the intent when retrieval found
it. Neither calls the generator. Retrieval fuses the passage's similarity with the
classifier's probability for the passage's intent, so a message whose wording is close to
the wrong article still finds the article for its intent. The guard checks each sentence of
a draft as it completes, and the draft stops at the first one it rejects, or where it goes
off track: a sentence that repeats an earlier one, or that talks about the customer instead
of to them (a sentence that may do either streams once it is clear that it does not). A
second draft, asked for the article's steps, gets one more chance before the reply quotes
the article.
"""

from __future__ import annotations

import difflib
import json
import logging
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import closing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from pipeline.classifier import IntentClassifier
from pipeline.encoder import SentenceEncoder, VectorCache
from pipeline.errors import InputError, ModelLoadError, TandemError
from pipeline.guard import GroundingGuard, last_sentence_end, lead, off_track
from pipeline.knowledge import KnowledgeIndex, Passage, load_articles
from pipeline.responder import ANSWER, STEPS, GenerationLimits, Responder, make_backend
from pipeline.settings import Settings

log = logging.getLogger(__name__)

OOS_REPLY = ("Sorry, I can only help with questions about your Northwind account, cards and payments. "
             "Could you rephrase your question?")
UNSURE_REPLY = ("Sorry, I'm not sure I understood. Could you rephrase your question? "
                "One of these help articles may answer it:")
SUGGESTED_ARTICLES = 3  # how many articles the reply to an unsure message lists
HANDOFF_OPENING = ("This needs one of our specialists. I've passed your conversation to the team and someone "
                   "will reply here shortly.")
HANDOFF_REPLY = f"{HANDOFF_OPENING} If your card may be in someone else's hands, freeze it now in the app."

Progress = Callable[[str, int, int], None]


@dataclass
class Understanding:
    """What the BERT side found for one message: small JSON, safe to pass between workers."""
    message: str
    intent: str
    confidence: float
    top_intents: list[dict]
    escalate: bool
    out_of_scope: bool
    passages: list[Passage] = field(default_factory=list)
    # Out of scope only because the intent model's confidence is under its threshold, while a
    # passage is near: a banking question it cannot place, whose reply suggests articles.
    unsure: bool = False
    timings_ms: dict[str, float] = field(default_factory=dict)
    # The knowledge index the passages came from: a gen worker keys cached replies by it, not by
    # its own index, which can lag a reload behind the nlu worker's (reload_index).
    index_version: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Understanding:
        # Fields it does not know are left out: during a rolling upgrade a newer nlu worker's
        # understanding (a field added since) still reaches an older gen worker as a reply.
        known, known_in_passage = {f.name for f in fields(cls)}, {f.name for f in fields(Passage)}
        return cls(**{k: v for k, v in data.items() if k in known and k != "passages"},
                   passages=[Passage(**{k: v for k, v in p.items() if k in known_in_passage})
                             for p in data.get("passages", [])])


@dataclass
class PipelineResult:
    message: str
    intent: str
    confidence: float
    top_intents: list[dict]
    passages: list[dict]
    reply: str
    grounded: bool
    escalate: bool
    sources: list[str]
    timings_ms: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Meta:
    understanding: Understanding


@dataclass
class Token:
    text: str
    from_guard: bool = False  # help-centre sentences the guard appended or quoted, not generated text
    restart: bool = False  # the text streamed before it is withdrawn: a second draft or the quoted answer begins
    quoted: bool = False  # the guard's answer quoted from the passages, in place of the drafts it rejected
    # Written by the second draft: ``restart`` marks where one begins only when the first streamed
    # something, and a first draft cut at its first word by off_track streams nothing.
    second_draft: bool = False


@dataclass
class Done:
    result: PipelineResult


Event = Meta | Token | Done


def clean_message(message: str | bytes, max_chars: int) -> str:
    """The message as text, or an InputError that says why it cannot be used."""
    if isinstance(message, bytes):
        try:
            message = message.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"message is not valid UTF-8 (byte {exc.start})") from None
    if not isinstance(message, str):
        raise InputError("message must be text")
    if not message.isprintable():  # the common case skips this walk over every character
        message = "".join(ch for ch in message if ch.isprintable() or ch in "\n\t")
    message = message.strip()
    if not message:
        raise InputError("message is empty")
    if len(message) > max_chars:
        raise InputError(f"message is {len(message)} characters; the limit is {max_chars} (TANDEM_MAX_MESSAGE_CHARS)")
    return message


def handoff_reply(understanding: Understanding) -> tuple[str, list[Passage]]:
    """The holding reply for a hand-off intent, and the passage it quotes. Where the best passage
    begins the article written for the escalated intent, the reply quotes that article's lead, so
    a customer who waits for a person about a payment they did not make is told the first steps
    now (freeze the card, report the payment within 120 days) and not only a general line. The
    lead is quoted whole, so the reply says nothing the article does not."""
    best = understanding.passages[0] if understanding.passages else None
    if best is not None and understanding.intent in best.intents and (opening := lead(best)):
        return f"{HANDOFF_OPENING} While you wait: {opening}", [best]
    return HANDOFF_REPLY, []


def handoff_under_threshold(leaning: str, nearest: list[Passage], handoff: Collection[str]) -> str | None:
    """The hand-off intent an under-threshold message is escalated with, if retrieval points at
    fraud: the intent model leans to a hand-off intent whose article is among the nearest
    passages, or the nearest passage is a hand-off intent's article. The lean alone sent "can I make
    a single-use card number?" (compromised_card at 0.23, nearest passages all about disposable
    cards) to a person; without the nearest passage, sample ticket T0038 ("My wallet was stolen…
    contactless payments on my card I didn't make") leans to contactless_not_working and was
    asked to rephrase."""
    if leaning in handoff and any(leaning in p.intents for p in nearest):
        return leaning
    return next((intent for intent in nearest[0].intents if intent in handoff), None) if nearest else None


def unsure_reply(suggested: list[Passage]) -> str:
    """The request to rephrase for a message the intent model is unsure of: the articles retrieval
    found, then the first one's lead word for word, which often answers the question as it was
    asked (grounding set, gb27: "Disposable virtual cards are included with the Plus and Premium
    plans…"). A customer asked to rephrase has waited for nothing otherwise."""
    reply = UNSURE_REPLY + "".join(f"\n- {p.title}: {p.url}" for p in suggested)
    opening = lead(suggested[0])
    return f"{reply}\n\nFrom \"{suggested[0].title}\": {opening}" if opening else reply


def unknown_intents(names: Iterable[str], known: Collection[str]) -> str:
    """What is wrong with ``names`` ("" when every one is in ``known``): each unknown name,
    with the known one closest to it, since the usual cause is a typo."""
    problems = []
    for name in dict.fromkeys(names):
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
            problems.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"unknown intent {', '.join(problems)}" if problems else ""


class HybridPipeline:
    def __init__(self, encoder: SentenceEncoder, classifier: IntentClassifier, index: KnowledgeIndex,
                 responder: Responder, guard: GroundingGuard, settings: Settings):
        self.encoder = encoder
        self.classifier = classifier
        self.index = index
        self.responder = responder
        self.guard = guard
        self.settings = settings
        # Classify and retrieve may run as separate tasks on one worker; the second must not
        # pay for the encoder again.
        self._vectors = VectorCache(encoder.encode, 4096)
        if index.encoder != encoder.identity:
            raise ModelLoadError(f"the knowledge index was built with encoder {index.encoder!r} but the pipeline "
                                 f"uses {encoder.identity!r}; rebuild it with `tandem index`")
        # A misspelt hand-off intent would never escalate, and nothing else would say so.
        unknown = unknown_intents(settings.handoff_intents, classifier.labels)
        if unknown and "handoff_intents" in settings.model_fields_set:
            raise ModelLoadError(f"TANDEM_HANDOFF_INTENTS: {unknown} to the intent model; set it to intents the "
                                 "model predicts ([] for none)")
        if unknown:  # the default list names BANKING77's fraud intents; another model may have none of them
            log.warning("the intent model lacks the default hand-off intents (%s): set TANDEM_HANDOFF_INTENTS to "
                        "those of its intents a person must handle", unknown)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_settings(cls, settings: Settings | None = None, progress: Progress | None = None,
                      load_responder: bool = True) -> HybridPipeline:
        settings = settings or Settings()
        encoder = serving_encoder(settings)
        classifier = load_intent_model(settings, encoder, progress)
        index = load_or_build_index(settings, encoder, progress)
        limits = GenerationLimits(settings.max_tokens, settings.temperature, settings.stop, settings.timeout_s,
                                  settings.repeat_penalty)
        responder = Responder(make_backend(settings), limits, settings.max_passages_in_prompt)
        encoder.encode(["warm up"])  # the first forward pass pays one-off setup; keep it off the first request
        if load_responder:
            responder.warm_up()
        return cls(encoder, classifier, index, responder, GroundingGuard(encoder.embed, settings.guard_similarity,
                                                                    settings.guard_complete_sentences), settings)

    def reload_index(self) -> bool:
        """Serve the index folder's content if it changed since it was loaded (`tandem index`
        updated the help centre under running workers); True if it did. A folder caught mid-save,
        or saved again while it was read, is left for the next call. Raises IndexLoadError for
        a folder that does not load, and keeps serving the index it has."""
        directory = self.settings.resolved_index_dir
        seen = KnowledgeIndex.stored_version(directory)
        if seen is None or seen == self.index.version:
            return False
        index = KnowledgeIndex.load(directory)
        if KnowledgeIndex.stored_version(directory) != seen or index.version != seen:
            return False
        if index.encoder != self.encoder.identity:
            raise ModelLoadError(f"the knowledge index at {directory} was built with encoder {index.encoder!r} but "
                                 f"the pipeline uses {self.encoder.identity!r}; rebuild it with `tandem index`")
        self.index = index  # one assignment: a request under way keeps the index it started with
        return True

    # ------------------------------------------------------------------ BERT side
    def search(self, query: str | bytes, k: int = 3, intents: list[str] | None = None) -> list[Passage]:
        """Passages for a query alone, without the intent model's say; ``intents`` keeps only
        articles tagged with one of them. An intent that neither the intent model nor any
        article knows is an InputError, not an empty answer."""
        if intents is not None:
            unknown = unknown_intents(intents, {*self.classifier.labels, *self.index.intents})
            if unknown:
                raise InputError(unknown)
        vector = self.encoder.encode([clean_message(query, self.settings.max_message_chars)])[0]
        return self.index.search(vector, k, intents=intents)

    def understand(self, messages: list[str | bytes]) -> list[Understanding]:
        """Classify and retrieve for a batch of messages with one encoder pass each."""
        return self.add_passages(self.classify(messages))

    def classify(self, messages: list[str | bytes]) -> list[Understanding]:
        messages = [clean_message(m, self.settings.max_message_chars) for m in messages]
        started = time.perf_counter()
        vectors = self._encode(messages)
        encoded_at = time.perf_counter()
        predictions = self.classifier.predict(vectors, messages, k=3)
        oos = self.classifier.oos_label
        handoff = self.settings.handoff_intents
        unsure = []
        threshold = self.settings.oos_min_similarity
        for row, (prediction, nearest) in enumerate(zip(predictions, self._nearest_passages(vectors))):
            far = bool(threshold) and (not nearest or nearest[0].score < threshold)
            leaning = prediction.top_intents[0]["intent"] if prediction.top_intents else oos
            # Rejected only by the confidence threshold (not an `oos` class's win), near the help centre.
            under_threshold = prediction.intent == oos and not far and leaning != oos
            if far and prediction.intent not in handoff:  # a hand-off stays one
                prediction.intent = oos
            elif under_threshold and (fraud := handoff_under_threshold(leaning, nearest, handoff)):
                # Possible fraud under the confidence threshold still goes to a person: a false
                # alarm costs a person a look, a miss leaves a customer with a stolen card waiting.
                prediction.intent = fraud
                if fraud != leaning:  # the confidence reported is the model's own for the intent reported
                    probabilities = self.classifier.probabilities(vectors[row:row + 1], [messages[row]])[0]
                    prediction.confidence = round(float(probabilities[self.classifier.labels.index(fraud)]), 4)
            unsure.append(under_threshold and prediction.intent == oos)
        per_message = 1000 / max(len(messages), 1)
        timings = {"encode": round((encoded_at - started) * per_message, 2),
                   "classify": round((time.perf_counter() - encoded_at) * per_message, 2)}
        return [Understanding(message=m, intent=p.intent, confidence=p.confidence, top_intents=p.top_intents,
                              escalate=p.intent in handoff, out_of_scope=p.intent == oos, unsure=doubt,
                              timings_ms=dict(timings))
                for m, p, doubt in zip(messages, predictions, unsure)]

    def _nearest_passages(self, vectors: np.ndarray) -> list[list[Passage]]:
        """Each message's five nearest passages, best first. The intent model always picks one of
        its intents, at times confidently ("Can you recommend a good home insurance policy?" is
        `request_refund` at 0.92); a message whose nearest passage is under
        TANDEM_OOS_MIN_SIMILARITY is out of scope whatever it picked."""
        return self.index.search_many(vectors, 5) if len(vectors) else []

    def add_passages(self, understandings: list[Understanding]) -> list[Understanding]:
        vectors = self._encode([u.message for u in understandings])
        retrieved = [not u.out_of_scope or u.unsure for u in understandings]
        rows = [i for i, wanted in enumerate(retrieved) if wanted]
        index = self.index
        started = time.perf_counter()
        found = self.retrieve_many(vectors[rows], [understandings[i].top_intents for i in rows], index)
        per_message = round((time.perf_counter() - started) * 1000 / max(len(rows), 1), 2)
        version = index.version
        for i, passages in zip(rows, found):
            understandings[i].passages = passages
            understandings[i].index_version = version
        for understanding, wanted in zip(understandings, retrieved):
            understanding.timings_ms["retrieve"] = per_message if wanted else 0.0
        return understandings

    def _encode(self, messages: list[str]) -> np.ndarray:
        return self._vectors(messages) if messages else np.zeros((0, self.encoder.dim), np.float32)

    def retrieve(self, embedding: np.ndarray, top_intents: list[dict] | None = None, k: int | None = None) -> list[Passage]:
        return self.retrieve_many(embedding.reshape(1, -1), [top_intents], k=k)[0]

    def retrieve_many(self, embeddings: np.ndarray, top_intents: list[list[dict] | None],
                      index: KnowledgeIndex | None = None, k: int | None = None) -> list[list[Passage]]:
        """The ``k`` (default TANDEM_TOP_K) passages for each embedding: its nearest ones, and with
        intent routing on, the nearest in the articles of its top intents, each scored by
        similarity plus the probability of the article's intent. One passage per article.
        ``index``: the one served when the call began (reload_index may swap another in meanwhile)."""
        k, index = k or self.settings.top_k, self.index if index is None else index  # an empty index is falsy
        nearest = index.search_many(embeddings, 4 * k)
        routed_rows = [i for i, top in enumerate(top_intents) if top and self.settings.route_by_intent]
        probabilities = {i: {t["intent"]: t["confidence"] for t in top_intents[i]} for i in routed_rows}
        routed = dict(zip(routed_rows, index.search_many(embeddings[routed_rows], k,
                                                               [list(probabilities[i]) for i in routed_rows])))
        results = []
        for i, passages in enumerate(nearest):
            candidates = {(p.article_id, p.text): p for p in passages}
            if i not in routed:
                results.append(list(candidates.values())[:k])
                continue
            candidates.update({(p.article_id, p.text): p for p in routed[i]})
            probability = probabilities[i]
            best: dict[str, Passage] = {}  # one passage per article: k results are k different articles
            for passage in candidates.values():
                passage.score = round(passage.score + max((probability.get(t, 0.0) for t in passage.intents),
                                                          default=0.0), 4)
                if passage.article_id not in best or passage.score > best[passage.article_id].score:
                    best[passage.article_id] = passage
            results.append(sorted(best.values(), key=lambda p: -p.score)[:k])
        return results

    # ------------------------------------------------------------------ GPT side
    def respond(self, understanding: Understanding, history: list[dict] | None = None,
                limits: GenerationLimits | None = None) -> Iterator[Event]:
        """Stream a reply for an understood message: Meta, then Tokens, then Done."""
        started = time.perf_counter()
        timings = dict(understanding.timings_ms)
        yield Meta(understanding)
        grounded = True
        quoted_from: list[Passage] = []  # the articles a reply without generation quotes or suggests
        if understanding.escalate:
            reply, quoted_from = handoff_reply(understanding)
            yield Token(reply)
        elif understanding.out_of_scope:
            quoted_from = understanding.passages[:SUGGESTED_ARTICLES] if understanding.unsure else []
            reply = unsure_reply(quoted_from) if quoted_from else OOS_REPLY
            yield Token(reply)
        else:
            shown = understanding.passages[: self.responder.max_passages]
            hold = self.settings.guard_hold_sentences
            streamed = restart = False

            def release(text: str, quoted: bool = False) -> Token:
                nonlocal streamed, restart
                if "first_token" not in timings:
                    timings["first_token"] = round((time.perf_counter() - started) * 1000, 2)
                token = Token(text, from_guard=quoted, restart=restart, quoted=quoted,
                              second_draft=instruction is STEPS and not quoted)
                streamed, restart = True, False
                return token

            accepted = False
            for instruction in [ANSWER, STEPS] if self.settings.guard_second_draft else [ANSWER]:
                restart = streamed  # a client replaces what it showed of the rejected draft
                draft = ""
                checked = 0  # the draft's first `checked` characters are whole sentences the guard passed
                shown_up_to = 0  # without hold: the draft's first `shown_up_to` characters have streamed
                rejected = False
                with closing(self.responder.stream(understanding.message, understanding.intent,
                                                   understanding.passages, history, limits,
                                                   instruction=instruction)) as pieces:  # frees the backend's slot
                    for piece in pieces:
                        draft += piece
                        stop, streamable = off_track(draft)
                        if stop is not None:  # a repeat, or narration: the draft ends where it begins
                            draft = draft[:stop]
                            break
                        end = last_sentence_end(draft) if self.settings.guard_stop_early or hold else 0
                        if end > checked:
                            sentences = draft[checked:end]
                            # A rejected sentence fails the whole reply, which the guard will replace:
                            # stop decoding it now rather than at max_tokens, and stream nothing after it.
                            if sentences.strip() and not self.guard.check(sentences, shown, whole=False).supported:
                                rejected = True
                                if not hold and end > shown_up_to:
                                    yield release(draft[shown_up_to:end])
                                break
                            if hold:
                                yield release(sentences)
                            checked = end
                        if not hold and streamable > shown_up_to:
                            yield release(draft[shown_up_to:streamable])
                            shown_up_to = streamable
                if not rejected and (stop := off_track(draft + "\n")[0]) is not None:
                    draft = draft[:stop]  # its last sentence, ended by the end of the stream, went off track
                if not hold and not rejected and draft[shown_up_to:]:
                    yield release(draft[shown_up_to:])  # held while it could have gone off track, which it did not
                if not rejected and self.guard.check(draft.strip(), shown).supported:
                    accepted = True
                    break
            timings["generate"] = round((time.perf_counter() - started) * 1000, 2)
            guard_started = time.perf_counter()
            reply = draft.strip()
            if not accepted:
                reply = self.guard.extractive_answer(understanding.message, shown)
                grounded = False
                # Streamed like any reply, so a client that shows the tokens since the last restart
                # shows the reply; it withdraws the rejected draft the client has shown, if any.
                restart = streamed
                if reply:
                    yield release(reply, quoted=True)
            else:
                if hold and draft[checked:]:
                    yield release(draft[checked:])  # the last sentence, which no break followed
                if missing := self.guard.missing_sentences(reply, understanding.message, shown):
                    gap = "\n\n"[len(draft) - len(draft.rstrip("\n")):]  # a blank line, counting the draft's own
                    addition = gap + " ".join(missing)
                    yield Token(addition, from_guard=True)
                    reply = (draft + addition).strip()  # what a client that joins the tokens (since a restart) shows
            timings["guard"] = round((time.perf_counter() - guard_started) * 1000, 2)
        timings["total"] = round(sum(v for k, v in timings.items() if k not in {"first_token"}), 2)
        used = (quoted_from if understanding.escalate or understanding.out_of_scope
                else understanding.passages[: self.responder.max_passages])
        yield Done(PipelineResult(
            message=understanding.message, intent=understanding.intent, confidence=understanding.confidence,
            top_intents=understanding.top_intents, passages=[p.to_dict() for p in understanding.passages],
            reply=reply, grounded=grounded, escalate=understanding.escalate,
            sources=list(dict.fromkeys(p.article_id for p in used)),
            timings_ms=timings))

    @property
    def reply_identity(self) -> str:
        """What a cached reply (its tokens too) depends on besides the message, its intent and the index."""
        # "q": the guard's quoted answer streams as a token; "h": a hand-off quotes its article's
        # lead; "s": an unsure message gets articles suggested, "l" with the first one's lead.
        # Replies cached before are not served.
        return (f"{self.responder.identity}|{self.guard.identity}|"
                f"{int(self.settings.guard_stop_early)}{int(self.settings.guard_hold_sentences)}"
                f"{int(self.settings.guard_second_draft)}qhsl")

    def stream(self, message: str | bytes, history: list[dict] | None = None) -> Iterator[Event]:
        yield from self.respond(self.understand([message])[0], history)

    def run(self, message: str | bytes, history: list[dict] | None = None) -> PipelineResult:
        return self.run_understood(self.understand([message])[0], history)

    def run_understood(self, understanding: Understanding, history: list[dict] | None = None,
                       limits: GenerationLimits | None = None) -> PipelineResult:
        for event in self.respond(understanding, history, limits):
            if isinstance(event, Done):
                return event.result
        raise TandemError("the pipeline ended without a result")  # pragma: no cover


# ---------------------------------------------------------------------- defaults

def serving_encoder(settings: Settings, method: str | None = None) -> SentenceEncoder:
    """The sentence encoder as the pipeline runs it for an intent model trained by ``method``
    (default: the configured model's). On a CPU a head-only model reads its vectors from ONNX
    Runtime with int8 weights (or torch with int8 attention); the other methods change the
    encoder's weights, so they stay on torch. Train and evaluate a head on this encoder, so its
    fusion weight, temperature and threshold are fitted to the vectors it is served (README,
    "Intent accuracy")."""
    encoder = SentenceEncoder.from_settings(settings)
    if settings.encoder_device == "cpu" and (method or intent_model_method(settings)) == "head":  # measured for it only
        onnx = settings.encoder_onnx_int8 and encoder.use_onnx_int8(settings.data_dir / "models",
                                                                    settings.encoder_threads)
        if settings.encoder_int8_attention and not onnx:
            encoder.quantize_attention()
    return encoder


def index_encoder(settings: Settings) -> SentenceEncoder:
    """The encoder a knowledge index must be embedded with to serve the configured pipeline: the
    serving encoder, carrying a fine-tuned or adapted intent model's weights as the pipeline's
    does. A plain encoder named another identity, and `tandem index` refused the pipeline's index."""
    encoder = serving_encoder(settings)
    if intent_model_method(settings) not in ("head", ""):  # a head leaves the encoder as it is
        load_intent_model(settings, encoder)
    return encoder


def intent_model_path(settings: Settings) -> Path:
    """The configured intent model's folder; without one, the shipped model, or where the default
    is trained on first use when the installed package lacks it."""
    path = settings.resolved_intent_model
    if settings.intent_model is None and not (path / "config.json").is_file():
        return settings.data_dir / "models" / "intents-banking77"
    return path


def intent_model_method(settings: Settings) -> str:
    """How the configured intent model was trained, read from its config without loading it;
    "" where there is no readable config (loading the model then says what is wrong)."""
    config = intent_model_path(settings) / "config.json"
    if settings.intent_model is None and not config.is_file():
        return DEFAULT_TRAINING["method"]
    try:
        return str(json.loads(config.read_text(encoding="utf-8")).get("method", ""))
    except (OSError, ValueError, AttributeError, UnicodeDecodeError):
        return ""


def intent_model_labels(settings: Settings) -> set[str] | None:
    """The configured intent model's intents, read from its folder without loading it; None
    where there is no readable model yet (loading it then says what is wrong)."""
    try:
        return set(json.loads((intent_model_path(settings) / "labels.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def load_intent_model(settings: Settings, encoder: SentenceEncoder, progress: Progress | None = None) -> IntentClassifier:
    """The configured intent model; the shipped default is trained on first use if absent."""
    path = intent_model_path(settings)
    if settings.intent_model is None and not (path / "config.json").is_file():
        train_default_intent_model(encoder, path, progress)
    classifier = IntentClassifier.load(path)
    classifier.attach_encoder(encoder)
    return classifier


def train_default_intent_model(encoder: SentenceEncoder, out, progress: Progress | None = None) -> IntentClassifier:
    from pipeline.classifier import TrainConfig
    from pipeline.data_io import read_labelled_csv
    from pipeline.settings import PACKAGE_DATA

    texts, labels = read_labelled_csv(PACKAGE_DATA / "banking77" / "train.csv", "text", "category")
    return IntentClassifier.train(encoder, texts, labels, TrainConfig(**DEFAULT_TRAINING), progress, out=out)


# The shipped model's recipe, chosen by measurement (README, "Intent accuracy").
DEFAULT_TRAINING: dict = {"method": "head", "lexical": True, "c": 20.0}


def build_index(kb_dir, encoder: SentenceEncoder, settings: Settings, progress: Progress | None = None) -> KnowledgeIndex:
    articles = load_articles(kb_dir)
    index = KnowledgeIndex(encoder.dim, encoder.identity, settings.exact_index_max, settings.chunk_words)

    def embed(texts: list[str]) -> np.ndarray:
        return encoder.encode(texts, progress=(lambda n: progress("index", n, len(texts))) if progress else None)

    index.upsert(articles, embed)
    return index


def load_or_build_index(settings: Settings, encoder: SentenceEncoder, progress: Progress | None = None) -> KnowledgeIndex:
    """The configured index; without one, the bundled help centre, built once and kept."""
    directory = settings.resolved_index_dir
    if settings.index_dir is not None:
        index = KnowledgeIndex.load(directory)
        if index.chunk_words != settings.chunk_words:
            log.warning("%s was cut into passages of %d words, not TANDEM_CHUNK_WORDS=%d: rebuild it with "
                        "`tandem index`", directory, index.chunk_words, settings.chunk_words)
        return index
    if (directory / "meta.json").is_file():
        index = KnowledgeIndex.load(directory)
        # Built with another encoder or passage size, it is built again.
        if index.encoder == encoder.identity and index.chunk_words == settings.chunk_words:
            index.exact_max = settings.exact_index_max
            # Pick up edits to the knowledge base folder without a full rebuild.
            articles = load_articles(settings.kb_dir)
            changed = index.upsert(articles, encoder.embed)
            removed = index.delete(set(index.articles) - {a.id for a in articles})
            if changed["added"] or changed["updated"] or removed:
                index.save(directory)
            return index
    index = build_index(settings.kb_dir, encoder, settings, progress)
    index.save(directory)
    return index
