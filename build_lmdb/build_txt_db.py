"""`uniter3m build-txt-db`: tokenise a transcript file (CSV/TSV/JSONL) into a text LMDB.

Example (MELD):
    uniter3m build-txt-db --input meld/train_sent_emo.csv --id-col Dialogue_ID,Utterance_ID \\
        --text-col Utterance --label-col Emotion,Sentiment --tokenizer TOKENIZER_DIR --out db/meld_train_txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from uniter3m.data.store import claim_database_dir
from uniter3m.errors import UserError
from uniter3m.ingest.text_db import DEFAULT_MAX_LEN, TextDbSpec, build_text_db, summary_lines


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
    parser.add_argument(
        "--text-col",
        default=None,
        help="the column holding the transcript (required without --asr; with --asr the column written, default 'text')",
    )
    parser.add_argument(
        "--id-prefix",
        default="",
        help="put this before every id (e.g. 'train_'): split files whose ids repeat across splits, as MELD's "
        "do, then give databases that can be used together (their feature dbs need the same ids)",
    )
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
        "'nrc6' (MEmoBERT's 6: no anticipation, no trust), 'none', or a file with one word per line "
        "(default: nrc)",
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
    asr = parser.add_argument_group(
        "transcripts from recordings (--input is then a manifest id,path,start,end,...)"
    )
    asr.add_argument(
        "--asr",
        default=None,
        metavar="MODEL",
        help="whisper-ct2 (the packaged Whisper tiny.en), whisper-ct2:DIR (a CTranslate2 Whisper folder) "
        "or a local transformers Whisper-family folder",
    )
    asr.add_argument("--asr-batch-size", type=int, default=8)
    asr.add_argument("--asr-language", default=None, help="e.g. 'en', 'de' (default: the model detects it)")
    asr.add_argument("--asr-max-tokens", type=int, default=128, help="longest transcript, in model tokens")
    asr.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")


def run(args: argparse.Namespace) -> int:
    claim_database_dir(args.out.resolve(), args.overwrite)  # before any work: refuse a folder not ours
    if args.asr is None and not args.text_col:
        raise UserError("--text-col is required (or --asr DIR to transcribe the recordings of a manifest)")
    text_col, rows, extra = args.text_col or "text", None, None
    if args.asr is not None:
        from uniter3m.ingest.asr import make_transcriber, transcribe_manifest

        transcriber = make_transcriber(
            args.asr, args.device, args.asr_batch_size, args.asr_language, args.asr_max_tokens
        )
        rows, asr = transcribe_manifest(args.input, transcriber, text_col, progress=True)
        extra = {"asr": asr}
    spec = TextDbSpec(
        input=args.input,
        id_cols=split_columns([args.id_col]),
        text_col=text_col,
        tokenizer=args.tokenizer,
        out=args.out,
        label_cols=split_columns(args.label_col),
        lexicon=args.lexicon,
        soft_label_col=args.soft_label_col,
        max_len=args.max_len,
        encoding=args.encoding,
        overwrite=args.overwrite,
        source_extra=extra,
        id_prefix=args.id_prefix,
    )
    meta = build_text_db(spec, rows)
    for line in summary_lines(meta):
        print(line)
    print(f"wrote {args.out}")
    return 0
