"""`uniter3m build-media-db`: recordings -> a feature LMDB (decode -> detect faces -> registered extractor).

Examples:
    uniter3m build-media-db --input recordings/ --format wav --out db/speech_compare     # ComParE 130-d
    uniter3m build-media-db --manifest utts.csv --format wav --extractor hf:models/wav2vec2-base \\
        --layer 9 --pool-frames 3 --workers 4 --out db/speech_w2v                       # id,path,start,end
    uniter3m build-media-db --input videos/ --format video --fps 5 --extractor hf:models/clip-vit-b16 \\
        --face-size 224 --face-colour rgb --out db/face_clip
    uniter3m build-media-db --input videos/ --format wav --shard 0/8 --out db/speech.0   # then merge-db
    uniter3m build-media-db --input recordings/ --format wav --extractor resemblyzer --pool-frames 10 \
        --out db/speech_resemblyzer                                    # pretrained speaker-encoder states
    uniter3m build-media-db --input videos/ --format video --detector mtcnn --extractor fer \
        --out db/face_fer                        # expression CNN: 256-d + 7 soft labels; landmarks.npz

Extractors and detectors come from registries (`uniter3m.ingest.extractors`, `uniter3m.ingest.detectors`):
a new one is one module plus one registry line. Feature files (npz, h5, csv, OpenFace) go through
`uniter3m build-feat-db`. The pipeline is described in `uniter3m.ingest.recordings`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from uniter3m.data.store import claim_database_dir
from uniter3m.ingest.detectors import DETECTORS
from uniter3m.ingest.encoders import PRECISIONS, TOKEN_POOLS
from uniter3m.ingest.extractors import EXTRACTORS, ExtractorOptions
from uniter3m.ingest.faces import COLOURS, SELECT, FaceOptions
from uniter3m.ingest.feat_db import DTYPES, NAN_POLICIES, FeatDbSpec, build_feat_db, summary_lines
from uniter3m.ingest.recordings import MediaOptions, media_source


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        type=Path,
        default=None,
        help="a folder or one media file; with --manifest optional (relative manifest paths resolve against it)",
    )
    parser.add_argument(
        "--manifest", type=Path, default=None, help="CSV id,path[,start,end] (seconds): one row per utterance"
    )
    parser.add_argument(
        "--format",
        required=True,
        help="wav: speech from any audio or video container | video: faces from video files",
    )
    parser.add_argument("--out", required=True, type=Path, help="output database folder")
    parser.add_argument(
        "--extractor",
        default=None,
        help=f"NAME or NAME:ARG, one of: {', '.join(sorted(EXTRACTORS))} (default: compare for wav, "
        "geometric for video; hf:DIR = a local transformers audio or vision encoder folder)",
    )
    parser.add_argument(
        "--detector", default="haar", help=f"video: face detector, one of: {', '.join(sorted(DETECTORS))}"
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="storage dtype (default: the extractor's; float32 for openSMILE, whose values exceed float16)",
    )
    parser.add_argument(
        "--nan-policy",
        choices=NAN_POLICIES,
        default="error",
        help="an utterance with NaN/Inf: stop with an error (default) or drop it and list it in meta.json",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a database already in --out")
    parser.add_argument(
        "--workers", type=int, default=1, help="processes for decoding, face detection and openSMILE"
    )
    parser.add_argument(
        "--shard",
        default=None,
        help="K/N: keep every N-th file from the K-th (0 <= K < N); join with merge-db",
    )
    ext = parser.add_argument_group("extractor settings (each extractor reads those it uses)")
    ext.add_argument(
        "--layer",
        default=None,
        help="hf: hidden state to keep: N (0 = before the first layer; negative from the end; default last), "
        "A-B or A,B,C for their mean, 'all' for the mean of every layer",
    )
    ext.add_argument(
        "--pool-frames",
        type=int,
        default=1,
        help="speech (hf, compare, egemaps): mean-pool every K frames (MEmoBERT wav2vec: 3; "
        "ComParE 10 -> 10 frames/s)",
    )
    ext.add_argument(
        "--pool", choices=TOKEN_POOLS, default="cls", help="hf vision: CLS token, mean token or pooled output"
    )
    ext.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="networks: utterances (audio) or crops x4 (vision) per batch",
    )
    ext.add_argument("--device", default="auto", help="networks: auto (GPU when present) | cpu | cuda[:N]")
    ext.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="networks: auto = bf16/fp16 on GPU, fp32 on CPU",
    )
    face = parser.add_argument_group("faces (--format video)")
    face.add_argument("--fps", type=float, default=5.0, help="frames per second to sample (default 5)")
    face.add_argument(
        "--face-size",
        type=int,
        default=64,
        help="crop side in pixels for extractors that take any size (pixels, hf; default 64, MEmoBERT)",
    )
    face.add_argument("--face-colour", choices=COLOURS, default="grey", help="crop colour (default grey)")
    face.add_argument("--face-select", choices=SELECT, default="largest", help="the face kept per frame")
    face.add_argument("--face-margin", type=float, default=0.2, help="margin around the box, per side")
    face.add_argument(
        "--min-face", type=float, default=0.05, help="smallest face side as a fraction of the frame's"
    )
    face.add_argument(
        "--landmarks-keep",
        type=int,
        default=100,
        help="detectors with landmarks (mtcnn, blazeface): per-frame landmarks of the first N utterances "
        "go to landmarks.npz in the database folder (0: none; default 100)",
    )


def run(args: argparse.Namespace) -> int:
    claim_database_dir(args.out.resolve(), args.overwrite)  # before any work: refuse a folder not ours
    opts = MediaOptions(
        extractor=args.extractor,
        detector=args.detector,
        manifest=args.manifest,
        workers=args.workers,
        shard=args.shard,
        landmarks_keep=args.landmarks_keep,
        face=FaceOptions(select=args.face_select, margin=args.face_margin, min_face=args.min_face),
        extract=ExtractorOptions(
            layer=args.layer,
            pool_frames=args.pool_frames,
            token_pool=args.pool,
            batch_size=args.batch_size,
            device=args.device,
            precision=args.precision,
            fps=args.fps,
            face_size=args.face_size,
            face_colour=args.face_colour,
        ),
    )
    spec = FeatDbSpec(out=args.out, dtype=args.dtype, nan_policy=args.nan_policy, overwrite=args.overwrite)
    meta = build_feat_db(spec, media_source(args.format, opts, path=args.input))
    for line in summary_lines(meta):
        print(line)
    print(f"wrote {args.out}")
    return 0
