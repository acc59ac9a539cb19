"""Recordings -> feature frames: the `wav` (speech) and `video` (face) sources of build-feat-db.

Extractors (`--extractor`):
- speech (`--format wav`, any audio or video container): `compare` (openSMILE ComParE_2016 LLD +
  deltas, 130-d, 100 frames/s), `egemaps` (openSMILE eGeMAPSv02 LLDs, 25-d, 100 frames/s),
  `hf:DIR` (a local wav2vec 2.0 / HuBERT / WavLM / data2vec-audio folder, `uniter3m.ingest.encoders`);
- face (`--format video`): `geometric` (4-d face box per frame), `pixels` (the flattened crop,
  /255), `hf:DIR` (a local CLIP/SigLIP/ViT/DINOv2 folder, one vector per crop).

Work unit = one file with all its segments (`media.FileTask`). With `--workers N` > 1 the
decoding, openSMILE and face detection run in N processes (ordered results); neural encoders run
in the main process in batches. `--shard K/N` keeps every N-th file from the K-th, so N jobs
(a Slurm array) cover a corpus once; `uniter3m merge-db` joins their databases.
"""

from __future__ import annotations

import multiprocessing
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from uniter3m.errors import UserError
from uniter3m.ingest import media
from uniter3m.ingest.faces import GEOMETRIC_DIM, FaceOptions, choose, crop, detect, geometry

SPEECH_EXTRACTORS = ("compare", "egemaps", "hf:DIR")
FACE_EXTRACTORS = ("geometric", "pixels", "hf:DIR")
OPENSMILE_KINDS = ("compare", "egemaps")


@dataclass
class MediaOptions:
    """Everything the wav/video sources need besides the input (mirrors the CLI flags)."""

    extractor: str | None = None  # None: compare (wav) / geometric (video)
    manifest: Path | None = None
    layer: str | None = None
    pool_frames: int = 1
    token_pool: str = "cls"
    batch_size: int = 16
    device: str = "auto"
    precision: str = "auto"
    fps: float = 5.0
    face: FaceOptions = field(default_factory=FaceOptions)
    workers: int = 1
    shard: str | None = None


@dataclass
class Item:
    """One segment after the worker stage: its payload for the main process."""

    seg: media.Segment
    feat: np.ndarray | None = None  # final frames (openSMILE, geometric)
    audio: np.ndarray | None = None  # samples for a neural audio encoder
    crops: np.ndarray | None = None  # face crops for a neural vision encoder / pixels
    no_face: int = 0
    upsampled: bool = False


def default_extractor(fmt: str) -> str:
    return "compare" if fmt == "wav" else "geometric"


def default_dtype(fmt: str, extractor: str | None) -> str:
    """float32 for openSMILE (ComParE energies exceed float16 on real speech), float16 otherwise."""
    return "float32" if fmt == "wav" and (extractor or "compare") in OPENSMILE_KINDS else "float16"


def _hf_dir(extractor: str) -> Path | None:
    return Path(extractor[3:]).expanduser() if extractor.startswith("hf:") else None


def check_extractor(fmt: str, extractor: str) -> None:
    allowed = SPEECH_EXTRACTORS if fmt == "wav" else FACE_EXTRACTORS
    if extractor in allowed or (extractor.startswith("hf:") and len(extractor) > 3):
        return
    raise UserError(f"--format {fmt} takes --extractor {' | '.join(allowed)}, got {extractor!r}")


# --------------------------------------------------------------------------- worker stage


def speech_stage(task: media.FileTask, kind: str, rate: int, pool: int = 1) -> list[Item]:
    """Decode one file once; openSMILE runs here too (its frames mean-pooled `pool` at a time), a
    neural encoder later in the main process."""
    from uniter3m.ingest.encoders import pool_frames
    from uniter3m.ingest.speech import opensmile_signal_frames

    items = []
    for seg, audio, native in media.segment_audio(task, rate):
        item = Item(seg, upsampled=0 < native < rate)
        if kind in OPENSMILE_KINDS:
            item.feat = pool_frames(opensmile_signal_frames(kind, audio, rate, seg.where()), pool)
        else:
            item.audio = audio
        items.append(item)
    return items


def face_stage(task: media.FileTask, fps: float, opts: FaceOptions, want_crops: bool) -> list[Item]:
    """Decode one file's frames once at `fps`; per segment keep one face per frame (crop and box)."""
    segs = task.segments
    crops: list[list[np.ndarray]] = [[] for _ in segs]
    boxes: list[list[np.ndarray]] = [[] for _ in segs]
    no_face = [0] * len(segs)
    previous: list[np.ndarray | None] = [None] * len(segs)
    last_t = 0.0
    for t, rgb in media.video_frames(task, fps):
        last_t = t
        covering = [i for i, seg in enumerate(segs) if media.in_segment(t, seg)]
        if not covering:
            continue
        found = detect(rgb, opts)
        for i in covering:
            if len(found) == 0:
                no_face[i] += 1
                continue
            box = choose(found, opts, previous[i])
            previous[i] = box
            boxes[i].append(geometry(box, rgb.shape))
            if want_crops:
                crops[i].append(crop(rgb, box, opts))
    slack = max(0.1, 2.0 / fps)
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
        channels = 1 if opts.colour == "grey" else 3
        item = Item(seg, no_face=no_face[i])
        item.feat = np.array(boxes[i], np.float32).reshape(-1, GEOMETRIC_DIM)
        if want_crops:
            item.crops = np.array(crops[i], np.uint8).reshape(-1, opts.size, opts.size, channels)
        items.append(item)
    return items


