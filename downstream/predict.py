"""`uniter3m predict --checkpoint RUN_OR_BEST INPUT... --out DIR`: emotions of new recordings.

    uniter3m predict --checkpoint runs/emodb_la/fold00-03-valid08/best talk.mp4 clips/ --out preds/
    uniter3m predict --checkpoint runs/emodb_la segments.csv --asr whisper-ct2 --out preds/   # id,path[,start,end][,text]

INPUT: audio/video files, folders, or manifest CSVs. The checkpoint's recorded extractors, tokenizer
and normalisation make the inputs; recordings without manifest times are cut into fixed windows
(--window, --hop). Writes DIR/predictions.csv and .json (start, end, text, modalities used, label,
every class probability) and DIR/timeline_<recording>.png. The work is `uniter3m.train.predict`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from uniter3m.train.predict import HOP_S, WINDOW_S, run_predict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="a `<fold>/best` folder or a fine-tuning run folder (output_dir)"
    )
    parser.add_argument(
        "inputs", nargs="+", type=Path, help="audio/video files, folders, manifest .csv files"
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--fold", type=int, default=None, help="a run folder's fold (default: its best on validation)"
    )
    parser.add_argument(
        "--asr",
        default=None,
        metavar="MODEL",
        help="text for a model that reads it: whisper-ct2[:DIR] or a local Whisper folder (default: no text "
        "unless a manifest has a text column)",
    )
    parser.add_argument("--window", type=float, default=WINDOW_S, help=f"window seconds (default {WINDOW_S})")
    parser.add_argument("--hop", type=float, default=HOP_S, help=f"seconds between windows (default {HOP_S})")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")


def run(args: argparse.Namespace) -> int:
    result = run_predict(
        args.checkpoint,
        args.inputs,
        args.out,
        fold=args.fold,
        asr=args.asr,
        window=args.window,
        hop=args.hop,
        device=args.device,
    )
    print(f"{len(result['predictions'])} segments scored with {result['checkpoint']}")
    print(f"wrote {result['csv']}, {result['json']} and {len(result['pictures'])} timeline picture(s)")
    return 0
