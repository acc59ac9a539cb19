"""Utterances -> a feature LMDB (kind "feat", record layout in DEVELOPERS.md), in one streaming pass.

The utterances come from a `FrameSource`: feature files (`uniter3m.ingest.sources`: npz, h5, csv,
OpenFace), recordings (`uniter3m.ingest.recordings`: decode -> detect -> extract), or any iterable of
`Utterance` a caller makes (corpus recipes, per-speaker normalisation): `build_feat_db(spec, utterances)`.

Rules for imperfect input:
- NaN/Inf in frames or soft labels: an error naming the file, id and fix; with
  `nan_policy="drop"` the utterance is dropped instead and listed in meta `dropped`;
- a feature dimension that differs from the first utterance's: an error naming both files;
- an utterance with no frame left (no face found, every frame failed): KEPT as an empty (0, D)
  stream and counted in meta `empty` -- never a made-up zero frame;
- a value beyond the float16 range with `dtype="float16"`: an error (use float32 or rescale).

meta.json holds `mean`/`std` per dimension (population std, of the stored values, computed in
one streaming pass: per-utterance moments merged with Chan et al.'s formula in float64), so
loaders can normalise without a second pass. A constant dimension has std 0 (so has every
dimension of a database without any frame): loaders must floor it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uniter3m.data.store import DbWriter
from uniter3m.errors import UserError
from uniter3m.ingest.sources import FrameSource, Utterance, open_source
from uniter3m.ingest.text_db import length_histogram, length_stats
from uniter3m.progress import disabled

DTYPES = ("float16", "float32")
NAN_POLICIES = ("error", "drop")


# --------------------------------------------------------------------------- statistics


class RunningMoments:
    """Per-dimension mean and population variance over frames, merged one batch at a time.

    Chan, Golub & LeVeque's pairwise update in float64: exact to rounding, one pass, O(D) memory.
    """

    def __init__(self, dim: int):
        self.n = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self.m2 = np.zeros(dim, dtype=np.float64)

    def update(self, frames: np.ndarray) -> None:
        nb = frames.shape[0]
        if nb == 0:
            return
        frames = frames.astype(np.float64, copy=False)
        mean_b = frames.mean(axis=0)
        m2_b = ((frames - mean_b) ** 2).sum(axis=0)
        n = self.n + nb
        delta = mean_b - self.mean
        self.mean += delta * (nb / n)
        self.m2 += m2_b + delta**2 * (self.n * nb / n)
        self.n = n

    @property
    def std(self) -> np.ndarray:
        """Population std; zeros when no frame was seen (nothing to normalise, and never NaN in meta.json)."""
        return np.sqrt(self.m2 / self.n) if self.n else np.zeros_like(self.m2)


# --------------------------------------------------------------------------- building


@dataclass(kw_only=True)
class FeatDbSpec:
    """Where and how to store; `input`/`format` (and the csv/openface flags) name a feature-file source.

    With `build_feat_db(spec, utterances)` the input fields stay unset: the utterances are the source.
    """

    out: Path
    input: Path | None = None
    format: str | None = None  # npz | h5 | openface | csv
    id_cols: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    min_confidence: float | None = None
    dtype: str | None = None  # None: what the source needs (float32 for openSMILE, float16 otherwise)
    nan_policy: str = "error"
    overwrite: bool = False
    progress: bool | None = None  # None: tqdm decides (on for a terminal)


def nonfinite_detail(utt: Utterance) -> str | None:
    """Where an utterance holds NaN/Inf (frames first, then soft labels), or None when it holds none."""
    for what, values in (("frames", utt.feat), ("soft labels", utt.soft)):
        if values is not None and not np.all(np.isfinite(values)):
            bad = np.argwhere(~np.isfinite(values))
            return f"{len(bad)} NaN/Inf value(s) in its {what}, first at frame {bad[0][0]}, dim {bad[0][1]}"
    return None


def build_feat_db(
    spec: FeatDbSpec, utterances: FrameSource | Iterable[Utterance] | None = None
) -> dict[str, Any]:
    """Build the database in one streaming pass; returns the meta.json written.

    `utterances`: a `FrameSource` (recordings, a file source already opened), any iterable of
    `Utterance` (meta source `{"format": "records"}`), or None to open the files `spec` names.
    """
    from tqdm.auto import tqdm

    if spec.dtype is not None and spec.dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {spec.dtype!r}")
    if spec.nan_policy not in NAN_POLICIES:
        raise UserError(f"--nan-policy must be one of {', '.join(NAN_POLICIES)}, got {spec.nan_policy!r}")
    if utterances is None:
        source = open_source(spec.input, spec.format or "", spec.id_cols, spec.columns, spec.min_confidence)
    elif isinstance(utterances, FrameSource):
        source = utterances
    else:
        source = FrameSource(iter(utterances), {"path": None, "format": "records"})
    dtype_name = spec.dtype or source.dtype
    dtype = np.dtype(dtype_name)
    writer = DbWriter(spec.out, "feat", overwrite=spec.overwrite)
    first: Utterance | None = None
    stats: RunningMoments | None = None
    soft_dim: int | None = None
    dropped: list[dict[str, str]] = []
    empty_ids: list[str] = []
    frames_dropped: Counter[str] = Counter()
    frame_counts: list[int] = []
    try:
        for utt in tqdm(
            source.utterances,
            total=source.count,
            desc="features",
            unit="utt",
            disable=disabled(spec.progress),
        ):
            frames_dropped.update(utt.frames_dropped)
            if first is None:
                first, stats, soft_dim = utt, RunningMoments(utt.feat.shape[1]), _soft_dim(utt)
            _check_shapes(first, soft_dim, utt)
            problem = nonfinite_detail(utt)
            if problem is not None:
                if spec.nan_policy == "error":
                    raise UserError(
                        f"{utt.source}: utterance {utt.id!r} has {problem}; clean or re-extract the features, "
                        "or pass --nan-policy drop to drop such utterances (listed in meta.json 'dropped')"
                    )
                dropped.append({"id": utt.id, "reason": f"NaN/Inf: {problem}"})
                continue
            with np.errstate(over="ignore"):  # an overflow becomes inf, reported just below
                feat = utt.feat.astype(dtype)
            if not np.all(np.isfinite(feat)):
                raise UserError(
                    f"{utt.source}: utterance {utt.id!r} has values beyond the {dtype_name} range "
                    f"(|x| > {float(np.finfo(dtype).max):g}); pass --dtype float32 or rescale the features"
                )
            record: dict[str, Any] = {"feat": feat}
            if utt.soft is not None:
                record["soft_labels"] = utt.soft.astype(np.float32)
            stats.update(feat)
            if len(feat) == 0:
                empty_ids.append(utt.id)
            frame_counts.append(len(feat))
            writer.put(utt.id, record, len(feat))
        if first is None:
            raise UserError(
                f"{source.info.get('path') or 'the input'} holds no utterance; check --input and --format"
            )
        meta = {
            "dim": int(first.feat.shape[1]),
            "dtype": dtype_name,
            "frames": int(sum(frame_counts)),
            "frame_histogram": length_histogram(frame_counts),
            "frame_stats": length_stats(frame_counts),
            "mean": stats.mean.tolist(),
            "std": stats.std.tolist(),
            "soft_label_dim": soft_dim,
            "dropped": dropped,
            "empty": len(empty_ids),
            "empty_ids": empty_ids,
            "frames_dropped": dict(frames_dropped),
            "nan_policy": spec.nan_policy,
            "source": source.info,
        }
        return writer.finish(meta, source.files)
    except BaseException:
        writer.abort()
        for path in source.files.values():
            path.unlink(missing_ok=True)
        raise


def _soft_dim(utt: Utterance) -> int | None:
    return None if utt.soft is None else int(utt.soft.shape[1])


def _check_shapes(first: Utterance, soft_dim: int | None, utt: Utterance) -> None:
    dim = first.feat.shape[1]
    if utt.feat.shape[1] != dim:
        raise UserError(
            f"feature dimension {utt.feat.shape[1]} in {utt.source} (id {utt.id!r}) differs from {dim} in "
            f"{first.source} (id {first.id!r}); every utterance of one database needs the same features"
        )
    if (utt.soft is None) != (soft_dim is None):
        has, lacks = (utt, first) if utt.soft is not None else (first, utt)
        raise UserError(
            f"{has.source} (id {has.id!r}) has per-frame soft labels but {lacks.source} (id {lacks.id!r}) has "
            "none; give soft labels for every utterance or for none"
        )
    if utt.soft is not None:
        if utt.soft.shape[0] != utt.feat.shape[0]:
            raise UserError(
                f"{utt.source} (id {utt.id!r}) has {utt.feat.shape[0]} frames but {utt.soft.shape[0]} rows of "
                "soft labels; they need one row per frame"
            )
        if utt.soft.shape[1] != soft_dim:
            raise UserError(
                f"{utt.source} (id {utt.id!r}) has {utt.soft.shape[1]} soft-label classes but {first.source} has "
                f"{soft_dim}; every utterance needs the same classes"
            )


def summary_lines(meta: dict[str, Any]) -> Iterator[str]:
    """The short report printed after a build."""
    stats = meta.get("frame_stats", {})
    src = meta.get("source", {})
    yield (
        f"feature db {src.get('path')} ({src.get('format')}) -> {meta['count']} utterances, dim {meta.get('dim')}, "
        f"{meta.get('dtype')}, {meta.get('frames')} frames (per utterance min {stats.get('min')} / "
        f"mean {stats.get('mean')} / max {stats.get('max')})"
    )
    yield f"empty (zero-frame) utterances kept: {meta.get('empty', 0)}"
    reasons = Counter(d["reason"].split(":")[0] for d in meta.get("dropped", []))
    yield "dropped utterances: " + (", ".join(f"{n} {r}" for r, n in reasons.items()) if reasons else "0")
    frames = meta.get("frames_dropped") or {}
    if frames:
        yield "dropped frames: " + ", ".join(f"{n} {r}" for r, n in frames.items())
    if meta.get("soft_label_dim"):
        yield f"per-frame soft labels: {meta['soft_label_dim']} classes"
    extractor = src.get("extractor")
    if extractor:
        yield f"extractor: {extractor.get('name')} ({extractor.get('dim')}-d, {extractor.get('frame_rate')} frames/s)"
    if src.get("sample_rates"):
        yield "files by sample rate (Hz): " + ", ".join(f"{r}: {n}" for r, n in src["sample_rates"].items())
    if src.get("upsampled"):
        yield f"upsampled (recorded below the extractor's rate): {src['upsampled']} utterances"
    if src.get("faces_upscaled"):
        yield (
            f"faces upscaled (crop square under the extractor's {extractor.get('crop_size')} px input): "
            f"{src['faces_upscaled']} frames in {src.get('faces_upscaled_utterances')} utterances"
        )
    marks = src.get("landmarks")
    if marks:
        yield f"landmarks ({len(marks['names'])} per face) of {marks['utterances']} utterances in {marks['file']}"
    ignored = src.get("ignored_files") or []
    if ignored:
        more = f", ... (all {len(ignored)} in meta.json source.ignored_files)" if len(ignored) > 5 else ""
        yield f"ignored files (not read by --format {src.get('format')}): {len(ignored)}: {', '.join(ignored[:5])}{more}"
