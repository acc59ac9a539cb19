"""The extractor contract: decoded media in, per-utterance frames (and optional per-frame soft labels) out.

A speech extractor receives mono float32 signals at its `sample_rate`, or, with `sample_rate = None`
(openSMILE functionals: decoded at each file's own rate), `(signal, rate)` pairs; a face extractor receives one
`FaceTrack` per utterance (the aligned crops, boxes and landmarks of the frames where a face was found).
Cheap per-file work (openSMILE) may run in the decoding worker processes (`in_worker = True`); neural
networks run batched in the main process. See docs/DESIGN.md §2 (ingest) for where this sits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from uniter3m.errors import UserError


@dataclass
class ExtractorOptions:
    """The CLI flags an extractor may read; each extractor ignores what it does not use."""

    layer: str | None = None  # which hidden layer(s) of a network ("-1", "4", "2,3")
    pool_frames: int = 1  # mean-pool this many consecutive frames into one
    token_pool: str = "cls"  # vision transformers: cls | mean
    batch_size: int = 16
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    fps: float = 5.0  # face: frames sampled per second of video
    face_size: int = 64  # face: crop side for extractors that take any size (pixels, hf)
    face_colour: str = "grey"  # face: grey | rgb, for extractors that take either
    modality: str = "speech"  # what the build is for (--format wav: speech, video: face)
    extra: dict[str, Any] = field(default_factory=dict)  # extractor-specific settings


@dataclass
class Frames:
    """One utterance's output: frames (T, D) and, for extractors that classify, soft labels (T, C)."""

    feat: np.ndarray
    soft: np.ndarray | None = None


@dataclass
class FaceTrack:
    """The faces of one utterance, one row per sampled frame in which a face was kept."""

    crops: np.ndarray  # (N, S, S, C) uint8, aligned crops at the extractor's crop_size / colour
    boxes: np.ndarray  # (N, 4) float32: box centre x, y, width, height over frame width / height
    landmarks: np.ndarray | None = (
        None  # (N, K, 2) float32 in [0, 1] of the frame, when the detector has them
    )
    times: np.ndarray | None = None  # (N,) seconds


class Extractor:
    """One registered way of turning media into frames. Subclasses set the class fields and `extract`."""

    name: ClassVar[str]  # the --extractor value (before any ":ARG")
    modality: ClassVar[str]  # "speech", "face", or "any" (then __init__ reads options.modality)
    in_worker: ClassVar[bool] = False  # True: extract() runs per file in the decoding workers
    needs_crops: ClassVar[bool] = True  # face: False when only boxes / landmarks are used
    store_dtype: ClassVar[str] = "float16"  # the database dtype it stores by default (--dtype overrides)

    dim: int
    frame_rate: float  # frames per second of the output (face: the sampling --fps; 0: one per utterance)
    sample_rate: int | None = 16000  # speech: the rate signals are decoded at; None: each file's own
    crop_size: int = 64  # face: the crop side it wants
    colour: str = "grey"  # face: grey | rgb
    soft_label_dim: int = 0  # > 0 when Frames.soft is filled

    def __init__(self, arg: str | None, options: ExtractorOptions) -> None:
        """`arg`: the text after "NAME:" in --extractor (None without one)."""
        self.arg = arg
        self.options = options

    @classmethod
    def refuse_argument(cls, arg: str | None) -> None:
        """For an extractor with nothing to choose: a ":ARG" (even an empty one) is a mistake, not ignored."""
        if arg is not None:
            raise UserError(f"--extractor {cls.name} takes no argument, got '{cls.name}:{arg}'")

    def extract(self, inputs: Sequence[Any]) -> list[Frames]:
        """Speech: a list of 1-D signals (`(signal, rate)` pairs when `sample_rate` is None); face: a list of
        FaceTrack. One Frames per input, in order.

        Frames.feat is (T, dim); a face extractor gives one row per crop (T = 0 for an empty track).
        Raise `UserError` for bad input: the caller adds the file and id to the message.
        """
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """What meta.json records: name, dim, frame rate, package + version, weight file + sha256, settings."""
        return {
            "name": self.name if self.arg is None else f"{self.name}:{self.arg}",
            "dim": self.dim,
            "frame_rate": self.frame_rate,
            "soft_label_dim": self.soft_label_dim,
        }
