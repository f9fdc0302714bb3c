"""The BERT sentence encoder: one forward pass gives the vector that both the intent
classifier and the retriever read.

It reads a sentence-transformers folder (or any Hugging Face encoder id or path) with
plain ``transformers``, pooling as the folder's ``1_Pooling`` config says (mean by
default) and L2-normalising. Messages are sorted by token length and cut into batches
under a budget of padded tokens, so little compute goes on padding and a long message
does not make its batch-mates as costly as itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

    from pipeline.settings import Settings

log = logging.getLogger(__name__)


def onnx_session(path: Path | str, threads_per_run: int):
    """An ONNX Runtime CPU session whose runs each compute on ``threads_per_run`` threads."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads_per_run
    options.inter_op_num_threads = 1
    # Idle threads must not spin: an nlu worker shares its cores with a gen worker's llama.cpp.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def activation_products(graph_path: Path) -> list[str]:
    """The graph's MatMul nodes with no weight among their inputs (attention's query-key and
    score-value products): an activation times an activation, which costs accuracy in int8."""
    import onnx

    graph = onnx.load(str(graph_path)).graph
    weights = {w.name for w in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and not weights & set(n.input)]


class SentenceEncoder:
    def __init__(self, model: str, device: str = "cpu", batch_size: int = 16, max_length: int = 128,
                 batch_tokens: int = 0):
        if batch_size < 1 or batch_tokens < 0:
            raise ValueError(f"an encoder batch needs batch_size >= 1 and batch_tokens >= 0 "
                             f"(got {batch_size} and {batch_tokens})")
        self.model_name = model
        self.device = device
        self.batch_size = batch_size  # messages in a batch, at most
        self.batch_tokens = batch_tokens  # padded tokens in a batch, at most (0: no budget)
        self.max_length = max_length
        self._tokenizer = None  # transformers' tokenizer, for the torch paths (training, export)
        self._model = None
        # Read from the model's folder without loading the model: a worker served by ONNX Runtime
        # never imports torch (280 MB of its memory; transformers' tokenizer classes import it too).
        self._width: int | None = None
        self._token_ids: Callable[[list[str]], list[list[int]]] | None = None
        self._pad_id = 0
        self._onnx = None  # an onnxruntime session, once use_onnx_int8 has made one
        self._onnx_pool: ThreadPoolExecutor | None = None  # runs the session's batches side by side
        self._int8_attention = False
        self.pooling = "mean"
        self.tag = ""  # set when fine-tuned weights replace the base model's
        # A gen worker drafts replies on many threads; a fast tokenizer refuses concurrent use
        # ("Already borrowed"), and two torch forward passes at once only fight over the cores
        # (the ONNX path's pool bounds its runs instead).
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()  # several threads may call encode at once

    @classmethod
    def from_settings(cls, settings: Settings) -> SentenceEncoder:
        """The configured encoder on torch, batched as the settings say (the pipeline's runtime
        on top of it is pipeline.chain.serving_encoder's choice)."""
        return cls(settings.encoder, settings.encoder_device, settings.encoder_batch_size,
                   settings.encoder_max_length, settings.encoder_batch_tokens)

    @property
    def dim(self) -> int:
        self._read_folder()
        return self._width

    @property
    def runtime(self) -> str:
        """What runs the forward pass: "onnxruntime-int8", "torch-int8-attention" or "torch"."""
        if self._onnx is not None:
            return "onnxruntime-int8"
        return "torch-int8-attention" if self._int8_attention else "torch"

    @property
    def identity(self) -> str:
        """Names the encoder an index was built with; a different one cannot search it."""
        self._read_folder()  # the pooling is read from the model's folder: "mean" until then
        return f"{Path(self.model_name).name}:{self.pooling}:{self.tag}"

    def warm_up(self) -> None:
        """Load what encoding needs: the tokenizer, and the torch model unless ONNX Runtime runs it."""
        self._read_folder()
        if self._onnx is None:
            self._load_model()

    def _load_model(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModel

        try:
            self._model = AutoModel.from_pretrained(self.model_name).to(self.device).eval()
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load encoder {self.model_name!r}: {exc}") from None

    def _read_folder(self) -> None:
        """The encoder's width, pooling and token ids. From a local folder with a tokenizer.json
        (as sentence-transformers folders have) by the ``tokenizers`` library alone, which gives
        the ids transformers' tokenizer gives (all 13,090 BANKING77 messages, checked 2026-12-07);
        otherwise (a Hugging Face id, or a folder without one) through transformers."""
        if self._token_ids is not None:
            return
        folder = Path(self.model_name)
        try:
            if (folder / "tokenizer.json").is_file() and (folder / "config.json").is_file():
                from tokenizers import Tokenizer

                tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
                self._width = json.loads((folder / "config.json").read_text())["hidden_size"]
                self._pad_id = tokenizer.padding["pad_id"] if tokenizer.padding else 0  # masked: any id would do
                tokenizer.no_padding()  # ``batches`` pads each batch to its longest message
                tokenizer.enable_truncation(self.max_length)

                def token_ids(texts: list[str]) -> list[list[int]]:
                    return [e.ids for e in tokenizer.encode_batch(texts)]
            else:
                from transformers import AutoConfig

                self._width = AutoConfig.from_pretrained(self.model_name).hidden_size
                self._pad_id = self.tokenizer.pad_token_id or 0

                def token_ids(texts: list[str]) -> list[list[int]]:
                    return self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        except ModelLoadError:  # from the tokenizer property, already saying which encoder
            raise
        except Exception as exc:  # tokenizers raises a bare Exception for a file it cannot parse
            raise ModelLoadError(f"cannot load encoder {self.model_name!r}: {exc}") from None
        pooling_config = folder / "1_Pooling" / "config.json"
        if pooling_config.is_file():
            config = json.loads(pooling_config.read_text())
            self.pooling = "cls" if config.get("pooling_mode_cls_token") else "mean"
        self._token_ids = token_ids

    def use_model(self, model: torch.nn.Module, tag: str = "") -> None:
        """Swap in a fine-tuned copy of the encoder (same tokenizer)."""
        self.warm_up()
        self._model = model.to(self.device).eval()
        self._onnx = None  # an ONNX copy holds the weights it was made from
        self._int8_attention = False
        self.tag = tag or self.tag

    def quantize_attention(self) -> None:
        """int8 weights for the attention layers' linear maps (dynamic quantization, CPU).

        Inference only: the quantized layers cannot train. The identity stays the same because
        the vectors stay interchangeable with fp32 ones (settings.encoder_int8_attention)."""
        import torch

        names = {name for name, module in self.model.named_modules()
                 if isinstance(module, torch.nn.Linear) and ".attention." in f".{name}."}
        # In place: a copy would hold a second encoder in memory while it is made. Torch 2.13
        # warns that the quantized tensor types behind this are deprecated; every CLI command
        # and worker start printed that warning, which says nothing a user can act on.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor", category=UserWarning)
            self._model = torch.ao.quantization.quantize_dynamic(self.model, names, dtype=torch.qint8, inplace=True)
        self._int8_attention = True

    def use_onnx_int8(self, cache_dir: Path, threads: int | None = None) -> bool:
        """Encode through ONNX Runtime, with int8 weights (dynamic, one scale per output channel).

        The model is exported and quantized once into ``cache_dir``. Only the weight matrices
        go to int8: the attention scores (an activation times an activation) stay fp32, which
        cost accuracy in int8. Inference only, like quantize_attention; the vectors stay close
        to fp32 ones (settings.encoder_onnx_int8 has the figures). ``threads`` batches run side
        by side, one thread each (default: one per core this process may use). False, with a
        warning, where the model cannot be exported; the encoder then stays on torch."""
        self._read_folder()  # the pooling is read from the model's folder
        source = Path(self.model_name).resolve()
        weights = sorted(source.glob("*.safetensors")) or sorted(source.glob("*.bin"))
        stamp = ":".join(f"{w}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in weights) or str(source)
        digest = hashlib.sha256(f"{stamp}:{self.pooling}:{self.max_length}".encode()).hexdigest()[:12]
        target = Path(cache_dir) / f"{source.name}.{digest}.int8.onnx"
        if not target.is_file():
            # In a child process: exporting and quantizing took a process from 0.59 to 1.06 GB
            # (measured), and a worker would carry that peak for the rest of its life.
            try:
                subprocess.run([sys.executable, "-m", "pipeline.encoder", self.model_name, str(self.max_length),
                                str(target)], check=True, capture_output=True, text=True, timeout=900)
            except (subprocess.SubprocessError, OSError) as exc:
                detail = (getattr(exc, "stderr", None) or "").strip().splitlines()[-1:] or [str(exc)]
                log.warning("encoder stays on torch: no ONNX int8 copy in %s (%s)", cache_dir, detail[0])
                return False
        # One thread per run, and as many runs at once as there are threads: a batch of short
        # messages gives matrices too small to split well across cores. On 2 cores (no VNNI,
        # exploratory, 2026-12-01) two one-thread runs side by side encoded 1.19x as fast as one
        # two-thread run at a batch of 16, and one message took 7.5 ms against 6.6 ms.
        self._onnx = onnx_session(target, threads_per_run=1)
        self._onnx_pool = ThreadPoolExecutor(threads or len(os.sched_getaffinity(0)), thread_name_prefix="encoder")
        self._model = None  # the ONNX copy serves; torch's weights would only hold memory
        return True

    def _run_torch(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        with self._lock, torch.inference_mode():
            return self.forward({k: torch.from_numpy(v).to(self.device) for k, v in batch.items()}).cpu().numpy()

    def _run_onnx(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        # An InferenceSession may run from several threads at once, each run on its caller's thread.
        return self._onnx.run(None, batch)[0]

    def batches(self, texts: list[str]) -> list[tuple[list[int], dict[str, np.ndarray]]]:
        """``texts`` as padded batches, longest messages first: (their positions in ``texts``,
        {"input_ids", "attention_mask"} as int64 arrays). A batch holds at most batch_size
        messages and, past its first, at most batch_tokens padded tokens."""
        self._read_folder()
        with self._tokenizer_lock:  # a fast tokenizer refuses concurrent use ("Already borrowed")
            ids = self._token_ids(texts)
        order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))
        batches = []
        start = 0
        while start < len(order):
            width = len(ids[order[start]])  # the longest in the batch: the others pad to it
            size = min(self.batch_size, max(1, self.batch_tokens // width)) if self.batch_tokens else self.batch_size
            rows = order[start:start + size]
            input_ids = np.full((len(rows), width), self._pad_id, np.int64)
            mask = np.zeros((len(rows), width), np.int64)
            for row, i in enumerate(rows):
                input_ids[row, :len(ids[i])] = ids[i]
                mask[row, :len(ids[i])] = 1
            batches.append((rows, {"input_ids": input_ids, "attention_mask": mask}))
            start += size
        return batches

    def export_onnx(self, path: Path) -> None:
        """The encoder with its pooling and normalisation as one fp32 ONNX graph, batch and
        length dynamic (the int8 copy and `bench.explore static-int8` start from it)."""
        import torch

        class Pooled(torch.nn.Module):
            def __init__(self, encoder: SentenceEncoder):
                super().__init__()
                self.encoder = encoder
                self.model = encoder.model

            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
                return self.encoder.forward({"input_ids": input_ids, "attention_mask": attention_mask})

        sample = self.tokenize(["a sample message to trace", "hi"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on control flow it does not need
            torch.onnx.export(Pooled(self), (sample["input_ids"], sample["attention_mask"]), str(path),
                              input_names=["input_ids", "attention_mask"], output_names=["vectors"],
                              dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                                            "attention_mask": {0: "batch", 1: "tokens"}, "vectors": {0: "batch"}},
                              opset_version=17, dynamo=False)

    def _export_int8(self, target: Path) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        target.parent.mkdir(parents=True, exist_ok=True)
        fp32 = target.with_name(f"{target.name}.{os.getpid()}.fp32")
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        try:
            self.export_onnx(fp32)
            products = activation_products(fp32)
            quiet = _DropRecords("pre-processing before quantization")  # onnxruntime's advice for image models
            logging.getLogger().addFilter(quiet)
            try:
                quantize_dynamic(str(fp32), str(partial), weight_type=QuantType.QInt8, per_channel=True,
                                 op_types_to_quantize=["MatMul"], nodes_to_exclude=products)
            finally:
                logging.getLogger().removeFilter(quiet)
            os.replace(partial, target)  # whole or not at all: workers starting together race here safely
        finally:
            for leftover in (fp32, partial):
                leftover.unlink(missing_ok=True)

    @property
    def model(self) -> torch.nn.Module:
        """The torch model (loaded on first use where ONNX Runtime serves the encoder)."""
        self._read_folder()  # forward pools as the folder says
        self._load_model()
        return self._model

    @property
    def tokenizer(self):
        """transformers' tokenizer, for the torch paths: training, export, saving a fine-tuned encoder."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.model_name)
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"cannot load encoder {self.model_name!r}: {exc}") from None
        return self._tokenizer

    def tokenize(self, texts: list[str], tensors: str = "pt") -> dict:
        """A padded batch as torch tensors on the encoder's device, or as numpy arrays ("np")."""
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors=tensors)
        return batch.to(self.device) if tensors == "pt" else batch

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised sentence vectors for a tokenised batch (with gradients when training)."""
        import torch

        hidden = self.model(**batch).last_hidden_state
        # A prompt-tuned model prepends its virtual tokens to the output sequence: pool over the
        # message's own tokens (the last ones), which line up with the attention mask.
        hidden = hidden[:, hidden.shape[1] - batch["attention_mask"].shape[1]:]
        return torch.nn.functional.normalize(self.pool(hidden, batch["attention_mask"]).float(), dim=-1)

    def encode(self, texts: list[str], progress=None) -> np.ndarray:
        """(n, dim) float32 vectors, in length-sorted batches; ``progress(n_done)`` is called per batch."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        batches = self.batches(texts)
        vectors = np.zeros((len(texts), self.dim), np.float32)
        futures: dict = {}
        if self._onnx is not None:
            # The longest batches go first, so a call ends on short ones and no core waits long
            # for the last (in a pipeline A/B here, 1.13x the tickets/s of submitting them in
            # order). The pool also bounds how many runs share the cores, whichever threads call encode.
            futures = {self._onnx_pool.submit(self._run_onnx, batch): rows for rows, batch in batches}
            finished = ((futures[future], future.result()) for future in as_completed(futures))
        else:
            finished = ((rows, self._run_torch(batch)) for rows, batch in batches)
        try:
            done = 0
            for rows, result in finished:
                vectors[rows] = result
                done += len(rows)
                if progress:
                    progress(done)
        finally:
            for future in futures:
                future.cancel()  # after an error, the batches not yet started
        return vectors

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.encode(texts)


class _DropRecords(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


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


if __name__ == "__main__":  # SentenceEncoder.use_onnx_int8 runs the export here, in its own process
    SentenceEncoder(sys.argv[1], max_length=int(sys.argv[2]))._export_int8(Path(sys.argv[3]))
