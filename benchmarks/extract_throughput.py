"""Extraction throughput: real-time factor (speech) and frames per second (faces), every extractor.

Every contender is a full `build-media-db` run (decode + detect + extract + write) into a temporary
folder: speech extractors on EmoDB files, face detectors + extractors on a generated video of the
astronaut's face. All contenders run in this one process, ROTATED round by round (round r starts at
contender r), so a noisy neighbour or a warm cache favours none of them; the table gives the min and
median over rounds, the real-time factor (processing seconds per second of audio; < 1 is faster than
real time) or frames/s of the best round, and the speed relative to the baseline of its modality
(`compare w=1`, `haar geometric w=1`).

    python benchmarks/extract_throughput.py --files 40 --workers 2 --rounds 3
    python benchmarks/extract_throughput.py --hf models/wav2vec2-base  # a real encoder folder
    python benchmarks/extract_throughput.py --only resemblyzer,whisper-ct2,fer --files 8 --rounds 2

Pretrained contenders whose package is not installed are left out (and listed). `--hf` adds a
local transformers audio encoder; `--hf random` a randomly initialised wav2vec 2.0 *base-sized*
model (95 M parameters: the compute of the real one, no download).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the test media helpers: tests.support.media

from uniter3m.errors import UserError  # noqa: E402
from uniter3m.ingest.extractors import ExtractorOptions  # noqa: E402
from uniter3m.ingest.feat_db import FeatDbSpec, build_feat_db  # noqa: E402
from uniter3m.ingest.recordings import MediaOptions, media_source  # noqa: E402


@dataclass
class Contender:
    name: str
    fmt: str  # wav | video
    options: MediaOptions
    baseline: str  # the contender its speed is compared with


def base_wav2vec2(folder: Path) -> Path:
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    Wav2Vec2Model(Wav2Vec2Config()).eval().save_pretrained(folder)
    return folder


def make_long_video(path: Path, seconds: float, fps: int = 25) -> int:
    """A 320x240 video: the astronaut's head wandering, one blank frame in five. Returns the frame count."""
    import av

    from tests.support.media import head

    face = head()
    out = av.open(str(path), "w")
    stream = out.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
    n = int(seconds * fps)
    for i in range(n):
        image = np.full((240, 320, 3), 128, np.uint8)
        if i % 5:
            x, y = 20 + (7 * i) % 170, 20 + (3 * i) % 90
            image[y : y + 120, x : x + 120] = face
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    return n


def contenders(workers: int, hf: Path | None, fps: float, batch: int) -> list[Contender]:
    """Speech then faces; each with 1 worker, the cheap ones and one network also with `workers`."""
    speech = "compare w=1"
    out = [Contender(f"compare w={w}", "wav", MediaOptions(extractor="compare", workers=w), speech)
           for w in (1, workers)]  # fmt: skip
    out.append(Contender("egemaps w=1", "wav", MediaOptions(extractor="egemaps"), speech))
    out.append(Contender("functionals w=1", "wav", MediaOptions(extractor="functionals"), speech))
    for name, ws in (("resemblyzer", (1, workers)), ("resemblyzer-utt", (1,)), ("whisper-ct2", (1,))):
        for w in ws:
            opts = MediaOptions(extractor=name, workers=w, extract=ExtractorOptions(batch_size=batch))
            out.append(Contender(f"{name} w={w}", "wav", opts, speech))
    if hf is not None:
        opts = MediaOptions(extractor=f"hf:{hf}", extract=ExtractorOptions(batch_size=8, pool_frames=3))
        out.append(Contender("hf wav2vec2-base w=1", "wav", opts, speech))
    faces = "haar geometric w=1"
    for detector, extractor, ws in (
        ("haar", "geometric", (1, workers)),
        ("haar", "fer", (1,)),
        ("mtcnn", "landmarks", (1,)),
        ("mtcnn", "fer", (1, workers)),
        ("blazeface", "landmarks:468", (1,)),
        ("blazeface", "fer", (1,)),
    ):
        for w in ws:
            extract = ExtractorOptions(fps=fps, batch_size=batch * 4)
            opts = MediaOptions(extractor=extractor, detector=detector, workers=w, extract=extract)
            out.append(Contender(f"{detector} {extractor} w={w}", "video", opts, faces))
    return out


