"""The BERT sentence encoder: one forward pass gives the vector that both the intent
classifier and the retriever read.

It reads a sentence-transformers folder (or any Hugging Face encoder id or path) with
plain ``transformers``, pooling as the folder's ``1_Pooling`` config says (mean by
default) and L2-normalising. Batches are sorted by token length so little compute
goes on padding.
"""

from __future__ import annotations

import json
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from pipeline.errors import ModelLoadError


class SentenceEncoder:
    def __init__(self, model: str, device: str = "cpu", batch_size: int = 16, max_length: int = 128):
        self.model_name = model
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self._tokenizer = None
        self._model = None
        self.pooling = "mean"
        self.tag = ""  # set when fine-tuned weights replace the base model's
        # A gen worker drafts replies on many threads; a fast tokenizer refuses concurrent use
        # ("Already borrowed"), and two forward passes at once only fight over the cores.
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        self.warm_up()
        return self._model.config.hidden_size

    @property
    def identity(self) -> str:
        """Names the encoder an index was built with; a different one cannot search it."""
        return f"{Path(self.model_name).name}:{self.pooling}:{self.tag}"

    def warm_up(self) -> None:
        if self._model is not None:
            return
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_name)
            self._model = AutoModel.from_pretrained(self.model_name).to(self.device).eval()
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load encoder {self.model_name!r}: {exc}") from None
        pooling_config = Path(self.model_name) / "1_Pooling" / "config.json"
        if pooling_config.is_file():
            config = json.loads(pooling_config.read_text())
            self.pooling = "cls" if config.get("pooling_mode_cls_token") else "mean"

    def use_model(self, model: torch.nn.Module, tag: str = "") -> None:
        """Swap in a fine-tuned copy of the encoder (same tokenizer)."""
        self.warm_up()
        self._model = model.to(self.device).eval()
        self.tag = tag or self.tag

    def quantize_attention(self) -> None:
        """int8 weights for the attention layers' linear maps (dynamic quantization, CPU).

        Inference only: the quantized layers cannot train. The identity stays the same because
        the vectors stay interchangeable with fp32 ones (settings.encoder_int8_attention)."""
        names = {name for name, module in self.model.named_modules()
                 if isinstance(module, torch.nn.Linear) and ".attention." in f".{name}."}
        # In place: a copy would hold a second encoder in memory while it is made. Torch 2.13
        # warns that the quantized tensor types behind this are deprecated; every CLI command
        # and worker start printed that warning, which says nothing a user can act on.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor", category=UserWarning)
            self._model = torch.ao.quantization.quantize_dynamic(self.model, names, dtype=torch.qint8, inplace=True)

    @property
    def model(self) -> torch.nn.Module:
        self.warm_up()
        return self._model

    @property
    def tokenizer(self):
        self.warm_up()
        return self._tokenizer

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt").to(self.device)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised sentence vectors for a tokenised batch (with gradients when training)."""
        hidden = self.model(**batch).last_hidden_state
        # A prompt-tuned model prepends its virtual tokens to the output sequence: pool over the
        # message's own tokens (the last ones), which line up with the attention mask.
        hidden = hidden[:, hidden.shape[1] - batch["attention_mask"].shape[1]:]
        return torch.nn.functional.normalize(self.pool(hidden, batch["attention_mask"]).float(), dim=-1)

    @torch.inference_mode()
    def encode(self, texts: list[str], progress=None) -> np.ndarray:
        """(n, dim) float32 vectors, in length-sorted batches; ``progress(n_done)`` is called per batch."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        vectors: list[np.ndarray] = []
        for start in range(0, len(texts), self.batch_size):
            with self._lock:
                batch = self.tokenize([texts[i] for i in order[start:start + self.batch_size]])
                vectors.append(self.forward(batch).cpu().numpy())
            if progress:
                progress(min(start + self.batch_size, len(texts)))
        return np.concatenate(vectors)[np.argsort(order)]

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.encode(texts)


class VectorCache:
    """Vectors of recently seen texts, each embedded once while it stays among the last
    ``size`` used. Thread-safe: a gen worker drafts replies on many threads."""

    def __init__(self, embed: Callable[[list[str]], np.ndarray], size: int):
        self.embed = embed
        self.size = size
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) vectors; ``texts`` must not be empty."""
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._vectors))
            if missing:
                self._vectors.update(zip(missing, self.embed(missing)))
            vectors = np.stack([self._vectors[t] for t in texts])  # read before evicting: a batch may exceed size
            for text in texts:
                self._vectors.move_to_end(text)
            while len(self._vectors) > self.size:
                self._vectors.popitem(last=False)
        return vectors

    def clear(self) -> None:
        with self._lock:
            self._vectors.clear()
