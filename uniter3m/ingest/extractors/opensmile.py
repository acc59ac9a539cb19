"""openSMILE extractors: `compare` (ComParE_2016 LLDs + deltas), `egemaps` (eGeMAPSv02 LLDs), `functionals`.

`compare` gives MEmoBERT's 130-d speech frames: 65 LLDs + 65 deltas per 10 ms frame. openSMILE
computes the two levels separately and, when it flushes at the end of a signal, repeats a few tail
frames (same start time) in each; we keep the first row per start time and join the two levels on
it, so every stored frame holds one LLD vector and its own deltas. A signal too short for one
analysis window comes back from openSMILE as a single all-NaN row: that is no frame, so the
utterance gets an empty stream (kept and counted by the builder), not a NaN error.
`egemaps` frames are the 25 eGeMAPSv02 LLDs, 10 ms apart (that set has no delta level).
`functionals` is the ComParE_2016 functionals of the whole utterance: ONE 6373-d frame (frame rate 0).

All run in the decoding workers (cheap, per file) on mono audio and store float32 by default
(ComParE energies exceed float16 on real speech). The frame extractors read it resampled to 16 kHz
(one corpus's files give comparable frames); `functionals` reads each file at its own rate
(`sample_rate = None`), as openSMILE reads a file and as the classic SVM baselines were measured
(EmoDB: 22.05 kHz). `--pool-frames K` mean-pools every K LLD frames. openSMILE's licence is
non-commercial, so it is the optional extra `uniter3m[speech]`.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from collections.abc import Sequence
from functools import cache
from typing import Any, ClassVar

import numpy as np

from uniter3m.errors import UserError
from uniter3m.ingest.encoders import pool_frames
from uniter3m.ingest.extractors.base import Extractor, ExtractorOptions, Frames

COMPARE_DIM = 130  # 65 LLDs + 65 deltas
EGEMAPS_DIM = 25
FUNCTIONALS_DIM = 6373
OPENSMILE_RATE = 16000  # the rate audio is resampled to, so one corpus's files give comparable frames
OPENSMILE_FRAME_RATE = 100.0


def _opensmile() -> Any:
    try:
        import opensmile
    except ImportError as err:
        raise UserError(
            "--extractor compare/egemaps/functionals needs openSMILE (non-commercial licence): "
            "pip install 'uniter3m[speech]'"
        ) from err
    return opensmile


@cache
def _smiles(kind: str) -> tuple[Any, ...]:
    """The openSMILE configurations whose outputs are joined into one frame (cached per process)."""
    opensmile = _opensmile()
    sets, levels = opensmile.FeatureSet, opensmile.FeatureLevel
    if kind == "compare":
        return (
            opensmile.Smile(feature_set=sets.ComParE_2016, feature_level=levels.LowLevelDescriptors),
            opensmile.Smile(feature_set=sets.ComParE_2016, feature_level=levels.LowLevelDescriptors_Deltas),
        )
    if kind == "egemaps":
        return (opensmile.Smile(feature_set=sets.eGeMAPSv02, feature_level=levels.LowLevelDescriptors),)
    return (opensmile.Smile(feature_set=sets.ComParE_2016, feature_level=levels.Functionals),)


def _first_row_per_start(frame: Any) -> Any:
    starts = frame.index.get_level_values("start")
    frame = frame.set_axis(starts, axis=0)
    return frame[~frame.index.duplicated(keep="first")]


def signal_frames(kind: str, signal: np.ndarray, rate: int, dim: int) -> np.ndarray:
    """(T, dim) float64 frames of a mono signal; T = 0 for a signal shorter than one analysis window."""
    if len(signal) == 0:
        return np.zeros((0, dim), np.float64)
    try:
        with warnings.catch_warnings():  # "Segment too short, filling with NaN": handled below
            warnings.simplefilter("ignore", UserWarning)
            parts = [
                _first_row_per_start(s.process_signal(np.asarray(signal, np.float32), rate))
                for s in _smiles(kind)
            ]
    except Exception as err:  # openSMILE raises many types
        raise UserError(f"openSMILE failed on its audio ({type(err).__name__}: {err})") from err
    joined = parts[0]
    for part in parts[1:]:
        joined = joined.join(part, how="inner")
    frames = joined.to_numpy(dtype=np.float64)
    frames = frames[~np.isnan(frames).all(axis=1)]
    if frames.shape[1] != dim:
        raise UserError(
            f"openSMILE gave {frames.shape[1]} {kind} values per frame, expected {dim}; "
            "check the installed opensmile version"
        )
    return frames


class _OpenSmile(Extractor):
    """What the three share: mono in, run per file in the workers, float32 storage."""

    kind: ClassVar[str]
    modality = "speech"
    in_worker = True
    store_dtype = "float32"
    sample_rate: int | None = OPENSMILE_RATE

    def info(self) -> dict[str, Any]:
        return {
            **super().info(),
            "package": "opensmile",
            "version": importlib.metadata.version("opensmile"),
            "sample_rate": self.sample_rate or "native",
        }

    def frames(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        """openSMILE's frames of each input (a signal at `sample_rate`, or a (signal, rate) pair)."""
        pairs = inputs if self.sample_rate is None else [(s, self.sample_rate) for s in inputs]
        return [signal_frames(self.kind, signal, rate, self.dim) for signal, rate in pairs]


class _Lld(_OpenSmile):
    """Low-level descriptors every 10 ms, mean-pooled `--pool-frames` at a time."""

    def __init__(self, arg: str | None, options: ExtractorOptions) -> None:
        self.refuse_argument(arg)
        if options.pool_frames < 1:
            raise UserError(f"--pool-frames must be >= 1, got {options.pool_frames}")
        super().__init__(arg, options)
        self.pool = options.pool_frames
        self.frame_rate = OPENSMILE_FRAME_RATE / self.pool

    def extract(self, inputs: Sequence[np.ndarray]) -> list[Frames]:
        return [Frames(pool_frames(f, self.pool)) for f in self.frames(inputs)]

    def info(self) -> dict[str, Any]:
        return {**super().info(), "pool_frames": self.pool}


class Compare(_Lld):
    name = "compare"
    kind = "compare"
    dim = COMPARE_DIM


class Egemaps(_Lld):
    name = "egemaps"
    kind = "egemaps"
    dim = EGEMAPS_DIM


class Functionals(_OpenSmile):
    """ComParE_2016 functionals: one 6373-d frame per utterance (declare it as its own stream), at the file's rate."""

    name = "functionals"
    kind = "functionals"
    dim = FUNCTIONALS_DIM
    frame_rate = 0.0
    sample_rate = None

    def __init__(self, arg: str | None, options: ExtractorOptions) -> None:
        self.refuse_argument(arg)
        super().__init__(arg, options)

    def extract(self, inputs: Sequence[tuple[np.ndarray, int]]) -> list[Frames]:
        return [Frames(f[:1]) for f in self.frames(inputs)]
