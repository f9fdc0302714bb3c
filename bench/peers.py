"""Peers the performance bench measures Tandem against, in the same run, on the same
models, data and machine.

  naive    - the per-ticket code a tutorial writes: a transformers ``pipeline`` for the
             embedding, ``generate`` per ticket, no batching and no cache.
  haystack - a Haystack pipeline (``haystack-ai`` with its sentence-transformers and
             llama.cpp integrations): embed -> classify + retrieve -> prompt -> generate,
             run once per ticket as Haystack pipelines are used.

Both classify with the shipped intent model (its linear head and its lexical model,
through ``IntentClassifier.predict``, so the temperature and out-of-scope threshold are
the pipeline's too), on a query vector that equals ours up to float noise: the accuracy
they report is the pipeline's accuracy, and their speed is compared at equal accuracy.
Both generate from the same SmolLM2-135M GGUF with the pipeline's grounded prompt
(``pipeline.responder.build_messages``), greedy, for at most ``max_tokens`` tokens.

Loading and index building happen before the clock starts; each timed loop follows one
warm-up call on a text outside the measured set. These peers need the ``bench`` extra
(``pip install -e '.[bench]' -c constraints.txt``); the functions import it lazily, so
this module imports without it.

No ``from __future__ import annotations`` here: Haystack reads the run() annotations of
the components defined inside a function below, and those must be real types there.
"""

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.classifier import IntentClassifier
from pipeline.knowledge import KnowledgeIndex, Passage, chunk_article
from pipeline.settings import Settings

# Haystack reports usage to a telemetry service unless told not to; nothing here may call out.
os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")

WARM_UP_TEXT = "How do I top up my account?"  # not a BANKING77 test row, so no peer sees a measured ticket early

Nlu = Callable[[str], tuple[str, list[Passage]]]  # one ticket -> (intent, passages)


# ---------------------------------------------------------------------- shared pieces

def _settings(settings: Settings | None) -> Settings:
    return settings or Settings()


def _classifier(settings: Settings) -> IntentClassifier:
    """The shipped intent model itself, not a copy: the peers' accuracy is the pipeline's."""
    return IntentClassifier.load(settings.resolved_intent_model)


def _index(settings: Settings) -> KnowledgeIndex:
    """The knowledge index exactly as the pipeline loads (or first builds) it."""
    from pipeline.chain import load_or_build_index
    from pipeline.encoder import SentenceEncoder

    encoder = SentenceEncoder.from_settings(settings)
    return load_or_build_index(settings, encoder)


def _split_gguf(path: str) -> tuple[str, str]:
    """transformers reads a GGUF as (folder, file name inside it)."""
    return os.path.dirname(path), os.path.basename(path)


def _recall(passages: list[Passage], label: str) -> bool:
    """Whether any retrieved passage comes from an article written for the ticket's intent
    (the vector-only recall of pipeline.evaluation.retrieval_recall)."""
    return any(label in p.intents for p in passages)


def _time_nlu(nlu: Nlu, texts: list[str], labels: list[str]) -> dict:
    """Tickets/s over a one-at-a-time loop, with accuracy and recall@k (k = Settings.top_k,
    3 by default; the key says 3) from the same calls."""
    nlu(WARM_UP_TEXT)
    correct = found = 0
    started = time.perf_counter()
    for text, label in zip(texts, labels):
        intent, passages = nlu(text)
        correct += intent == label
        found += _recall(passages, label)
    seconds = time.perf_counter() - started
    n = len(texts)
    return {"n": n, "seconds": round(seconds, 3), "tickets_per_s": round(n / seconds, 2),
            "accuracy": round(correct / n, 4), "recall_at_3": round(found / n, 4)}


def _time_e2e(draft: Callable[[str], tuple[str, int]], texts: list[str], max_tokens: int) -> dict:
    """Tickets/min over a one-at-a-time loop of NLU then a draft; tokens counted so runs
    whose drafts stop early on end-of-text can still be compared per token."""
    draft(WARM_UP_TEXT)
    tokens = 0
    first = ""
    started = time.perf_counter()
    for text in texts:
        reply, generated = draft(text)
        tokens += generated
        first = first or reply
    seconds = time.perf_counter() - started
    n = len(texts)
    return {"n": n, "seconds": round(seconds, 3), "tickets_per_min": round(60 * n / seconds, 2), "max_tokens": max_tokens,
            "tokens": tokens, "tokens_per_ticket": round(tokens / n, 1), "tokens_per_s": round(tokens / seconds, 2),
            "example_draft": first}


# ---------------------------------------------------------------------- naive

