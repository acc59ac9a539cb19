"""Speech frames from audio files: openSMILE ComParE_2016 low-level descriptors and their deltas.

These are MEmoBERT's 130-d speech features: 65 LLDs + 65 deltas per 10 ms frame. openSMILE
computes the two levels separately and, when it flushes at the end of a file, repeats a few tail
frames (same start time) in each; we keep the first row per start time and join the two levels
on it, so every stored frame holds one LLD vector and its own deltas. A file too short for one
analysis window comes back from openSMILE as a single all-NaN row: that is no frame, so the
utterance gets an empty stream (kept and counted by the builder), not a NaN error.

openSMILE's licence is non-commercial, so it is the optional extra `uniter3m[speech]`.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from uniter3m.errors import UserError

FEATURE_SET = "ComParE_2016"
COMPARE_DIM = 130  # 65 LLDs + 65 deltas
AUDIO_SUFFIXES = (".wav", ".flac")


@lru_cache(maxsize=1)
def _extractors() -> tuple[Any, Any]:
    try:
        import opensmile
    except ImportError as err:
        raise UserError(
            "--format wav needs openSMILE (non-commercial licence): pip install 'uniter3m[speech]'"
        ) from err
    feature_set = getattr(opensmile.FeatureSet, FEATURE_SET)
    levels = opensmile.FeatureLevel
    return (
        opensmile.Smile(feature_set=feature_set, feature_level=levels.LowLevelDescriptors),
        opensmile.Smile(feature_set=feature_set, feature_level=levels.LowLevelDescriptors_Deltas),
    )


def _first_row_per_start(frame: Any) -> Any:
    starts = frame.index.get_level_values("start")
    frame = frame.set_axis(starts, axis=0)
    return frame[~frame.index.duplicated(keep="first")]


def compare_frames(file: Path, uid: str) -> np.ndarray:
    """(T, 130) float64 frames of one audio file: LLDs then deltas, 10 ms apart; T = 0 for a too-short file."""
    lld_smile, delta_smile = _extractors()
    try:
        with warnings.catch_warnings():  # "Segment too short, filling with NaN": handled below
            warnings.simplefilter("ignore", UserWarning)
            lld = _first_row_per_start(lld_smile.process_file(str(file)))
            delta = _first_row_per_start(delta_smile.process_file(str(file)))
    except Exception as err:  # openSMILE/audiofile raise many types for a broken file
        raise UserError(
            f"{file} (id {uid!r}) cannot be read as audio ({type(err).__name__}: {err}); re-export it"
        ) from err
    joined = lld.join(delta, how="inner")
    if joined.shape[1] != COMPARE_DIM:
        raise UserError(
            f"{file} (id {uid!r}): openSMILE gave {joined.shape[1]} ComParE values per frame, expected "
            f"{COMPARE_DIM}; check the installed opensmile version"
        )
    frames = joined.to_numpy(dtype=np.float64)
    return frames[~np.isnan(frames).all(axis=1)]
