"""The shared real corpora -> uniter3m databases, with the real builders (recipe: `build_lmdb/corpora.py`).

Each builder reads the corpus files in place (nothing is copied into the project) and hands the
rows / utterances straight to `build_text_db` / `build_feat_db` (no intermediate files), so the
databases get exactly the builders' checks and meta.

MELD      `<out>/meld_txt`: ids `<split>_<Dialogue_ID>_<Utterance_ID>` (Dialogue_ID_Utterance_ID is only
          unique within one split file); labels Emotion, Sentiment, Speaker and split (train/dev/test).
IEMOCAP   `<out>/iemocap6_txt`: ids `<dialogue>_<turn>`; labels label, speaker (M/F), split
          (train/valid/test = Session 5), dialogue and session (Ses01..Ses05, from the dialogue name).
CMU-MOSI  `<out>/mosi_txt`, `<out>/mosi_audio` (73-d), `<out>/mosi_video` (100-d): ids `<video>_<segment>`;
          with split_dbs also `<out>/mosi_txt_{train,valid,test}` (pretraining on the training portion).
          Text tokens come from data/transcripts.csv through the row index in column 0 of
          data/text_{train,test}.csv; the audio and video vectors of each utterance become ONE-frame
          streams (rows of {audio,video}_{split}0.csv are aligned with text_{split}.csv, which is
          checked through the binary label in their last column). Labels: binary (1 = score >= 0, from
          the files), score (labels/OpinionLevelSentiment.csv by video + segment, in [-3, 3]), video,
          split. The validation split is carved from train BY VIDEO (speaker independent, like the
          train/test split): the `MOSI_VALID_VIDEOS` train videos with the smallest SHA-256 of their id,
          a fixed choice that needs no seed.
EmoDB     `<out>/emodb_txt`: ids = the file stem (`03a01Fa`); text = the German sentence (identical across
          emotions, so it carries no emotion); labels emotion (7), speaker (03..16), gender, sentence.
          `<out>/emodb_compare`: openSMILE ComParE LLD + deltas (130-d, 100 frames/s, float32) of each
          wav; with pool_frames K also `<out>/emodb_compare_p{K}` (K frames mean-pooled: 100/K frames/s).
          With split_dbs also `<out>/emodb_txt_spk{NN}`, one text db per speaker, so pretraining can
          read exactly the training speakers of a leave-one-speaker-out fold. With speaker_norm also
          `<name>_spk` for each speech db: every dimension z-scored with the mean/std of ALL frames of
          the utterance's speaker (`uniter3m.ingest.normalise`). With functionals also `<out>/emodb_func`:
          the `functionals` extractor (ComParE_2016 functionals of each wav at its own 22.05 kHz, ONE 6373-d
          frame per utterance; a stream to declare in a config, e.g. "streams": {"func": "F"}). With
          extractors also `<out>/emodb_<name>` per registered speech extractor (`-` becomes `_`: resemblyzer
          -> `emodb_resemblyzer`, 256-d states at 100 frames/s; resemblyzer-utt -> `emodb_resemblyzer_utt`, the
          one-frame utterance embedding), each pooled by pool_frames when it gives frames.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uniter3m.errors import UserError
from uniter3m.ingest.extractors import ExtractorOptions, extractor_class
from uniter3m.ingest.feat_db import FeatDbSpec, build_feat_db
from uniter3m.ingest.media import Segment
from uniter3m.ingest.normalise import speaker_normalised_db
from uniter3m.ingest.recordings import MediaOptions, media_source
from uniter3m.ingest.sources import Utterance
from uniter3m.ingest.text_db import TextDbSpec, build_text_db

MELD_SPLITS = {"train": "train_sent_emo.csv", "dev": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}
MOSI_VALID_VIDEOS = 8  # of 62 training videos (~13 %)
_SESSION = re.compile(r"^(Ses\d\d)")


def _need(path: Path) -> Path:
    if not path.exists():
        raise UserError(
            f"{path} does not exist; point --data at the shared data folder (UNITER3M_SHARED_DATA)"
        )
    return path


def text_db_from_rows(
    rows: Iterable[dict[str, Any]],
    out: Path,
    tokenizer: Path,
    labels: list[str],
    overwrite: bool,
    lexicon: str,
) -> dict[str, Any]:
    """A text db of rows {"id", "text", label columns...} (what every corpus here writes)."""
    spec = TextDbSpec(
        id_cols=["id"],
        text_col="text",
        tokenizer=tokenizer,
        out=out,
        label_cols=labels,
        lexicon=lexicon,
        overwrite=overwrite,
    )
    return build_text_db(spec, rows)


# ----------------------------------------------------------------------------- MELD
def meld_rows(meld_dir: Path) -> Iterable[dict[str, Any]]:
    for split, name in MELD_SPLITS.items():
        path = _need(meld_dir / name)
        with path.open(encoding="utf-8", newline="") as f:
            for line, row in enumerate(csv.DictReader(f), start=2):
                try:
                    uid = f"{split}_{int(row['Dialogue_ID'])}_{int(row['Utterance_ID'])}"
                except (KeyError, ValueError) as err:
                    raise UserError(
                        f"{path} line {line}: no integer Dialogue_ID/Utterance_ID ({err})"
                    ) from err
                yield {
                    "id": uid,
                    "text": row["Utterance"],
                    "Emotion": row["Emotion"],
                    "Sentiment": row["Sentiment"],
                    "Speaker": row["Speaker"],
                    "split": split,
                }


def build_meld(data: Path, out: Path, tokenizer: Path, overwrite: bool = False, lexicon: str = "nrc") -> dict:
    labels = ["Emotion", "Sentiment", "Speaker", "split"]
    return {
        "meld_txt": text_db_from_rows(
            meld_rows(data / "meld"), out / "meld_txt", tokenizer, labels, overwrite, lexicon
        )
    }


# ----------------------------------------------------------------------------- IEMOCAP
def iemocap_rows(path: Path) -> Iterable[dict[str, Any]]:
    with _need(path).open(encoding="utf-8") as f:
        for line, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
                dialogue = row["dialogue"]
                match = _SESSION.match(dialogue)
                if match is None:
                    raise UserError(f"{path} line {line}: dialogue {dialogue!r} does not start with SesNN")
                yield {
                    "id": f"{dialogue}_{row['turn']}",
                    "text": row["text"],
                    "label": row["label"],
                    "speaker": row["speaker"],
                    "split": row["split"],
                    "dialogue": dialogue,
                    "session": match.group(1),
                }
            except (json.JSONDecodeError, KeyError) as err:
                raise UserError(f"{path} line {line}: not an IEMOCAP record ({err!r})") from err


def build_iemocap(
    data: Path, out: Path, tokenizer: Path, overwrite: bool = False, lexicon: str = "nrc"
) -> dict:
    rows = iemocap_rows(data / "iemocap6_text" / "iemocap6.jsonl")
    labels = ["label", "speaker", "split", "dialogue", "session"]
    return {
        "iemocap6_txt": text_db_from_rows(rows, out / "iemocap6_txt", tokenizer, labels, overwrite, lexicon)
    }


# ----------------------------------------------------------------------------- CMU-MOSI
def _read_csv(path: Path) -> list[list[str]]:
    with _need(path).open(encoding="utf-8", newline="") as f:
        return [row for row in csv.reader(f) if row]


def mosi_valid_videos(train_videos: Iterable[str], count: int = MOSI_VALID_VIDEOS) -> set[str]:
    """The `count` training videos with the smallest SHA-256 of their id (fixed, seed-free)."""
    ranked = sorted(set(train_videos), key=lambda v: hashlib.sha256(v.encode()).hexdigest())
    return set(ranked[:count])


def mosi_utterances(mosi: Path) -> tuple[list[dict[str, Any]], dict[str, list[list[float]]]]:
    """Text rows (with labels) and the aligned audio/video vectors, in file order (train, then test)."""
    transcripts = _read_csv(mosi / "data" / "transcripts.csv")
    scores: dict[str, float] = {}
    for line, row in enumerate(_read_csv(mosi / "labels" / "OpinionLevelSentiment.csv"), start=1):
        if len(row) != 5:
            raise UserError(
                f"{mosi}/labels/OpinionLevelSentiment.csv line {line}: expected 5 columns, got {len(row)}"
            )
        scores[f"{row[2]}_{row[3]}"] = float(row[4])
    rows: list[dict[str, Any]] = []
    feats: dict[str, list[list[float]]] = {"audio": [], "video": []}
    for split in ("train", "test"):
        text_index = _read_csv(mosi / "data" / f"text_{split}.csv")
        streams = {m: _read_csv(mosi / "data" / m / f"{m}_{split}0.csv") for m in ("audio", "video")}
        for m, table in streams.items():
            if len(table) != len(text_index):
                raise UserError(
                    f"{mosi}/data/{m}/{m}_{split}0.csv has {len(table)} rows but data/text_{split}.csv has "
                    f"{len(text_index)}; the files must be aligned row by row"
                )
        for r, index_row in enumerate(text_index):
            t = int(float(index_row[0]))
            if not 0 <= t < len(transcripts):
                raise UserError(
                    f"{mosi}/data/text_{split}.csv row {r + 1}: index {t} is outside transcripts.csv"
                )
            uid, text, video, binary = transcripts[t][:4]
            for m, table in streams.items():
                if table[r][-1] != binary:
                    raise UserError(
                        f"{mosi}/data/{m}/{m}_{split}0.csv row {r + 1} has label {table[r][-1]} but utterance "
                        f"{uid!r} (text_{split}.csv row {r + 1}) has {binary}: the files are not aligned"
                    )
                feats[m].append([float(v) for v in table[r][:-1]])
            if uid not in scores:
                raise UserError(f"utterance {uid!r} has no score in {mosi}/labels/OpinionLevelSentiment.csv")
            if (scores[uid] >= 0) != (binary == "1"):
                raise UserError(
                    f"utterance {uid!r}: score {scores[uid]} disagrees with its binary label {binary}"
                )
            rows.append(
                {
                    "id": uid,
                    "text": text,
                    "binary": int(binary),
                    "score": scores[uid],
                    "video": uid.rsplit("_", 1)[0],
                    "split": split,
                }
            )
    valid = mosi_valid_videos(r["video"] for r in rows if r["split"] == "train")
    for row in rows:
        if row["split"] == "train" and row["video"] in valid:
            row["split"] = "valid"
    return rows, feats


def build_mosi(
    data: Path,
    out: Path,
    tokenizer: Path,
    overwrite: bool = False,
    lexicon: str = "nrc",
    split_dbs: bool = False,
) -> dict:
    rows, feats = mosi_utterances(data / "mosi_bclstm")
    labels = ["binary", "score", "video", "split"]
    # with split_dbs one text db per split too (mosi_txt_train, ...), e.g. to pretrain on the training portion only
    metas = text_dbs_by(rows, out, "mosi_txt", "split", "", tokenizer, labels, overwrite, lexicon, split_dbs)
    for m in ("audio", "video"):
        dims = {len(v) for v in feats[m]}
        if len(dims) != 1:
            raise UserError(f"CMU-MOSI {m} vectors of different lengths {sorted(dims)}")
        utterances = (
            Utterance(r["id"], f"CMU-MOSI {m} of {r['id']!r}", np.asarray([vec], np.float64))
            for r, vec in zip(rows, feats[m])
        )
        spec = FeatDbSpec(out=out / f"mosi_{m}", dtype="float32", overwrite=overwrite)
        metas[f"mosi_{m}"] = build_feat_db(spec, utterances)
    metas["split_counts"] = dict(Counter(r["split"] for r in rows))
    return metas


# ----------------------------------------------------------------------------- EmoDB
EMODB_LABELS = ["emotion", "speaker", "gender", "sentence"]


def corpus_rows(folder: Path, table: str, media: str, labels: list[str], unit: str) -> list[dict[str, Any]]:
    """One row per `unit` of `folder/table` (columns id, `media`, text, `labels`), the media file's
    absolute path checked to exist (a corpus with a bad path fails before any long extraction)."""
    path = _need(folder / table)
    rows = []
    with path.open(encoding="utf-8", newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                file = _need(folder / row[media])
                rows.append(
                    {
                        "id": row["id"],
                        media: str(file.resolve()),
                        "text": row["text"],
                        **{k: row[k] for k in labels},
                    }
                )
            except KeyError as err:
                raise UserError(
                    f"{path} line {line}: no column {err} (need id, {media}, text, {labels})"
                ) from err
    if not rows:
        raise UserError(f"{path} holds no {unit}")
    return rows


def emodb_rows(emodb: Path) -> list[dict[str, Any]]:
    """One row per utterance of emodb.csv, with the wav's absolute path checked to exist."""
    return corpus_rows(emodb, "emodb.csv", "wav", EMODB_LABELS, "utterance")


