"""`landmarks[:K]`: per sampled frame, the face box and its K landmarks relative to it (4 + 2K dims).

For a detector with landmarks (`--detector mtcnn`: K = 5, the default; `blazeface`: K = 468); the
features: the face box (centre x, y, width, height over the frame's width, height) followed by every
landmark's x, y relative to the box ((x - centre x) / width, same for y): where the face is, and its
shape wherever it is. Needs no crop, so it runs in the decoding workers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from uniter3m.errors import UserError
from uniter3m.ingest.extractors.base import Extractor, ExtractorOptions, FaceTrack, Frames


def geometric(boxes: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Per-frame geometry (N, 4 + 2K) from a FaceTrack's boxes (N, 4) and landmarks (N, K, 2)."""
    relative = (landmarks - boxes[:, None, 0:2]) / boxes[:, None, 2:4]
    return np.concatenate([boxes, relative.reshape(len(boxes), -1)], 1).astype(np.float32)


class Landmarks(Extractor):
    name = "landmarks"
    modality = "face"
    in_worker = True
    needs_crops = False

    def __init__(self, arg: str | None, options: ExtractorOptions) -> None:
        super().__init__(arg, options)
        if arg is not None and not (arg.isdigit() and int(arg) > 0):
            raise UserError(
                f"--extractor landmarks:K takes a landmark count K (5: mtcnn, 468: blazeface), got {arg!r}"
            )
        self.count = int(arg) if arg else 5
        self.dim = 4 + 2 * self.count
        self.frame_rate = options.fps

    def extract(self, inputs: Sequence[FaceTrack]) -> list[Frames]:
        out = []
        for track in inputs:
            if not len(track.boxes):
                out.append(Frames(np.zeros((0, self.dim), np.float32)))
                continue
            found = None if track.landmarks is None else track.landmarks.shape[1]
            if found != self.count:
                raise UserError(
                    f"--extractor landmarks:{self.count} needs {self.count} landmarks per face, the detector "
                    f"gave {found or 'none'}; use --detector mtcnn with landmarks:5, blazeface with landmarks:468"
                )
            out.append(Frames(geometric(track.boxes, track.landmarks)))
        return out
