"""The ``tandem`` command line.

Every command prints a one-line error and exits with status 2 on bad input; a
traceback means a bug in Tandem.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline.errors import TandemError

if TYPE_CHECKING:
    from pipeline.knowledge import Article
    from pipeline.settings import Settings

app = typer.Typer(help="Tandem: BERT understands the customer, GPT writes the reply.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console()
err = Console(stderr=True)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Read by transformers (and huggingface_hub) when a command imports them, if it does: importing
    # transformers here to quiet it cost every worker and the API 46 MB, and none of them uses it.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def friendly(command: Callable) -> Callable:
    """Turn Tandem's own errors, and a bad TANDEM_* setting, into a one-line message and exit status 2."""
    from pydantic import ValidationError

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TandemError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from None
        except ValidationError as exc:  # raised by Settings() reading the environment
            for problem in exc.errors():
                name = "TANDEM_" + "_".join(str(part) for part in problem["loc"]).upper()
                err.print(f"[bold red]error:[/] {name}: {problem['msg']}", highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
    return wrapper


@contextmanager
def progress_bars() -> Iterator[Callable[[str, int, int], None]]:
    """A ``(stage, done, total)`` callback that drives one rich bar per stage."""
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=True) as progress:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done, total=total)

        yield update


def _settings():
    from pipeline.settings import Settings

    return Settings()


def _load_pipeline(load_responder: bool = True):
    from pipeline.chain import HybridPipeline

    _quiet_libraries()
    with progress_bars() as progress:
        progress("loading models", 0, 1)
        pipeline = HybridPipeline.from_settings(_settings(), progress=progress, load_responder=load_responder)
        progress("loading models", 1, 1)
    return pipeline


@app.command("train-intents")
@friendly
def train_intents(
    train_csv: Annotated[Path, typer.Argument(help="CSV with a text and a label column")],
    out: Annotated[Path, typer.Option("--out", help="artifact folder to write")],
    text_col: Annotated[str, typer.Option("--text-col")] = "text",
    label_col: Annotated[str, typer.Option("--label-col")] = "label",
    method: Annotated[str, typer.Option("--method", help="head | finetune | lora | prefix | prompt")] = "head",
    val_split: Annotated[float, typer.Option("--val-split", min=0.0, max=0.5)] = 0.1,
    lexical: Annotated[bool, typer.Option("--lexical/--no-lexical", help="fuse with the n-gram model")] = True,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 4,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    max_train: Annotated[int | None, typer.Option("--max-train", help="use at most this many rows")] = None,
) -> None:
    """Train an intent classifier from a CSV."""
    from pipeline.chain import serving_encoder
    from pipeline.classifier import METHODS, IntentClassifier, TrainConfig
    from pipeline.data_io import read_labelled_csv

    if method not in METHODS:
        raise typer.BadParameter(f"must be one of {', '.join(METHODS)}", param_hint="--method")
    texts, labels = read_labelled_csv(train_csv, text_col, label_col)
    settings = _settings()
    _quiet_libraries()
    encoder = serving_encoder(settings, method)
    config = TrainConfig(method=method, val_split=val_split, lexical=lexical, epochs=epochs, seed=seed,
                         oos_label=settings.oos_label, max_train=max_train)
    with progress_bars() as progress:
        model = IntentClassifier.train(encoder, texts, labels, config, progress, out=out)
    console.print(f"trained [bold]{len(model.labels)}[/] intents ({method}) in {model.metrics['train_seconds']} s; "
                  f"validation accuracy {model.metrics['val_accuracy']}; saved to {out}")


@app.command("eval-intents")
@friendly
def eval_intents(
    test_csv: Annotated[Path, typer.Argument(help="CSV with a text and a label column")],
    model: Annotated[Path | None, typer.Option("--model", help="artifact folder (default: the shipped model)")] = None,
    text_col: Annotated[str, typer.Option("--text-col")] = "text",
    label_col: Annotated[str, typer.Option("--label-col")] = "label",
    json_out: Annotated[Path | None, typer.Option("--json", help="write the report as JSON here")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="write a confusion-matrix PNG here")] = None,
) -> None:
    """Accuracy, macro-F1 and out-of-scope figures of an intent model on labelled data."""
    from pipeline.chain import load_intent_model, serving_encoder
    from pipeline.classifier import evaluate
    from pipeline.data_io import read_labelled_csv

    texts, labels = read_labelled_csv(test_csv, text_col, label_col)
    settings = _settings()
    if model is not None:
        settings.intent_model = model
    _quiet_libraries()
    encoder = serving_encoder(settings)  # the figures are those of the model as the pipeline serves it
    with progress_bars() as progress:
        classifier = load_intent_model(settings, encoder, progress)
        report, predicted = evaluate(classifier, encoder, texts, labels,
                                     progress=lambda n: progress("encode", n, len(texts)))
    table = Table("metric", "value")
    for key, value in report.items():
        table.add_row(key, str(value))
    console.print(table)
    print(json.dumps(report))
    if json_out:
        json_out.write_text(json.dumps(report, indent=2))
    if plot:
        _confusion_plot(labels, predicted, plot)


