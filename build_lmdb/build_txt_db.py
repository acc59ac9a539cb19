"""`uniter3m build-txt-db`: tokenise a transcript file (CSV/TSV/JSONL) into a text LMDB.

Example (MELD):
    uniter3m build-txt-db --input meld/train_sent_emo.csv --id-col Dialogue_ID,Utterance_ID \\
        --text-col Utterance --label-col Emotion,Sentiment --tokenizer TOKENIZER_DIR --out db/meld_train_txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from uniter3m.data.store import claim_database_dir
from uniter3m.data.text_db import DEFAULT_MAX_LEN, TextDbSpec, build_text_db, summary_lines


def split_columns(values: list[str] | None) -> list[str]:
    """Flatten repeated and/or comma-separated column flags, keeping order, without duplicates."""
    out: dict[str, None] = {}
    for value in values or []:
        for part in value.split(","):
            if part.strip():
                out[part.strip()] = None
    return list(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input", required=True, type=Path, help="a .csv, .tsv or .jsonl file, one utterance per row"
    )
    parser.add_argument(
        "--id-col", required=True, help="id column(s), comma-separated; several are joined with '_'"
    )
    parser.add_argument("--text-col", required=True, help="the column holding the transcript")
    parser.add_argument("--tokenizer", required=True, type=Path, help="local HF tokenizer directory")
    parser.add_argument("--out", required=True, type=Path, help="output database folder")
    parser.add_argument(
        "--label-col",
        action="append",
        default=[],
        help="label/metadata column(s) to keep; repeat the flag and/or separate with commas",
    )
    parser.add_argument(
        "--lexicon",
        default="nrc",
        help="emotion words: 'nrc' (NRC EmoLex from the nrclex package, 8 basic emotions), "
        "'none', or a file with one word per line (default: nrc)",
    )
    parser.add_argument(
        "--soft-label-col",
        default=None,
        help="column whose cells hold a JSON list of class probabilities (weak labels)",
    )
    parser.add_argument(
        "--max-len",
        type=int,
        default=DEFAULT_MAX_LEN,
        help=f"longer texts are truncated to this many tokens and counted (default {DEFAULT_MAX_LEN})",
    )
    parser.add_argument("--encoding", default="utf-8", help="text encoding of the input (default utf-8)")
    parser.add_argument("--overwrite", action="store_true", help="replace a database already in --out")


def run(args: argparse.Namespace) -> int:
    claim_database_dir(args.out.resolve(), args.overwrite)  # before any work: refuse a folder not ours
    spec = TextDbSpec(
        input=args.input,
        id_cols=split_columns([args.id_col]),
        text_col=args.text_col,
        tokenizer=args.tokenizer,
        out=args.out,
        label_cols=split_columns(args.label_col),
        lexicon=args.lexicon,
        soft_label_col=args.soft_label_col,
        max_len=args.max_len,
        encoding=args.encoding,
        overwrite=args.overwrite,
    )
    meta = build_text_db(spec)
    for line in summary_lines(meta):
        print(line)
    print(f"wrote {args.out}")
    return 0
