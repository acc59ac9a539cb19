"""`uniter3m evaluate`: score a fine-tuned checkpoint once per modality set (missing-modality protocol).

    uniter3m evaluate --checkpoint runs/mosi_lva/fold00-split/best --modality-sets L,A,LA

The run's resolved config is read by default (`--config` and `--set` override it); the table
(`modalities.csv/.md/.json`) goes into `--out DIR` (default: the checkpoint's fold folder). Without
`--modality-sets`, every set the config's modalities allow is scored. The work is
`uniter3m.train.evaluate.evaluate_modalities`.
"""

from __future__ import annotations

import argparse

from uniter3m.config import add_set_argument
from uniter3m.train.evaluate import evaluate_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a `<fold>/best` dir written by uniter3m finetune, or its run folder (every fold is scored)",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="a downstream config (default: the run's resolved config.json beside the fold folders)",
    )
    parser.add_argument(
        "--modality-sets",
        default=None,
        help="comma-separated modality sets, e.g. L,A,LA (default: every set the config allows)",
    )
    parser.add_argument("--split", choices=("test", "valid"), default="test")
    parser.add_argument("--fold", type=int, default=None, help="fold index (default: the checkpoint's own)")
    parser.add_argument("--out", default=None, help="output folder (default: the checkpoint's fold folder)")
    add_set_argument(parser, "data.txt_db=db/other")


def run(args: argparse.Namespace) -> int:
    sets = [s for s in (args.modality_sets or "").split(",") if s.strip()]
    results = evaluate_run(
        args.checkpoint, args.config, args.overrides, sets, split=args.split, fold=args.fold, out=args.out
    )
    for result in results:
        print(result["table"])
        print(f"wrote modalities.csv/.md/.json in {result['out']}")
    return 0