def text_dbs_by(
    rows: Sequence[dict[str, Any]],
    out: Path,
    name: str,
    column: str,
    part: str,
    tokenizer: Path,
    labels: list[str],
    overwrite: bool,
    lexicon: str,
    split_dbs: bool,
) -> dict[str, Any]:
    """`<out>/<name>` of all rows (the media column left out), and with split_dbs one more per value v of
    `column`, `<out>/<name>_<part>v`, so fold-safe pretraining reads exactly a fold's training speakers."""
    text_rows = [{k: v for k, v in r.items() if k in ("id", "text", *labels)} for r in rows]
    metas = {name: text_db_from_rows(text_rows, out / name, tokenizer, labels, overwrite, lexicon)}
    if split_dbs:
        for value in sorted({r[column] for r in text_rows}):
            group = [r for r in text_rows if r[column] == value]
            metas[f"{name}_{part}{value}"] = text_db_from_rows(
                group, out / f"{name}_{part}{value}", tokenizer, labels, overwrite, lexicon
            )
    return metas


def one_frame(extractor: str) -> bool:
    """Whether the registered extractor gives one frame per utterance (nothing to pool)."""
    return getattr(extractor_class(extractor), "frame_rate", None) == 0.0


def speech_db(
    segments: Sequence[Segment], out: Path, extractor: str, overwrite: bool, pool_frames: int = 1
) -> dict[str, Any]:
    """A speech db of `segments` by a registered extractor (stored float32)."""
    opts = MediaOptions(extractor=extractor, extract=ExtractorOptions(pool_frames=pool_frames))
    spec = FeatDbSpec(out=out, dtype="float32", overwrite=overwrite, progress=False)
    return build_feat_db(spec, media_source("wav", opts, segments=segments))


