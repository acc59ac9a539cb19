"""Real test media: EmoDB speech, and short videos of the astronaut's face (skimage) made with PyAV."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

# The astronaut's head, cut from skimage.data.astronaut() and resized: OpenCV's Haar cascade finds it.
HEAD_PX = 120
HEAD_TOP = 20
FRAME_W, FRAME_H = 240, 180


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as f:
        rate = f.getframerate()
        samples = np.frombuffer(f.readframes(f.getnframes()), np.int16)
    return samples.astype(np.float32) / 32768.0, rate


def head() -> np.ndarray:
    import cv2
    from skimage import data

    return cv2.resize(data.astronaut()[30:230, 120:320], (HEAD_PX, HEAD_PX), interpolation=cv2.INTER_AREA)


def head_left(i: int) -> int:
    """Left edge of the head in frame i: it moves 8 px a frame, back to the left every 12 frames."""
    return 10 + 8 * (i % 12)


def make_video(
    path: Path,
    frames: int = 12,
    fps: int = 6,
    blank: tuple[int, ...] = (3, 7),
    audio: tuple[np.ndarray, int] | None = None,
    scale: float = 1.0,
) -> Path:
    """An mp4 (h264, optional aac track) of the head moving right on grey; `blank` frames hold no face."""
    import av
    import cv2

    face = head() if scale == 1.0 else cv2.resize(head(), (int(HEAD_PX * scale),) * 2)
    out = av.open(str(path), "w")
    video = out.add_stream("libx264", rate=fps)
    video.width, video.height, video.pix_fmt = FRAME_W, FRAME_H, "yuv420p"
    sound = None
    if audio is not None:
        sound = out.add_stream("aac", rate=audio[1], layout="mono")
    for i in range(frames):
        image = np.full((FRAME_H, FRAME_W, 3), 128, np.uint8)
        if i not in blank:
            x = head_left(i)
            image[HEAD_TOP : HEAD_TOP + len(face), x : x + len(face)] = face
        for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            out.mux(packet)
    for packet in video.encode():
        out.mux(packet)
    if sound is not None:
        samples, rate = audio
        for lo in range(0, len(samples), 1024):
            frame = av.AudioFrame.from_ndarray(
                samples[None, lo : lo + 1024].copy(), format="fltp", layout="mono"
            )
            frame.sample_rate = rate
            frame.pts = lo  # time base 1/rate: lets the muxer record the encoder delay
            for packet in sound.encode(frame):
                out.mux(packet)
        for packet in sound.encode():
            out.mux(packet)
    out.close()
    return path
