"""`uniter3m inspect DIR [--json] [--verify]`: what a database holds, from its meta.json and index.

`--verify` also reads every record and checks its CRC-32: the
damaged ids are listed and the exit status is 1 when any is found.

Opening goes through DbReader, so an interrupted build (no meta.json), a foreign folder or a
damaged index is reported as such. The lengths come from the index itself (not only from
meta.json), so the numbers shown are those of the records actually stored; works for databases
built by any tool that uses DbWriter, whatever extra keys its meta holds.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from uniter3m.data.store import DbReader
from uniter3m.fileio import json_default
from uniter3m.ingest.text_db import length_histogram, length_stats

_SHOW = 10  # skipped/dropped items listed in the human-readable view


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("db", type=Path, metavar="DIR", help="a database folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="read every record and check its checksum; list damaged ids, exit 1 when any",
    )


def describe(path: Path, verify: bool = False) -> dict[str, Any]:
    """meta.json, completed with what the index says (lengths) and the first record's layout;
    with `verify`, the result of reading every record under "verify" (see DbReader.verify)."""
    reader = DbReader(path)
    try:
        info: dict[str, Any] = {"path": str(path), **reader.meta}
        info["checksums"] = reader.meta.get("checksums")
        if verify:
            info["verify"] = reader.verify()
        info["count"] = len(reader)
        lengths = reader.lengths.tolist()
        unit = "frames" if reader.kind == "feat" else "tokens"
        info["lengths"] = {"unit": unit, **length_stats(lengths), "histogram": length_histogram(lengths)}
        damaged = {d["id"] for d in info.get("verify", {}).get("damaged", [])}
        intact = [i for i in reader.ids[:50] if i not in damaged]
        if intact:
            first = reader[intact[0]]
            info["record_layout"] = _layout(first)
            if reader.kind == "feat" and "dim" not in info and "feat" in first:
                info["dim"] = int(first["feat"].shape[-1])
        return info
    finally:
        reader.close()


def _layout(record: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in record.items():
        if isinstance(value, np.ndarray):
            out[key] = f"{value.dtype}{list(value.shape)}"
        elif isinstance(value, dict):
            out[key] = "{" + ", ".join(value) + "}"
        else:
            out[key] = type(value).__name__
    return out


def text_lines(info: dict[str, Any]) -> Iterator[str]:
    """The human-readable view."""
    yield f"{info['path']}: {info.get('kind')} database, {info['count']} utterances"
    lengths = info["lengths"]
    yield (
        f"{lengths['unit']} per utterance: min {lengths['min']}, mean {lengths['mean']}, p50 {lengths['p50']}, "
        f"p95 {lengths['p95']}, max {lengths['max']}"
    )
    yield from _histogram_lines(lengths["histogram"])
    if "record_layout" in info:
        yield "record: " + ", ".join(f"{k}={v}" for k, v in info["record_layout"].items())
    if info.get("kind") == "txt":
        yield from _text_db_lines(info)
    elif info.get("kind") == "feat":
        yield from _feat_db_lines(info)
    source = info.get("source")
    if isinstance(source, dict):
        yield "source: " + ", ".join(f"{k}={v}" for k, v in source.items() if not isinstance(v, (list, dict)))
    yield f"record checksums: {info['checksums']}"
    if "verify" in info:
        yield from _verify_lines(info["path"], info["verify"])


def _verify_lines(path: str, result: dict[str, Any]) -> Iterator[str]:
    bad = result["damaged"]
    yield (
        f"verify: {result['checked']} records read, {len(bad)} damaged, {len(result['missing'])} missing, "
        f"{result['unindexed']} not in the index"
    )
    for item in bad[:_SHOW]:
        yield f"  damaged {item['id']}: {item['reason']}"
    if len(bad) > _SHOW:
        yield f"  ... {len(bad) - _SHOW} more (--json lists them all)"
    for uid in result["missing"][:_SHOW]:
        yield f"  missing {uid}"
    if not verify_ok(result):
        yield f"rebuild {path} with --overwrite (or restore it from a copy)"


def _histogram_lines(histogram: dict[str, int]) -> Iterator[str]:
    if not histogram:
        return
    top = max(histogram.values()) or 1
    width = max(len(k) for k in histogram)
    for bucket, n in histogram.items():
        yield f"  {bucket:>{width}} | {'#' * max(1 if n else 0, round(30 * n / top)):<30} {n}"


def _text_db_lines(info: dict[str, Any]) -> Iterator[str]:
    tok = info.get("tokenizer") or {}
    if tok:
        yield (
            f"tokenizer: {tok.get('name')} (vocab {tok.get('vocab_size')}, hash {tok.get('vocab_hash')}; "
            f"cls {tok.get('cls_id')}, sep {tok.get('sep_id')}, mask {tok.get('mask_id')}, pad {tok.get('pad_id')}, "
            f"unk {tok.get('unk_id')})"
        )
    if "truncated" in info:
        yield f"truncated to {info.get('max_len')} tokens: {info['truncated']}"
    lex = info.get("lexicon") or {}
    if lex:
        yield f"lexicon: {lex.get('source')} ({lex.get('words')} words), {lex.get('emotion_tokens')} emotion-word tokens"
    for col, counts in (info.get("label_counts") or {}).items():
        total = sum(counts.values()) or 1
        shown = list(counts.items())[:20]
        yield f"label {col} ({len(counts)} values):"
        for value, n in shown:
            yield f"  {value}: {n} ({100 * n / total:.1f}%)"
        if len(counts) > len(shown):
            yield f"  ... {len(counts) - len(shown)} more values"
    if info.get("soft_label_dim"):
        yield f"utterance soft labels: {info['soft_label_dim']} classes"
    yield from _items(
        "skipped rows",
        info.get("skipped"),
        lambda s: f"row {s.get('row')} id {s.get('id')}: {s.get('reason')}",
    )


def _feat_db_lines(info: dict[str, Any]) -> Iterator[str]:
    yield f"dim {info.get('dim')}, dtype {info.get('dtype')}, frames {info.get('frames')}"
    mean, std = info.get("mean"), info.get("std")
    if mean and std:
        m = np.asarray([np.nan if v is None else v for v in mean], dtype=float)
        s = np.asarray([np.nan if v is None else v for v in std], dtype=float)
        if np.isfinite(m).any():
            yield (
                f"per-dimension mean in [{np.nanmin(m):.4g}, {np.nanmax(m):.4g}], std in [{np.nanmin(s):.4g}, "
                f"{np.nanmax(s):.4g}]; constant dimensions (std 0): {int(np.sum(s == 0))}"
            )
    if "empty" in info:
        yield f"empty (zero-frame) utterances: {info['empty']}"
    if info.get("soft_label_dim"):
        yield f"per-frame soft labels: {info['soft_label_dim']} classes"
    if info.get("frames_dropped"):
        yield "dropped frames: " + ", ".join(f"{n} {r}" for r, n in info["frames_dropped"].items())
    columns = (info.get("source") or {}).get("columns")
    if columns:
        yield f"columns ({len(columns)}): " + ", ".join(columns[:12]) + (", ..." if len(columns) > 12 else "")
    yield from _items(
        "dropped utterances", info.get("dropped"), lambda d: f"{d.get('id')}: {d.get('reason')}"
    )


def _items(title: str, items: list[dict[str, Any]] | None, fmt: Any) -> Iterator[str]:
    if items is None:
        return
    yield f"{title}: {len(items)}"
    for item in items[:_SHOW]:
        yield "  " + fmt(item)
    if len(items) > _SHOW:
        yield f"  ... {len(items) - _SHOW} more (see meta.json or --json)"


def verify_ok(result: dict[str, Any]) -> bool:
    return not (result["damaged"] or result["missing"] or result["unindexed"])


def run(args: argparse.Namespace) -> int:
    info = describe(args.db, verify=args.verify)
    if args.json:
        print(json.dumps(info, default=json_default))
    else:
        for line in text_lines(info):
            print(line)
    return 0 if "verify" not in info or verify_ok(info["verify"]) else 1
