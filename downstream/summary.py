"""`uniter3m summary RUN [RUN ...] [--out DIR]`: mean ± std over runs (e.g. seeds) of each run's fold mean.

    uniter3m summary runs/iemocap4_seed1 runs/iemocap4_seed2 runs/iemocap4_seed3 --out runs/iemocap4_seeds

Each RUN is a fine-tuning output_dir with its summary.json (written by `uniter3m finetune`); the
table is `uniter3m.evaluation.report.summarize_runs`, also written as DIR/seeds_summary.md and .json.
Runs that differ in protocol, classes, folds or databases, or a run given twice, are refused with the
difference named (`--force` averages them anyway, and the table says so).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from uniter3m.evaluation.report import summarize_runs

OUT_STEM = "seeds_summary"  # DIR/seeds_summary.md and .json (never a run's own summary.*)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, help="fine-tuning output folders (one per seed)")
    parser.add_argument("--out", type=Path, default=None, help=f"also write DIR/{OUT_STEM}.md and .json")
    parser.add_argument(
        "--force",
        action="store_true",
        help="average runs that differ in protocol, classes, folds or databases (the table says so)",
    )


def run(args: argparse.Namespace) -> int:
    stem = args.out / OUT_STEM if args.out else None
    if stem is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    print(summarize_runs(args.runs, stem, force=args.force), end="")
    if stem is not None:
        print(f"wrote {stem.with_suffix('.md')} and {stem.with_suffix('.json')}")
    return 0
