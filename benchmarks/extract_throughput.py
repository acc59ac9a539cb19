"""Extraction throughput: seconds of audio per second (speech) and frames per second (faces).

Every contender is a full `build-media-db` run (decode + extract + write) into a temporary folder:
speech extractors on EmoDB files, the face path on a generated video of the astronaut's face, each
with 1 and N workers. Contenders are interleaved round by round (so a noisy neighbour hits all of
them alike); the table gives min / median over rounds and each contender's ratio to its 1-worker run.

    python benchmarks/extract_throughput.py --files 40 --workers 2 --rounds 3
    python benchmarks/extract_throughput.py --hf models/wav2vec2-base  # a real encoder folder

Without --hf a randomly initialised wav2vec 2.0 *base-sized* model (95 M parameters) stands in:
same compute as the real one, no download.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from uniter3m.ingest.extractors import ExtractorOptions  # noqa: E402
from uniter3m.ingest.feat_db import FeatDbSpec, build_feat_db  # noqa: E402
from uniter3m.ingest.recordings import MediaOptions, media_source  # noqa: E402


def base_wav2vec2(folder: Path) -> Path:
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    Wav2Vec2Model(Wav2Vec2Config()).eval().save_pretrained(folder)
    return folder


def make_long_video(path: Path, seconds: float, fps: int = 25) -> int:
    """A 320x240 video: the astronaut's head wandering, one blank frame in five. Returns the frame count."""
    import av
    from _media import head

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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--emodb", type=Path, default=REPO.parent / "shared" / "data" / "emodb" / "wav")
    parser.add_argument("--files", type=int, default=40, help="EmoDB files per speech run")
    parser.add_argument("--videos", type=int, default=4, help="copies of the generated video per face run")
    parser.add_argument("--video-seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2, help="N of the N-worker contenders")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--hf", type=Path, default=None, help="a local audio encoder folder (default: random base)"
    )
    parser.add_argument("--skip-hf", action="store_true")
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
    frames *= args.videos

    contenders: list[tuple[str, str, Path, MediaOptions, float, str]] = []
    for ext in ("compare", "egemaps"):
        for w in (1, args.workers):
            contenders.append(
                (
                    f"{ext} w={w}",
                    "wav",
                    speech_dir,
                    MediaOptions(extractor=ext, workers=w),
                    audio_s,
                    "audio s/s",
                )
            )
    if not args.skip_hf:
        hf = args.hf or base_wav2vec2(tmp / "w2v-base")
        for w in (1, args.workers):
            extract = ExtractorOptions(batch_size=8, pool_frames=3)
            opts = MediaOptions(extractor=f"hf:{hf}", workers=w, extract=extract)
            contenders.append((f"hf wav2vec2-base w={w}", "wav", speech_dir, opts, audio_s, "audio s/s"))
    for w in (1, args.workers):
        opts = MediaOptions(extractor="geometric", workers=w, extract=ExtractorOptions(fps=25.0))
        contenders.append((f"faces geometric 25fps w={w}", "video", video_dir, opts, frames, "frames/s"))

    times: dict[str, list[float]] = {c[0]: [] for c in contenders}
    for r in range(args.rounds):
        for name, fmt, src, opts, _, _ in contenders:
            spec = FeatDbSpec(out=tmp / "db", overwrite=True, progress=False)
            t0 = time.perf_counter()
            build_feat_db(spec, media_source(fmt, opts, path=src))
            times[name].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    print(f"\n{len(wavs)} EmoDB files ({audio_s:.1f} s of audio); {frames} video frames at 320x240")
    print(f"{'contender':<28} {'min s':>8} {'median s':>9} {'throughput (best)':>22} {'vs w=1':>7}")
    for name, _, _, _, amount, unit in contenders:
        best, med = min(times[name]), statistics.median(times[name])
        base = name.rsplit(" w=", 1)[0] + " w=1"
        ratio = min(times[base]) / best
        print(f"{name:<28} {best:8.2f} {med:9.2f} {amount / best:12.1f} {unit:<9} {ratio:6.2f}x")


if __name__ == "__main__":
    main()
