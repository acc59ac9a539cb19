"""RAVDESS (speech part) -> uniter3m databases (recipe: `build_lmdb/corpora.py ravdess`).

Reads `<data>/ravdess/ravdess.csv`, its FLAC files and `face_au.csv` in place (nothing is copied)
and hands rows / utterances to the library builders (`build_text_db`, `build_feat_db`).

`<out>/ravdess_txt`      ids = the RAVDESS audio-only name (`03-01-05-02-01-01-12`); text = the statement
                         ("Kids are talking by the door" / "Dogs are sitting by the door": it carries no
                         emotion); labels emotion (8), actor (01..24), gender, intensity, statement, repetition.
`<out>/ravdess_face`     the 35 OpenFace action-unit values of the clip's video (averaged over its frames by
                         the source) as ONE 35-d frame: the built-in `face` stream (V) with feat_dim 35.
`<out>/ravdess_<ext>`    a speech db per extractor of `extractors` (the registry's names: compare = ComParE
                         LLD 130-d at 100 frames/s, egemaps = eGeMAPS LLD, functionals = ComParE_2016
                         functionals as one 6373-d frame, resemblyzer = the speaker encoder's 256-d states
                         at 100 frames/s); with pool_frames K also `ravdess_<ext>_p{K}` for every extractor
                         that gives frames (K frames mean-pooled: 100/K frames/s).
split_dbs                also `<out>/ravdess_txt_actor{NN}`, one text db per actor (fold-safe pretraining
                         reads exactly a fold's training actors).
speaker_norm             also `<name>_spk` of the face and every speech db: each dimension z-scored with the
                         mean/std of all frames of the clip's actor (label-free; `uniter3m.ingest.normalise`).
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uniter3m.errors import UserError
from uniter3m.ingest.corpora import _need, corpus_rows, one_frame, speech_db, text_dbs_by
from uniter3m.ingest.extractors import extractor_class
from uniter3m.ingest.feat_db import FeatDbSpec, build_feat_db
from uniter3m.ingest.media import Segment
from uniter3m.ingest.normalise import speaker_normalised_db
from uniter3m.ingest.sources import Utterance

RAVDESS_LABELS = ["emotion", "actor", "gender", "intensity", "statement", "repetition"]
SPEECH_EXTRACTORS = ("compare", "egemaps", "functionals", "resemblyzer")
FACE_AU_DIM = 35


def ravdess_rows(ravdess: Path) -> list[dict[str, Any]]:
    """One row per clip of ravdess.csv, with the audio file's absolute path checked to exist."""
    return corpus_rows(ravdess, "ravdess.csv", "audio", RAVDESS_LABELS, "clip")


def face_vectors(ravdess: Path, ids: Sequence[str]) -> dict[str, np.ndarray]:
    """The 35 action-unit values of each clip in `ids`, from face_au.csv (every id must have one)."""
    path = _need(ravdess / "face_au.csv")
    wanted = set(ids)
    found: dict[str, np.ndarray] = {}
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        if len(header) != FACE_AU_DIM + 1 or header[0] != "id":
            raise UserError(
                f"{path}: the header must be id + {FACE_AU_DIM} action-unit columns, got {len(header)} columns"
            )
        for line, row in enumerate(reader, start=2):
            if not row or row[0] not in wanted:
                continue
            try:
                found[row[0]] = np.asarray([float(v) for v in row[1:]], np.float64)
            except ValueError as err:
                raise UserError(f"{path} line {line} (id {row[0]!r}): a non-numeric value ({err})") from err
            if found[row[0]].shape != (FACE_AU_DIM,) or not np.isfinite(found[row[0]]).all():
                raise UserError(
                    f"{path} line {line} (id {row[0]!r}): need {FACE_AU_DIM} finite values, "
                    f"got {len(row) - 1}: fix or drop the row"
                )
    missing = [uid for uid in ids if uid not in found]
    if missing:
        raise UserError(
            f"{path}: {len(missing)} clip(s) of ravdess.csv have no action-unit row (first id {missing[0]!r}); "
            "add them or drop those clips from ravdess.csv"
        )
    return found


def build_ravdess(
    data: Path,
    out: Path,
    tokenizer: Path,
    overwrite: bool = False,
    lexicon: str = "nrc",
    split_dbs: bool = False,
    extractors: Sequence[str] = SPEECH_EXTRACTORS,
    pool_frames: Sequence[int] = (),
    speaker_norm: bool = False,
) -> dict[str, Any]:
    """Text, face and speech dbs of RAVDESS (see the module docstring for names and options)."""
    ravdess = data / "ravdess"
    rows = ravdess_rows(ravdess)
    faces = face_vectors(ravdess, [r["id"] for r in rows])  # checked before any long extraction
    for name in extractors:
        extractor_class(name)  # an unknown name fails here, not after the first databases
    metas = text_dbs_by(
        rows, out, "ravdess_txt", "actor", "actor", tokenizer, RAVDESS_LABELS, overwrite, lexicon, split_dbs
    )

    def face_utterances() -> Iterator[Utterance]:
        for r in rows:
            yield Utterance(r["id"], f"{ravdess / 'face_au.csv'} id {r['id']!r}", faces[r["id"]][None])

    spec = FeatDbSpec(out=out / "ravdess_face", dtype="float32", overwrite=overwrite, progress=False)
    metas["ravdess_face"] = build_feat_db(spec, face_utterances())
    segments = [Segment(r["id"], Path(r["audio"])) for r in rows]
    for name in extractors:
        metas[f"ravdess_{name}"] = speech_db(segments, out / f"ravdess_{name}", name, overwrite)
        if not one_frame(name):
            for k in (k for k in pool_frames if k > 1):
                metas[f"ravdess_{name}_p{k}"] = speech_db(
                    segments, out / f"ravdess_{name}_p{k}", name, overwrite, k
                )
    if speaker_norm:
        actor_of = {r["id"]: r["actor"] for r in rows}
        for db in [
            n for n in metas if n == "ravdess_face" or n.startswith(tuple(f"ravdess_{e}" for e in extractors))
        ]:
            metas[f"{db}_spk"] = speaker_normalised_db(out / db, out / f"{db}_spk", actor_of, overwrite)
    metas["emotion_counts"] = dict(Counter(r["emotion"] for r in rows))
    return metas
