"""Join feature databases (the shards of `build-media-db --shard K/N`) into one.

Every input must be complete (its meta.json exists) and hold the same kind of features: same
dim, dtype, soft-label classes and extractor. Ids must be unique across the inputs (an id in
two shards is an error naming both). The statistics (`mean`, `std`, histograms, counts) are
recomputed from the stored frames, `dropped`/`empty_ids`/`frames_dropped` are joined, and when
the inputs carry shard numbers every shard K/N must be present once (else `allow_partial`).
Like every build, the output gets its meta.json last: an interrupted merge is never complete.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from uniter3m.data.store import DbReader, DbWriter
from uniter3m.errors import DatabaseError
from uniter3m.ingest.feat_db import RunningMoments
from uniter3m.ingest.text_db import length_histogram, length_stats

SAME = ("dim", "dtype", "soft_label_dim")


def _extractor(meta: dict[str, Any]) -> Any:
    ext = dict(meta.get("source", {}).get("extractor") or {})
    for key in ("device", "precision"):  # where it ran does not change what it computes
        ext.pop(key, None)
    return ext


def check_shards(paths: list[Path], metas: list[dict[str, Any]], allow_partial: bool) -> None:
    shards = [m.get("source", {}).get("shard") for m in metas]
    if not any(shards):
        return
    ns = {s.split("/")[1] for s in shards if s}
    if None in shards or len(ns) != 1:
        raise DatabaseError(f"inputs mix shard settings {shards}; merge the shards of one --shard K/N run")
    n = int(ns.pop())
    count = Counter(int(s.split("/")[0]) for s in shards)
    twice = sorted(k for k, c in count.items() if c > 1)
    if twice:
        raise DatabaseError(f"shard {twice[0]}/{n} is given more than once; pass each shard once")
    missing = sorted(set(range(n)) - set(count))
    if missing and not allow_partial:
        raise DatabaseError(
            f"shards {', '.join(f'{k}/{n}' for k in missing)} are missing; build them, or pass --allow-partial"
        )


def merge_feat_dbs(
    out: Path, inputs: list[Path], overwrite: bool = False, allow_partial: bool = False
) -> dict:
    """Join feature databases into `out` and return its meta."""
    readers = [DbReader(p) for p in inputs]
    first = readers[0]
    for r in readers:
        if r.kind != "feat":
            raise DatabaseError(f"{r.path} is a {r.kind!r} database; merge-db joins feature databases")
        for key in SAME:
            if r.meta.get(key) != first.meta.get(key):
                raise DatabaseError(
                    f"{r.path} has {key} {r.meta.get(key)!r} but {first.path} has {first.meta.get(key)!r}; "
                    "only databases of the same features can be merged"
                )
        if _extractor(r.meta) != _extractor(first.meta):
            raise DatabaseError(
                f"{r.path} was built with extractor {_extractor(r.meta)} but {first.path} with "
                f"{_extractor(first.meta)}; rebuild one of them with the same settings"
            )
    check_shards(inputs, [r.meta for r in readers], allow_partial)
    owner: dict[str, Path] = {}
    for r in readers:
        for uid in r.ids:
            if uid in owner:
                raise DatabaseError(f"id {uid!r} is in {owner[uid]} and in {r.path}; ids must be unique")
            owner[uid] = r.path
    writer = DbWriter(out, "feat", overwrite=overwrite)
    try:
        stats = RunningMoments(int(first.meta["dim"]))
        frames: list[int] = []
        for r in readers:
            for uid in r.ids:
                record = r[uid]
                stats.update(record["feat"])
                frames.append(len(record["feat"]))
                writer.put(uid, dict(record), len(record["feat"]))
        dropped_frames: Counter[str] = Counter()
        for r in readers:
            dropped_frames.update(r.meta.get("frames_dropped") or {})
        source = dict(first.meta.get("source") or {})
        source.update(
            merged=[str(p) for p in inputs],
            shard=None,
            ignored_files=list(
                dict.fromkeys(f for r in readers for f in r.meta.get("source", {}).get("ignored_files") or [])
            ),
        )
        for key in ("segments", "files", "upsampled", "faces_upscaled", "faces_upscaled_utterances"):
            if key in source:
                source[key] = sum(int(r.meta.get("source", {}).get(key) or 0) for r in readers)
        for key in ("upsampled_ids", "faces_upscaled_ids"):
            if key in source:
                source[key] = [i for r in readers for i in r.meta.get("source", {}).get(key) or []][:100]
        if "sample_rates" in source:
            rates: Counter[str] = Counter()
            for r in readers:
                rates.update(r.meta.get("source", {}).get("sample_rates") or {})
            source["sample_rates"] = dict(sorted(rates.items()))
        if source.get("landmarks"):
            source["landmarks"] = None  # each shard's landmarks.npz stays in its own folder
        meta = {
            **{k: first.meta.get(k) for k in SAME},
            "frames": int(sum(frames)),
            "frame_histogram": length_histogram(frames),
            "frame_stats": length_stats(frames),
            "mean": stats.mean.tolist(),
            "std": stats.std.tolist(),
            "dropped": [d for r in readers for d in r.meta.get("dropped", [])],
            "empty": sum(int(r.meta.get("empty", 0)) for r in readers),
            "empty_ids": [i for r in readers for i in r.meta.get("empty_ids", [])],
            "frames_dropped": dict(dropped_frames),
            "nan_policy": first.meta.get("nan_policy"),
            "source": source,
        }
        return writer.finish(meta)
    except BaseException:
        writer.abort()
        raise