@contextmanager
def ordered_map(workers: int) -> Iterator[Callable[[Callable[..., Any], Iterable[Any]], Iterator[Any]]]:
    """`map` in this process (workers <= 1) or over a pool of forked processes, results in order."""
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if workers == 1:
        yield map
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = multiprocessing.get_context(method).Pool(workers)
    try:
        yield lambda fn, tasks: pool.imap(fn, tasks, chunksize=1)
    finally:
        pool.terminate()
        pool.join()


# --------------------------------------------------------------------------- the source


def media_source(
    fmt: str, path: Path | None, opts: MediaOptions
) -> tuple[int, Iterator[Any], dict[str, Any]]:
    """(utterance count, iterator of feat_db.Utterance, info for meta.json) for --format wav/video."""
    from uniter3m.ingest.feat_db import Utterance

    extractor = opts.extractor or default_extractor(fmt)
    check_extractor(fmt, extractor)
    shard = media.parse_shard(opts.shard)  # flags first: a typo costs no decoding
    if opts.workers < 1:
        raise UserError(f"--workers must be >= 1, got {opts.workers}")
    suffixes = media.MEDIA_SUFFIXES if fmt == "wav" else media.VIDEO_SUFFIXES
    if opts.manifest is not None:
        base = path if path is not None and path.is_dir() else None
        segments, ignored = media.read_manifest(opts.manifest, base), []
    else:
        if path is None:
            raise UserError(
                f"--format {fmt} needs --input (a folder or file) or --manifest (id,path,start,end)"
            )
        segments, ignored = media.folder_segments(path, suffixes)
    tasks = media.file_tasks(segments, shard)
    if not tasks:
        raise UserError(
            f"--shard {opts.shard} holds no file: the input has {len(media.file_tasks(segments))} file(s); "
            "use at most that many shards"
        )
    info: dict[str, Any] = {
        "segments": sum(len(t.segments) for t in tasks),
        "files": len(tasks),
        "ignored_files": ignored,
        "manifest": None if opts.manifest is None else str(opts.manifest),
        "shard": opts.shard,
        "workers": opts.workers,
    }
    model_dir = _hf_dir(extractor)
    encoder: Any = None
    if fmt == "wav":
        if model_dir is None:
            from uniter3m.ingest.speech import COMPARE_DIM, EGEMAPS_DIM, OPENSMILE_FRAME_RATE, OPENSMILE_RATE

            rate = OPENSMILE_RATE
            if opts.pool_frames < 1:
                raise UserError(f"--pool-frames must be >= 1, got {opts.pool_frames}")
            info["extractor"] = {
                "name": extractor,
                "dim": COMPARE_DIM if extractor == "compare" else EGEMAPS_DIM,
                "sample_rate": rate,
                "frame_rate": OPENSMILE_FRAME_RATE / opts.pool_frames,
                "pool_frames": opts.pool_frames,
            }
            stage = partial(speech_stage, kind=extractor, rate=rate, pool=opts.pool_frames)
        else:
            from uniter3m.ingest.encoders import AudioEncoder

            encoder = AudioEncoder(
                model_dir, opts.layer, opts.pool_frames, opts.batch_size, opts.device, opts.precision
            )
            info["extractor"] = encoder.info()
            stage = partial(speech_stage, kind="hf", rate=encoder.sample_rate)
    else:
        opts.face.check()
        if not opts.fps or opts.fps <= 0:
            raise UserError(f"--fps must be > 0, got {opts.fps}")
        face = {"detector": "opencv-haar-frontalface-default", **opts.face.__dict__, "fps": opts.fps}
        if model_dir is not None:
            from uniter3m.ingest.encoders import VisionEncoder

            encoder = VisionEncoder(
                model_dir, opts.token_pool, opts.layer, opts.batch_size, opts.device, opts.precision
            )
            info["extractor"] = {**encoder.info(), **face, "frame_rate": opts.fps}
        else:
            channels = 1 if opts.face.colour == "grey" else 3
            dim = GEOMETRIC_DIM if extractor == "geometric" else opts.face.size**2 * channels
            info["extractor"] = {"name": extractor, "dim": dim, **face, "frame_rate": opts.fps}
        want_crops = extractor != "geometric"
        stage = partial(face_stage, fps=opts.fps, opts=opts.face, want_crops=want_crops)
    upsampled: list[str] = []

    def finish(items: list[Item]) -> Iterator[Utterance]:
        if fmt == "wav" and encoder is not None:
            feats = encoder.encode([it.audio for it in items])
        elif fmt == "video" and encoder is not None:
            sizes = [len(it.crops) for it in items]
            flat = encoder.encode(np.concatenate([it.crops for it in items]))
            feats = np.split(flat, np.cumsum(sizes)[:-1])
        elif extractor == "pixels":
            feats = [
                it.crops.reshape(len(it.crops), int(np.prod(it.crops.shape[1:]))) / 255.0 for it in items
            ]
        else:
            feats = [it.feat for it in items]
        for it, feat in zip(items, feats):
            if it.upsampled:
                upsampled.append(it.seg.id)
            dropped = Counter({"no face": it.no_face}) if it.no_face else Counter()
            yield Utterance(it.seg.id, it.seg.where(), np.asarray(feat, np.float64), None, dropped)

    def read() -> Iterator[Utterance]:
        window = max(opts.batch_size, 1) * 4 if encoder is not None else 1
        pending: list[Item] = []
        with ordered_map(opts.workers) as mapper:
            for items in mapper(stage, tasks):
                pending.extend(items)
                if len(pending) >= window:
                    yield from finish(pending)
                    pending = []
            if pending:
                yield from finish(pending)
        info["upsampled"] = len(upsampled)
        info["upsampled_ids"] = upsampled[:100]

    return info["segments"], read(), info