def usable(contender: Contender, src: Path) -> str | None:
    """None when the contender can run here, else why not (a package that is not installed)."""
    try:
        media_source(contender.fmt, contender.options, path=src)
    except (UserError, ImportError) as err:
        return str(err).split(";")[0]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--emodb", type=Path, default=REPO.parent / "shared" / "data" / "emodb" / "wav")
    parser.add_argument("--files", type=int, default=40, help="EmoDB files per speech run")
    parser.add_argument("--videos", type=int, default=2, help="copies of the generated video per face run")
    parser.add_argument("--video-seconds", type=float, default=6.0)
    parser.add_argument("--fps", type=float, default=25.0, help="video frames sampled per second")
    parser.add_argument("--workers", type=int, default=2, help="N of the N-worker contenders")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="networks: utterances per batch (x4 crops)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default=None, help="comma-separated substrings of the contenders to run")
    parser.add_argument("--hf", default=None, help="a local audio encoder folder, or 'random' (base-sized)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="extract_bench_"))
    wavs = sorted(args.emodb.glob("*.wav"))[: args.files]
    if not wavs:
        sys.exit(f"no EmoDB wav under {args.emodb}: pass --emodb")
    speech_dir = tmp / "speech"
    speech_dir.mkdir()
    for w in wavs:
        (speech_dir / w.name).symlink_to(w)
    import av

    audio_s = 0.0
    for w in wavs:
        with av.open(str(w)) as c:
            audio_s += float(c.streams.audio[0].duration * c.streams.audio[0].time_base)
    video_dir = tmp / "video"
    video_dir.mkdir()
    frames = make_long_video(video_dir / "v0.mp4", args.video_seconds)
    for k in range(1, args.videos):
        (video_dir / f"v{k}.mp4").symlink_to(video_dir / "v0.mp4")
    frames = int(frames * args.videos * args.fps / 25)
    src = {"wav": speech_dir, "video": video_dir}

    hf = (
        None
        if args.hf is None
        else (base_wav2vec2(tmp / "w2v-base") if args.hf == "random" else Path(args.hf))
    )
    chosen = contenders(args.workers, hf, args.fps, args.batch_size)
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        chosen = [c for c in chosen if any(k in c.name for k in keys) or c.name == c.baseline]
    skipped = {c.name: why for c in chosen if (why := usable(c, src[c.fmt]))}
    chosen = [c for c in chosen if c.name not in skipped]
    times: dict[str, list[float]] = {c.name: [] for c in chosen}
    for r in range(args.rounds):
        for c in chosen[r % len(chosen) :] + chosen[: r % len(chosen)]:
            spec = FeatDbSpec(out=tmp / "db", overwrite=True, progress=False)
            t0 = time.perf_counter()
            build_feat_db(spec, media_source(c.fmt, c.options, path=src[c.fmt]))
            times[c.name].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    print(
        f"\n{len(wavs)} EmoDB files ({audio_s:.1f} s of audio); {args.videos} generated videos, {frames} frames "
        f"sampled at {args.fps:g} fps (320x240); {args.rounds} rounds, contenders rotated"
    )
    print(f"{'contender':<26} {'min s':>8} {'median s':>9} {'best':>22} {'vs baseline':>12}")
    for c in chosen:
        best, med = min(times[c.name]), statistics.median(times[c.name])
        if c.fmt == "wav":
            speed = f"RTF {best / audio_s:.3f} ({audio_s / best:.1f}x)"
        else:
            speed = f"{frames / best:.1f} frames/s"
        ratio = min(times[c.baseline]) / best if c.baseline in times else float("nan")
        print(f"{c.name:<26} {best:8.2f} {med:9.2f} {speed:>22} {ratio:11.2f}x")
    for name, why in skipped.items():
        print(f"not run: {name}: {why}")


if __name__ == "__main__":
    main()
