"""Feature files -> utterances: the file sources of `build-feat-db` (`--format npz | h5 | openface | csv`).

Every source (these, the recordings of `uniter3m.ingest.recordings`, or records a caller makes) is a
`FrameSource`: a count, an iterator of `Utterance`, and a description for meta.json. The feature-db
builder (`uniter3m.ingest.feat_db`) takes any of them.

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
- `csv`: one CSV, one row per utterance holding one frame; `--id-col` names the id column(s)
  (several are joined with '_'); `--columns` picks the features, by default every column holding a
  number but the ids (a cell that is not a number in such a column is an error naming it; columns
  without any number are left out and printed). An empty cell is a missing value and counts as NaN.

A 1-D array is one frame. Any other file in an input folder is listed in meta `source.ignored_files`
and in the printed report, never skipped silently.
"""

from __future__ import annotations

import csv
import fnmatch
import logging
import zipfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uniter3m.errors import UserError

log = logging.getLogger(__name__)

FORMATS = ("npz", "h5", "openface", "csv")
MEDIA_FORMATS = ("wav", "video")  # recordings: `build-media-db`, uniter3m.ingest.recordings
OPENFACE_BOOKKEEPING = ("frame", "face_id", "timestamp", "confidence", "success")
SOFT_KEY = "soft_labels"


@dataclass
class Utterance:
    """One utterance from a source: frames (T, D) and optional per-frame soft labels (T, C), as float64.

    A 1-D array is one frame; anything that is not numbers or not 2-D is an error naming `source`.
    """

    id: str
    source: str  # where it came from, for error messages
    feat: np.ndarray
    soft: np.ndarray | None = None
    frames_dropped: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.feat = as_frames(np.asarray(self.feat), self.source, "the frames")
        if self.soft is not None:
            self.soft = as_frames(np.asarray(self.soft), self.source, "the soft labels")


@dataclass
class FrameSource:
    """Utterances with a known count (None: unknown, for the progress bar) and what meta.json says of them.

    `info` becomes meta.json `source` (it holds `path` and `format`); `dtype` is the storage dtype the
    source's values need when the caller does not choose one (openSMILE energies exceed float16);
    `files` ({name: path}, filled by the time the utterances are exhausted) are side files the database
    keeps beside meta.json (recordings: `landmarks.npz`).
    """

    utterances: Iterator[Utterance]
    info: dict[str, Any]
    count: int | None = None
    dtype: str = "float16"
    files: dict[str, Path] = field(default_factory=dict)


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

    info = {
        "path": str(path),
        "format": "npz",
        "files": len(files),
        "ignored_files": _ignored_files(path, ".npz"),
    }
    return FrameSource(read(), info, len(files))


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

    info = {"path": str(path), "format": "h5", "datasets": len(names), "with_soft_labels": len(soft_names)}
    return FrameSource(read(), info, len(names))


def _read_csv(file: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(header, cells as a (rows, cols) string array, the file line of each row); blank lines are skipped."""
    rows: list[list[str]] = []
    lines: list[int] = []
    try:
        with open(file, newline="", encoding="utf-8-sig") as f:  # a spreadsheet's UTF-8 BOM is not a header
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
        "path": str(path),
        "format": "openface",
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

    return FrameSource(read(), info, len(files))  # info["columns"] is filled in by the first file


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
        # a column with any number in it is a feature column: a bad cell in it is an error naming the
        # cell (dropping the column would change the feature dimension without a word)
        columns = [c for c in header if c not in id_cols and _any_number(cells[:, col[c]])]
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
    if ignored:
        log.warning(
            "%s: %d column(s) without numbers are not features and are left out: %s (choose with --columns)",
            path,
            len(ignored),
            ", ".join(ignored),
        )
    info = {"path": str(path), "format": "csv", "columns": columns, "ignored_columns": ignored}
    return FrameSource(read(), info, len(ids))


def _any_number(column: np.ndarray) -> bool:
    for v in column:
        try:
            float(v)
        except ValueError:
            continue
        return True
    return False


def _short(columns: Sequence[str]) -> str:
    return f"[{', '.join(columns[:6])}{', ...' if len(columns) > 6 else ''}] ({len(columns)})"


def open_source(
    path: Path | None,
    fmt: str,
    id_cols: Sequence[str] = (),
    columns: Sequence[str] = (),
    min_confidence: float | None = None,
) -> FrameSource:
    """Check that the flags fit the format and the input exists, then open the file source."""
    if fmt in MEDIA_FORMATS:
        raise UserError(
            f"--format {fmt} reads recordings: use `uniter3m build-media-db --format {fmt}` (decoding, "
            "face detection and an --extractor); build-feat-db packs feature files"
        )
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    misplaced = []
    if id_cols and fmt != "csv":
        misplaced.append("--id-col (csv only; other formats take the id from the file or dataset name)")
    if columns and fmt not in {"openface", "csv"}:
        misplaced.append("--columns (openface and csv only)")
    if min_confidence is not None and fmt != "openface":
        misplaced.append("--min-confidence (openface only)")
    if misplaced:
        raise UserError(f"--format {fmt} does not take " + "; ".join(misplaced))
    if path is None:
        raise UserError(f"--format {fmt} needs --input")
    if not path.exists():
        raise UserError(f"input {path} does not exist; check --input")
    if fmt == "npz":
        return npz_source(path)
    if fmt == "h5":
        return h5_source(path)
    if fmt == "openface":
        return openface_source(path, columns, min_confidence or 0.0)
    return csv_source(path, id_cols, columns)
