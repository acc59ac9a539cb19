"""`uniter3m build-feat-db`: pack feature files (npz, h5, OpenFace CSVs, one CSV) into a feature LMDB.

Examples:
    uniter3m build-feat-db --input openface_csvs/ --format openface --columns 'AU*_r,pose_*,gaze_*' \\
        --min-confidence 0.8 --out db/face
    uniter3m build-feat-db --input wav2vec.h5 --format h5 --dtype float32 --out db/speech

Recordings (`--format wav|video`) are `uniter3m build-media-db`'s work: given here, the whole line runs
as that command (`route`), so `build-feat-db --format wav --extractor resemblyzer ...` works and each
command's own flags stay the ones that mean something for its inputs. The rules for each format and for bad
input are in `uniter3m.ingest.sources` and `uniter3m.ingest.feat_db`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from uniter3m.data.store import claim_database_dir
from uniter3m.ingest.feat_db import DTYPES, NAN_POLICIES, FeatDbSpec, build_feat_db, summary_lines
from uniter3m.ingest.sources import FORMATS, MEDIA_FORMATS, parse_patterns


def route(argv: list[str]) -> str | None:
    """`build-media-db` when the line names a recordings format (wav, video), else None (this command)."""
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--format" and i + 1 < len(argv) else arg.partition("=")[2]
        if (arg == "--format" or arg.startswith("--format=")) and value in MEDIA_FORMATS:
            return "build-media-db"
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input", type=Path, default=None, help="a folder (npz, openface), an HDF5 file (h5) or a CSV (csv)"
    )
    parser.add_argument(
        "--format",
        required=True,
        help=f"how the frames are stored: {' | '.join(FORMATS)} (wav | video: run as build-media-db)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output database folder")
    parser.add_argument(
        "--id-col", default=None, help="csv only: id column(s), comma-separated; several are joined with '_'"
    )
    parser.add_argument(
        "--columns",
        default=None,
        help="openface/csv: comma-separated glob patterns of feature columns, e.g. 'AU*_r,pose_*,gaze_*' "
        "(default: openface every column but frame/face_id/timestamp/confidence/success; csv every numeric "
        "column but the id)",
    )
    parser.add_argument(
        "--min-confidence",
        type=float,
        default=None,
        help="openface only: drop frames whose confidence is below this (frames with success 0 are always "
        "dropped; counts are reported)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="storage dtype (default float16)")
    parser.add_argument(
        "--nan-policy",
        choices=NAN_POLICIES,
        default="error",
        help="an utterance with NaN/Inf: stop with an error (default) or drop it and list it in meta.json",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a database already in --out")


def run(args: argparse.Namespace) -> int:
    claim_database_dir(args.out.resolve(), args.overwrite)  # before any work: refuse a folder not ours
    spec = FeatDbSpec(
        out=args.out,
        input=args.input,
        format=args.format,
        id_cols=parse_patterns(args.id_col),
        columns=parse_patterns(args.columns),
        min_confidence=args.min_confidence,
        dtype=args.dtype,
        nan_policy=args.nan_policy,
        overwrite=args.overwrite,
    )
    meta = build_feat_db(spec)
    for line in summary_lines(meta):
        print(line)
    print(f"wrote {args.out}")
    return 0
