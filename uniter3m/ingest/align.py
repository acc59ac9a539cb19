"""Face alignment and landmark storage: what a detection becomes before an extractor sees it, and after.

`aligned_crop`: with landmarks (mtcnn: 5, blazeface: the 468-point mesh) the frame is rotated about
the eyes' midpoint so the eyes are level, and the crop side is a fixed multiple of the inter-ocular
distance (so a face's size in the crop does not depend on its size in the frame, nor on how loosely
the detector drew its box); without landmarks (haar) it is the square box crop. Either way `margin`
widens the square by that fraction on each side, edge pixels are repeated past the frame, and the
square is resized with area averaging to `size` x `size`, grey or RGB.

`LandmarkWriter`: per-frame landmarks of the first utterances, in `landmarks.npz` beside meta.json,
for drawing them over the video (meta.json would not hold 468 points per frame).
"""

from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from uniter3m.errors import UserError
from uniter3m.ingest.detectors.base import Detection

# Landmark rows of the eyes (image left, image right) of an upright face, by landmark count; an eye
# given by several rows is their mean (the mesh's eye corners).
EYES: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    5: ((0,), (1,)),  # mtcnn
    468: ((33, 133), (362, 263)),  # MediaPipe face mesh
}
# The face square before the margin, in inter-ocular distances: its side, and how far its centre lies
# below the eyes' midpoint. Chosen so that the aligned square of a frontal face covers what MTCNN's
# box covers (brow to chin): on the astronaut the box is 2.1 x 2.65 eye distances, centred 0.33 below.
FACE_SIDE = 2.5
CENTRE_BELOW_EYES = 0.35
COLOURS = ("grey", "rgb")


def eye_centres(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image-left eye, image-right eye) as x, y from a detector's landmarks (K, 2)."""
    if len(landmarks) not in EYES:
        raise UserError(
            f"cannot find the eyes among {len(landmarks)} landmarks; known layouts: "
            f"{', '.join(str(k) for k in sorted(EYES))} points"
        )
    left, right = EYES[len(landmarks)]
    return landmarks[list(left)].mean(0), landmarks[list(right)].mean(0)


def face_square(detection: Detection, margin: float) -> tuple[np.ndarray, float, float]:
    """(centre x, y in pixels, side in pixels, rotation in degrees) of the square `aligned_crop` cuts."""
    if detection.landmarks is None:
        x0, y0, x1, y1 = (float(v) for v in detection.box)
        centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
        return centre, max(x1 - x0, y1 - y0) * (1 + 2 * margin), 0.0
    left, right = eye_centres(detection.landmarks.astype(np.float64))
    dx, dy = right - left
    distance = math.hypot(dx, dy)
    angle = math.atan2(dy, dx)
    # "below" in the face's own frame: perpendicular to the eye line, towards the mouth
    below = np.array([-math.sin(angle), math.cos(angle)]) * CENTRE_BELOW_EYES * distance
    centre = (left + right) / 2 + below
    return centre, FACE_SIDE * distance * (1 + 2 * margin), math.degrees(angle)


def aligned_crop(rgb: np.ndarray, detection: Detection, size: int, colour: str, margin: float) -> np.ndarray:
    """The face of `detection` cut from the RGB frame, eyes level: (size, size, 1 or 3) uint8."""
    import cv2

    if colour not in COLOURS:
        raise UserError(f"face colour must be one of {', '.join(COLOURS)}, got {colour!r}")
    centre, side, degrees = face_square(detection, margin)
    s = max(int(round(side)), 1)
    matrix = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), degrees, 1.0)
    matrix[:, 2] = np.round(matrix[:, 2] + s / 2 - centre)  # whole-pixel shift: an upright box is a plain cut
    patch = cv2.warpAffine(rgb, matrix, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    patch = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)
    if colour == "grey":
        patch = cv2.cvtColor(patch, cv2.COLOR_RGB2GRAY)[..., None]
    return np.ascontiguousarray(patch)


class LandmarkWriter:
    """Streams the landmarks of the first `limit` utterances that have any into `path` (an .npz).

    Per utterance id: `landmarks/<id>` (N, K, 2) float16, x and y over the frame's width and height,
    `boxes/<id>` (N, 4) float32 (centre x, y, width, height, same units) and `times/<id>` (N,) seconds
    of the frames. `np.load(path)["landmarks/" + id]` reads one back.
    """

    def __init__(self, path: Path, limit: int, names: tuple[str, ...]) -> None:
        if limit < 0:
            raise UserError(f"the number of utterances to keep landmarks for must be >= 0, got {limit}")
        self.path, self.limit, self.names = Path(path), limit, names
        self.ids: list[str] = []
        self._zip = zipfile.ZipFile(self.path, "w", zipfile.ZIP_DEFLATED)

    def add(
        self, uid: str, landmarks: np.ndarray | None, boxes: np.ndarray, times: np.ndarray | None
    ) -> None:
        """One utterance's FaceTrack fields (`landmarks` None or empty: nothing to store)."""
        if landmarks is None or not len(landmarks) or len(self.ids) >= self.limit:
            return
        arrays = {"landmarks": landmarks.astype(np.float16), "boxes": np.asarray(boxes, np.float32)}
        if times is not None:
            arrays["times"] = np.asarray(times, np.float32)
        for kind, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, array, allow_pickle=False)
            self._zip.writestr(f"{kind}/{uid}.npy", buffer.getvalue())
        self.ids.append(uid)

    def discard(self) -> None:
        """Close and delete the file (a build that failed keeps nothing)."""
        self._zip.close()
        self.path.unlink(missing_ok=True)

    def close(self) -> dict[str, Any]:
        """What meta.json records under "landmarks"."""
        self._zip.close()
        return {
            "file": self.path.name,
            "names": list(self.names),
            "utterances": len(self.ids),
            "limit": self.limit,
            "units": "x, y over the frame's width, height",
        }
