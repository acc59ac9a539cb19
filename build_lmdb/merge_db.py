"""`uniter3m merge-db OUT IN...`: join feature databases (the shards of `build-media-db --shard K/N`).

The rules (same features, unique ids, every shard once) are in `uniter3m.ingest.merge`.

Example (after a Slurm array of `build-media-db ... --shard $SLURM_ARRAY_TASK_ID/8 --out db/speech.$ID`):
    uniter3m merge-db db/speech db/speech.{0..7}
"""

from __future__ import annotations

import argparse
from pathlib import Path

from uniter3m.ingest.feat_db import summary_lines
from uniter3m.ingest.merge import merge_feat_dbs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="output database folder")
    parser.add_argument("inputs", type=Path, nargs="+", help="feature databases to join, in this order")
    parser.add_argument("--overwrite", action="store_true", help="replace a database already in OUT")
    parser.add_argument(
        "--allow-partial", action="store_true", help="merge even when some shards K/N are missing"
    )


def run(args: argparse.Namespace) -> int:
    meta = merge_feat_dbs(args.out, list(args.inputs), args.overwrite, args.allow_partial)
    for line in summary_lines(meta):
        print(line)
    print(f"wrote {args.out} from {len(args.inputs)} databases")
    return 0
