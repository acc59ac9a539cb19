"""`uniter3m pretrain --config FILE [--set key=value ...] [--resume auto|DIR] [--overwrite]`

The run itself is `uniter3m.train.pretrain.run_pretrain`; the same command runs alone, under
`torchrun` and under `horovodrun` (scripts/pretrain_torchrun.sh, scripts/pretrain_horovod.sh).
"""

from __future__ import annotations

import argparse

from uniter3m.config import add_resume_arguments, add_set_argument
from uniter3m.train.config import load_pretrain_config
from uniter3m.train.pretrain import run_pretrain


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="pretraining config JSON (see configs/pretrain/)")
    add_set_argument(parser, "optim.lr=5e-5 --set steps=1000")
    add_resume_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = load_pretrain_config(args.config, args.overrides)
    run_pretrain(cfg, resume=args.resume, overwrite=args.overwrite)
    print(
        f"checkpoints and logs in {cfg.output_dir} (checkpoints/latest, logs/metrics.jsonl, logs/tensorboard)"
    )
    return 0
