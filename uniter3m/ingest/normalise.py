"""Per-speaker normalisation: a copy of a feature database whose frames are z-scored per speaker.

The statistics are those of every frame of the speaker's utterances (no label is read): the
per-speaker normalisation of the classic speech-emotion baselines.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from uniter3m.data.store import DbReader
from uniter3m.errors import UserError
from uniter3m.ingest.feat_db import FeatDbSpec, build_feat_db
from uniter3m.ingest.sources import FrameSource, Utterance

STD_FLOOR = 1e-6  # a constant dimension stays 0 instead of dividing by zero


def speaker_normalised_db(
    src: Path, out: Path, speaker_of: Mapping[str, str], overwrite: bool = False
) -> dict[str, Any]:
    """Build `out` from feature db `src` with every frame z-scored by its speaker's mean/std (float32)."""
    db = DbReader(src, kind="feat")
    feats = {uid: np.asarray(db[uid]["feat"], dtype=np.float64) for uid in db.ids}
    missing = sorted(set(feats) - set(speaker_of))
    if missing:
        raise UserError(f"{src}: ids without a speaker, e.g. {missing[:3]}; give every utterance a speaker")
    stats = {}
    for spk in sorted({speaker_of[u] for u in feats}):
        frames = np.concatenate([f for u, f in feats.items() if speaker_of[u] == spk and len(f)])
        stats[spk] = (frames.mean(0), np.maximum(frames.std(0), STD_FLOOR))

    def utterances() -> Iterator[Utterance]:
        for uid, f in feats.items():
            mean, std = stats[speaker_of[uid]]
            yield Utterance(uid, f"{src} id {uid!r}", ((f - mean) / std).astype(np.float32))

    info = {
        "path": str(src),
        "format": "speaker-normalised",
        "extractor": db.meta.get("source", {}).get("extractor"),
    }
    spec = FeatDbSpec(out=out, dtype="float32", overwrite=overwrite, progress=False)
    return build_feat_db(spec, FrameSource(utterances(), info, len(feats)))
