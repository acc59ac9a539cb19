"""Transcripts (CSV/TSV/JSONL) -> a text LMDB (kind "txt", record layout in DEVELOPERS.md).

Per utterance we store the WordPiece ids without [CLS]/[SEP] (the collator adds them with the
tokenizer's own ids), the word index of every token (whole-word masking), a per-token
emotion-word flag (emotion-word masking) and the chosen label columns.

Rules for imperfect input, all reported in meta.json and the printed summary:
- an empty text (or one that yields no token) is skipped, with its row and reason in `skipped`;
- a text longer than `max_len` tokens is truncated (never dropped) and counted in `truncated`;
- anything else that is wrong (undecodable bytes, a missing column or id, a duplicate id, a bad
  soft-label cell) is an error naming the file, the row and the fix, because guessing would
  silently change the corpus.

Emotion words: a word (the tokenizer's pre-tokenised word; its wordpieces joined back together,
`##` stripped, lower-cased) is an emotion word when the lexicon holds it. With the NRC lexicon
(`--lexicon nrc`, the nrc_en.json bundled in the `nrclex` package) a word counts only when it is
associated with at least one of the 8 basic emotions (anger, anticipation, disgust, fear, joy,
sadness, surprise, trust); words carrying only `positive`/`negative` sentiment do not, because
those two are polarity, not emotion, and would flag a third of everyday vocabulary. `--lexicon nrc6`
keeps MEmoBERT's 6 (no anticipation, no trust); the loader is `uniter3m.data.lexicon`.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uniter3m.data.lexicon import load_emotion_lexicon, word_classes
from uniter3m.data.store import DbWriter
from uniter3m.data.tokenization import encode_text, load_tokenizer, special_tokens, vocab_hash
from uniter3m.errors import UserError
from uniter3m.progress import disabled

DEFAULT_MAX_LEN = 512 - 2  # room for [CLS] and [SEP] in a 512-position BERT
_TOKENIZE_CHUNK = 1024


# --------------------------------------------------------------------------- reading rows


@dataclass(frozen=True)
class Row:
    """One input record: `row` is its 1-based number after the header, `line` its first file line."""

    row: int
    line: int
    fields: dict[str, Any]


def input_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in {".csv", ".tsv"}:
        return suffix[1:]
    if suffix in {".jsonl", ".ndjson"}:
        return "jsonl"
    raise UserError(
        f"{path}: cannot tell the format from the extension {suffix!r}; use a .csv, .tsv or .jsonl file"
    )


def _decode(path: Path, data: bytes, encoding: str, fmt: str) -> str:
    """Decode the whole file, turning a decoding failure into an error that names the row."""
    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in {"utf-8", "utf8"} else encoding
    try:
        return data.decode(codec)
    except LookupError as err:
        raise UserError(f"unknown --encoding {encoding!r} for {path}: {err}") from err
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        line = data.count(b"\n", 0, err.start) + 1
        if fmt == "jsonl":
            where = f"line {line}"
        else:
            prefix = data[:line_start].decode(codec, errors="replace")
            records = sum(1 for _ in csv.reader(io.StringIO(prefix), delimiter=_delimiter(fmt)))
            where = f"row {max(records, 1)} (line {line})"
        bad = data[err.start : err.end].hex(" ")
        raise UserError(
            f"{path}: {where} is not valid {encoding} (bytes {bad} at offset {err.start}: {err.reason}); "
            "pass the file's real encoding, e.g. --encoding cp1252 or --encoding latin-1, "
            "or re-save the file as UTF-8"
        ) from err


def _delimiter(fmt: str) -> str:
    return "\t" if fmt == "tsv" else ","


def read_rows(path: Path, encoding: str = "utf-8") -> tuple[list[str], list[Row]]:
    """Read every record of a CSV/TSV (header row) or JSONL file; returns (columns, rows).

    For JSONL the columns are the union of the keys seen, in first-seen order.
    """
    if not path.is_file():
        raise UserError(f"input file {path} does not exist; check --input")
    fmt = input_format(path)
    text = _decode(path, path.read_bytes(), encoding, fmt)
    if fmt == "jsonl":
        return _read_jsonl(path, text)
    return _read_csv(path, text, fmt)


def _read_csv(path: Path, text: str, fmt: str) -> tuple[list[str], list[Row]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(fmt))
    try:
        header = next(reader)
    except StopIteration:
        raise UserError(f"{path} is empty; it needs a header row and one row per utterance") from None
    except csv.Error as err:
        raise UserError(f"{path}: the header row cannot be parsed ({err})") from err
    header = [h.strip() for h in header]
    dupes = sorted(h for h, n in Counter(header).items() if n > 1)
    if dupes:
        raise UserError(f"{path}: the header names column(s) {dupes} more than once; rename them")
    rows: list[Row] = []
    prev_end = reader.line_num
    number = 0
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise UserError(
                f"{path}: row {number + 1} (line {prev_end + 1}) cannot be parsed ({err}); check its quoting"
            ) from err
        start = prev_end + 1
        prev_end = reader.line_num
        if not cells:  # a blank line is not a record
            continue
        number += 1
        if len(cells) != len(header):
            raise UserError(
                f"{path}: row {number} (line {start}) has {len(cells)} fields where the header has "
                f"{len(header)}; quote fields that contain the delimiter or fix the row"
            )
        rows.append(Row(number, start, dict(zip(header, cells))))
    return header, rows


def _read_jsonl(path: Path, text: str) -> tuple[list[str], list[Row]]:
    columns: dict[str, None] = {}
    rows: list[Row] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(
                f"{path}: line {line_no} is not valid JSON ({err.msg}); fix or remove it"
            ) from err
        if not isinstance(obj, dict):
            raise UserError(f"{path}: line {line_no} holds a {type(obj).__name__}, not a JSON object")
        columns.update(dict.fromkeys(obj))
        rows.append(Row(line_no, line_no, obj))
    return list(columns), rows


def _require_columns(path: Path | str, available: Sequence[str], wanted: dict[str, Sequence[str]]) -> None:
    missing = [f"{flag} {col!r}" for flag, cols in wanted.items() for col in cols if col not in available]
    if missing:
        raise UserError(
            f"{path} has no column {', '.join(missing)}; its columns are: {', '.join(map(repr, available))}"
        )


def _cell(path: Path | str, row: Row, column: str) -> Any:
    if column not in row.fields:
        raise UserError(f"{path}: row {row.row} (line {row.line}) has no {column!r} field; add it")
    return row.fields[column]


def _as_id_part(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip() if value is not None else ""


# --------------------------------------------------------------------------- histograms


def length_histogram(lengths: Iterable[int]) -> dict[str, int]:
    """Counts in power-of-two buckets ("0", "1", "2-3", "4-7", ...), from the shortest to the longest."""
    counts: Counter[int] = Counter()
    for n in lengths:
        counts[0 if n <= 0 else int(n).bit_length()] += 1
    if not counts:
        return {}
    out = {}
    for b in range(min(counts), max(counts) + 1):
        lo, hi = (0, 0) if b == 0 else (1 << (b - 1), (1 << b) - 1)
        out[str(lo) if lo == hi else f"{lo}-{hi}"] = counts.get(b, 0)
    return out


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    if len(lengths) == 0:
        return {"min": 0, "max": 0, "mean": 0.0, "p50": 0, "p95": 0}
    arr = np.asarray(lengths)
    return {
        "min": int(arr.min()),
        "max": int(arr.max()),
        "mean": round(float(arr.mean()), 3),
        "p50": int(np.percentile(arr, 50, method="nearest")),
        "p95": int(np.percentile(arr, 95, method="nearest")),
    }


# --------------------------------------------------------------------------- building


@dataclass(kw_only=True)
class TextDbSpec:
    """What to read and how to tokenise it (mirrors the CLI flags).

    `input` is the transcript file; with `build_text_db(spec, rows)` it stays None (the rows are the input).
    """

    id_cols: list[str]
    text_col: str
    tokenizer: Path
    out: Path
    input: Path | None = None
    label_cols: list[str] = field(default_factory=list)
    lexicon: str = "nrc"
    soft_label_col: str | None = None
    max_len: int = DEFAULT_MAX_LEN
    encoding: str = "utf-8"
    overwrite: bool = False
    progress: bool | None = None  # None: tqdm decides (on for a terminal)
    source_extra: dict[str, Any] | None = None  # more about the input, kept in meta source (e.g. asr)
    id_prefix: str = ""  # put before every id: split files whose ids repeat across splits (MELD) stay apart


@dataclass
class _Utterance:
    row: Row
    id: str
    text: str
    labels: dict[str, Any]
    soft: np.ndarray | None


def _parse_soft_labels(path: Path | str, row: Row, uid: str, column: str, cell: Any) -> np.ndarray:
    where = f"{path}: row {row.row} (line {row.line}), id {uid!r}, column {column!r}"
    value = cell
    if isinstance(cell, str):
        try:
            value = json.loads(cell)
        except json.JSONDecodeError as err:
            raise UserError(
                f"{where} is not a JSON list of class probabilities ({err.msg}); write e.g. [0.7, 0.2, 0.1]"
            ) from err
    if not isinstance(value, list) or not value or not all(isinstance(v, (int, float)) for v in value):
        raise UserError(f"{where} must hold a non-empty JSON list of numbers, got {cell!r}")
    arr = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
        raise UserError(f"{where} holds values outside [0, 1] or NaN/Inf ({cell!r}); give probabilities")
    return arr.astype(np.float32)


def _collect(spec: TextDbSpec, rows: list[Row]) -> tuple[list[_Utterance], list[dict[str, Any]]]:
    """Validate every row; returns utterances to tokenise and the skipped rows (with reasons)."""
    where = spec.input or "the records"
    seen: dict[str, Row] = {}
    kept: list[_Utterance] = []
    skipped: list[dict[str, Any]] = []
    soft_dim: int | None = None
    soft_first: Row | None = None
    for row in rows:
        parts = [_as_id_part(_cell(where, row, c)) for c in spec.id_cols]
        empty = [c for c, p in zip(spec.id_cols, parts) if not p]
        if empty:
            raise UserError(
                f"{where}: row {row.row} (line {row.line}) has an empty id column {empty}; "
                "every utterance needs an id: fill it in or choose other --id-col columns"
            )
        uid = spec.id_prefix + "_".join(parts)
        if uid in seen:
            first = seen[uid]
            raise UserError(
                f"{where}: id {uid!r} appears in row {first.row} (line {first.line}) and row {row.row} "
                f"(line {row.line}); ids must be unique: add a column to --id-col (e.g. a dialogue id)"
            )
        seen[uid] = row
        labels = {c: _cell(where, row, c) for c in spec.label_cols}
        soft = None
        if spec.soft_label_col is not None:
            soft = _parse_soft_labels(
                where, row, uid, spec.soft_label_col, _cell(where, row, spec.soft_label_col)
            )
            if soft_dim is None:
                soft_dim, soft_first = len(soft), row
            elif len(soft) != soft_dim:
                raise UserError(
                    f"{where}: row {row.row}, id {uid!r} has {len(soft)} soft labels but row "
                    f"{soft_first.row} has {soft_dim}; every row needs the same number of classes"
                )
        text = row.fields.get(spec.text_col)
        if text is None or (isinstance(text, str) and not text.strip()):
            reason = "missing text" if text is None else "empty text"
            skipped.append({"row": row.row, "id": uid, "reason": reason})
            continue
        if not isinstance(text, str):
            raise UserError(
                f"{where}: row {row.row}, id {uid!r}: {spec.text_col!r} holds a {type(text).__name__}, "
                "not a string; check --text-col"
            )
        kept.append(_Utterance(row, uid, text, labels, soft))
    return kept, skipped


def _label_counts(utterances: Sequence[_Utterance], columns: Sequence[str]) -> dict[str, dict[str, int]]:
    out = {}
    for col in columns:
        counts = Counter(_label_key(u.labels[col]) for u in utterances)
        out[col] = dict(sorted(counts.items()))
    return out


def _label_key(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def records(rows: Iterable[dict[str, Any]]) -> tuple[list[str], list[Row]]:
    """(columns, rows) of records given in memory: the union of their keys, numbered from 1."""
    columns: dict[str, None] = {}
    out = []
    for number, fields in enumerate(rows, start=1):
        columns.update(dict.fromkeys(fields))
        out.append(Row(number, number, dict(fields)))
    return list(columns), out


def build_text_db(spec: TextDbSpec, rows: Iterable[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Build the database from `spec.input` or from `rows` (dicts: id, text and label columns); returns meta.json."""
    from tqdm.auto import tqdm

    if spec.max_len < 1:
        raise UserError(f"--max-len must be at least 1, got {spec.max_len}")
    if not spec.id_cols:
        raise UserError("--id-col names no column; give e.g. --id-col Dialogue_ID,Utterance_ID")
    if rows is not None:
        fmt = "records"
        columns, rows = records(rows)
    elif spec.input is None:
        raise UserError("build-txt-db needs --input (a .csv, .tsv or .jsonl file)")
    else:
        fmt = input_format(spec.input) if spec.input.is_file() else None
        columns, rows = read_rows(spec.input, spec.encoding)
    where = spec.input or "the records"
    wanted = {"--id-col": spec.id_cols, "--text-col": [spec.text_col], "--label-col": spec.label_cols}
    if spec.soft_label_col is not None:
        wanted["--soft-label-col"] = [spec.soft_label_col]
    _require_columns(where, columns, wanted)
    lexicon = load_emotion_lexicon(spec.lexicon)
    tokenizer = load_tokenizer(spec.tokenizer)
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"tokenizer {spec.tokenizer} is not a fast tokenizer; word ids need tokenizer.json")
    ids = special_tokens(tokenizer)

    if not rows:
        raise UserError(
            f"{where} holds no utterance (a header or nothing, no data rows); "
            "check --input: an empty database would train on nothing"
        )
    utterances, skipped = _collect(spec, rows)
    encoded: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    truncated_ids: list[str] = []
    keep: list[_Utterance] = []
    bar = tqdm(total=len(utterances), desc="tokenising", unit="utt", disable=disabled(spec.progress))
    for start in range(0, len(utterances), _TOKENIZE_CHUNK):
        chunk = utterances[start : start + _TOKENIZE_CHUNK]
        enc = encode_text(tokenizer, [u.text for u in chunk])  # a typed [SEP] stays text
        for i, utt in enumerate(chunk):
            tokens, words, input_ids = enc.tokens(i), enc.word_ids(i), enc["input_ids"][i]
            if not input_ids:
                skipped.append({"row": utt.row.row, "id": utt.id, "reason": "no tokens after tokenisation"})
                continue
            if len(input_ids) > spec.max_len:
                truncated_ids.append(utt.id)
                tokens, words, input_ids = (
                    tokens[: spec.max_len],
                    words[: spec.max_len],
                    input_ids[: spec.max_len],
                )
            word_ids = np.asarray([-1 if w is None else w for w in words], dtype=np.int32)
            # the run-time MELM rule: every token of a word whose joined pieces the lexicon holds
            flags = (word_classes(tokens, list(word_ids), lexicon) > 0).astype(np.uint8)
            encoded.append((np.asarray(input_ids, dtype=np.int32), word_ids, flags))
            keep.append(utt)
        bar.update(len(chunk))
    bar.close()
    skipped.sort(key=lambda s: s["row"])
    if not keep:
        reasons = Counter(s["reason"] for s in skipped)
        raise UserError(
            f"{where}: every one of its {len(rows)} rows was skipped "
            f"({', '.join(f'{n} {r}' for r, n in reasons.items())}); check --text-col {spec.text_col!r}"
        )

    writer = DbWriter(spec.out, "txt", overwrite=spec.overwrite)
    try:
        for utt, (input_ids, word_ids, flags) in zip(keep, encoded):
            record: dict[str, Any] = {
                "input_ids": input_ids,
                "word_ids": word_ids,
                "emo_flags": flags,
                "text": utt.text,
                "labels": utt.labels,
            }
            if utt.soft is not None:
                record["soft_labels"] = utt.soft
            writer.put(utt.id, record, len(input_ids))
        lengths = [len(e[0]) for e in encoded]
        emo_tokens = int(sum(int(e[2].sum()) for e in encoded))
        meta = {
            "tokenizer": {
                "name": str(tokenizer.name_or_path),
                "vocab_hash": vocab_hash(tokenizer),
                **ids.to_dict(),
            },
            "source": {
                "path": None if spec.input is None else str(spec.input),
                "format": fmt,
                "encoding": spec.encoding,
                "id_columns": spec.id_cols,
                "id_prefix": spec.id_prefix,
                "text_column": spec.text_col,
                "rows": len(rows),
                **(spec.source_extra or {}),
            },
            "max_len": spec.max_len,
            "truncated": len(truncated_ids),
            "truncated_ids": truncated_ids,
            "length_histogram": length_histogram(lengths),
            "length_stats": length_stats(lengths),
            "tokens": int(sum(lengths)),
            "label_columns": spec.label_cols,
            "label_counts": _label_counts(keep, spec.label_cols),
            "soft_label_column": spec.soft_label_col,
            "soft_label_dim": None if not keep or keep[0].soft is None else len(keep[0].soft),
            "skipped": skipped,
            "lexicon": {**lexicon.info, "emotion_tokens": emo_tokens},
        }
        return writer.finish(meta)
    except BaseException:
        writer.abort()  # the build folder goes; the target keeps what it held before
        raise


def summary_lines(meta: dict[str, Any]) -> Iterator[str]:
    """The short report printed after a build."""
    stats = meta.get("length_stats", {})
    yield (
        f"text db {meta.get('source', {}).get('path')} -> {meta['count']} utterances "
        f"({meta.get('tokens', 0)} tokens, length min {stats.get('min')} / mean {stats.get('mean')} / "
        f"max {stats.get('max')})"
    )
    reasons = Counter(s["reason"] for s in meta.get("skipped", []))
    yield "skipped: " + (", ".join(f"{n} {r}" for r, n in reasons.items()) if reasons else "0")
    yield f"truncated to {meta.get('max_len')} tokens: {meta.get('truncated', 0)}"
    lex = meta.get("lexicon", {})
    yield f"lexicon: {lex.get('source')} ({lex.get('words')} words), {lex.get('emotion_tokens', 0)} emotion-word tokens"
    for col, counts in meta.get("label_counts", {}).items():
        yield (
            f"label {col}: "
            + ", ".join(f"{k}={v}" for k, v in list(counts.items())[:12])
            + (f", ... ({len(counts)} values)" if len(counts) > 12 else "")
        )
