"""Recipes: the shared real corpora -> uniter3m databases, with the real builders.

    python -m uniter3m.recipes.build_lmdb.corpora meld    --data ../shared/data --tokenizer TOK --out db/
    python -m uniter3m.recipes.build_lmdb.corpora iemocap --data ../shared/data --tokenizer TOK --out db/
    python -m uniter3m.recipes.build_lmdb.corpora mosi    --data ../shared/data --tokenizer TOK --out db/
    python -m uniter3m.recipes.build_lmdb.corpora emodb   --data ../shared/data --tokenizer TOK --out db/ \
        [--pool-frames 10] [--split-dbs]

Each recipe reads the corpus files in place (nothing is copied into the project), writes one
intermediate file per database into a temporary folder (a JSONL transcript with the label
columns the protocols need, or a one-row-per-utterance feature CSV) and hands it to
`build_text_db` / `build_feat_db`, so the databases get exactly the builders' checks and meta.

MELD      `<out>/meld_txt`: ids `<split>_<Dialogue_ID>_<Utterance_ID>` (Dialogue_ID_Utterance_ID is only
          unique within one split file); labels Emotion, Sentiment, Speaker and split (train/dev/test).
IEMOCAP   `<out>/iemocap6_txt`: ids `<dialogue>_<turn>`; labels label, speaker (M/F), split
          (train/valid/test = Session 5), dialogue and session (Ses01..Ses05, from the dialogue name).
CMU-MOSI  `<out>/mosi_txt`, `<out>/mosi_audio` (73-d), `<out>/mosi_video` (100-d): ids `<video>_<segment>`;
          with --split-dbs also `<out>/mosi_txt_{train,valid,test}` (pretraining on the training portion).
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
          wav; with --pool-frames K also `<out>/emodb_compare_p{K}` (K frames mean-pooled: 100/K frames/s).
          With --split-dbs also `<out>/emodb_txt_spk{NN}`, one text db per speaker, so pretraining can
          read exactly the training speakers of a leave-one-speaker-out fold. With --speaker-norm also
          `<name>_spk` for each speech db: every dimension z-scored with the mean/std of ALL frames of
          the utterance's speaker (label-free, the per-speaker normalisation of the classic baselines).
          With --functionals also `<out>/emodb_func`: the openSMILE ComParE_2016 functionals of each wav
          as ONE 6373-d frame (a stream to declare in a config, e.g. "streams": {"func": "F"}).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from uniter3m.errors import UserError
from uniter3m.ingest.feat_db import FeatDbSpec, build_feat_db
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


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def _text_db(
    jsonl: Path, out: Path, tokenizer: Path, labels: list[str], overwrite: bool, lexicon: str
) -> dict[str, Any]:
    spec = TextDbSpec(
        input=jsonl,
        id_cols=["id"],
        text_col="text",
        tokenizer=tokenizer,
        out=out,
        label_cols=labels,
        lexicon=lexicon,
        overwrite=overwrite,
    )
    return build_text_db(spec)


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
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = Path(tmp) / "meld.jsonl"
        _write_jsonl(jsonl, meld_rows(data / "meld"))
        meta = _text_db(
            jsonl,
            out / "meld_txt",
            tokenizer,
            ["Emotion", "Sentiment", "Speaker", "split"],
            overwrite,
            lexicon,
        )
    return {"meld_txt": meta}


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
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = Path(tmp) / "iemocap6.jsonl"
        _write_jsonl(jsonl, iemocap_rows(data / "iemocap6_text" / "iemocap6.jsonl"))
        meta = _text_db(
            jsonl,
            out / "iemocap6_txt",
            tokenizer,
            ["label", "speaker", "split", "dialogue", "session"],
            overwrite,
            lexicon,
        )
    return {"iemocap6_txt": meta}


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


def _feature_csv(path: Path, ids: Sequence[str], vectors: Sequence[Sequence[float]]) -> None:
    dims = {len(v) for v in vectors}
    if len(dims) != 1:
        raise UserError(f"{path.name}: feature vectors of different lengths {sorted(dims)}")
    dim = dims.pop()
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", *(f"f{i}" for i in range(dim))])
        for uid, vec in zip(ids, vectors):
            w.writerow([uid, *(repr(x) for x in vec)])


def build_mosi(
    data: Path,
    out: Path,
    tokenizer: Path,
    overwrite: bool = False,
    lexicon: str = "nrc",
    split_dbs: bool = False,
) -> dict:
    rows, feats = mosi_utterances(data / "mosi_bclstm")
    ids = [r["id"] for r in rows]
    metas = {}
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = Path(tmp) / "mosi.jsonl"
        _write_jsonl(jsonl, rows)
        labels = ["binary", "score", "video", "split"]
        metas["mosi_txt"] = _text_db(jsonl, out / "mosi_txt", tokenizer, labels, overwrite, lexicon)
        if split_dbs:
            # One text db per split, e.g. for pretraining on the training portion only.
            for split in ("train", "valid", "test"):
                part = Path(tmp) / f"mosi_{split}.jsonl"
                _write_jsonl(part, (r for r in rows if r["split"] == split))
                metas[f"mosi_txt_{split}"] = _text_db(
                    part, out / f"mosi_txt_{split}", tokenizer, labels, overwrite, lexicon
                )
        for m in ("audio", "video"):
            table = Path(tmp) / f"mosi_{m}.csv"
            _feature_csv(table, ids, feats[m])
            spec = FeatDbSpec(
                input=table,
                format="csv",
                out=out / f"mosi_{m}",
                id_cols=["id"],
                dtype="float32",
                overwrite=overwrite,
            )
            metas[f"mosi_{m}"] = build_feat_db(spec)
    metas["split_counts"] = dict(Counter(r["split"] for r in rows))
    return metas


# ----------------------------------------------------------------------------- EmoDB
EMODB_LABELS = ["emotion", "speaker", "gender", "sentence"]


def emodb_rows(emodb: Path) -> list[dict[str, Any]]:
    """One row per utterance of emodb.csv, with the wav's absolute path checked to exist."""
    path = _need(emodb / "emodb.csv")
    rows = []
    with path.open(encoding="utf-8", newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                wav = _need(emodb / row["wav"])
                rows.append(
                    {
                        "id": row["id"],
                        "wav": str(wav.resolve()),
                        "text": row["text"],
                        **{k: row[k] for k in EMODB_LABELS},
                    }
                )
            except KeyError as err:
                raise UserError(
                    f"{path} line {line}: no column {err} (need id, wav, text, {EMODB_LABELS})"
                ) from err
    if not rows:
        raise UserError(f"{path} holds no utterance")
    return rows


def _speech_db(manifest: Path, out: Path, pool: int, overwrite: bool) -> dict:
    from uniter3m.ingest.recordings import MediaOptions

    spec = FeatDbSpec(
        input=None,
        format="wav",
        out=out,
        dtype="float32",
        overwrite=overwrite,
        progress=False,
        media=MediaOptions(extractor="compare", manifest=manifest, pool_frames=pool),
    )
    return build_feat_db(spec)


def speaker_normalised_db(
    src: Path, out: Path, speaker_of: Mapping[str, str], overwrite: bool = False
) -> dict[str, Any]:
    """A copy of feature db `src` whose frames are z-scored per speaker (statistics over every frame
    of that speaker's utterances; no label is read)."""
    import numpy as np

    from uniter3m.data.store import DbReader

    db = DbReader(src, kind="feat")
    feats = {uid: np.asarray(db[uid]["feat"], dtype=np.float64) for uid in db.ids}
    missing = sorted(set(feats) - set(speaker_of))
    if missing:
        raise UserError(f"{src}: ids without a speaker, e.g. {missing[:3]}")
    stats = {}
    for spk in sorted({speaker_of[u] for u in feats}):
        frames = np.concatenate([f for u, f in feats.items() if speaker_of[u] == spk and len(f)])
        stats[spk] = (frames.mean(0), np.maximum(frames.std(0), 1e-6))
    with tempfile.TemporaryDirectory() as tmp:
        for uid, f in feats.items():
            mean, std = stats[speaker_of[uid]]
            np.savez(Path(tmp) / f"{uid}.npz", feat=((f - mean) / std).astype(np.float32))
        spec = FeatDbSpec(
            input=Path(tmp), format="npz", out=out, dtype="float32", overwrite=overwrite, progress=False
        )
        return build_feat_db(spec)


def functionals_db(wavs: Sequence[str], ids: Sequence[str], out: Path, overwrite: bool = False) -> dict:
    """openSMILE ComParE_2016 functionals (6373-d) of each wav, stored as a one-frame stream."""
    import numpy as np
    import opensmile

    smile = opensmile.Smile(opensmile.FeatureSet.ComParE_2016, opensmile.FeatureLevel.Functionals)
    with tempfile.TemporaryDirectory() as tmp:
        for uid, wav in zip(ids, wavs, strict=True):
            feat = smile.process_file(wav).to_numpy()[:1].astype(np.float32)
            np.savez(Path(tmp) / f"{uid}.npz", feat=feat)
        spec = FeatDbSpec(
            input=Path(tmp), format="npz", out=out, dtype="float32", overwrite=overwrite, progress=False
        )
        return build_feat_db(spec)


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
) -> dict:
    """Text db + ComParE speech db(s) of EmoDB (`limit`: the first N rows only, for tests)."""
    rows = emodb_rows(data / "emodb")[:limit]
    metas: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = Path(tmp) / "emodb.jsonl"
        _write_jsonl(jsonl, ({k: v for k, v in r.items() if k != "wav"} for r in rows))
        metas["emodb_txt"] = _text_db(jsonl, out / "emodb_txt", tokenizer, EMODB_LABELS, overwrite, lexicon)
        if split_dbs:
            for spk in sorted({r["speaker"] for r in rows}):
                part = Path(tmp) / f"emodb_{spk}.jsonl"
                _write_jsonl(
                    part, ({k: v for k, v in r.items() if k != "wav"} for r in rows if r["speaker"] == spk)
                )
                metas[f"emodb_txt_spk{spk}"] = _text_db(
                    part, out / f"emodb_txt_spk{spk}", tokenizer, EMODB_LABELS, overwrite, lexicon
                )
        manifest = Path(tmp) / "manifest.csv"
        with manifest.open("w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "path"])
            w.writerows((r["id"], r["wav"]) for r in rows)
        metas["emodb_compare"] = _speech_db(manifest, out / "emodb_compare", 1, overwrite)
        for k in pool_frames:
            if k > 1:
                metas[f"emodb_compare_p{k}"] = _speech_db(manifest, out / f"emodb_compare_p{k}", k, overwrite)
    if functionals:
        metas["emodb_func"] = functionals_db(
            [r["wav"] for r in rows], [r["id"] for r in rows], out / "emodb_func", overwrite
        )
    if speaker_norm:
        speaker_of = {r["id"]: r["speaker"] for r in rows}
        for name in [n for n in metas if n.startswith(("emodb_compare", "emodb_func"))]:
            metas[f"{name}_spk"] = speaker_normalised_db(
                out / name, out / f"{name}_spk", speaker_of, overwrite
            )
    metas["emotion_counts"] = dict(Counter(r["emotion"] for r in rows))
    return metas


RECIPES = {"meld": build_meld, "iemocap": build_iemocap, "mosi": build_mosi, "emodb": build_emodb}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="build the databases of a shared real corpus")
    parser.add_argument("corpus", choices=sorted(RECIPES))
    parser.add_argument("--data", type=Path, required=True, help="the shared data folder (../shared/data)")
    parser.add_argument("--tokenizer", type=Path, required=True, help="local tokenizer dir")
    parser.add_argument("--out", type=Path, required=True, help="folder that receives the databases")
    parser.add_argument("--lexicon", default="nrc")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument(
        "--split-dbs",
        action="store_true",
        help="mosi: also one text db per split (mosi_txt_{train,valid,test}); emodb: one per speaker",
    )
    parser.add_argument(
        "--pool-frames",
        type=int,
        action="append",
        default=None,
        help="emodb: also a speech db with every K ComParE frames mean-pooled (repeatable; e.g. 10)",
    )
    parser.add_argument(
        "--functionals",
        action="store_true",
        help="emodb: also emodb_func, the ComParE_2016 functionals as one 6373-d frame per utterance",
    )
    parser.add_argument(
        "--speaker-norm",
        action="store_true",
        help="emodb: also a per-speaker z-normalised copy (<name>_spk) of each speech db",
    )
    args = parser.parse_args(argv)
    try:
        extra: dict[str, Any] = {"split_dbs": True} if args.split_dbs else {}
        if extra and args.corpus not in ("mosi", "emodb"):
            raise UserError("--split-dbs applies to mosi and emodb only")
        if args.pool_frames:
            if args.corpus != "emodb":
                raise UserError("--pool-frames applies to emodb only")
            extra["pool_frames"] = args.pool_frames
        if args.speaker_norm:
            if args.corpus != "emodb":
                raise UserError("--speaker-norm applies to emodb only")
            extra["speaker_norm"] = True
        if args.functionals:
            if args.corpus != "emodb":
                raise UserError("--functionals applies to emodb only")
            extra["functionals"] = True
        metas = RECIPES[args.corpus](
            args.data, args.out, args.tokenizer, args.overwrite, args.lexicon, **extra
        )
    except UserError as err:
        print(f"corpora {args.corpus}: error: {err}")
        return 2
    for name, meta in metas.items():
        if isinstance(meta, dict) and "count" in meta:
            print(
                f"{args.out / name}: {meta['count']} records, skipped {len(meta.get('skipped', []))}, "
                f"truncated {meta.get('truncated', 0)}"
            )
        else:
            print(f"{name}: {meta}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
