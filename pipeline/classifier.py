"""Intent classification with calibrated confidence and out-of-scope rejection.

Two models vote, by a weighted sum of log-probabilities whose weight is chosen on a
validation split: a linear head on the encoder's sentence vector, and a logistic
regression on word and character n-grams. They err on different messages (the
encoder generalises over wording, the n-grams catch exact product words), so the
pair beats either alone (README, "Intent accuracy"). The encoder side trains one of
five ways:
  head      - logistic regression on frozen vectors (fast; the encoder stays shared
              with retrieval unchanged)
  finetune  - the whole encoder and the head, cross-entropy with label smoothing
  lora      - low-rank adapters on the encoder's attention and dense layers (peft)
  prefix    - learned key/value vectors prepended in every attention layer (peft)
  prompt    - learned input embeddings prepended to every message (peft)

Confidence is the fused softmax with a temperature fitted on the validation split. A
message is out of scope (``oos``) when the winning class is ``oos`` (if the training
data has that class) or its confidence is under a threshold tuned on the same split.
The artifact is a folder of JSON and numpy/safetensors files, never pickles.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from scipy.sparse import csr_matrix

from pipeline.encoder import SentenceEncoder
from pipeline.errors import InputError, ModelLoadError

if TYPE_CHECKING:  # torch trains; a served model is numpy alone, and a worker spares torch's memory
    import torch

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = 1
_WORD_CACHE_SIZE = 100_000  # words whose character n-grams LexicalModel keeps
# Methods whose artifact is a peft adapter over the base encoder (saved in ``adapter/``).
ADAPTER_METHODS = ("lora", "prefix", "prompt")
METHODS = ("head", "finetune", *ADAPTER_METHODS)
Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class IntentPrediction:
    intent: str
    confidence: float
    top_intents: list[dict]  # [{"intent": ..., "confidence": ...}], best first

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainConfig:
    method: Literal["head", "finetune", "lora", "prefix", "prompt"] = "head"
    lexical: bool = True  # fuse with the n-gram model
    val_split: float = 0.1
    seed: int = 0
    oos_label: str = "oos"
    # Without oos examples the threshold rejects this share of in-scope validation messages.
    oos_reject_rate: float = 0.005
    c: float = 20.0  # inverse regularisation of both logistic regressions
    epochs: int = 4
    batch_size: int = 32
    lr: float = 5e-5
    head_lr: float = 5e-3
    label_smoothing: float = 0.1
    lora_r: int = 16
    num_virtual_tokens: int = 8  # prefix and prompt tuning
    # Prefix and prompt tuning train a few thousand fresh vectors with no pretrained
    # values to stay near, so they take steps far larger than the encoder's weights can.
    prompt_lr: float = 2e-2
    max_train: int | None = None  # cap on training rows, for quick runs
    # head only: refit on every row once the validation split has calibrated. Off, every
    # method's weights see the same rows (bench/peft.py compares them that way).
    refit: bool = True


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


class LexicalModel:
    """Word 1-2-gram and character 2-5-gram TF-IDF, then logistic regression."""

    def __init__(self, word_vocab: dict[str, int], word_idf: np.ndarray, char_vocab: dict[str, int],
                 char_idf: np.ndarray, weight: np.ndarray, bias: np.ndarray):
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.word = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, vocabulary=word_vocab)
        self.word.idf_ = word_idf
        self.char = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, vocabulary=char_vocab)
        self.char.idf_ = char_idf
        self.weight, self.bias = weight, bias
        # Stored as float16; converted once here rather than copied on every call.
        self._weight_t = np.ascontiguousarray(weight.T, dtype=np.float32)
        self._word_cache: dict[str, np.ndarray] = {}  # see _char_tfidf

    def logits(self, texts: list[str]) -> np.ndarray:
        from scipy.sparse import hstack

        x = hstack([self.word.transform(texts), self._char_tfidf(texts)]).tocsr()
        return np.asarray(x @ self._weight_t) + self.bias

    def _char_tfidf(self, texts: list[str]) -> csr_matrix:
        """``self.char.transform(texts)``, from per-word counts kept in a cache.

        Character n-grams never cross a word boundary, so a message's counts are the sum of its
        words' counts, and words repeat across tickets far more than messages do. sklearn's
        transform spent most of its time collecting n-grams in Python: this took the n-gram
        model from a tenth of NLU time to a twentieth (profile, 2 cores, 2026-11-23)."""
        from sklearn.preprocessing import normalize

        indices: list[np.ndarray] = []
        indptr = [0]
        for text in texts:
            words = [self._word_ngrams(word) for word in text.lower().split()]
            indices.extend(words)
            indptr.append(indptr[-1] + sum(len(w) for w in words))
        flat = np.concatenate(indices) if indices else np.zeros(0, np.int64)
        x = csr_matrix((np.ones(len(flat)), flat, indptr), shape=(len(texts), len(self.char.vocabulary)))
        x.sum_duplicates()  # counts
        x.data = (np.log(x.data) + 1) * self.char.idf_[x.indices]  # sublinear tf, times idf
        return normalize(x)

    def _word_ngrams(self, word: str) -> np.ndarray:
        """Vocabulary ids of one lower-cased word's character n-grams, repeats kept."""
        found = self._word_cache.get(word)
        if found is None:
            vocab = self.char.vocabulary
            found = np.array([vocab[g] for g in self.char._char_wb_ngrams(word) if g in vocab], np.int64)
            if len(self._word_cache) >= _WORD_CACHE_SIZE:
                self._word_cache.clear()
            self._word_cache[word] = found
        return found

    @classmethod
    def fit(cls, texts: list[str], y: np.ndarray, n_classes: int, c: float) -> LexicalModel:
        from scipy.sparse import hstack
        from sklearn.feature_extraction.text import TfidfVectorizer

        word = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
        char = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2)
        x = hstack([word.fit_transform(texts), char.fit_transform(texts)]).tocsr()
        weight, bias = _fit_logistic(x, y, n_classes, c)
        return cls({k: int(v) for k, v in word.vocabulary_.items()}, word.idf_,
                   {k: int(v) for k, v in char.vocabulary_.items()}, char.idf_, weight, bias)

    def save(self, directory: Path) -> None:
        (directory / "lexical_vocab.json").write_text(json.dumps({"word": self.word.vocabulary, "char": self.char.vocabulary}))
        np.savez_compressed(directory / "lexical.npz", weight=self.weight.astype(np.float16), bias=self.bias,
                            word_idf=self.word.idf_, char_idf=self.char.idf_)

    @classmethod
    def load(cls, directory: Path) -> LexicalModel:
        vocab = json.loads((directory / "lexical_vocab.json").read_text())
        with np.load(directory / "lexical.npz") as arrays:
            return cls(vocab["word"], arrays["word_idf"], vocab["char"], arrays["char_idf"],
                       arrays["weight"].astype(np.float32), arrays["bias"])


