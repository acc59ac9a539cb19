"""Recordings -> utterance segments -> decoded audio or video frames (PyAV, extra `uniter3m[media]`).

A *segment* is one utterance: a file, optionally cut by start/end seconds from a manifest CSV
(`id,path,start,end`; empty start/end = the whole file), so one long recording yields many
utterances. Work is grouped by file (`FileTask`): each file is opened and decoded once however
many segments it holds, which is what makes a one-hour recording with 800 utterances cheap.

Audio comes back mono float32 at the rate the extractor asks for (PyAV's resampler, any
container: wav, flac, mp3, mp4, mkv, avi, flv, webm). Video frames come back RGB uint8, sampled
at a chosen rate. Every failure names the file, the id and the fix (`UserError`).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from uniter3m.errors import UserError

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".flv", ".webm", ".mov", ".m4v")
MEDIA_SUFFIXES = AUDIO_SUFFIXES + VIDEO_SUFFIXES
END_TOLERANCE_S = 0.05  # an end this far past the decoded length is rounding, not an error


@dataclass(frozen=True)
class Segment:
    """One utterance: `path` cut to [start, end) seconds (None = from the beginning / to the end)."""

    id: str
    path: Path
    start: float | None = None
    end: float | None = None
    line: int | None = None  # manifest line, for error messages

    def where(self) -> str:
        cut = ""
        if self.start is not None or self.end is not None:
            cut = f" [{self.start or 0:g}-{'end' if self.end is None else f'{self.end:g}'} s]"
        line = f", manifest line {self.line}" if self.line else ""
        return f"{self.path}{cut} (id {self.id!r}{line})"


@dataclass
class FileTask:
    """The segments of one file, decoded together."""

    path: Path
    segments: list[Segment] = field(default_factory=list)


def _av():
    try:
        import av
    except ImportError as err:
        raise UserError(
            "decoding audio/video files needs PyAV: pip install 'uniter3m[media]' (or 'uniter3m[speech]')"
        ) from err
    return av


# --------------------------------------------------------------------------- listing


def folder_segments(path: Path, suffixes: Sequence[str]) -> tuple[list[Segment], list[str]]:
    """One segment per media file under `path` (id = relative path without suffix) and the other files.

    Every file is either used or returned as ignored (the caller reports them); two files with the
    same id (a.wav and a.mp4) are an error, not a silent overwrite.
    """
    if path.is_file():
        if path.suffix.lower() not in suffixes:
            raise UserError(f"{path} is not a media file this format reads ({', '.join(suffixes)})")
        return [Segment(path.stem, path)], []
    used: list[Segment] = []
    ignored: list[str] = []
    seen: dict[str, Path] = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path)
        if file.suffix.lower() not in suffixes:
            ignored.append(rel.as_posix())
            continue
        uid = rel.with_suffix("").as_posix()
        if uid in seen:
            raise UserError(
                f"{seen[uid]} and {file} both give the utterance id {uid!r}; rename one, or list the "
                "utterances in a --manifest CSV with their own ids"
            )
        seen[uid] = file
        used.append(Segment(uid, file))
    if not used:
        raise UserError(
            f"{path} holds no media file ({', '.join(suffixes)}); found {len(ignored)} other file(s) "
            f"{ignored[:5]}; check --input and --format"
        )
    return used, ignored


def _seconds(cell: str, what: str, manifest: Path, line: int) -> float | None:
    cell = cell.strip()
    if not cell:
        return None
    try:
        value = float(cell)
    except ValueError:
        raise UserError(
            f"{manifest}: line {line}, column {what!r} holds {cell!r}, not a number of seconds"
        ) from None
    if not math.isfinite(value) or value < 0:
        raise UserError(f"{manifest}: line {line}, column {what!r} holds {cell!r}; times are seconds >= 0")
    return value


def read_manifest(manifest: Path, base: Path | None = None) -> list[Segment]:
    """Segments from a CSV with columns id, path and optionally start, end (seconds).

    A relative path is resolved against `base` (default: the manifest's folder). An id listed
    twice, a start at or after its end, or a missing file is an error naming the line.
    """
    if not manifest.is_file():
        raise UserError(f"manifest {manifest} does not exist; check --manifest")
    base = manifest.parent if base is None else base
    try:
        with open(manifest, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"{manifest} cannot be read as a UTF-8 CSV ({err})") from err
    if not rows:
        raise UserError(f"{manifest} is empty; a header 'id,path,start,end' is expected")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in ("id", "path") if c not in header]
    if missing:
        raise UserError(
            f"{manifest} has no column {missing}; its header is {header}, expected 'id,path[,start,end]'"
        )
    col = {c: i for i, c in enumerate(header)}
    segments: list[Segment] = []
    first_line: dict[str, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise UserError(f"{manifest}: line {line} has {len(row)} fields, the header {len(header)}")
        uid, rel = row[col["id"]].strip(), row[col["path"]].strip()
        if not uid or not rel:
            raise UserError(f"{manifest}: line {line} has an empty id or path")
        if uid in first_line:
            raise UserError(
                f"{manifest}: id {uid!r} is on lines {first_line[uid]} and {line}; ids must be unique"
            )
        first_line[uid] = line
        start = _seconds(row[col["start"]], "start", manifest, line) if "start" in col else None
        end = _seconds(row[col["end"]], "end", manifest, line) if "end" in col else None
        if end is not None and end <= (start or 0.0):
            raise UserError(
                f"{manifest}: line {line} (id {uid!r}) has start {start or 0:g} s >= end {end:g} s; "
                "a segment needs end > start"
            )
        path = Path(rel)
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise UserError(f"{manifest}: line {line} (id {uid!r}) names {path}, which does not exist")
        segments.append(Segment(uid, path, start, end, line))
    if not segments:
        raise UserError(f"{manifest} lists no utterance")
    return segments


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """'K/N' (0 <= K < N; Slurm: --shard $SLURM_ARRAY_TASK_ID/N with --array=0-(N-1)) -> (K, N)."""
    if spec is None:
        return None
    try:
        k, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise UserError(f"--shard must look like K/N (e.g. 0/8), got {spec!r}") from None
    if n < 1 or not 0 <= k < n:
        raise UserError(f"--shard {spec}: K must satisfy 0 <= K < N (shards are numbered from 0)")
    return k, n


def file_tasks(segments: Sequence[Segment], shard: tuple[int, int] | None = None) -> list[FileTask]:
    """Group segments by file (first-appearance order); a shard takes every N-th file from the K-th.

    Sharding by file keeps a recording's segments together, so each file is decoded by one job.
    """
    tasks: dict[Path, FileTask] = {}
    for seg in segments:
        tasks.setdefault(seg.path, FileTask(seg.path)).segments.append(seg)
    out = list(tasks.values())
    if shard is not None:
        k, n = shard
        out = out[k::n]
    return out


# --------------------------------------------------------------------------- audio


def _open(av, path: Path, seg: Segment):
    try:
        return av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise UserError(
            f"{seg.where()} cannot be opened as media ({type(err).__name__}: {err}); the file is truncated "
            "or not audio/video: re-export it"
        ) from err


def decode_audio(task: FileTask, sample_rate: int) -> tuple[np.ndarray, int]:
    """The whole file's first audio track, mono float32 at `sample_rate`, and its native rate."""
    av = _av()
    seg = task.segments[0]
    container = _open(av, task.path, seg)
    with container:
        if not container.streams.audio:
            kinds = ", ".join(s.type for s in container.streams) or "no stream"
            raise UserError(
                f"{seg.where()} has no audio track (it holds: {kinds}); drop it from the input or use "
                "--format video for its faces"
            )
        stream = container.streams.audio[0]
        native = int(stream.codec_context.sample_rate or stream.rate or 0)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks: list[np.ndarray] = []
        offset: float | None = None
        try:
            for frame in container.decode(stream):
                if offset is None and frame.time is not None:
                    offset = max(float(frame.time), 0.0)
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
        except (av.FFmpegError, ValueError) as err:
            raise UserError(
                f"{seg.where()}: decoding the audio failed ({type(err).__name__}: {err}); the file is "
                "truncated or damaged: re-export it"
            ) from err
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if offset:  # a stream that starts late: keep file time, so manifest times mean the same in every file
        audio = np.concatenate([np.zeros(int(round(offset * sample_rate)), np.float32), audio])
    return audio.astype(np.float32, copy=False), native


def cut(audio: np.ndarray, sample_rate: int, seg: Segment) -> np.ndarray:
    """The samples of `seg` in a decoded file; an end past the file is an error naming its length."""
    duration = len(audio) / sample_rate
    if seg.end is not None and seg.end > duration + END_TOLERANCE_S:
        raise UserError(
            f"{seg.where()} ends at {seg.end:g} s but the audio lasts {duration:.3f} s; fix the manifest's end"
        )
    if seg.start is not None and seg.start >= duration:
        raise UserError(
            f"{seg.where()} starts at {seg.start:g} s but the audio lasts {duration:.3f} s; fix the manifest"
        )
    lo = 0 if seg.start is None else int(round(seg.start * sample_rate))
    hi = len(audio) if seg.end is None else min(len(audio), int(round(seg.end * sample_rate)))
    return audio[lo:hi]


def segment_audio(task: FileTask, sample_rate: int) -> list[tuple[Segment, np.ndarray, int]]:
    """(segment, mono float32 samples, native rate) for each segment of one file, decoding it once."""
    audio, native = decode_audio(task, sample_rate)
    return [(seg, cut(audio, sample_rate, seg), native) for seg in task.segments]


# --------------------------------------------------------------------------- video


def video_frames(task: FileTask, fps: float | None) -> Iterator[tuple[float, np.ndarray]]:
    """(time in seconds, RGB uint8 frame) of the first video track, about `fps` per second (None: all).

    Frames are sampled on a fixed time grid (k / fps), taking the first decoded frame at or after
    each grid point, so the rate does not depend on the file's own frame rate.
    """
    av = _av()
    seg = task.segments[0]
    container = _open(av, task.path, seg)
    with container:
        if not container.streams.video:
            kinds = ", ".join(s.type for s in container.streams) or "no stream"
            raise UserError(
                f"{seg.where()} has no video track (it holds: {kinds}); --format video reads faces from "
                "video files: use --format wav for audio"
            )
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        step = None if not fps else 1.0 / fps
        next_t = 0.0
        count = 0
        try:
            for i, frame in enumerate(container.decode(stream)):
                t = float(frame.time) if frame.time is not None else i / float(stream.average_rate or 25)
                if step is not None:
                    if t + 1e-6 < next_t:
                        continue
                    next_t = (math.floor(t / step + 1e-6) + 1) * step
                count += 1
                yield t, frame.to_ndarray(format="rgb24")
        except av.FFmpegError as err:
            raise UserError(
                f"{seg.where()}: decoding the video failed ({type(err).__name__}: {err}); the file is "
                "truncated or damaged: re-export it"
            ) from err
        if count == 0:
            raise UserError(
                f"{seg.where()} has a video track but no decodable frame; the file is empty or damaged: "
                "re-export it or leave it out"
            )


def in_segment(t: float, seg: Segment) -> bool:
    return (seg.start is None or t >= seg.start) and (seg.end is None or t < seg.end)
