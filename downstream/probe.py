"""`uniter3m probe`: a linear probe (logistic regression, C chosen on validation) on frozen features.

    uniter3m probe --config configs/downstream/X.json --features emb.h5 [--per-stream] [--out DIR]
    uniter3m probe --config configs/downstream/X.json --checkpoint DIR [--pool cls|mean|pooler] [--per-stream]

The config gives the protocol (folds, targets, metrics) and, with --checkpoint, the data to extract
features from; results are written as `uniter3m finetune` writes them (per-fold metrics.json,
summary.md). The work is `uniter3m.train.probe.run_probe`.
"""

from __future__ import annotations

import argparse

from uniter3m.config import add_set_argument
from uniter3m.train.extract import POOLS
from uniter3m.train.probe import run_probe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a downstream config (protocol, data)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--features", help="a file written by `uniter3m extract` (.h5, .npz, .safetensors)")
    source.add_argument(
        "--checkpoint",
        help="a model folder: extract its features, then probe them ({fold} in it: each fold's own folder)",
    )
    parser.add_argument("--out", default=None, help="output folder (default: the config's output_dir)")
    parser.add_argument("--pool", choices=POOLS, default="cls", help="with --checkpoint: how to pool")
    parser.add_argument(
        "--per-stream", action="store_true", help="probe the per-stream vectors, concatenated (late fusion)"
    )
    weighting = parser.add_mutually_exclusive_group()
    weighting.add_argument("--class-weighted", dest="class_weighted", action="store_true", default=None)
    weighting.add_argument("--no-class-weighted", dest="class_weighted", action="store_false")
    parser.add_argument("--fold", type=int, default=None, help="probe only fold K (0-based)")
    parser.add_argument("--device", default="auto", help="with --checkpoint: auto, cpu, cuda, ...")
    parser.add_argument("--overwrite", action="store_true", help="replace the probe run in --out")
    add_set_argument(parser, "protocol.scheme=session")


def run(args: argparse.Namespace) -> int:
    result = run_probe(
        args.config,
        features=args.features,
        checkpoint=args.checkpoint,
        out=args.out,
        per_stream=args.per_stream,
        pool=args.pool,
        class_weighted=args.class_weighted,
        fold=args.fold,
        overrides=args.overrides,
        overwrite=args.overwrite,
        device=args.device,
    )
    print(result["summary_md"])
    return 0
