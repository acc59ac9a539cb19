"""`uniter3m corpora NAME`: the shared real corpora -> uniter3m databases (the builders are
`uniter3m.ingest.corpora`).

    uniter3m corpora meld    --data ../shared/data --tokenizer TOK --out db/
    uniter3m corpora iemocap --data ../shared/data --tokenizer TOK --out db/
    uniter3m corpora mosi    --data ../shared/data --tokenizer TOK --out db/
    uniter3m corpora emodb   --data ../shared/data --tokenizer TOK --out db/ \
        [--pool-frames 10] [--split-dbs] [--speaker-norm] [--functionals] [--extractors resemblyzer,resemblyzer-utt]
    uniter3m corpora ravdess --data ../shared/data --tokenizer TOK --out db/ \
        [--extractors functionals,resemblyzer] [--pool-frames 10] [--split-dbs] [--speaker-norm]

What each corpus gives (databases, ids, labels) is in `uniter3m.ingest.corpora`'s docstring
(RAVDESS: `uniter3m.ingest.ravdess`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from uniter3m.errors import UserError
from uniter3m.ingest.corpora import CORPUS_BUILDERS
from uniter3m.ingest.ravdess import SPEECH_EXTRACTORS, build_ravdess

BUILDERS = {**CORPUS_BUILDERS, "ravdess": build_ravdess}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("corpus", choices=sorted(BUILDERS))
    parser.add_argument("--data", type=Path, required=True, help="the shared data folder (../shared/data)")
    parser.add_argument("--tokenizer", type=Path, required=True, help="local tokenizer dir")
    parser.add_argument("--out", type=Path, required=True, help="folder that receives the databases")
    parser.add_argument("--lexicon", default="nrc")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument(
        "--split-dbs",
        action="store_true",
        help="mosi: also one text db per split (mosi_txt_{train,valid,test}); emodb, ravdess: one per speaker",
    )
    parser.add_argument(
        "--pool-frames",
        type=int,
        action="append",
        default=None,
        help="emodb, ravdess: also speech dbs with every K frames mean-pooled (repeatable; e.g. 10)",
    )
    parser.add_argument(
        "--functionals",
        action="store_true",
        help="emodb: also emodb_func, the ComParE_2016 functionals as one 6373-d frame per utterance",
    )
    parser.add_argument(
        "--speaker-norm",
        action="store_true",
        help="emodb: also a per-speaker z-normalised copy (<name>_spk) of each speech db",
    )
    parser.add_argument(
        "--extractors",
        default=None,
        help="comma-separated speech extractor names; ravdess: the speech dbs to build (default "
        f"{','.join(SPEECH_EXTRACTORS)}); emodb: speech dbs besides ComParE (emodb_<name>, e.g. resemblyzer)",
    )


def run(args: argparse.Namespace) -> int:
    extra: dict[str, Any] = {"split_dbs": True} if args.split_dbs else {}
    if extra and args.corpus not in ("mosi", "emodb", "ravdess"):
        raise UserError("--split-dbs applies to mosi, emodb and ravdess only")
    if args.pool_frames:
        if args.corpus not in ("emodb", "ravdess"):
            raise UserError("--pool-frames applies to emodb and ravdess only")
        extra["pool_frames"] = args.pool_frames
    if args.speaker_norm:
        if args.corpus not in ("emodb", "ravdess"):
            raise UserError("--speaker-norm applies to emodb and ravdess only")
        extra["speaker_norm"] = True
    if args.functionals:
        if args.corpus != "emodb":
            raise UserError("--functionals applies to emodb only")
        extra["functionals"] = True
    if args.extractors:
        if args.corpus not in ("emodb", "ravdess"):
            raise UserError("--extractors applies to emodb and ravdess only")
        extra["extractors"] = [e.strip() for e in args.extractors.split(",") if e.strip()]
    metas = BUILDERS[args.corpus](args.data, args.out, args.tokenizer, args.overwrite, args.lexicon, **extra)
    for name, meta in metas.items():
        if isinstance(meta, dict) and "count" in meta:
            print(
                f"{args.out / name}: {meta['count']} records, skipped {len(meta.get('skipped', []))}, "
                f"truncated {meta.get('truncated', 0)}"
            )
        else:
            print(f"{name}: {meta}")
    return 0


if __name__ == "__main__":  # pragma: no cover  (python -m uniter3m.recipes.build_lmdb.corpora NAME ...)
    from uniter3m.cli import main

    raise SystemExit(main(["corpora", *sys.argv[1:]]))
