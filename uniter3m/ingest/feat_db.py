"""Frame features (face or speech) -> a feature LMDB (kind "feat", record layout in DEVELOPERS.md).

Sources (`--format`):
- `npz`: a folder of .npz files (searched recursively), one utterance each; id = the path relative
  to the folder without `.npz` (the file stem for a flat folder). Frames are the array `feat`, or
  the file's only array; an extra array `soft_labels` (T, C) holds per-frame soft labels.
- `h5`: one HDF5 file, one dataset per utterance, groups allowed; id = the dataset path without the
  leading '/'. Per-frame soft labels live in the top-level group `soft_labels`, under the same
  path as the utterance (`/soft_labels/ses1/utt3` belongs to `/ses1/utt3`).
- `openface`: a folder of OpenFace 2.x CSVs (recursive; or one CSV), one utterance each, id as
  for npz. Frames with success == 0 or confidence below `--min-confidence` are dropped and
  counted; columns are picked by glob patterns (`AU*_r,pose_*,gaze_*`), by default every column
  but frame, face_id, timestamp, confidence and success.
- `wav`: a folder of audio or video files (wav, flac, mp3, mp4, mkv, avi, flv, webm, ...;
  recursive; or one file), one utterance each, id as for npz, or a `--manifest` CSV
  (`id,path,start,end`) cutting utterances out of longer recordings. Audio is decoded with PyAV,
  mono, resampled for the extractor: `compare` (default; openSMILE ComParE_2016 LLD + deltas,
  130-d, 10 ms: MEmoBERT's), `egemaps` (25-d) or `hf:DIR` (a local speech encoder). openSMILE
  extractors store float32 by default (ComParE energies exceed float16 on real speech).
- `video`: video files (or a manifest) -> one face per sampled frame (`--fps`), embedded by
  `--extractor geometric | pixels | hf:DIR`; frames without a face are skipped and counted.
  Both media formats are in `uniter3m.ingest.recordings`; any other file in an input folder is
  listed in meta `source.ignored_files` and in the printed report, never skipped silently.
- `csv`: one CSV, one row per utterance holding one frame; `--id-col` names the id column(s)
  (several are joined with '_'); `--columns` picks the features, by default every numeric column
  but the ids. An empty cell is a missing value and counts as NaN.

A 1-D array in npz/h5 is one frame. Rules for imperfect input:
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

import csv
import fnmatch
import zipfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uniter3m.data.store import DbWriter
from uniter3m.errors import UserError
from uniter3m.ingest.recordings import MediaOptions, default_dtype, media_source
from uniter3m.ingest.text_db import discard_partial, length_histogram, length_stats, tqdm_disable

FORMATS = ("npz", "h5", "openface", "csv", "wav", "video")
MEDIA_FORMATS = ("wav", "video")
DTYPES = ("float16", "float32")
NAN_POLICIES = ("error", "drop")
OPENFACE_BOOKKEEPING = ("frame", "face_id", "timestamp", "confidence", "success")
SOFT_KEY = "soft_labels"


@dataclass
class Utterance:
    """One utterance from a source: frames as float64 (T, D), before any check."""

    id: str
    source: str  # where it came from, for error messages
    feat: np.ndarray
    soft: np.ndarray | None = None
    frames_dropped: Counter[str] = field(default_factory=Counter)


@dataclass
class FrameSource:
    """An iterable of utterances with a known count (for the progress bar) and a description."""

    count: int
    utterances: Iterator[Utterance]
    info: dict[str, Any]


# --------------------------------------------------------------------------- helpers


def parse_patterns(spec: str | None) -> list[str]:
    return [p.strip() for p in (spec or "").split(",") if p.strip()]


def select_columns(
    path: Path, header: Sequence[str], patterns: Sequence[str], exclude: Sequence[str]
) -> list[str]:
    """Columns matching the glob patterns, in pattern order then file order; a pattern matching nothing is an error."""
    chosen: dict[str, None] = {}
    for pattern in patterns:
        hits = [c for c in header if c not in exclude and fnmatch.fnmatchcase(c, pattern)]
        if not hits:
            raise UserError(
                f"{path}: --columns pattern {pattern!r} matches no column; the columns are: "
                f"{', '.join(c for c in header if c not in exclude)}"
            )
        chosen.update(dict.fromkeys(hits))
    return list(chosen)


def to_float(cells: np.ndarray, path: Path, columns: Sequence[str], lines: np.ndarray) -> np.ndarray:
    """Parse a (rows, cols) array of strings (`lines`: each row's file line); empty cells become NaN."""
    cells = np.char.strip(cells.astype(str))
    cells = np.where(cells == "", "nan", cells)
    try:
        return cells.astype(np.float64)
    except ValueError:
        for r, c in np.ndindex(cells.shape):
            try:
                float(cells[r, c])
            except ValueError:
                raise UserError(
                    f"{path}: line {lines[r]}, column {columns[c]!r} holds {str(cells[r, c])!r}, "
                    "which is not a number; fix the file or leave that column out with --columns"
                ) from None
        raise


def as_frames(array: np.ndarray, source: str, what: str) -> np.ndarray:
    """A numeric (T, D) float64 array; a 1-D array is one frame."""
    if array.dtype.kind not in "biuf":
        raise UserError(f"{source}: {what} has dtype {array.dtype}, not numbers; store float frames")
    if array.ndim == 1:
        if array.size == 0:
            raise UserError(f"{source}: {what} is an empty 1-D array; store an empty stream as shape (0, D)")
        array = array[None, :]
    if array.ndim != 2:
        raise UserError(
            f"{source}: {what} has shape {array.shape}; frames must be (T, D), one row per frame "
            "(flatten each frame's features)"
        )
    return np.asarray(array, dtype=np.float64)


def _files(path: Path, suffixes: str | tuple[str, ...]) -> list[tuple[str, Path]]:
    """(id, file) pairs: one file, or every file with one of `suffixes` under a folder (id = relative path, no suffix)."""
    if path.is_file():
        return [(path.stem, path)]
    suffixes = (suffixes,) if isinstance(suffixes, str) else suffixes
    files = sorted(p for suffix in suffixes for p in path.rglob(f"*{suffix}") if p.is_file())
    if not files:
        raise UserError(f"{path} holds no {' or '.join(suffixes)} file; check --input and --format")
    return [(p.relative_to(path).with_suffix("").as_posix(), p) for p in files]


def _ignored_files(path: Path, suffixes: str | tuple[str, ...]) -> list[str]:
    """Files under a folder that a format does not read: reported, never skipped silently."""
    if path.is_file():
        return []
    suffixes = (suffixes,) if isinstance(suffixes, str) else suffixes
    return sorted(
        p.relative_to(path).as_posix()
        for p in path.rglob("*")
        if p.is_file() and not any(p.name.endswith(s) for s in suffixes)
    )


# --------------------------------------------------------------------------- sources


def npz_source(path: Path) -> FrameSource:
    files = _files(path, ".npz")

    def read() -> Iterator[Utterance]:
        for uid, file in files:
            try:
                with np.load(file, allow_pickle=False) as data:
                    arrays = {k: data[k] for k in data.files}
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
                raise UserError(
                    f"{file} (id {uid!r}) is not a readable .npz file ({err}); re-export it"
                ) from err
            frame_keys = [k for k in arrays if k != SOFT_KEY]
            if "feat" in arrays:
                key = "feat"
            elif len(frame_keys) == 1:
                key = frame_keys[0]
            else:
                raise UserError(
                    f"{file} (id {uid!r}) holds arrays {sorted(arrays)}; store the frames under the key 'feat' "
                    f"(and per-frame soft labels under '{SOFT_KEY}')"
                )
            feat = as_frames(arrays[key], str(file), f"array {key!r}")
            soft = arrays.get(SOFT_KEY)
            soft = None if soft is None else as_frames(soft, str(file), f"array {SOFT_KEY!r}")
            yield Utterance(uid, str(file), feat, soft)

    info = {"files": len(files), "ignored_files": _ignored_files(path, ".npz")}
    return FrameSource(len(files), read(), info)


def h5_source(path: Path) -> FrameSource:
    import h5py

    if not path.is_file():
        raise UserError(f"{path} is not a file; --format h5 reads one HDF5 file")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise UserError(f"{path} is not a readable HDF5 file ({err}); check --input and --format") from err
    names: list[str] = []
    soft_names: dict[str, str] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            if name.startswith(f"{SOFT_KEY}/"):
                soft_names[name[len(SOFT_KEY) + 1 :]] = name
            else:
                names.append(name)

    handle.visititems(visit)
    if not names:
        handle.close()
        raise UserError(f"{path} holds no dataset; one dataset per utterance is expected")
    orphans = sorted(set(soft_names) - set(names))
    if orphans:
        handle.close()
        raise UserError(
            f"{path}: soft labels {', '.join('/' + soft_names[o] for o in orphans[:5])} have no utterance "
            f"dataset of the same path (e.g. /{orphans[0]}); fix the names in the file"
        )

    def read() -> Iterator[Utterance]:
        with handle:
            for name in names:
                where = f"{path}:/{name}"
                feat = as_frames(np.asarray(handle[name][()]), where, "the dataset")
                soft = None
                if name in soft_names:
                    soft_where = f"{path}:/{soft_names[name]}"
                    soft = as_frames(np.asarray(handle[soft_names[name]][()]), soft_where, "the soft labels")
                yield Utterance(name, where, feat, soft)

    return FrameSource(len(names), read(), {"datasets": len(names), "with_soft_labels": len(soft_names)})


def _read_csv(file: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(header, cells as a (rows, cols) string array, the file line of each row); blank lines are skipped."""
    rows: list[list[str]] = []
    lines: list[int] = []
    try:
        with open(file, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            start = 1
            for r in reader:
                if r:
                    rows.append(r)
                    lines.append(start)
                start = reader.line_num + 1
    except UnicodeDecodeError as err:
        raise UserError(f"{file} is not UTF-8 text ({err}); is it really a CSV?") from err
    except csv.Error as err:
        raise UserError(f"{file} cannot be parsed as CSV ({err})") from err
    if not rows:
        raise UserError(f"{file} is empty; a header row is expected")
    header = [h.strip() for h in rows[0]]
    bad = [line for line, r in zip(lines[1:], rows[1:]) if len(r) != len(header)]
    if bad:
        raise UserError(
            f"{file}: line {bad[0]} has a different number of fields than the header ({len(header)}); "
            "the file is truncated or damaged"
        )
    cells = np.array(rows[1:], dtype=str).reshape(len(rows) - 1, len(header))
    return header, cells, np.asarray(lines[1:], dtype=np.int64)


def openface_source(path: Path, patterns: Sequence[str], min_confidence: float) -> FrameSource:
    files = _files(path, ".csv")
    first: dict[str, Any] = {}
    info: dict[str, Any] = {
        "files": len(files),
        "min_confidence": min_confidence,
        "patterns": list(patterns),
        "ignored_files": _ignored_files(path, ".csv"),
    }

    def read() -> Iterator[Utterance]:
        for uid, file in files:
            header, cells, lines = _read_csv(file)
            missing = [c for c in ("success", "confidence") if c not in header]
            if missing:
                raise UserError(
                    f"{file} (id {uid!r}) has no {' or '.join(missing)} column; is it OpenFace 2.x output? "
                    "Use --format csv for other tables"
                )
            exclude = [c for c in OPENFACE_BOOKKEEPING if c in header]
            columns = (
                select_columns(file, header, patterns, exclude)
                if patterns
                else [c for c in header if c not in exclude]
            )
            if not first:
                first.update(file=file, columns=columns)
                info["columns"] = columns
            elif columns != first["columns"]:
                raise UserError(
                    f"{file} (id {uid!r}) yields columns {_short(columns)} but {first['file']} yields "
                    f"{_short(first['columns'])}; export every file with the same OpenFace settings"
                )
            col = {c: i for i, c in enumerate(header)}
            status = to_float(
                cells[:, [col["success"], col["confidence"]]], file, ["success", "confidence"], lines
            )
            if not np.all(np.isfinite(status)):
                raise UserError(
                    f"{file} (id {uid!r}): success/confidence hold NaN or empty cells; re-export it"
                )
            failed = status[:, 0] == 0
            unsure = ~failed & (status[:, 1] < min_confidence)
            keep = ~failed & ~unsure
            feat = to_float(cells[keep][:, [col[c] for c in columns]], file, columns, lines[keep])
            if "face_id" in col and keep.any():
                faces = np.unique(cells[keep, col["face_id"]])
                if len(faces) > 1:
                    raise UserError(
                        f"{file} (id {uid!r}) tracks {len(faces)} faces (face_id {', '.join(faces[:5])}); "
                        "keep one face per utterance (e.g. the speaker's) before importing"
                    )
            dropped = Counter(
                {"success == 0": int(failed.sum()), f"confidence < {min_confidence}": int(unsure.sum())}
            )
            yield Utterance(uid, str(file), feat.reshape(len(feat), len(columns)), None, +dropped)

    return FrameSource(len(files), read(), info)  # info["columns"] is filled in by the first file


def csv_source(path: Path, id_cols: Sequence[str], patterns: Sequence[str]) -> FrameSource:
    if not path.is_file():
        raise UserError(f"{path} is not a file; --format csv reads one CSV with one row per utterance")
    if not id_cols:
        raise UserError("--format csv needs --id-col (the column(s) holding the utterance id)")
    header, cells, lines = _read_csv(path)
    missing = [c for c in id_cols if c not in header]
    if missing:
        raise UserError(f"{path} has no --id-col column {missing}; its columns are: {', '.join(header)}")
    col = {c: i for i, c in enumerate(header)}
    if patterns:
        columns = select_columns(path, header, patterns, id_cols)
    else:
        columns = [c for c in header if c not in id_cols and _numeric(cells[:, col[c]])]
        if not columns:
            raise UserError(f"{path} has no numeric column besides the id; name the features with --columns")
    values = to_float(cells[:, [col[c] for c in columns]], path, columns, lines)
    ids = ["_".join(cells[r, col[c]].strip() for c in id_cols) for r in range(len(cells))]
    seen: dict[str, int] = {}
    for r, uid in enumerate(ids):
        if not uid.strip("_"):
            raise UserError(
                f"{path}: line {lines[r]} has an empty id; fill in the {'/'.join(id_cols)} column"
            )
        if uid in seen:
            raise UserError(
                f"{path}: id {uid!r} appears on lines {lines[seen[uid]]} and {lines[r]}; ids must be unique "
                "(add a column to --id-col)"
            )
        seen[uid] = r

    def read() -> Iterator[Utterance]:
        for r, uid in enumerate(ids):
            yield Utterance(uid, f"{path} line {lines[r]}", values[r : r + 1])

    ignored = [c for c in header if c not in columns and c not in id_cols]
    return FrameSource(len(ids), read(), {"columns": columns, "ignored_columns": ignored})


def _numeric(column: np.ndarray) -> bool:
    values = [v.strip() for v in column if v.strip()]
    if not values:
        return False
    try:
        np.array(values).astype(np.float64)
    except ValueError:
        return False
    return True


def _short(columns: Sequence[str]) -> str:
    return f"[{', '.join(columns[:6])}{', ...' if len(columns) > 6 else ''}] ({len(columns)})"


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


@dataclass
class FeatDbSpec:
    """What to read and how to store it (mirrors the CLI flags)."""

    input: Path | None
    format: str
    out: Path
    id_cols: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    min_confidence: float | None = None
    dtype: str | None = None  # None: float32 for openSMILE speech features, float16 otherwise
    nan_policy: str = "error"
    overwrite: bool = False
    progress: bool | None = None  # None: tqdm decides (on for a terminal)
    media: MediaOptions | None = None  # wav/video: extractor, manifest, workers, shard, face options

    def resolved_dtype(self) -> str:
        if self.dtype is not None:
            return self.dtype
        return default_dtype(self.format, self.media.extractor if self.media else None)


def open_source(spec: FeatDbSpec) -> FrameSource:
    """Check that the flags fit the format and the input exists, then open the source."""
    if spec.format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {spec.format!r}")
    if spec.dtype is not None and spec.dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {spec.dtype!r}")
    if spec.nan_policy not in NAN_POLICIES:
        raise UserError(f"--nan-policy must be one of {', '.join(NAN_POLICIES)}, got {spec.nan_policy!r}")
    misplaced = []
    if spec.id_cols and spec.format != "csv":
        misplaced.append("--id-col (csv only; other formats take the id from the file or dataset name)")
    if spec.columns and spec.format not in {"openface", "csv"}:
        misplaced.append("--columns (openface and csv only)")
    if spec.min_confidence is not None and spec.format != "openface":
        misplaced.append("--min-confidence (openface only)")
    if spec.media is not None and spec.format not in MEDIA_FORMATS:
        misplaced.append(
            "--extractor/--manifest/--workers/--shard and the other recording flags (wav, video only)"
        )
    if misplaced:
        raise UserError(f"--format {spec.format} does not take " + "; ".join(misplaced))
    if spec.input is not None and not spec.input.exists():
        raise UserError(f"input {spec.input} does not exist; check --input")
    if spec.format in MEDIA_FORMATS:
        count, utterances, info = media_source(spec.format, spec.input, spec.media or MediaOptions())
        return FrameSource(count, utterances, info)
    if spec.input is None:
        raise UserError(f"--format {spec.format} needs --input")
    if spec.format == "npz":
        return npz_source(spec.input)
    if spec.format == "h5":
        return h5_source(spec.input)
    if spec.format == "openface":
        return openface_source(spec.input, spec.columns, spec.min_confidence or 0.0)
    return csv_source(spec.input, spec.id_cols, spec.columns)


def nonfinite_detail(utt: Utterance) -> str | None:
    """Where an utterance holds NaN/Inf (frames first, then soft labels), or None when it holds none."""
    for what, values in (("frames", utt.feat), ("soft labels", utt.soft)):
        if values is not None and not np.all(np.isfinite(values)):
            bad = np.argwhere(~np.isfinite(values))
            return f"{len(bad)} NaN/Inf value(s) in its {what}, first at frame {bad[0][0]}, dim {bad[0][1]}"
    return None


def build_feat_db(spec: FeatDbSpec) -> dict[str, Any]:
    """Build the database described by `spec` in one streaming pass; returns the meta.json written."""
    from tqdm.auto import tqdm

    source = open_source(spec)
    dtype_name = spec.resolved_dtype()
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
            disable=tqdm_disable(spec.progress),
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
            raise UserError(f"{spec.input} holds no utterance; check --input and --format")
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
            "source": {
                "path": None if spec.input is None else str(spec.input),
                "format": spec.format,
                **source.info,
            },
        }
        return writer.finish(meta)
    except BaseException:
        discard_partial(writer)
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
    if src.get("upsampled"):
        yield f"upsampled (recorded below the extractor's rate): {src['upsampled']} utterances"
    ignored = src.get("ignored_files") or []
    if ignored:
        more = f", ... (all {len(ignored)} in meta.json source.ignored_files)" if len(ignored) > 5 else ""
        yield f"ignored files (not read by --format {src.get('format')}): {len(ignored)}: {', '.join(ignored[:5])}{more}"
