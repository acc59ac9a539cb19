"""`hf:DIR`: a local transformers encoder, for speech or faces (whichever the build is for).

For `--format wav` DIR holds an audio encoder (wav2vec 2.0, HuBERT, WavLM, data2vec-audio: hidden
states of `--layer`, mean-pooled every `--pool-frames`); for `--format video` a vision encoder
(CLIP/SigLIP vision tower, ViT, DINOv2: one vector per face crop, `--pool cls | mean | pooler`).
The networks run batched in the main process (`uniter3m.ingest.encoders`); meta.json records the
sha256 of the weight files, so two databases from different weights never look alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uniter3m.errors import UserError
from uniter3m.ingest.extractors.base import Extractor, ExtractorOptions, FaceTrack, Frames

WEIGHT_SUFFIXES = (".safetensors", ".bin")


class HfExtractor(Extractor):
    name = "hf"
    modality = "any"

    def __init__(self, arg: str | None, options: ExtractorOptions) -> None:
        from uniter3m.ingest.encoders import AudioEncoder, VisionEncoder

        if not arg:
            raise UserError("--extractor hf needs a local model folder: --extractor hf:DIR")
        super().__init__(arg, options)
        self.modality = options.modality
        self.model_dir = Path(arg).expanduser()
        self.encoder: AudioEncoder | VisionEncoder
        if options.modality == "speech":
            self.encoder = AudioEncoder(
                self.model_dir,
                options.layer,
                options.pool_frames,
                options.batch_size,
                options.device,
                options.precision,
            )
            self.sample_rate = self.encoder.sample_rate
            self.frame_rate = self.encoder.frame_rate
        else:
            self.encoder = VisionEncoder(
                self.model_dir,
                options.token_pool,
                options.layer,
                options.batch_size,
                options.device,
                options.precision,
            )
            self.frame_rate = options.fps
            self.crop_size = options.face_size
            self.colour = options.face_colour
        self.dim = self.encoder.dim

    def extract(self, inputs: Sequence[Any]) -> list[Frames]:
        if self.modality == "speech":
            return [Frames(f) for f in self.encoder.encode(inputs)]
        tracks: Sequence[FaceTrack] = inputs
        sizes = [len(t.crops) for t in tracks]
        flat = self.encoder.encode(np.concatenate([t.crops for t in tracks]))
        return [Frames(f) for f in np.split(flat, np.cumsum(sizes)[:-1])]

    def info(self) -> dict[str, Any]:
        import transformers

        from uniter3m.ingest.extractors.weights import sha256_of

        weights = sorted(p for p in self.model_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        return {
            **super().info(),
            **self.encoder.info(),
            "package": "transformers",
            "version": transformers.__version__,
            "frame_rate": self.frame_rate,
            "weights_sha256": {p.name: sha256_of(p) for p in weights},
        }
