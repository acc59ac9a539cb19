"""`uniter3m extract`: utterance embeddings of a frozen checkpoint, for linear probes and light heads.

    uniter3m extract --checkpoint DIR --config FILE --file emb.h5|emb.npz|emb.safetensors
                     [--pool cls|mean|pooler] [--per-stream] [--sequence] [--modalities LVA]
                     [--batch-size 64] [--device auto]

FILE is a fine-tuning config (its `data` section is used) or a small JSON with just the data keys
(`{"txt_db": ..., "face_db": ..., "speech_db": ...}`, optionally `modalities`, `max_txt_len`,
`max_frames`, `normalize`). What the output holds and how the pools differ:
`uniter3m.train.extract`, which does the work.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from uniter3m.train.extract import POOLS, extract_to_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help="our checkpoint dir (or an HF BERT dir)"
    )
    parser.add_argument(
        "--config",
        default=None,
        type=Path,
        help="fine-tuning config JSON, or a JSON with the data keys (txt_db, <stream>_db, ...); "
        "default: the run's resolved config.json beside a fine-tuned checkpoint",
    )
    parser.add_argument(
        "--file", required=True, type=Path, help="output file: .h5, .npz or .safetensors (a feature cache)"
    )
    parser.add_argument("--pool", choices=POOLS, default="cls", help="how one utterance becomes one vector")
    parser.add_argument(
        "--modalities",
        help="modality letters to feed (default: the config's); e.g. --modalities LA drops the face",
    )
    parser.add_argument(
        "--per-stream", action="store_true", help="also one mean vector per stream (text, face, speech)"
    )
    parser.add_argument(
        "--sequence",
        action="store_true",
        help="also every real position's hidden state (ragged, with offsets)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    result = extract_to_file(
        args.checkpoint,
        args.file,
        args.config,
        modalities=args.modalities,
        pool=args.pool,
        batch_size=args.batch_size,
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        per_stream=args.per_stream,
        sequence=args.sequence,
    )
    print(
        f"wrote {len(result['ids'])} embeddings of size {result['embeddings'].shape[1]} "
        f"({args.pool} pooling, modalities {result['modalities']}) to {args.file}"
    )
    if result["dropped"]:
        print(f"note: {result['dropped']} utterances of the text db were left out (see the log for why)")
    return 0
