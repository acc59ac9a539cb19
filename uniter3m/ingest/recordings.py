"""Recordings -> utterances: the media source of `build-media-db` (decode -> detect faces -> extract).

`--format wav` (any audio or video container): each utterance's audio, mono at the extractor's
`sample_rate` (None: the file's own, passed with the samples), goes to a speech extractor; meta
`source.sample_rates` counts the files' native rates, `upsampled` the utterances recorded below the
extractor's rate. `--format video`: frames sampled at `--fps`, one face kept per frame (`--detector`,
`uniter3m.ingest.faces`), cropped at the extractor's `crop_size`/`colour`; each utterance's
`FaceTrack` (crops, boxes, landmarks, times) goes to a face extractor. Extractors come from the
registry (`uniter3m.ingest.extractors`, `--extractor NAME[:ARG]`): defaults `compare` (wav) and
`geometric` (video). Frames without a face are skipped and counted (meta `frames_dropped`); an
utterance without any is kept as an empty stream. A face whose crop square is smaller than the
extractor's input is upscaled and counted (meta `source.faces_upscaled`). With a detector that has
landmarks (mtcnn, blazeface) the landmarks, boxes and times of the first `--landmarks-keep`
utterances go to `landmarks.npz` beside meta.json (`uniter3m.ingest.align.LandmarkWriter`; meta
`source.landmarks`), for drawing them over the video.

Work unit = one file with all its segments (`media.FileTask`). With `--workers N` > 1 the decoding,
face detection and the extractors marked `in_worker` (openSMILE, geometric, pixels) run in N
processes (results in order); neural extractors run in the main process in batches. `--shard K/N`
keeps every N-th file from the K-th, so N jobs (a Slurm array) cover a corpus once;
`uniter3m merge-db` joins their databases.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np

from uniter3m.errors import UserError
from uniter3m.ingest import media
from uniter3m.ingest.align import LandmarkWriter, face_square
from uniter3m.ingest.detectors import Detector, get_detector
from uniter3m.ingest.extractors import Extractor, ExtractorOptions, FaceTrack, Frames, get_extractor
from uniter3m.ingest.faces import FaceOptions, check_crop, choose, crop, geometry
from uniter3m.ingest.sources import FrameSource, Utterance

MODALITY = {"wav": "speech", "video": "face"}
DEFAULT_EXTRACTOR = {"wav": "compare", "video": "geometric"}


@dataclass
class MediaOptions:
    """Everything the recording source needs besides the input (mirrors the CLI flags)."""

    extractor: str | None = None  # None: compare (wav) / geometric (video)
    detector: str = "haar"
    manifest: Path | None = None
    workers: int = 1
    shard: str | None = None
    landmarks_keep: int = 100  # video: utterances whose per-frame landmarks go to landmarks.npz
    face: FaceOptions = field(default_factory=FaceOptions)
    extract: ExtractorOptions = field(default_factory=ExtractorOptions)  # modality is set from the format


@dataclass
class Item:
    """One segment after the worker stage: its frames, or the input the main-process extractor takes."""

    seg: media.Segment
    frames: Frames | None = None  # from an in-worker extractor
    audio: np.ndarray | tuple[np.ndarray, int] | None = None  # (samples, rate) for a native-rate extractor
    track: FaceTrack | None = None  # without its crops when an in-worker extractor used them
    no_face: int = 0
    upscaled: int = 0  # faces whose crop square was smaller than the extractor's input
    native: int = 0  # the file's own sample rate
    upsampled: bool = False


@dataclass(frozen=True)
class FacePlan:
    """What the face stage needs (picklable: it travels to the worker processes)."""

    fps: float
    face: FaceOptions
    detector: str
    crop_size: int
    colour: str
    needs_crops: bool


def run_extractor(extractor: Extractor, inputs: Sequence[Any], segs: Sequence[media.Segment]) -> list[Frames]:
    """`extractor.extract` with its errors naming the utterances, and its output checked against its `dim`."""
    try:
        out = extractor.extract(inputs)
    except UserError as err:
        where = segs[0].where() if len(segs) == 1 else f"one of {len(segs)} utterances from {segs[0].where()}"
        raise UserError(f"{where}: --extractor {extractor.name}: {err}") from err
    if len(out) != len(inputs):
        raise UserError(f"--extractor {extractor.name} returned {len(out)} results for {len(inputs)} inputs")
    for seg, frames in zip(segs, out):
        feat = np.asarray(frames.feat)
        if feat.ndim != 2 or feat.shape[1] != extractor.dim:
            raise UserError(
                f"{seg.where()}: --extractor {extractor.name} gave frames of shape {feat.shape}, "
                f"not (T, {extractor.dim}) as its dim says"
            )
    return out


# --------------------------------------------------------------------------- worker stage


def speech_stage(task: media.FileTask, rate: int | None, extractor: Extractor | None) -> list[Item]:
    """Decode one file once (at `rate`, None: its own); an in-worker extractor (openSMILE) runs here, a
    network later in the main process."""
    items = []
    for seg, audio, native in media.segment_audio(task, rate):
        signal = audio if rate else (audio, native)  # a native-rate extractor gets the rate with the samples
        item = Item(seg, native=native, upsampled=rate is not None and 0 < native < rate)
        if extractor is None:
            item.audio = signal
        else:
            item.frames = run_extractor(extractor, [signal], [seg])[0]
        items.append(item)
    return items


@lru_cache(maxsize=4)
def _detector(name: str, options: FaceOptions) -> Detector:
    """One detector per process (a worker builds its own on its first file)."""
    return get_detector(name, options)


def face_stage(task: media.FileTask, plan: FacePlan, extractor: Extractor | None) -> list[Item]:
    """Decode one file's frames once at `fps`; per segment keep one face per frame (crop, box, landmarks)."""
    detector = _detector(plan.detector, plan.face)
    segs = task.segments
    crops: list[list[np.ndarray]] = [[] for _ in segs]
    boxes: list[list[np.ndarray]] = [[] for _ in segs]
    marks: list[list[np.ndarray | None]] = [[] for _ in segs]
    times: list[list[float]] = [[] for _ in segs]
    no_face = [0] * len(segs)
    upscaled = [0] * len(segs)
    previous: list[np.ndarray | None] = [None] * len(segs)
    last_t = 0.0
    for t, rgb in media.video_frames(task, plan.fps):
        last_t = t
        covering = [i for i, seg in enumerate(segs) if media.in_segment(t, seg)]
        if not covering:
            continue
        found = detector.detect(rgb)
        for i in covering:
            if not found:
                no_face[i] += 1
                continue
            det = choose(found, plan.face.select, previous[i])
            previous[i] = det.box
            boxes[i].append(geometry(det.box, rgb.shape))
            scale = np.array([rgb.shape[1], rgb.shape[0]], np.float32)
            marks[i].append(None if det.landmarks is None else det.landmarks / scale)
            times[i].append(t)
            if plan.needs_crops:
                crops[i].append(crop(rgb, det, plan.face.margin, plan.crop_size, plan.colour))
                upscaled[i] += face_square(det, plan.face.margin)[1] < plan.crop_size
    slack = max(0.1, 2.0 / plan.fps)
    channels = 1 if plan.colour == "grey" else 3
    items = []
    for i, seg in enumerate(segs):
        if seg.end is not None and seg.end > last_t + slack:
            raise UserError(
                f"{seg.where()} ends at {seg.end:g} s but the video's last frame is at {last_t:.2f} s; "
                "fix the manifest's end"
            )
        if seg.start is not None and seg.start > last_t:
            raise UserError(
                f"{seg.where()} starts at {seg.start:g} s, after the video's last frame ({last_t:.2f} s); "
                "fix the manifest"
            )
        landmarks = None
        if marks[i] and all(m is not None for m in marks[i]):
            landmarks = np.stack(marks[i]).astype(np.float32)
        track = FaceTrack(
            crops=np.array(crops[i], np.uint8).reshape(-1, plan.crop_size, plan.crop_size, channels),
            boxes=np.array(boxes[i], np.float32).reshape(-1, 4),
            landmarks=landmarks,
            times=np.array(times[i], np.float32),
        )
        item = Item(seg, no_face=no_face[i], upscaled=upscaled[i], track=track)
        if extractor is not None:
            item.frames = run_extractor(extractor, [track], [seg])[0]
            item.track = replace(track, crops=track.crops[:0])  # landmarks travel back, crops need not
        items.append(item)
    return items