def _retired_copies(directory: Path) -> list[Path]:
    """Models ``IntentClassifier.save`` moved aside to put a new one at ``directory``, newest first."""
    found = [p for p in directory.parent.glob(f".{directory.name}.*.old") if (p / "config.json").is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


@dataclass
class IntentClassifier:
    labels: list[str]
    weight: np.ndarray  # (n_labels, dim): linear head on the encoder vector
    bias: np.ndarray
    lexical: LexicalModel | None = None
    lexical_weight: float = 0.0
    temperature: float = 1.0
    oos_threshold: float = 0.0
    oos_label: str = "oos"
    method: str = "head"
    encoder: str = ""
    metrics: dict = field(default_factory=dict)
    path: Path | None = None

    # ------------------------------------------------------------------ inference
    def logits(self, embeddings: np.ndarray, texts: list[str]) -> np.ndarray:
        fused = _log_softmax(np.atleast_2d(embeddings) @ self.weight.T + self.bias)
        if self.lexical is not None and self.lexical_weight > 0:
            fused = (1 - self.lexical_weight) * fused + self.lexical_weight * _log_softmax(self.lexical.logits(texts))
        return fused

    def probabilities(self, embeddings: np.ndarray, texts: list[str]) -> np.ndarray:
        return np.exp(_log_softmax(self.logits(embeddings, texts) / self.temperature))

    def predict(self, embeddings: np.ndarray, texts: list[str], k: int = 3) -> list[IntentPrediction]:
        probs = self.probabilities(embeddings, texts)
        predictions = []
        for row in probs:
            top = np.argsort(-row)[:k]
            best = int(top[0])
            intent = self.labels[best]
            if row[best] < self.oos_threshold:
                intent = self.oos_label
            predictions.append(IntentPrediction(
                intent=intent, confidence=round(float(row[best]), 4),
                top_intents=[{"intent": self.labels[i], "confidence": round(float(row[i]), 4)} for i in top]))
        return predictions

    def attach_encoder(self, encoder: SentenceEncoder) -> None:
        """Fine-tuned and adapter artifacts carry their own encoder weights: load them into the encoder."""
        if self.method == "head" or self.path is None:
            return
        from safetensors import SafetensorError
        from transformers import AutoModel
        try:
            if self.method == "finetune":
                model = AutoModel.from_pretrained(self.path / "encoder")
            else:
                from peft import PeftModel
                model = PeftModel.from_pretrained(encoder.model, self.path / "adapter")
                if self.method == "lora":  # LoRA folds into the weights; prefix and prompt vectors stay a wrapper
                    model = model.merge_and_unload()
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
            part = "encoder" if self.method == "finetune" else "adapter"
            raise ModelLoadError(f"intent model at {self.path}: its {part}/ folder does not load "
                                 f"({type(exc).__name__}: {str(exc)[:200]})") from None
        encoder.use_model(model, tag=f"{self.method}:{self.metrics.get('artifact_id', '')}")

    # ------------------------------------------------------------------ persistence
    def save(self, directory: Path, encoder: SentenceEncoder | None = None, peft_model=None) -> None:
        """Write the artifact beside ``directory``, then put it in its place: written in place,
        a save cut short (disk full, Ctrl-C) over the folder a pipeline serves left neither
        the old model nor the new one."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = directory.with_name(f".{directory.name}.{os.getpid()}.saving")
        retired = directory.with_name(f".{directory.name}.{os.getpid()}.old")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            self._write(staging, encoder, peft_model)
            if directory.exists():
                shutil.rmtree(retired, ignore_errors=True)
                os.replace(directory, retired)
            os.replace(staging, directory)
            for left in _retired_copies(directory):  # this save's, and any a crashed one left (see load)
                shutil.rmtree(left, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.path = directory

    def _write(self, directory: Path, encoder: SentenceEncoder | None, peft_model) -> None:
        directory.mkdir(parents=True)
        np.savez(directory / "head.npz", weight=self.weight.astype(np.float32), bias=self.bias.astype(np.float32))
        if self.lexical is not None:
            self.lexical.save(directory)
        config = {"format": ARTIFACT_FORMAT, "method": self.method, "encoder": self.encoder,
                  "lexical_weight": self.lexical_weight if self.lexical else 0.0, "temperature": self.temperature,
                  "oos_threshold": self.oos_threshold, "oos_label": self.oos_label}
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        (directory / "labels.json").write_text(json.dumps(self.labels, indent=1))
        (directory / "metrics.json").write_text(json.dumps(self.metrics, indent=2))
        if self.method == "finetune" and encoder is not None:
            encoder.model.save_pretrained(directory / "encoder")
            encoder.tokenizer.save_pretrained(directory / "encoder")
        if self.method in ADAPTER_METHODS and peft_model is not None:
            peft_model.save_pretrained(directory / "adapter")

    @classmethod
    def load(cls, directory: Path) -> IntentClassifier:
        directory = Path(directory)
        if not directory.exists() and (kept := _retired_copies(directory)):
            # A save that stopped between its two renames (killed, power cut) left no folder here
            # and the model it was replacing whole beside it; serve that until a save succeeds.
            log.warning("no intent model at %s: a save was cut short; loading the model it replaced from %s",
                        directory, kept[0])
            directory = kept[0]
        if not (directory / "config.json").is_file():
            raise ModelLoadError(f"no intent model at {directory} (config.json missing); "
                                 f"train one with: tandem train-intents TRAIN.csv --out {directory}")
        try:
            config = json.loads((directory / "config.json").read_text())
            labels = json.loads((directory / "labels.json").read_text())
            metrics = json.loads((directory / "metrics.json").read_text()) if (directory / "metrics.json").is_file() else {}
            with np.load(directory / "head.npz") as head:
                weight, bias = head["weight"], head["bias"]
            lexical = LexicalModel.load(directory) if config["lexical_weight"] > 0 else None
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:  # npz: a zip
            raise ModelLoadError(f"intent model at {directory} is corrupt ({type(exc).__name__}: {exc})") from None
        if config.get("format") != ARTIFACT_FORMAT:
            raise ModelLoadError(f"intent model at {directory} has format {config.get('format')}, expected {ARTIFACT_FORMAT}")
        if weight.shape[0] != len(labels):
            raise ModelLoadError(f"intent model at {directory}: {len(labels)} labels but {weight.shape[0]} head rows")
        return cls(labels=labels, weight=weight, bias=bias, lexical=lexical, lexical_weight=config["lexical_weight"],
                   temperature=config["temperature"], oos_threshold=config["oos_threshold"],
                   oos_label=config["oos_label"], method=config["method"], encoder=config["encoder"],
                   metrics=metrics, path=directory)

    # ------------------------------------------------------------------ training
    @classmethod
    def train(cls, encoder: SentenceEncoder, texts: list[str], labels: list[str], config: TrainConfig,
              progress: Progress | None = None, out: Path | None = None) -> IntentClassifier:
        """Fit on a training split, tune fusion weight, temperature and threshold on the
        validation split, then (head method) refit both models on every row."""
        started = time.perf_counter()
        if len(texts) != len(labels):
            raise InputError("texts and labels differ in length")
        classes = sorted(set(labels))
        if len(classes) < 2:
            raise InputError(f"the label column has only one class ({classes[0]!r}); an intent model needs at least two")
        rng = np.random.default_rng(config.seed)
        order = rng.permutation(len(texts))[: config.max_train or None]
        texts = [texts[i] for i in order]
        y = np.array([classes.index(labels[i]) for i in order])
        train_idx, val_idx = _stratified_split(y, config.val_split, rng)
        progress = progress or (lambda stage, done, total: None)
        train_texts = [texts[i] for i in train_idx]
        val_texts = [texts[i] for i in val_idx]

        peft_model = None
        if config.method == "head":
            vectors = encoder.encode(texts, progress=lambda n: progress("encode", n, len(texts)))
            weight, bias = _fit_logistic(vectors[train_idx], y[train_idx], len(classes), config.c)
        else:
            weight, bias, peft_model = _train_encoder(encoder, train_texts, y[train_idx], len(classes), config, progress)
            vectors = encoder.encode(texts, progress=lambda n: progress("encode", n, len(texts)))
        progress("lexical", 0, 1)
        lexical = LexicalModel.fit(train_texts, y[train_idx], len(classes), config.c) if config.lexical else None
        model = cls(labels=classes, weight=weight, bias=bias, lexical=lexical, oos_label=config.oos_label,
                    method=config.method, encoder=encoder.model_name)

        val_acc = None
        if len(val_idx):
            if lexical is not None:
                model.lexical_weight = _choose_lexical_weight(model, vectors[val_idx], val_texts, y[val_idx])
            val_logits = model.logits(vectors[val_idx], val_texts)
            model.temperature = _fit_temperature(val_logits, y[val_idx])
            model.oos_threshold = _tune_threshold(model.probabilities(vectors[val_idx], val_texts), y[val_idx],
                                                  classes, config)
            val_pred = model.predict(vectors[val_idx], val_texts)
            val_acc = round(float(np.mean([p.intent == classes[t] for p, t in zip(val_pred, y[val_idx])])), 4)
        refit = config.method == "head" and config.refit and bool(len(val_idx))
        if refit:
            progress("refit", 0, 1)
            model.weight, model.bias = _fit_logistic(vectors, y, len(classes), config.c)
            if lexical is not None:
                model.lexical = LexicalModel.fit(texts, y, len(classes), config.c)
        model.metrics = {"method": config.method, "n_train": int(len(train_idx)), "n_val": int(len(val_idx)),
                         "val_accuracy": val_acc, "lexical_weight": model.lexical_weight,
                         "temperature": model.temperature, "oos_threshold": model.oos_threshold,
                         "refit_on_all_rows": refit, "encoder_runtime": encoder.runtime,
                         "train_seconds": round(time.perf_counter() - started, 1),
                         "config": asdict(config), "artifact_id": f"{int(time.time())}-{config.seed}"}
        if out is not None:
            model.save(out, encoder=encoder, peft_model=peft_model)
        return model


# ---------------------------------------------------------------------- helpers

def _stratified_split(y: np.ndarray, val_split: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``val_split`` of each class (at least one row where a class has two or more)."""
    train, val = [], []
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        n_val = int(round(len(rows) * val_split)) if len(rows) > 1 else 0
        n_val = max(n_val, 1) if val_split > 0 and len(rows) > 1 else n_val
        val.extend(rows[:n_val])
        train.extend(rows[n_val:])
    return np.array(sorted(train)), np.array(sorted(val), dtype=int)


def _fit_logistic(x, y: np.ndarray, n_classes: int, c: float) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=3000)
    clf.fit(x, y)
    weight = np.zeros((n_classes, x.shape[1]), np.float32)
    bias = np.full(n_classes, -1e4, np.float32)  # a class absent from the train split never wins
    weight[clf.classes_] = clf.coef_
    bias[clf.classes_] = clf.intercept_
    return weight, bias