def build_emodb(
    data: Path,
    out: Path,
    tokenizer: Path,
    overwrite: bool = False,
    lexicon: str = "nrc",
    split_dbs: bool = False,
    pool_frames: Sequence[int] = (),
    limit: int | None = None,
    speaker_norm: bool = False,
    functionals: bool = False,
    extractors: Sequence[str] = (),
) -> dict:
    """Text db + ComParE speech db(s) of EmoDB, + one per extra speech extractor (`limit`: the first N rows)."""
    for name in extractors:
        extractor_class(name)  # an unknown name fails here, not after the first databases
    rows = emodb_rows(data / "emodb")[:limit]
    metas = text_dbs_by(
        rows, out, "emodb_txt", "speaker", "spk", tokenizer, EMODB_LABELS, overwrite, lexicon, split_dbs
    )
    segments = [Segment(r["id"], Path(r["wav"])) for r in rows]
    metas["emodb_compare"] = speech_db(segments, out / "emodb_compare", "compare", overwrite)
    for k in pool_frames:
        if k > 1:
            metas[f"emodb_compare_p{k}"] = speech_db(
                segments, out / f"emodb_compare_p{k}", "compare", overwrite, k
            )
    if functionals:
        metas["emodb_func"] = speech_db(segments, out / "emodb_func", "functionals", overwrite)
    speech = ["emodb_compare", "emodb_func"]
    for extractor in extractors:
        name = f"emodb_{extractor.replace('-', '_')}"
        speech.append(name)
        metas[name] = speech_db(segments, out / name, extractor, overwrite)
        if not one_frame(extractor):
            for k in (k for k in pool_frames if k > 1):
                metas[f"{name}_p{k}"] = speech_db(segments, out / f"{name}_p{k}", extractor, overwrite, k)
    if speaker_norm:
        speaker_of = {r["id"]: r["speaker"] for r in rows}
        for name in [n for n in metas if n.startswith(tuple(speech))]:
            metas[f"{name}_spk"] = speaker_normalised_db(
                out / name, out / f"{name}_spk", speaker_of, overwrite
            )
    metas["emotion_counts"] = dict(Counter(r["emotion"] for r in rows))
    return metas


CORPUS_BUILDERS: dict[str, Callable[..., dict[str, Any]]] = {
    "meld": build_meld,
    "iemocap": build_iemocap,
    "mosi": build_mosi,
    "emodb": build_emodb,
}