def _naive_nlu_fn(settings: Settings) -> Nlu:
    """The tutorial's NLU: a feature-extraction pipeline per ticket, mean-pool and
    normalise in numpy, the intent model on that vector, one FAISS search per ticket."""
    from transformers import pipeline

    extractor = pipeline("feature-extraction", model=settings.encoder, device="cpu")
    classifier = _classifier(settings)
    index = _index(settings)

    def nlu(text: str) -> tuple[str, list[Passage]]:
        tokens = np.asarray(extractor(text), dtype=np.float32)[0]  # (tokens, dim); one text, so no padding to mask
        vector = tokens.mean(axis=0)
        vector /= np.linalg.norm(vector)
        intent = classifier.predict(vector[None, :], [text], k=1)[0].intent
        # A tutorial takes the nearest passages; it has no intent routing (the pipeline's retrieve() adds that).
        return intent, index.search(vector, settings.top_k)

    return nlu


def naive_nlu(texts: list[str], labels: list[str], settings: Settings | None = None) -> dict:
    """Tutorial-style classify + retrieve, one ticket at a time.

    Returns n, seconds, tickets_per_s, accuracy (intent, on the same tickets) and
    recall_at_3 (an article for the gold intent among the passages), plus peer."""
    return {"peer": "naive", **_time_nlu(_naive_nlu_fn(_settings(settings)), texts, labels)}


def naive_e2e(texts: list[str], max_tokens: int = 64, settings: Settings | None = None) -> dict:
    """Tutorial-style NLU, then ``model.generate`` per ticket on SmolLM2-135M loaded by
    transformers from the bundled GGUF (dequantised to float32 at load, ~25 s, untimed).

    Returns n, seconds, tickets_per_min, max_tokens, tokens, tokens_per_ticket,
    tokens_per_s, example_draft, plus peer and generator."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.responder import build_messages

    settings = _settings(settings)
    nlu = _naive_nlu_fn(settings)
    folder, gguf = _split_gguf(settings.responder_model)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf).eval()

    def draft(text: str) -> tuple[str, int]:
        intent, passages = nlu(text)
        messages = build_messages(text, intent, passages, max_passages=settings.max_passages_in_prompt)
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False,
                                    pad_token_id=tokenizer.eos_token_id)
        new = output[0, inputs["input_ids"].shape[1]:]
        # Count the end-of-text token out, as llama.cpp's usage figure (the Haystack peer's) does.
        return tokenizer.decode(new, skip_special_tokens=True), int((new != tokenizer.eos_token_id).sum())

    return {"peer": "naive", "generator": "transformers generate, GGUF dequantised to float32",
            **_time_e2e(draft, texts, max_tokens)}


# ---------------------------------------------------------------------- Haystack

def _documents(index: KnowledgeIndex) -> list[Any]:
    """The pipeline's search keys as Haystack Documents: one per passage ("title\\ntext")
    and one per "Common questions" line, each carrying its passage in meta, so both
    retrievers search the same keys and return the same passages.

    The vectors are Haystack's own (SentenceTransformersDocumentEmbedder), not copied
    from our index: building the store is untimed either way, and this is what a Haystack
    user runs. It truncates at the model's 256 tokens where our encoder stops at 128, so
    a few long passages get slightly different vectors; recall_at_3 shows any effect."""
    from haystack import Document

    documents = []
    for article in index.articles.values():
        chunks = chunk_article(article, index.chunk_words)
        meta = {"article_id": article.id, "title": article.title, "url": article.url, "intents": list(article.intents)}
        documents += [Document(content=f"{article.title}\n{text}", meta={**meta, "passage": text}) for text in chunks]
        documents += [Document(content=question, meta={**meta, "passage": chunks[0]}) for question in article.questions]
    return documents


def _passages(documents: list[Any]) -> list[Passage]:
    return [Passage(article_id=d.meta["article_id"], title=d.meta["title"], url=d.meta["url"], text=d.meta["passage"],
                    score=round(float(d.score or 0.0), 4), intents=d.meta["intents"]) for d in documents]


def _haystack_components() -> dict[str, type]:
    """Our two Haystack components, defined on first use so the module imports without haystack."""
    from haystack import Document, component
    from haystack.dataclasses import ChatMessage

    from pipeline.responder import build_messages

    @component
    class IntentClassification:
        """The shipped intent model on the embedder's query vector (and the text, for its lexical half)."""

        def __init__(self, classifier: IntentClassifier):
            self.classifier = classifier

        @component.output_types(intent=str)
        def run(self, text: str, embedding: list[float]) -> dict[str, Any]:
            vector = np.asarray(embedding, dtype=np.float32)[None, :]
            return {"intent": self.classifier.predict(vector, [text], k=1)[0].intent}

    @component
    class GroundedPrompt:
        """The pipeline's prompt (build_messages) from the retrieved Documents, as ChatMessages."""

        def __init__(self, max_passages: int):
            self.max_passages = max_passages

        @component.output_types(messages=list[ChatMessage])
        def run(self, query: str, intent: str, documents: list[Document]) -> dict[str, Any]:
            messages = build_messages(query, intent, _passages(documents), max_passages=self.max_passages)
            make = {"system": ChatMessage.from_system, "user": ChatMessage.from_user}
            return {"messages": [make[m["role"]](m["content"]) for m in messages]}

    return {"IntentClassification": IntentClassification, "GroundedPrompt": GroundedPrompt}