def worker_signals() -> None:
    """A pool worker dies on SIGTERM and leaves Ctrl-C to the parent. A forked worker inherits the CLI's
    SIGTERM handler, which raises inside whatever the worker is doing; one waiting on the pool's task
    lock then outlived `pool.terminate()` and `join` waited for it forever."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def ordered_map(workers: int) -> Iterator[Callable[[Callable[..., Any], Iterable[Any]], Iterator[Any]]]:
    """`map` in this process (workers <= 1) or over a pool of worker processes, results in order."""
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if workers == 1:
        yield map
        return
    # forkserver: workers fork from a clean one-thread server, never from this process, whose threads
    # (torch, loggers) may hold a lock at the fork that the child would wait on forever
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    pool = multiprocessing.get_context(method).Pool(workers, initializer=worker_signals)
    try:
        yield lambda fn, tasks: pool.imap(fn, tasks, chunksize=1)
    finally:
        pool.terminate()
        pool.join()


# --------------------------------------------------------------------------- the source


def media_source(
    fmt: str,
    opts: MediaOptions,
    path: Path | None = None,
    segments: Sequence[media.Segment] | None = None,
) -> FrameSource:
    """The utterances of recordings: a folder or file (`path`), a manifest (`opts.manifest`) or `segments`.

    `fmt` is "wav" (speech) or "video" (faces). Flags are checked before anything is decoded.
    """
    if fmt not in MODALITY:
        raise UserError(
            f"--format {fmt!r}: build-media-db reads recordings (--format wav or video); "
            "use `uniter3m build-feat-db` for feature files (npz, h5, openface, csv)"
        )
    shard = media.parse_shard(opts.shard)  # flags first: a typo costs no decoding
    if opts.workers < 1:
        raise UserError(f"--workers must be >= 1, got {opts.workers}")
    if opts.landmarks_keep < 0:
        raise UserError(f"--landmarks-keep must be >= 0, got {opts.landmarks_keep}")
    options = replace(opts.extract, modality=MODALITY[fmt])
    if fmt == "video":
        opts.face.check()
        check_crop(options.face_size, options.face_colour)
        if not options.fps or options.fps <= 0:
            raise UserError(f"--fps must be > 0, got {options.fps}")
        get_detector(opts.detector, opts.face)  # an unknown name fails here, before any decoding
    extractor = get_extractor(opts.extractor or DEFAULT_EXTRACTOR[fmt], options)
    ignored: list[str] = []
    if segments is None and opts.manifest is not None:
        base = path if path is not None and path.is_dir() else None
        segments = media.read_manifest(opts.manifest, base)
    elif segments is None:
        if path is None:
            raise UserError(
                f"--format {fmt} needs --input (a folder or file) or --manifest (id,path,start,end)"
            )
        if not path.exists():
            raise UserError(f"input {path} does not exist; check --input")
        suffixes = media.MEDIA_SUFFIXES if fmt == "wav" else media.VIDEO_SUFFIXES
        segments, ignored = media.folder_segments(path, suffixes)
    tasks = media.file_tasks(segments, shard)
    if not tasks:
        raise UserError(
            f"--shard {opts.shard} holds no file: the input has {len(media.file_tasks(segments))} file(s); "
            "use at most that many shards"
        )
    worker_extractor = extractor if extractor.in_worker else None
    info: dict[str, Any] = {
        "path": None if path is None else str(path),
        "format": fmt,
        "segments": sum(len(t.segments) for t in tasks),
        "files": len(tasks),
        "ignored_files": ignored,
        "manifest": None if opts.manifest is None else str(opts.manifest),
        "shard": opts.shard,
        "workers": opts.workers,
        "extractor": extractor.info(),
        # what `uniter3m predict` needs to make the same frames from new recordings
        "media": {
            "format": fmt,
            "extractor": opts.extractor or DEFAULT_EXTRACTOR[fmt],
            "detector": opts.detector,
            "options": asdict(options),
            "face": asdict(opts.face),
        },
    }
    if fmt == "wav":
        stage = partial(speech_stage, rate=extractor.sample_rate, extractor=worker_extractor)
    else:
        plan = FacePlan(
            options.fps,
            opts.face,
            opts.detector,
            extractor.crop_size,
            extractor.colour,
            extractor.needs_crops,
        )
        info["extractor"].update(
            detector=_detector(opts.detector, opts.face).info(),
            fps=options.fps,
            crop_size=extractor.crop_size,
            colour=extractor.colour,
            **opts.face.__dict__,
        )
        stage = partial(face_stage, plan=plan, extractor=worker_extractor)
    upsampled: list[str] = []
    upscaled: dict[str, int] = {}
    native_rates: Counter[int] = Counter()
    files: dict[str, Path] = {}
    names = _detector(opts.detector, opts.face).landmark_names if fmt == "video" else ()

    def finish(items: list[Item], marks: LandmarkWriter | None) -> Iterator[Utterance]:
        if worker_extractor is None:
            inputs = [it.audio if fmt == "wav" else it.track for it in items]
            frames = run_extractor(extractor, inputs, [it.seg for it in items])
        else:
            frames = [it.frames for it in items]
        for it, out in zip(items, frames):
            if it.upsampled:
                upsampled.append(it.seg.id)
            if it.upscaled:
                upscaled[it.seg.id] = it.upscaled
            if marks is not None and it.track is not None:
                marks.add(it.seg.id, it.track.landmarks, it.track.boxes, it.track.times)
            dropped = Counter({"no face": it.no_face}) if it.no_face else Counter()
            yield Utterance(it.seg.id, it.seg.where(), out.feat, out.soft, dropped)

    def read() -> Iterator[Utterance]:
        window = 1 if extractor.in_worker else max(options.batch_size, 1) * 4
        pending: list[Item] = []
        marks = landmark_writer(names, opts.landmarks_keep)
        try:
            with ordered_map(opts.workers) as mapper:
                for items in mapper(stage, tasks):
                    if fmt == "wav":
                        native_rates[items[0].native] += 1  # one file, one rate
                    pending.extend(items)
                    if len(pending) >= window:
                        yield from finish(pending, marks)
                        pending = []
                if pending:
                    yield from finish(pending, marks)
        except BaseException:
            if marks is not None:
                marks.discard()
            raise
        if fmt == "wav":
            info["sample_rates"] = {str(rate): n for rate, n in sorted(native_rates.items())}
            info["upsampled"] = len(upsampled)
            info["upsampled_ids"] = upsampled[:100]
        else:
            info["faces_upscaled"] = sum(upscaled.values())
            info["faces_upscaled_utterances"] = len(upscaled)
            info["faces_upscaled_ids"] = list(upscaled)[:100]
            info["landmarks"] = None
            if marks is not None:
                info["landmarks"] = {**marks.close(), "file": LANDMARKS_FILE}  # its name in the database
                files[LANDMARKS_FILE] = marks.path

    return FrameSource(read(), info, info["segments"], extractor.store_dtype, files)


LANDMARKS_FILE = "landmarks.npz"


def landmark_writer(names: tuple[str, ...], keep: int) -> LandmarkWriter | None:
    """A writer into a temporary file (the database builder moves it beside meta.json), or None when the
    detector gives no landmarks or none are to be kept."""
    if not names or keep == 0:
        return None
    handle, path = tempfile.mkstemp(prefix="uniter3m_landmarks_", suffix=".npz")
    os.close(handle)
    return LandmarkWriter(Path(path), keep, names)
