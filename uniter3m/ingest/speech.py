"""Speech frames from audio: openSMILE ComParE_2016 LLDs + deltas (`compare`) or eGeMAPS LLDs (`egemaps`).

These are MEmoBERT's 130-d speech features: 65 LLDs + 65 deltas per 10 ms frame. openSMILE
computes the two levels separately and, when it flushes at the end of a file, repeats a few tail
frames (same start time) in each; we keep the first row per start time and join the two levels
on it, so every stored frame holds one LLD vector and its own deltas. A file too short for one
analysis window comes back from openSMILE as a single all-NaN row: that is no frame, so the
utterance gets an empty stream (kept and counted by the builder), not a NaN error.

eGeMAPSv02 has no delta level: `egemaps` frames are its 25 LLDs, 10 ms apart.

openSMILE's licence is non-commercial, so it is the optional extra `uniter3m[speech]`.
Audio arrives decoded (any container, `uniter3m.ingest.media`) at `OPENSMILE_RATE`, mono.
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
EGEMAPS_SET = "eGeMAPSv02"
EGEMAPS_DIM = 25
OPENSMILE_RATE = 16000  # the rate audio is resampled to, so one corpus's files give comparable frames
OPENSMILE_FRAME_RATE = 100.0
AUDIO_SUFFIXES = (".wav", ".flac")


def _opensmile() -> Any:
    try:
        import opensmile
    except ImportError as err:
        raise UserError(
            "--extractor compare/egemaps needs openSMILE (non-commercial licence): pip install 'uniter3m[speech]'"
        ) from err
    return opensmile


@lru_cache(maxsize=1)
def _egemaps() -> Any:
    opensmile = _opensmile()
    return opensmile.Smile(
        feature_set=getattr(opensmile.FeatureSet, EGEMAPS_SET),
        feature_level=opensmile.FeatureLevel.LowLevelDescriptors,
    )


@lru_cache(maxsize=1)
def _extractors() -> tuple[Any, Any]:
    opensmile = _opensmile()
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


def _signal_frames(smiles: tuple[Any, ...], signal: np.ndarray, rate: int, where: str) -> np.ndarray:
    if len(signal) == 0:
        return np.zeros((0, sum(len(s.feature_names) for s in smiles)), np.float64)
    try:
        with warnings.catch_warnings():  # "Segment too short, filling with NaN": handled below
            warnings.simplefilter("ignore", UserWarning)
            parts = [_first_row_per_start(s.process_signal(signal, rate)) for s in smiles]
    except Exception as err:  # openSMILE raises many types
        raise UserError(f"{where}: openSMILE failed on its audio ({type(err).__name__}: {err})") from err
    joined = parts[0]
    for part in parts[1:]:
        joined = joined.join(part, how="inner")
    frames = joined.to_numpy(dtype=np.float64)
    return frames[~np.isnan(frames).all(axis=1)]


def opensmile_signal_frames(kind: str, signal: np.ndarray, rate: int, where: str) -> np.ndarray:
    """(T, D) float64 frames, 10 ms apart, of a mono signal: kind 'compare' (130-d) or 'egemaps' (25-d).

    T = 0 for a signal shorter than one analysis window (kept as an empty stream by the builder).
    """
    smiles = _extractors() if kind == "compare" else (_egemaps(),)
    frames = _signal_frames(smiles, np.asarray(signal, np.float32), rate, where)
    dim = COMPARE_DIM if kind == "compare" else EGEMAPS_DIM
    if frames.shape[1] != dim:
        raise UserError(
            f"{where}: openSMILE gave {frames.shape[1]} {kind} values per frame, expected {dim}; "
            "check the installed opensmile version"
        )
    return frames