def _haystack_pipeline(settings: Settings, max_tokens: int | None = None):
    """embedder -> (classifier, retriever) [-> prompt -> generator when max_tokens is given]."""
    from haystack import Pipeline
    from haystack.components.retrievers.in_memory import InMemoryEmbeddingRetriever
    from haystack.document_stores.in_memory import InMemoryDocumentStore
    from haystack.utils import ComponentDevice
    from haystack_integrations.components.embedders.sentence_transformers import (
        SentenceTransformersDocumentEmbedder,
        SentenceTransformersTextEmbedder,
    )

    parts = _haystack_components()
    device = ComponentDevice.from_str("cpu")
    common = {"model": settings.encoder, "device": device, "normalize_embeddings": True, "progress_bar": False,
              "local_files_only": True}
    # Unit vectors and dot product: the same cosine ranking as our FAISS inner-product index.
    store = InMemoryDocumentStore(embedding_similarity_function="dot_product")
    document_embedder = SentenceTransformersDocumentEmbedder(**common)
    document_embedder.warm_up()
    store.write_documents(document_embedder.run(_documents(_index(settings)))["documents"])

    pipe = Pipeline()
    pipe.add_component("embedder", SentenceTransformersTextEmbedder(**common))
    pipe.add_component("classifier", parts["IntentClassification"](_classifier(settings)))
    pipe.add_component("retriever", InMemoryEmbeddingRetriever(store, top_k=settings.top_k))
    pipe.connect("embedder.embedding", "classifier.embedding")
    pipe.connect("embedder.embedding", "retriever.query_embedding")
    if max_tokens is not None:
        from haystack_integrations.components.generators.llama_cpp import LlamaCppChatGenerator

        pipe.add_component("prompt", parts["GroundedPrompt"](settings.max_passages_in_prompt))
        # The pipeline's llama.cpp settings (context, threads), so only the orchestration differs.
        pipe.add_component("generator", LlamaCppChatGenerator(
            model=settings.responder_model, n_ctx=2048,
            model_kwargs={"n_threads": settings.responder_threads or os.cpu_count(), "verbose": False},
            generation_kwargs={"max_tokens": max_tokens, "temperature": 0.0}))
        pipe.connect("classifier.intent", "prompt.intent")
        pipe.connect("retriever.documents", "prompt.documents")
        pipe.connect("prompt.messages", "generator.messages")
    pipe.warm_up()
    return pipe


def _haystack_inputs(text: str, generate: bool) -> dict:
    data = {"embedder": {"text": text}, "classifier": {"text": text}}
    if generate:
        data["prompt"] = {"query": text}
    return data


def haystack_nlu(texts: list[str], labels: list[str], settings: Settings | None = None) -> dict:
    """A Haystack pipeline (embedder -> intent model + in-memory embedding retriever) run once per ticket.

    Returns the same keys as naive_nlu."""
    pipe = _haystack_pipeline(_settings(settings))

    def nlu(text: str) -> tuple[str, list[Passage]]:
        out = pipe.run(_haystack_inputs(text, generate=False))
        return out["classifier"]["intent"], _passages(out["retriever"]["documents"])

    return {"peer": "haystack", **_time_nlu(nlu, texts, labels)}


def haystack_e2e(texts: list[str], max_tokens: int = 64, settings: Settings | None = None) -> dict:
    """The Haystack NLU pipeline extended with our prompt and LlamaCppChatGenerator on the
    same GGUF, run once per ticket.

    Returns the same keys as naive_e2e."""
    pipe = _haystack_pipeline(_settings(settings), max_tokens)

    def draft(text: str) -> tuple[str, int]:
        reply = pipe.run(_haystack_inputs(text, generate=True))["generator"]["replies"][0]
        return reply.text or "", int(reply.meta["usage"]["completion_tokens"])

    return {"peer": "haystack", "generator": "LlamaCppChatGenerator (llama-cpp-python), same GGUF",
            **_time_e2e(draft, texts, max_tokens)}

