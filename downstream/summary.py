"""`uniter3m summary RUN [RUN ...]`: mean ± std over runs (e.g. seeds) of each run's fold mean.

    uniter3m summary runs/iemocap4_seed1 runs/iemocap4_seed2 runs/iemocap4_seed3 --out runs/iemocap4_seeds

Each RUN is a fine-tuning output_dir with its summary.json (written by `uniter3m finetune`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from uniter3m.evaluation.report import summarize_runs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, help="fine-tuning output folders (one per seed)")
    parser.add_argument("--out", type=Path, default=None, help="also write OUT.md and OUT.json")


def run(args: argparse.Namespace) -> int:
    print(summarize_runs(args.runs, args.out), end="")
    if args.out:
        print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")
    return 0
