"""`geometric`: the kept face's box per sampled frame, 4-d: centre x, y, width, height over the frame's size.

Needs no crop (`needs_crops = False`), so it is as cheap as the detector; runs in the decoding workers.
"""

from __future__ import annotations

from collections.abc import Sequence

from uniter3m.ingest.extractors.base import Extractor, ExtractorOptions, FaceTrack, Frames

GEOMETRIC_DIM = 4


class Geometric(Extractor):
    name = "geometric"
    modality = "face"
    in_worker = True
    needs_crops = False
    dim = GEOMETRIC_DIM

    def __init__(self, arg: str | None, options: ExtractorOptions) -> None:
        super().__init__(arg, options)
        self.frame_rate = options.fps

    def extract(self, inputs: Sequence[FaceTrack]) -> list[Frames]:
        return [Frames(track.boxes) for track in inputs]