def _choose_lexical_weight(model: IntentClassifier, vectors: np.ndarray, texts: list[str], y: np.ndarray) -> float:
    """The fusion weight with the best validation accuracy (the smaller one on ties)."""
    encoder_logp = _log_softmax(vectors @ model.weight.T + model.bias)
    lexical_logp = _log_softmax(model.lexical.logits(texts))
    grid = np.round(np.arange(0.0, 0.75, 0.05), 2)
    accuracy = [float(np.mean(((1 - w) * encoder_logp + w * lexical_logp).argmax(axis=1) == y)) for w in grid]
    return float(grid[int(np.argmax(accuracy))])


def _fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature that minimises validation negative log-likelihood."""
    if len(y) == 0:
        return 1.0
    from scipy.optimize import minimize_scalar

    def nll(log_t: float) -> float:
        z = logits / np.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        return float(-(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(axis=1))).mean())

    result = minimize_scalar(nll, bounds=(-3, 3), method="bounded")
    return round(float(np.exp(result.x)), 4)


def _tune_threshold(probs: np.ndarray, y: np.ndarray, classes: list[str], config: TrainConfig) -> float:
    if len(y) == 0:
        return 0.0
    confidence = probs.max(axis=1)
    predicted = probs.argmax(axis=1)
    if config.oos_label not in classes:
        return round(float(np.quantile(confidence, config.oos_reject_rate)), 4) if config.oos_reject_rate > 0 else 0.0
    oos = classes.index(config.oos_label)
    is_oos = y == oos
    best, best_t = -1.0, 0.0
    for t in np.unique(np.concatenate([[0.0], confidence])):
        final = np.where(confidence < t, oos, predicted)
        in_scope = float(np.mean(final[~is_oos] == y[~is_oos])) if (~is_oos).any() else 0.0
        recall = float(np.mean(final[is_oos] == oos)) if is_oos.any() else 0.0
        score = (in_scope + recall) / 2
        if score > best:
            best, best_t = score, float(t)
    return round(best_t, 4)


def _train_encoder(encoder: SentenceEncoder, texts: list[str], y: np.ndarray, n_classes: int,
                   config: TrainConfig, progress: Progress):
    """Fine-tune the encoder (or peft adapters on it) together with a linear head."""
    import torch

    torch.manual_seed(config.seed)
    model = encoder.model
    peft_model = None
    if config.method in ADAPTER_METHODS:
        peft_model = _peft_model(model, config)
        model = peft_model
        lr = config.lr * 10 if config.method == "lora" else config.prompt_lr
    else:
        lr = config.lr
    head = torch.nn.Linear(model.config.hidden_size, n_classes).to(encoder.device)
    scale = 20.0  # unit vectors give small logits; scale them so the softmax can get confident
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": params, "lr": lr}, {"params": head.parameters(), "lr": config.head_lr}],
                                  weight_decay=0.01)
    steps_per_epoch = (len(texts) + config.batch_size - 1) // config.batch_size
    total = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[lr, config.head_lr], total_steps=total,
                                                    pct_start=0.1)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    generator = torch.Generator().manual_seed(config.seed)
    encoder.use_model(model)
    model.train()
    step = 0
    for _ in range(config.epochs):
        for batch_rows in torch.randperm(len(texts), generator=generator).split(config.batch_size):
            batch = encoder.tokenize([texts[i] for i in batch_rows.tolist()])
            loss = loss_fn(scale * head(encoder.forward(batch)), torch.as_tensor(y[batch_rows.numpy()], device=encoder.device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            progress("train", step, total)
    if peft_model is not None:
        encoder.use_model(peft_model)  # eval mode; merged only when loaded for serving
    model.eval()
    return (scale * head.weight.detach().cpu().numpy().astype(np.float32),
            scale * head.bias.detach().cpu().numpy().astype(np.float32), peft_model)


def _peft_model(model: torch.nn.Module, config: TrainConfig):
    """Wrap the encoder in a peft model whose only trainable weights are the method's adapter."""
    import torch
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

    if config.method == "lora":
        return get_peft_model(model, LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, lora_dropout=0.1,
                                                target_modules=["query", "key", "value", "dense"]))
    # FEATURE_EXTRACTION keeps the bare encoder's output (last_hidden_state) that pooling reads.
    if config.method == "prefix":
        return get_peft_model(model, PrefixTuningConfig(task_type=TaskType.FEATURE_EXTRACTION,
                                                        num_virtual_tokens=config.num_virtual_tokens))
    peft_model = get_peft_model(model, PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION,
                                                          num_virtual_tokens=config.num_virtual_tokens))
    # peft's random init is N(0, 1), far off the scale of real word embeddings; start the
    # virtual tokens as copies of common words' embeddings instead (Lester et al. 2021).
    # BERT's WordPiece vocabulary lists whole words roughly by frequency from "the" (1996).
    words = model.get_input_embeddings().weight
    rows = torch.randint(1996, min(7000, words.shape[0]), (config.num_virtual_tokens,),
                         generator=torch.Generator().manual_seed(config.seed))
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(words[rows])
    return peft_model


