"""Faces in video frames: detect (OpenCV's Haar cascade), keep one per frame, crop it.

The detector's weights ship inside the `opencv-python-headless` wheel (`cv2.data.haarcascades`,
extra `uniter3m[media]`), so nothing is downloaded. A Haar detection counts as confident when
`min_neighbors` overlapping windows agree (OpenCV's own rule); a frame without one is skipped
and counted. Haar gives boxes, not landmarks, so "alignment" is a square crop around the box
(with a margin), resized to `size` x `size`, grey (MEmoBERT: 64x64 grey) or RGB.

One face per frame: `largest` keeps the biggest box; `track` keeps the box nearest the face kept
in the previous frame of the utterance (the largest to start), which follows one speaker when a
second face appears. Geometric features per kept frame: box centre x, y and width, height, each
divided by the frame's width or height (4-d, in [0, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from uniter3m.errors import UserError

SELECT = ("largest", "track")
COLOURS = ("grey", "rgb")
GEOMETRIC_DIM = 4
CASCADE = "haarcascade_frontalface_default.xml"


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as err:
        raise UserError("face detection needs OpenCV: pip install 'uniter3m[media]'") from err
    return cv2


@lru_cache(maxsize=1)
def _cascade() -> Any:
    cv2 = _cv2()
    cv2.setNumThreads(1)  # one process per worker does the parallel work
    path = cv2.data.haarcascades + CASCADE
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise UserError(f"OpenCV could not load its face detector {path}; reinstall opencv-python-headless<5")
    return cascade


@dataclass(frozen=True)
class FaceOptions:
    """How faces are found and cropped (mirrors the CLI flags)."""

    size: int = 64
    colour: str = "grey"
    select: str = "largest"
    margin: float = 0.2
    min_face: float = 0.05  # smallest box side, as a fraction of the frame's shorter side
    min_neighbors: int = 5

    def check(self) -> None:
        if self.select not in SELECT:
            raise UserError(f"--face-select must be one of {', '.join(SELECT)}, got {self.select!r}")
        if self.colour not in COLOURS:
            raise UserError(f"--face-colour must be one of {', '.join(COLOURS)}, got {self.colour!r}")
        if self.size < 8:
            raise UserError(f"--face-size must be >= 8 pixels, got {self.size}")
        if not 0 <= self.margin <= 1:
            raise UserError(f"--face-margin must be in [0, 1], got {self.margin}")
        if not 0 < self.min_face < 1:
            raise UserError(f"--min-face must be in (0, 1), got {self.min_face}")


def detect(rgb: np.ndarray, opts: FaceOptions) -> np.ndarray:
    """Face boxes (N, 4) as x, y, w, h in pixels (N = 0 when no confident face)."""
    cv2 = _cv2()
    grey = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    side = max(int(min(grey.shape) * opts.min_face), 16)
    boxes = _cascade().detectMultiScale(
        grey, scaleFactor=1.1, minNeighbors=opts.min_neighbors, minSize=(side, side)
    )
    return np.asarray(boxes, np.int64).reshape(-1, 4)


def choose(boxes: np.ndarray, opts: FaceOptions, previous: np.ndarray | None) -> np.ndarray:
    """The one box kept for this frame."""
    if opts.select == "track" and previous is not None:
        centres = boxes[:, :2] + boxes[:, 2:] / 2
        last = previous[:2] + previous[2:] / 2
        return boxes[int(np.argmin(((centres - last) ** 2).sum(1)))]
    return boxes[int(np.argmax(boxes[:, 2] * boxes[:, 3]))]


def crop(rgb: np.ndarray, box: np.ndarray, opts: FaceOptions) -> np.ndarray:
    """A square crop around `box` (margin added, edge pixels repeated past the frame), resized."""
    cv2 = _cv2()
    x, y, w, h = (float(v) for v in box)
    side = max(w, h) * (1 + 2 * opts.margin)
    cx, cy = x + w / 2, y + h / 2
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    s = int(round(side))
    pad = max(0, -x0, -y0, x0 + s - rgb.shape[1], y0 + s - rgb.shape[0])
    image = rgb
    if pad:
        image = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    patch = image[y0 + pad : y0 + pad + s, x0 + pad : x0 + pad + s]
    patch = cv2.resize(patch, (opts.size, opts.size), interpolation=cv2.INTER_AREA)
    if opts.colour == "grey":
        patch = cv2.cvtColor(patch, cv2.COLOR_RGB2GRAY)[..., None]
    return np.ascontiguousarray(patch)


def geometry(box: np.ndarray, frame_shape: tuple[int, ...]) -> np.ndarray:
    """Box centre x, y, width, height divided by the frame's width/height."""
    height, width = frame_shape[:2]
    x, y, w, h = (float(v) for v in box)
    return np.array([(x + w / 2) / width, (y + h / 2) / height, w / width, h / height], np.float32)
