"""`uniter3m finetune --config FILE [--fold K | --all-folds | --summarize] [--set key=value ...]
[--resume auto|DIR] [--overwrite]`: fine-tune and test on an emotion corpus under one of the field's
protocols. The run itself is `uniter3m.train.finetune.run_finetune`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from uniter3m.config import add_resume_arguments, add_set_argument
from uniter3m.evaluation.report import load_fold_results, write_summary
from uniter3m.train.config import load_finetune_config
from uniter3m.train.finetune import run_finetune


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="configs/downstream/X.json")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--fold", type=int, help="run only fold K (0-based); the fold loop scripts use this")
    which.add_argument("--all-folds", action="store_true", help="run every fold (the default)")
    which.add_argument(
        "--summarize", action="store_true", help="only (re)write the summary from the folds already run"
    )
    add_set_argument(parser, "optim.lr=3e-5")
    add_resume_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = load_finetune_config(args.config, args.overrides)
    if args.summarize:
        summary = write_summary(cfg.output_dir, load_fold_results(cfg.output_dir))
        print(Path(cfg.output_dir, "summary.md").read_text())
        return 0 if summary else 1
    result = run_finetune(cfg, fold=args.fold, resume=args.resume, overwrite=args.overwrite)
    if result.get("summary_md"):
        print(result["summary_md"])
    print(f"results in {cfg.output_dir} (summary.md, per-fold metrics.json, best/ checkpoints)")
    return 0