def _expected_calibration_error(top: list[dict], labels: list[str], bins: int = 10) -> float:
    """Mean gap between confidence and accuracy over equal-width confidence bins."""
    confidence = np.array([t["confidence"] for t in top])
    correct = np.array([t["intent"] == y for t, y in zip(top, labels)], dtype=float)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    gaps = [abs(confidence[which == b].mean() - correct[which == b].mean()) * np.mean(which == b)
            for b in range(bins) if np.any(which == b)]
    return round(float(sum(gaps)), 4)


def evaluate(classifier: IntentClassifier, encoder: SentenceEncoder, texts: list[str], labels: list[str],
             progress=None) -> tuple[dict, list[str]]:
    """Accuracy figures on labelled data, and the predicted labels."""
    from sklearn.metrics import f1_score

    vectors = encoder.encode(texts, progress=progress)
    predictions = classifier.predict(vectors, texts)
    predicted = [p.intent for p in predictions]
    gold = np.array(labels)
    pred = np.array(predicted)
    oos = classifier.oos_label
    is_oos = gold == oos
    report = {
        "accuracy": round(float(np.mean(pred == gold)), 4),
        # What the confidence threshold costs: the winning class's accuracy before it, and
        # the share of rows it (or an oos class) sent to out-of-scope.
        "accuracy_before_threshold": round(float(np.mean([p.top_intents[0]["intent"] == g
                                                          for p, g in zip(predictions, labels)])), 4),
        "rejected": round(float(np.mean(pred == oos)), 4),
        # Averaged over the true labels: a never-true "oos" column would only add a zero.
        "macro_f1": round(float(f1_score(gold, pred, labels=sorted(set(labels)), average="macro", zero_division=0)), 4),
        "in_scope_accuracy": round(float(np.mean(pred[~is_oos] == gold[~is_oos])), 4) if is_oos.any() else None,
        "oos_recall": round(float(np.mean(pred[is_oos] == oos)), 4) if is_oos.any() else None,
        "n": len(texts),
        "ece": _expected_calibration_error([p.top_intents[0] for p in predictions], labels),
        "unknown_labels": sorted(set(labels) - set(classifier.labels) - {oos}),
    }
    return report, predicted
