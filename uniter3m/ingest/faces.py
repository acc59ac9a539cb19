"""Faces in video frames: keep one detection per frame, crop it, describe its box.

The detector comes from the registry (`uniter3m.ingest.detectors`, `--detector`, default `haar`).
One face per frame: `largest` keeps the biggest box; `track` keeps the box nearest the face kept
in the previous frame of the utterance (the largest to start), which follows one speaker when a
second face appears. A detection with landmarks is cropped by `uniter3m.ingest.align.aligned_crop`
(rotated and scaled on the eyes); one without (Haar) gets a square crop around the box with a
margin, resized to the extractor's side, grey (MEmoBERT: 64x64 grey) or RGB. The box geometry per
kept frame: centre x, y and width, height, each divided by the frame's width or height (in [0, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from uniter3m.errors import UserError
from uniter3m.ingest.detectors.base import Detection
from uniter3m.ingest.detectors.haar import cv2_module

SELECT = ("largest", "track")
COLOURS = ("grey", "rgb")


@dataclass(frozen=True)
class FaceOptions:
    """How faces are found and kept (mirrors the CLI flags); the detector reads min_face / min_neighbors."""

    select: str = "largest"
    margin: float = 0.2
    min_face: float = 0.05  # smallest box side, as a fraction of the frame's shorter side
    min_neighbors: int = 5

    def check(self) -> None:
        if self.select not in SELECT:
            raise UserError(f"--face-select must be one of {', '.join(SELECT)}, got {self.select!r}")
        if not 0 <= self.margin <= 1:
            raise UserError(f"--face-margin must be in [0, 1], got {self.margin}")
        if not 0 < self.min_face < 1:
            raise UserError(f"--min-face must be in (0, 1), got {self.min_face}")


def check_crop(size: int, colour: str) -> None:
    """The --face-size / --face-colour flags (checked whether or not the extractor uses crops)."""
    if colour not in COLOURS:
        raise UserError(f"--face-colour must be one of {', '.join(COLOURS)}, got {colour!r}")
    if size < 8:
        raise UserError(f"--face-size must be >= 8 pixels, got {size}")


def _centre(box: np.ndarray) -> np.ndarray:
    return (box[:2] + box[2:]) / 2


def choose(found: list[Detection], select: str, previous: np.ndarray | None) -> Detection:
    """The one detection kept for this frame (`previous`: the box kept in the utterance's last frame)."""
    if select == "track" and previous is not None:
        last = _centre(previous)
        return found[int(np.argmin([((_centre(d.box) - last) ** 2).sum() for d in found]))]
    return found[int(np.argmax([(d.box[2] - d.box[0]) * (d.box[3] - d.box[1]) for d in found]))]


def crop(rgb: np.ndarray, det: Detection, margin: float, size: int, colour: str) -> np.ndarray:
    """The face as a (size, size, 1 or 3) uint8 crop: aligned on landmarks when it has them, else square."""
    if det.landmarks is not None:
        from uniter3m.ingest.align import aligned_crop

        return aligned_crop(rgb, det, size=size, colour=colour, margin=margin)
    cv2 = cv2_module()
    x0, y0, x1, y1 = (float(v) for v in det.box)
    w, h = x1 - x0, y1 - y0
    side = max(w, h) * (1 + 2 * margin)
    cx, cy = x0 + w / 2, y0 + h / 2
    left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
    s = int(round(side))
    pad = max(0, -left, -top, left + s - rgb.shape[1], top + s - rgb.shape[0])
    image = rgb
    if pad:
        image = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    patch = image[top + pad : top + pad + s, left + pad : left + pad + s]
    patch = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)
    if colour == "grey":
        patch = cv2.cvtColor(patch, cv2.COLOR_RGB2GRAY)[..., None]
    return np.ascontiguousarray(patch)


def geometry(box: np.ndarray, frame_shape: tuple[int, ...]) -> np.ndarray:
    """Box (x0, y0, x1, y1 pixels) -> centre x, y, width, height divided by the frame's width/height."""
    height, width = frame_shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = x1 - x0, y1 - y0
    return np.array([(x0 + w / 2) / width, (y0 + h / 2) / height, w / width, h / height], np.float32)
