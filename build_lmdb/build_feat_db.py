"""`uniter3m build-feat-db`: pack per-frame face or speech features into a feature LMDB.

Examples:
    uniter3m build-feat-db --input openface_csvs/ --format openface --columns 'AU*_r,pose_*,gaze_*' \\
        --min-confidence 0.8 --out db/face
    uniter3m build-feat-db --input wav2vec.h5 --format h5 --dtype float32 --out db/speech
    uniter3m build-feat-db --input recordings/ --format wav --out db/speech_compare   # ComParE 130-d, any container
    uniter3m build-feat-db --manifest utts.csv --format wav --extractor hf:models/wav2vec2-base \
        --layer 9 --pool-frames 3 --workers 4 --out db/speech_w2v                     # id,path,start,end
    uniter3m build-feat-db --input videos/ --format video --fps 5 --extractor hf:models/clip-vit-b16 \
        --face-size 224 --face-colour rgb --out db/face_clip
    uniter3m build-feat-db --input videos/ --format wav --shard 0/8 --out db/speech.0   # then merge-db

The rules for each format and for bad input are in `uniter3m.ingest.feat_db`'s docstring.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from uniter3m.data.store import claim_database_dir
from uniter3m.ingest.encoders import PRECISIONS, TOKEN_POOLS
from uniter3m.ingest.faces import COLOURS, SELECT, FaceOptions
from uniter3m.ingest.feat_db import (
    DTYPES,
    FORMATS,
    MEDIA_FORMATS,
    NAN_POLICIES,
    FeatDbSpec,
    build_feat_db,
    parse_patterns,
    summary_lines,
)
from uniter3m.ingest.recordings import MediaOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        type=Path,
        default=None,
        help="a folder (npz, openface, wav, video), an HDF5 file (h5) or a CSV (csv); wav/video: optional with "
        "--manifest (then relative manifest paths resolve against it)",
    )
    parser.add_argument("--format", required=True, choices=FORMATS, help="how the frames are stored")
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
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="storage dtype (default float32 for openSMILE speech features, whose values exceed float16; "
        "float16 otherwise)",
    )
    parser.add_argument(
        "--nan-policy",
        choices=NAN_POLICIES,
        default="error",
        help="an utterance with NaN/Inf: stop with an error (default) or drop it and list it in meta.json",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a database already in --out")
    rec = parser.add_argument_group("recordings (--format wav / video)")
    rec.add_argument(
        "--extractor",
        default=None,
        help="wav: compare (default, openSMILE ComParE LLD+deltas 130-d) | egemaps (25-d) | hf:DIR (local "
        "wav2vec2/HuBERT/WavLM/data2vec-audio folder); video: geometric (default, 4-d face box) | pixels | "
        "hf:DIR (local CLIP/SigLIP/ViT/DINOv2 folder)",
    )
    rec.add_argument(
        "--manifest", type=Path, default=None, help="CSV id,path[,start,end] (seconds): one row per utterance"
    )
    rec.add_argument(
        "--layer",
        default=None,
        help="hf: hidden state to keep: N (0 = before the first layer; negative from the end; default last), "
        "A-B or A,B,C for their mean, 'all' for the mean of every layer",
    )
    rec.add_argument(
        "--pool-frames",
        type=int,
        default=1,
        help="speech (hf, compare, egemaps): mean-pool every K frames (MEmoBERT wav2vec: 3; "
        "ComParE 10 -> 10 frames/s)",
    )
    rec.add_argument(
        "--pool", choices=TOKEN_POOLS, default="cls", help="hf vision: CLS token, mean token or pooled output"
    )
    rec.add_argument(
        "--batch-size", type=int, default=16, help="hf: utterances (audio) or crops x4 (vision) per batch"
    )
    rec.add_argument("--device", default="auto", help="hf: auto (GPU when present) | cpu | cuda[:N]")
    rec.add_argument(
        "--precision", choices=PRECISIONS, default="auto", help="hf: auto = bf16/fp16 on GPU, fp32 on CPU"
    )
    rec.add_argument(
        "--workers", type=int, default=1, help="processes for decoding, openSMILE and face detection"
    )
    rec.add_argument(
        "--shard",
        default=None,
        help="K/N: keep every N-th file from the K-th (0 <= K < N); join with merge-db",
    )
    rec.add_argument("--fps", type=float, default=5.0, help="video: frames per second to sample (default 5)")
    rec.add_argument(
        "--face-size", type=int, default=64, help="video: crop side in pixels (default 64, MEmoBERT)"
    )
    rec.add_argument(
        "--face-colour", choices=COLOURS, default="grey", help="video: crop colour (default grey)"
    )
    rec.add_argument(
        "--face-select", choices=SELECT, default="largest", help="video: the face kept per frame"
    )
    rec.add_argument("--face-margin", type=float, default=0.2, help="video: margin around the box, per side")
    rec.add_argument(
        "--min-face", type=float, default=0.05, help="video: smallest face side as a fraction of the frame's"
    )


MEDIA_FLAGS = (
    "extractor", "manifest", "layer", "pool_frames", "pool", "batch_size", "device", "precision", "workers",
    "shard", "fps", "face_size", "face_colour", "face_select", "face_margin", "min_face",
)  # fmt: skip


def media_options(args: argparse.Namespace) -> MediaOptions | None:
    """The recording flags, or None when the format is not wav/video and none was given (misuse is reported)."""
    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    changed = [f for f in MEDIA_FLAGS if getattr(args, f) != defaults.get_default(f)]
    if args.format not in MEDIA_FORMATS and not changed:
        return None
    return MediaOptions(
        extractor=args.extractor,
        manifest=args.manifest,
        layer=args.layer,
        pool_frames=args.pool_frames,
        token_pool=args.pool,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        fps=args.fps,
        face=FaceOptions(
            size=args.face_size,
            colour=args.face_colour,
            select=args.face_select,
            margin=args.face_margin,
            min_face=args.min_face,
        ),
        workers=args.workers,
        shard=args.shard,
    )


def run(args: argparse.Namespace) -> int:
    claim_database_dir(args.out.resolve(), args.overwrite)  # before any work: refuse a folder not ours
    spec = FeatDbSpec(
        input=args.input,
        format=args.format,
        out=args.out,
        id_cols=parse_patterns(args.id_col),
        columns=parse_patterns(args.columns),
        min_confidence=args.min_confidence,
        dtype=args.dtype,
        nan_policy=args.nan_policy,
        overwrite=args.overwrite,
        media=media_options(args),
    )
    meta = build_feat_db(spec)
    for line in summary_lines(meta):
        print(line)
    print(f"wrote {args.out}")
    return 0