def _confusion_plot(gold: list[str], predicted: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = sorted(set(gold) | set(predicted))
    position = {n: i for i, n in enumerate(names)}
    matrix = np.zeros((len(names), len(names)))
    for g, p in zip(gold, predicted):
        matrix[position[g], position[p]] += 1
    matrix /= matrix.sum(axis=1, keepdims=True).clip(min=1)
    size = max(6, len(names) * 0.18)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=5)
    ax.set_yticks(range(len(names)), names, fontsize=5)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


@app.command("index")
@friendly
def index(
    kb_dir: Annotated[Path, typer.Argument(help="folder of Markdown articles, or a JSONL file")],
    out: Annotated[Path, typer.Option("--out", help="index folder to write or update")],
) -> None:
    """Build or update a knowledge index (only changed articles are re-embedded)."""
    from pipeline.chain import index_encoder
    from pipeline.errors import IndexLoadError
    from pipeline.knowledge import KnowledgeIndex, load_articles

    articles = load_articles(kb_dir)
    settings = _settings()
    _quiet_libraries()
    encoder = index_encoder(settings)
    knowledge = None
    if (out / "meta.json").is_file():
        try:
            knowledge = KnowledgeIndex.load(out)
        except IndexLoadError as exc:
            # Every article comes from KB_DIR, so the index can be made again from it; refusing
            # left no way out but deleting the folder, since the error says to run this command.
            err.print(f"[yellow]warning:[/] {escape(str(exc))}; building it again from {kb_dir}", soft_wrap=True)
    if knowledge is not None and knowledge.chunk_words != settings.chunk_words:
        # Its passages were cut at another size; an update would cut only the changed articles anew.
        err.print(f"[yellow]warning:[/] {out} was cut into passages of {knowledge.chunk_words} words, "
                  f"TANDEM_CHUNK_WORDS is {settings.chunk_words}: building it again", soft_wrap=True)
        knowledge = None
    if knowledge is None:
        knowledge = KnowledgeIndex(encoder.dim, encoder.identity, settings.exact_index_max, settings.chunk_words)
    knowledge.exact_max = settings.exact_index_max  # read when vectors are added: applies from this update
    if knowledge.encoder != encoder.identity:
        raise TandemError(f"{out} was built with encoder {knowledge.encoder!r}; this one is {encoder.identity!r}: "
                          f"write a new index folder")
    with progress_bars() as progress:
        def embed(texts: list[str]):
            return encoder.encode(texts, progress=lambda n: progress("embedding", n, len(texts)))
        counts = knowledge.upsert(articles, embed)
    counts["deleted"] = knowledge.delete(set(knowledge.articles) - {a.id for a in articles})
    knowledge.save(out)
    console.print(f"{len(knowledge.articles)} articles, {len(knowledge)} vectors ({knowledge.kind} index), "
                  f"version {knowledge.version}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    _warn_of_unknown_intents(articles, settings)


def _warn_of_unknown_intents(articles: list[Article], settings: Settings) -> None:
    """Name each article tagged with an intent the configured intent model does not predict:
    retrieval weighs a passage by the model's probability for the article's intents, so a
    misspelt tag leaves the article to similarity alone. Skipped while the model is not trained."""
    from pipeline.chain import intent_model_labels, intent_model_path, unknown_intents

    labels = intent_model_labels(settings)
    if labels is None:
        return
    for article in articles:
        unknown = unknown_intents(article.intents, labels)
        if unknown:
            err.print(f"[yellow]warning:[/] article {article.id!r}: {unknown} to the intent model "
                      f"({intent_model_path(settings)}); it is found by similarity alone", highlight=False)


@app.command("ask")
@friendly
def ask(
    message: Annotated[str, typer.Argument(help="the customer's message ('-' reads standard input)")],
    as_json: Annotated[bool, typer.Option("--json", help="print the whole result as JSON")] = False,
) -> None:
    """Answer one message, streaming the reply as it is written."""
    from pipeline.chain import Done, Meta, Token

    if message == "-":
        message = sys.stdin.buffer.read()
    elif isinstance(message, str):
        # argv holds undecodable bytes as surrogates; hand them on as bytes so the check names them.
        message = message.encode("utf-8", "surrogateescape")
    pipeline = _load_pipeline()
    result = None
    drafted = False  # with TANDEM_GUARD_HOLD_SENTENCES a rejected draft may show nothing
    for event in pipeline.stream(message):
        if isinstance(event, Meta) and not as_json:
            u = event.understanding
            err.print(f"[dim]intent[/] [bold]{u.intent}[/] [dim]({u.confidence:.2f})"
                      f"{'  escalate' if u.escalate else ''}  sources: "
                      f"{', '.join(dict.fromkeys(p.article_id for p in u.passages[:pipeline.responder.max_passages])) or '-'}[/]",
                      highlight=False)
        elif isinstance(event, Token) and not as_json:
            if event.quoted:  # a terminal cannot take the rejected draft back: say what replaces it
                console.print("\n[yellow]The draft above was not supported by the help articles; the answer quoted "
                              "from them is:[/]" if drafted else "[yellow]Quoted from the help articles:[/]")
            elif event.restart and drafted:
                console.print("\n[yellow]The draft above was not supported by the help articles; a new one:[/]")
            drafted = drafted or bool(event.text.strip())
            console.print(event.text, end="", highlight=False, markup=False, soft_wrap=True)
        elif isinstance(event, Done):
            result = event.result
    if as_json:
        print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
        return
    console.print()
    shown = {p["article_id"]: p for p in reversed(result.passages) if p["article_id"] in result.sources}
    for passage in reversed(shown.values()):
        err.print(f"[dim]source: {passage['title']} {passage['url']}[/]", highlight=False)


@app.command("worker")
@friendly
def worker(
    queues: Annotated[str, typer.Option("--queues", help="comma-separated: nlu, gen")] = "nlu,gen",
    name: Annotated[str | None, typer.Option("--name", help="worker node name")] = None,
    loglevel: Annotated[str, typer.Option("--loglevel")] = "INFO",
) -> None:
    """Run a Celery worker that loads its models once and serves the given queues."""
    from workers.app import QUEUES, configure

    chosen = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = set(chosen) - set(QUEUES)
    if not chosen or unknown:
        raise typer.BadParameter(f"queues must be among {', '.join(QUEUES)}", param_hint="--queues")
    _quiet_libraries()
    os.environ["TANDEM_WORKER_QUEUES"] = ",".join(chosen)
    celery = configure()
    from workers.tasks import load_worker_pipeline  # registers the tasks and the model-loading signal

    load_worker_pipeline()  # a model, index or setting that does not load ends the worker here, with its error

    # One process holds the models; torch and llama.cpp use the cores themselves. With
    # TANDEM_GEN_POOL=threads a gen worker runs a task per reply slot, so concurrent chats
    # reach the responder together and its continuous batching decodes them in one batch.
    settings = _settings()
    threads = "gen" in chosen and settings.gen_pool == "threads"
    pool = ["--pool", "threads", "--concurrency", str(settings.responder_slots)] if threads else ["--pool", "solo"]
    celery.worker_main(["worker", "-Q", ",".join(chosen), *pool, "--loglevel", loglevel,
                        "-n", f"{name or '-'.join(chosen)}@%h", "--without-gossip", "--without-mingle"])


@app.command("batch")
@friendly
def batch(
    tickets: Annotated[Path, typer.Argument(help="tickets as .csv (id,text) or .jsonl ({id, text})")],
    out: Annotated[Path, typer.Option("--out", help="results JSONL, in input order")],
    drafts: Annotated[bool, typer.Option("--drafts/--no-drafts", help="also draft a reply for each ticket")] = True,
    chunk_size: Annotated[int | None, typer.Option("--chunk-size", min=1)] = None,
) -> None:
    """Classify, route and (optionally) draft replies for a file of tickets through the workers."""
    from workers.batch import run_batch

    with progress_bars() as progress:
        summary = run_batch(tickets, out, drafts=drafts, settings=_settings(), chunk_size=chunk_size,
                            progress=lambda done, total: progress("tickets" if not drafts else "steps", done, total))
    console.print(f"{summary['tickets']} tickets: {summary['processed']} processed, {summary['skipped']} already done, "
                  f"{summary['errors']} with errors; results in {out}")


@app.command("api")
@friendly
def api(
    host: Annotated[str | None, typer.Option("--host")] = None,
    port: Annotated[int | None, typer.Option("--port")] = None,
) -> None:
    """Serve the HTTP API and the chat page (uvicorn)."""
    import uvicorn

    from services.api import create_app

    settings = _settings()
    uvicorn.run(create_app(settings), host=host or settings.api_host, port=port or settings.api_port,
                log_level="info", timeout_graceful_shutdown=10)


@app.command("up")
@friendly
def up() -> None:
    """Start everything on this machine: an embedded Redis (unless TANDEM_REDIS_URL is set), a
    worker per queue and the HTTP API; one that dies (Redis too) is started again. Ctrl-C stops them all."""
    import signal
    import subprocess
    import time

    from workers.redis_server import EmbeddedRedis

    settings = _settings()
    server = None
    env = dict(os.environ)
    if settings.redis_url is None:
        server = EmbeddedRedis(settings.data_dir / "redis", settings.embedded_redis_port)
        env["TANDEM_REDIS_URL"] = server.start()
        err.print(f"embedded Redis on {server.url} (data in {server.directory})")
    # Both workers share this machine's cores. llama.cpp's threads spin at barriers, so a
    # decode thread that loses its core to the encoder stalls every step (measured: a
    # 24-token reply went from 2 s to over 60 s with 2 threads beside two busy processes).
    # Leave the encoder a core unless the operator chose.
    gen_env = {**env, "TANDEM_RESPONDER_THREADS": env.get("TANDEM_RESPONDER_THREADS") or str(max(1, (os.cpu_count() or 2) - 1))}
    commands = [(["worker", "--queues", "nlu"], env), (["worker", "--queues", "gen"], gen_env), (["api"], env)]

    def start(command: list[str], environment: dict[str, str]) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "services.cli", *command], env=environment)

    children = [start(command, e) for command, e in commands]
    err.print(f"workers and API started (pids {', '.join(str(c.pid) for c in children)}); "
              f"chat page on http://{settings.api_host}:{settings.api_port}/ ; Ctrl-C to stop")
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    # Both by hand: a shell starts background jobs with SIGINT ignored, and Python then keeps
    # ignoring it, so `tandem up &` would not stop on `kill -INT` (seen in a scripted CI run).
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, stop)  # the terminal closed: stop everything, Redis after the workers
    # A child that dies is started again, as a container's restart policy would: a gen worker
    # killed mid-reply comes back and finishes the reply where its stream stopped (the reply's
    # lease, workers.streams.ReplyLeases). One that dies again and again gives up the whole.
    restarts: dict[str, list[float]] = {}
    given_up: tuple[str, int] | None = None

    def may_restart(name: str) -> bool:
        """Whether ``name`` is within its restart budget, counting this restart if it is."""
        recent = [t for t in restarts.get(name, []) if time.monotonic() - t < _RESTART_WINDOW_S]
        if len(recent) >= _RESTARTS_PER_WINDOW:
            return False
        restarts[name] = [*recent, time.monotonic()]
        return True

    try:
        while not stopping and given_up is None:
            time.sleep(0.5)
            if server and server.process.poll() is not None:
                # The embedded Redis too: broker, results and reply streams all stop with it, and
                # the workers and API only reconnect. It comes back on the same port from its
                # append-only file, with the queued tasks and streams it had written.
                code = server.process.returncode
                if not may_restart("redis-server"):
                    given_up = ("redis-server", code)
                    break
                err.print(f"the embedded redis-server exited with status {code}; starting it again")
                try:
                    server.start()
                except TandemError as exc:
                    if server.process is None:  # not ours that failed: another server took the port
                        raise
                    # It died again before it answered (a corrupt append-only file, say): the next
                    # look counts that against the budget, as a death after it answered is.
                    err.print(f"{exc}")
            for i, child in enumerate(children):
                if stopping or child.poll() is None:
                    continue
                name = " ".join(commands[i][0])
                # Status 2 is the CLI's "bad input" (a setting, model or index that does not load):
                # starting it again would only fail again.
                if child.returncode == 2 or not may_restart(name):
                    given_up = (name, child.returncode)
                    break
                err.print(f"`tandem {name}` exited with status {child.returncode}; starting it again")
                children[i] = start(*commands[i])
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)  # Celery's warm shutdown: finish the current task
        for child in children:
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
        if server:
            server.stop()
        err.print("stopped")
    if given_up:
        name, status = given_up
        if name == "redis-server":
            raise TandemError(f"the embedded redis-server exited {_RESTARTS_PER_WINDOW + 1} times within "
                              f"{_RESTART_WINDOW_S} s (last status {status}); see {server.directory / 'redis.log'}")
        if status == 2:
            raise TandemError(f"`tandem {name}` could not start (its error is above); nothing was restarted")
        raise TandemError(f"`tandem {name}` exited {_RESTARTS_PER_WINDOW + 1} times within "
                          f"{_RESTART_WINDOW_S} s (last status {status}); see its output above")


_RESTARTS_PER_WINDOW = 3  # `tandem up` starts a child that died again at most this often a minute
_RESTART_WINDOW_S = 60


def main() -> None:
    app()


if __name__ == "__main__":
    main()
