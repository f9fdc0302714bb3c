"""The parameter-efficient tuning table for the intent classifier:
``python -m bench.peft [--epochs N] [--train-rows N] [--methods head finetune lora prefix prompt]``.

Every method trains on the same BANKING77 training rows (same seed, same validation
split for calibration, no lexical fusion, no head refit) and is scored on the whole
3,080-row test split. Each method runs in a fresh child process, so its peak RSS is
its own and not the high-water mark of the methods before it. Writes
``bench/results/peft.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.__main__ import machine, quiet, save
from pipeline.classifier import METHODS


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def run_method(method: str, epochs: int, train_rows: int | None, prompt_lr: float, num_virtual_tokens: int) -> dict:
    """Train and score one method in this process (the child); returns its table row."""
    from pipeline.classifier import IntentClassifier, TrainConfig, evaluate
    from pipeline.data_io import read_labelled_csv
    from pipeline.encoder import SentenceEncoder
    from pipeline.settings import PACKAGE_DATA, Settings

    train = read_labelled_csv(PACKAGE_DATA / "banking77" / "train.csv", "text", "category")
    test = read_labelled_csv(PACKAGE_DATA / "banking77" / "test.csv", "text", "category")
    encoder = SentenceEncoder(Settings().encoder)
    encoder.warm_up()
    base_params = sum(p.numel() for p in encoder.model.parameters())
    rss_loaded = _peak_rss_mb()
    config = TrainConfig(method=method, lexical=False, refit=False, epochs=epochs, max_train=train_rows,
                         prompt_lr=prompt_lr, num_virtual_tokens=num_virtual_tokens)
    started = time.perf_counter()
    model = IntentClassifier.train(encoder, *train, config)
    train_seconds = time.perf_counter() - started
    rss_trained = _peak_rss_mb()
    started = time.perf_counter()
    report, _ = evaluate(model, encoder, *test)
    eval_seconds = time.perf_counter() - started

    head_params = model.weight.size + model.bias.size
    tuned = encoder.model  # the peft wrapper for adapter methods, the base model otherwise
    if method == "head":
        encoder_trainable, encoder_total = 0, base_params
    elif method == "finetune":
        encoder_trainable = encoder_total = base_params
    else:
        encoder_trainable = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
        encoder_total = sum(p.numel() for p in tuned.parameters())
    trainable = encoder_trainable + head_params
    total = encoder_total + head_params
    return {"method": method, "trainable_params": int(trainable), "total_params": int(total),
            "trainable_pct": round(100 * trainable / total, 4), "encoder_trainable_params": int(encoder_trainable),
            "head_params": int(head_params), "accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
            "ece": report["ece"], "test_n": report["n"], "val_accuracy": model.metrics["val_accuracy"],
            "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1),
            "peak_rss_mb": _peak_rss_mb(), "peak_rss_mb_after_load": rss_loaded, "peak_rss_mb_after_train": rss_trained,
            "epochs": 0 if method == "head" else epochs, "train_rows": model.metrics["n_train"],
            "val_rows": model.metrics["n_val"],
            "lr": (None if method == "head" else config.lr if method == "finetune" else
                   10 * config.lr if method == "lora" else config.prompt_lr),
            "head_lr": None if method == "head" else config.head_lr}


def _child(args) -> None:
    quiet()
    row = run_method(args.child, args.epochs, args.train_rows, args.prompt_lr, args.num_virtual_tokens)
    Path(args.child_out).write_text(json.dumps(row))


def markdown(rows: list[dict]) -> str:
    lines = ["| method | trainable params | % of total | accuracy | macro-F1 | peak RSS (MB) | train time (s) | epochs | train rows |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['trainable_pct']:.3g}% | {r['accuracy']:.4f} | "
                     f"{r['macro_f1']:.4f} | {r['peak_rss_mb']:,.0f} | {r['train_seconds']:,.1f} | {r['epochs']} | "
                     f"{r['train_rows']:,} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peft")
    parser.add_argument("--epochs", type=int, default=1, help="epochs for the encoder-side methods (head has none)")
    parser.add_argument("--train-rows", type=int, default=None, help="cap on BANKING77 training rows (all 10,003 by default)")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--prompt-lr", type=float, default=2e-2, help="learning rate for prefix and prompt tuning")
    parser.add_argument("--num-virtual-tokens", type=int, default=8)
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        _child(args)
        return

    rows, failures = [], []
    settings = {"epochs": args.epochs, "train_rows_cap": args.train_rows, "prompt_lr": args.prompt_lr,
                "num_virtual_tokens": args.num_virtual_tokens, "methods": args.methods, "nice": os.nice(0),
                "load_average_1m_at_start": round(os.getloadavg()[0], 2),
                "command": " ".join(["python -m bench.peft", *sys.argv[1:]])}
    started = time.perf_counter()
    for method in args.methods:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "row.json"
            child = [sys.executable, "-m", "bench.peft", "--child", method, "--child-out", str(out),
                     "--epochs", str(args.epochs), "--prompt-lr", str(args.prompt_lr),
                     "--num-virtual-tokens", str(args.num_virtual_tokens)]
            if args.train_rows:
                child += ["--train-rows", str(args.train_rows)]
            t0 = time.perf_counter()
            done = subprocess.run(child, capture_output=True, text=True)
            if done.returncode != 0 or not out.is_file():
                failures.append({"method": method, "returncode": done.returncode, "stderr_tail": done.stderr[-2000:]})
                print(f"{method} failed ({done.returncode}):\n{done.stderr[-2000:]}", file=sys.stderr, flush=True)
            else:
                # The 1-minute load average when the child ends: other jobs on the machine slow every timing.
                rows.append({**json.loads(out.read_text()), "process_seconds": round(time.perf_counter() - t0, 1),
                             "load_average_1m_at_end": round(os.getloadavg()[0], 2)})
                print(json.dumps(rows[-1]), flush=True)
        # Saved after every method, so a run cut short still leaves what it measured.
        save("peft", {"dataset": "BANKING77 train (training) / test (3,080, scoring)",
                      "notes": ("Same rows for every method: a seeded 90/10 split of the (capped) training set; "
                                "the 10% calibrates temperature and the out-of-scope threshold only. No lexical "
                                "fusion, no head refit. train_seconds is the whole IntentClassifier.train call "
                                "(encoder training plus encoding the training rows and calibration). Peak RSS is "
                                "ru_maxrss of a fresh child process per method, over load, training and scoring. "
                                "Trainable params include the 77-way linear head."),
                      "settings": settings, "total_seconds": round(time.perf_counter() - started, 1),
                      "failures": failures, "rows": rows})
    print(markdown(rows))
    print(f"machine: {machine()}")
    if failures:  # the table above lacks them: a run that looks complete must not be
        raise SystemExit(f"{len(failures)} method(s) failed: {', '.join(f['method'] for f in failures)}")


if __name__ == "__main__":
    main()
