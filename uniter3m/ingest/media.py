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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uniter3m.errors import UserError

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".flv", ".webm", ".mov", ".m4v")
MEDIA_SUFFIXES = AUDIO_SUFFIXES + VIDEO_SUFFIXES
END_TOLERANCE_S = 0.05  # an end this far past the decoded length is rounding, not an error
# a track decoding this much shorter than its container declares is truncated (`check_complete`)
TRUNCATION_TOLERANCE = 0.05
TRUNCATION_TOLERANCE_S = 0.25


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


@contextmanager
def _first_track(av, task: FileTask, kind: str, fix: str) -> Iterator[tuple[Any, Any]]:
    """(open container, its first `kind` stream) of a file, closed on exit; a file without such a
    track is an error naming what it holds and `fix` (what to pass instead)."""
    seg = task.segments[0]
    with _open(av, task.path, seg) as container:
        streams = getattr(container.streams, kind)
        if not streams:
            kinds = ", ".join(s.type for s in container.streams) or "no stream"
            raise UserError(f"{seg.where()} has no {kind} track (it holds: {kinds}); {fix}")
        yield container, streams[0]


def probe(path: Path) -> dict[str, float]:
    """{"audio" | "video": seconds} of the tracks a file holds (the container's duration for a track
    that declares none)."""
    av = _av()
    with _open(av, path, Segment(path.stem, path)) as container:
        whole = container.duration / av.time_base if container.duration else 0.0
        out: dict[str, float] = {}
        for s in container.streams:
            if s.type in ("audio", "video") and s.type not in out:
                out[s.type] = float(s.duration * s.time_base) if s.duration and s.time_base else float(whole)
    return out


def decode_audio(task: FileTask, sample_rate: int | None) -> tuple[np.ndarray, int]:
    """The whole file's first audio track, mono float32 at `sample_rate` (None: its own), and its native rate."""
    av = _av()
    seg = task.segments[0]
    fix = "drop it from the input or use --format video for its faces"
    with _first_track(av, task, "audio", fix) as (container, stream):
        declared = declared_seconds(av, container, stream)
        native = int(stream.codec_context.sample_rate or stream.rate or 0)
        if sample_rate is None and not native:
            raise UserError(
                f"{seg.where()}: its audio track declares no sample rate, so it cannot be read at its own "
                "rate; re-export it (e.g. ffmpeg -i IN -ar 16000 OUT.wav)"
            )
        sample_rate = sample_rate or native
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
    check_complete(seg, "audio", len(audio) / sample_rate, declared)
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


def segment_audio(task: FileTask, sample_rate: int | None) -> list[tuple[Segment, np.ndarray, int]]:
    """(segment, mono float32 samples, native rate) for each segment of one file, decoding it once.

    The samples are at `sample_rate`, or at the file's native rate when it is None.
    """
    audio, native = decode_audio(task, sample_rate)
    return [(seg, cut(audio, sample_rate or native, seg), native) for seg in task.segments]


# --------------------------------------------------------------------------- video


def video_frames(task: FileTask, fps: float | None) -> Iterator[tuple[float, np.ndarray]]:
    """(time in seconds, RGB uint8 frame) of the first video track, about `fps` per second (None: all).

    Frames are sampled on a fixed time grid (k / fps), taking the first decoded frame at or after
    each grid point, so the rate does not depend on the file's own frame rate.
    """
    av = _av()
    seg = task.segments[0]
    fix = "--format video reads faces from video files: use --format wav for audio"
    with _first_track(av, task, "video", fix) as (container, stream):
        stream.thread_type = "AUTO"
        declared = declared_seconds(av, container, stream)
        interval = 1.0 / float(stream.average_rate or 25)
        step = None if not fps else 1.0 / fps
        next_t = 0.0
        count = 0
        last = None
        try:
            for i, frame in enumerate(container.decode(stream)):
                t = float(frame.time) if frame.time is not None else i * interval
                last = t
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
        start = float(stream.start_time * stream.time_base) if stream.start_time and stream.time_base else 0.0
        check_complete(seg, "video", (last or 0.0) - start + interval, declared)


def declared_seconds(av: Any, container: Any, stream: Any) -> float | None:
    """How long a track says it is: its own duration, else the container's; None when neither is known.

    For a wav file, FFmpeg derives the duration from the file's size, so a cut copy looks whole: the
    length its RIFF header declares is used instead."""
    if container.format.name == "wav":
        return _riff_seconds(Path(container.name))
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return float(container.duration / av.time_base)
    return None


def _riff_seconds(path: Path) -> float | None:
    """The data length a RIFF/WAVE header declares, in seconds (None: not a plain RIFF header, or a
    streaming writer's placeholder size)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return None
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    at, byte_rate = 12, 0
    while at + 8 <= len(head):
        chunk, size = head[at : at + 4], int.from_bytes(head[at + 4 : at + 8], "little")
        if chunk == b"fmt " and at + 20 <= len(head):
            byte_rate = int.from_bytes(head[at + 16 : at + 20], "little")
        if chunk == b"data":
            return size / byte_rate if byte_rate and 0 < size < 0xFFFFFFFF else None
        at += 8 + size + (size & 1)
    return None


def check_complete(seg: Segment, what: str, decoded: float, declared: float | None) -> None:
    """A track that decodes to less than its container declares is truncated (a cut copy, an interrupted
    download): an error, never a shorter utterance. Tolerance: TRUNCATION_TOLERANCE of it, at least
    TRUNCATION_TOLERANCE_S (encoder delays, a last frame's length)."""
    if declared is None:
        return
    if decoded < declared - max(TRUNCATION_TOLERANCE_S, TRUNCATION_TOLERANCE * declared):
        raise UserError(
            f"{seg.where()}: its {what} track declares {declared:.3f} s but only {decoded:.3f} s decode; the file "
            "is truncated (a cut copy or an interrupted download): copy it again or re-export it"
        )


def in_segment(t: float, seg: Segment) -> bool:
    return (seg.start is None or t >= seg.start) and (seg.end is None or t < seg.end)
