"""`pixels`: the face crop itself, flattened and scaled to [0, 1] (`--face-size` squared x 1 or 3 channels)."""

from __future__ import annotations

from collections.abc import Sequence

from uniter3m.ingest.extractors.base import Extractor, ExtractorOptions, FaceTrack, Frames


class Pixels(Extractor):
    name = "pixels"
    modality = "face"
    in_worker = True

    def __init__(self, arg: str | None, options: ExtractorOptions) -> None:
        super().__init__(arg, options)
        self.frame_rate = options.fps
        self.crop_size = options.face_size
        self.colour = options.face_colour
        self.dim = self.crop_size**2 * (1 if self.colour == "grey" else 3)

    def extract(self, inputs: Sequence[FaceTrack]) -> list[Frames]:
        return [Frames(t.crops.reshape(len(t.crops), self.dim) / 255.0) for t in inputs]
