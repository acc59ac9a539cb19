"""From a recording to an emotion: `uniter3m predict` and the public `EmotionClassifier`.

    clf = EmotionClassifier.from_pretrained("runs/emodb/fold00-03-valid08/best")   # or the run folder
    clf.predict(["talk.mp4", "clip.wav"], asr="whisper-ct2")                       # recordings
    clf.predict([{"id": "u1", "text": "hello", "speech": frames_130d}])            # prepared inputs

The inputs are made exactly as the training databases were: `finetune` records in
`best/finetune.json` (`inputs`, see `uniter3m.train.inputs`) each stream's extractor, its options,
face detector, frame rate and normalisation rule, and the model folder holds the tokenizer. Then the
same code path as training reads them: a text db and feature dbs written to a temporary folder
(`ingest.text_db`, `ingest.feat_db`), z-scored with the TRAINING databases' mean/std, joined by
`train.assembly.build_dataset`, collated and scored.

Segmentation: a manifest's start/end are kept; a recording without times is cut into FIXED WINDOWS
with overlap (`window` = 4 s, `hop` = 2 s by default: each second is seen by two windows); one shorter
than a window is one segment. No voice activity detection: silent windows are scored too.
Text: the manifest's `text` column, else ASR when the model reads text: `asr` ("whisper-ct2" or a local
Whisper folder), by default the ASR model its training transcripts were made with (when they were);
without either the model sees no text.

Missing modalities follow the model's rule: a stream the input lacks (no face found, an audio file
for a face stream, no text) is left out of that segment's input, exactly as an utterance without a
face is at training time (and as `evaluate --modality-sets` drops streams); each prediction lists
the modality letters it used. A segment left with nothing the model reads gets no label.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uniter3m.data.collate import Collator
from uniter3m.data.tokenization import SpecialTokens
from uniter3m.errors import UserError
from uniter3m.evaluation.metrics import is_better
from uniter3m.evaluation.report import FOLD_FILE
from uniter3m.fileio import atomic_write_bytes, atomic_write_json
from uniter3m.ingest import media
from uniter3m.ingest.encoders import pick_device
from uniter3m.ingest.normalise import STD_FLOOR
from uniter3m.model.card import has_tokenizer
from uniter3m.model.finetuning import FINETUNE_FILE, FinetuneModel, load_finetuned
from uniter3m.streams import StreamTable
from uniter3m.tasks.base import TaskContext
from uniter3m.tasks.supervised import SupervisedTask
from uniter3m.train.assembly import Databases, build_dataset, data_tokenizer
from uniter3m.train.config import STREAM_TABLE, DataConfig
from uniter3m.train.folds import fold_checkpoints
from uniter3m.train.inputs import INPUTS_KEY

log = logging.getLogger(__name__)

WINDOW_S = 4.0  # fixed windows for recordings without manifest times
HOP_S = 2.0  # 50 % overlap
TAIL_S = 0.5  # a segment starting this close to a track's end is scored without that track
# The text db needs a record for every segment; a segment without text is scored with L left out
# (`[CLS] [SEP]`), so this placeholder is never read by the model.
NO_TEXT = "-"


@dataclass
class Prediction:
    """One segment's prediction: the label, every class probability and the modalities it used."""

    id: str
    label: str | None
    probabilities: dict[str, float]
    modalities: str
    recording: str | None = None
    start: float | None = None
    end: float | None = None
    text: str | None = None

    def row(self) -> dict[str, Any]:
        return {
            "recording": self.recording,
            "id": self.id,
            "start": self.start,
            "end": self.end,
            "text": self.text,
            "modalities": self.modalities,
            "label": self.label,
            "probabilities": self.probabilities,
        }


@dataclass
class _Segment:
    seg: media.Segment
    recording: Path
    tracks: dict[str, float]  # {"audio" | "video": seconds} of the recording
    text: str | None = None
    shown: tuple[float, float] = (0.0, 0.0)  # start, end as reported (a last window runs to the end)
    frames: dict[str, np.ndarray] = field(default_factory=dict)

    def within(self, kind: str) -> media.Segment | None:
        """The segment cut to the recording's `kind` track ("audio" | "video"): None when the file has
        none or it ends before the segment (its last TAIL_S included), the end dropped past its end."""
        seconds = self.tracks.get(kind)
        if seconds is None or (self.seg.start or 0.0) >= seconds - TAIL_S:
            return None
        return (
            replace(self.seg, end=None) if self.seg.end is not None and self.seg.end > seconds else self.seg
        )


def choose_checkpoint(path: str | os.PathLike, fold: int | None = None) -> Path:
    """The `best/` folder to use: `path` itself, the fold `fold` of a run, or the run's only fold;
    with several folds and no `fold`, the one with the best validation score (logged)."""
    found = fold_checkpoints(path)
    if fold is not None:
        chosen = [d for d in found if json.loads((d / FINETUNE_FILE).read_text()).get("fold_index") == fold]
        if not chosen:
            raise UserError(
                f"{path} has no fold {fold}; its folds: {', '.join(d.parent.name for d in found)}"
            )
        return chosen[0]
    if len(found) == 1:
        return found[0]
    scored = []
    for d in found:
        result = d.parent / FOLD_FILE
        if result.is_file():
            r = json.loads(result.read_text())
            scored.append((r.get("selection_metric") or "uar", r.get("best_valid"), d))
    best = None
    for metric, value, d in scored:
        if value is not None and (best is None or is_better(metric, float(value), best[1])):
            best = (metric, float(value), d)
    if best is None:
        raise UserError(
            f"{path} holds {len(found)} folds ({', '.join(d.parent.name for d in found)}) and none has results "
            "yet; give one `<fold>/best` folder or --fold K"
        )
    log.info("%s: using %s (best validation %s %.4f of %d folds; --fold K picks another)", path,
             best[2], best[0], best[1], len(found))  # fmt: skip
    return best[2]


class EmotionClassifier:
    """A fine-tuned model with everything it needs to classify new recordings or prepared inputs."""

    def __init__(self, model: FinetuneModel, directory: Path, device: str = "auto") -> None:
        if model.spec.classifier == "regression":
            raise UserError(f"{directory} is a regression model (scores, no classes); predict classifies")
        spec = json.loads((directory / FINETUNE_FILE).read_text())
        record = spec.get(INPUTS_KEY)
        if record is None:
            raise UserError(
                f"{directory}/{FINETUNE_FILE} does not record how its inputs were made (fine-tuned before "
                "`inputs` was recorded); fine-tune it again (`uniter3m finetune --config ... --overwrite`)"
            )
        if not has_tokenizer(directory):
            raise UserError(f"{directory} holds no tokenizer files; fine-tune it again with `tokenizer` set")
        self.record: dict[str, Any] = record
        self.directory = directory
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.stream_table = StreamTable.declaring(self.record.get("streams_declared") or None)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, fold: int | None = None, device: str = "auto"
    ) -> EmotionClassifier:
        """Load a `<fold>/best` folder written by `uniter3m finetune`, or a run folder (see `choose_checkpoint`)."""
        directory = choose_checkpoint(path, fold)
        return cls(load_finetuned(directory), directory, device)

    @property
    def classes(self) -> list[str]:
        return list(self.model.spec.classes)

    @property
    def modalities(self) -> str:
        """The modality letters the model was fine-tuned on."""
        return str(self.record["modalities"])

    # ------------------------------------------------------------------ prepared inputs
    def predict(
        self,
        inputs: Sequence[Mapping[str, Any] | str | os.PathLike],
        *,
        asr: str | None = None,
        window: float = WINDOW_S,
        hop: float = HOP_S,
        batch_size: int = 32,
    ) -> list[Prediction]:
        """Prepared inputs (dicts: `id`, `text`, `<stream>`: (T, D) frames as the training database holds
        them, i.e. the training extractor's, per-speaker normalised when that database was; the z-score
        with its statistics is applied here) or recordings (files, folders, manifests: `predict_files`)."""
        if inputs and all(isinstance(x, Mapping) for x in inputs):
            return self.predict_prepared(inputs, batch_size)  # type: ignore[arg-type]
        if any(isinstance(x, Mapping) for x in inputs):
            raise UserError("give either prepared inputs (dicts) or recordings (paths), not both")
        return self.predict_files(inputs, asr=asr, window=window, hop=hop, batch_size=batch_size)  # type: ignore[arg-type]

    def predict_prepared(
        self, examples: Sequence[Mapping[str, Any]], batch_size: int = 32
    ) -> list[Prediction]:
        """One prediction per example; a stream absent (None or no frame) or an empty text is left out."""
        from uniter3m.ingest.feat_db import FeatDbSpec, build_feat_db
        from uniter3m.ingest.sources import Utterance
        from uniter3m.ingest.text_db import TextDbSpec, build_text_db

        record = self.record
        uses = self.modalities
        streams = [s for s in record["streams"] if self.stream_table.get(s).letter in uses]
        ids = [str(e["id"]) for e in examples]
        if len(set(ids)) != len(ids):
            raise UserError("prepared inputs: every example needs its own id")
        used: dict[str, str] = {}
        for uid, e in zip(ids, examples, strict=True):
            letters = "L" if "L" in uses and (e.get("text") or "").strip() else ""
            for s in streams:
                frames = e.get(s)
                if frames is not None and len(frames):
                    letters += self.stream_table.get(s).letter
            used[uid] = letters
        with tempfile.TemporaryDirectory(prefix="uniter3m_predict_") as tmp:
            rows = [
                {"id": uid, "text": (e.get("text") or "").strip() or NO_TEXT} for uid, e in zip(ids, examples)
            ]
            txt = Path(tmp) / "txt"
            build_text_db(
                TextDbSpec(id_cols=["id"], text_col="text", tokenizer=self.directory, out=txt, lexicon="none",
                           progress=False),
                rows,
            )  # fmt: skip
            section: dict[str, Any] = {
                "txt_db": str(txt),
                "modalities": uses,
                "max_txt_len": record["max_txt_len"],
                "max_frames": record["max_frames"],
                "normalize": record["normalize"],
            }
            dbs = Databases()
            for s in streams:
                info = record["streams"][s]
                utterances = []
                for uid, e in zip(ids, examples, strict=True):
                    frames = e.get(s)
                    frames = np.zeros((0, info["dim"]), np.float32) if frames is None else np.asarray(frames)
                    if frames.ndim != 2 or (len(frames) and frames.shape[1] != info["dim"]):
                        raise UserError(
                            f"input {uid!r}: {s} frames of shape {frames.shape}; the model reads (T, {info['dim']}) "
                            f"frames of {info['extractor'].get('name') or 'its extractor'}"
                        )
                    utterances.append(Utterance(uid, f"input {uid!r}", frames.reshape(-1, info["dim"])))
                path = Path(tmp) / s
                build_feat_db(FeatDbSpec(out=path, dtype="float32", progress=False), utterances)
                section[f"{s}_db"] = str(path)
                norm = info["normalisation"]
                # the TRAINING database's statistics, not the new recordings' own
                dbs.get(path, "feat").meta.update(mean=norm["mean"], std=norm["std"])
            data = DataConfig.model_validate(section, context={STREAM_TABLE: self.stream_table})
            scores = self._score(data, dbs, used, batch_size)
        out = []
        for uid, e in zip(ids, examples, strict=True):
            probs = scores.get(uid)
            label = None if probs is None else self.classes[int(np.argmax(probs))]
            out.append(
                Prediction(
                    uid,
                    label,
                    {} if probs is None else {c: round(float(p), 6) for c, p in zip(self.classes, probs)},
                    used[uid],
                    text=(e.get("text") or None),
                )
            )
        return out

    @torch.no_grad()
    def _score(
        self, data: DataConfig, dbs: Databases, used: Mapping[str, str], batch_size: int
    ) -> dict[str, list[float]]:
        """{id: class probabilities}, each id read with exactly the modalities it has."""
        meta = data_tokenizer(data, dbs)
        special = SpecialTokens.from_dict(meta)
        task = SupervisedTask(
            TaskContext(special=special, stream_table=self.stream_table),
            targets={},
            classifier=self.model.spec.classifier,
            prompt_ids=self.model.spec.prompt_ids,
            soft_prompt=self.model.spec.soft_prompt,
            max_len=self.model.config.max_position_embeddings,
        )
        collate = Collator(special, stream_table=self.stream_table)
        groups: dict[str, list[str]] = defaultdict(list)
        for uid, letters in used.items():
            if letters:
                groups[letters].append(uid)
        out: dict[str, list[float]] = {}
        for letters, ids in groups.items():
            dataset = build_dataset(data, dbs, modalities=letters, ids=ids)
            for start in range(0, len(dataset), batch_size):
                batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
                inputs = task.backbone_inputs(batch)
                kwargs = {k: v.to(self.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
                probs = self.model.probabilities(self.model(**kwargs)).cpu().tolist()
                out.update(zip(batch["ids"], probs, strict=True))
        return out

    # ------------------------------------------------------------------ recordings
    def predict_files(
        self,
        inputs: Sequence[str | os.PathLike],
        *,
        asr: str | None = None,
        window: float = WINDOW_S,
        hop: float = HOP_S,
        batch_size: int = 32,
    ) -> list[Prediction]:
        """Files, folders (every media file under them) and manifests (`.csv`: id,path[,start,end][,text])."""
        segments = list_segments(inputs, window, hop)
        uses = self.modalities
        if "L" in uses:
            self._add_text(segments, asr)
        for name, info in self.record["streams"].items():
            if self.stream_table.get(name).letter in uses:
                self._add_frames(segments, name, info)
        examples = [{"id": s.seg.id, "text": s.text, **s.frames} for s in segments]
        predictions = self.predict_prepared(examples, batch_size)
        for p, s in zip(predictions, segments, strict=True):
            p.recording, (p.start, p.end) = str(s.recording), s.shown
        return predictions

    def _add_text(self, segments: list[_Segment], asr: str | None) -> None:
        """Transcripts for the segments without text: by `asr`, else by the ASR model the training
        transcripts came from (`build-txt-db --asr`, recorded with its language and length limit)."""
        todo = [s for s in segments if s.text is None and s.within("audio")]
        if not todo:
            return
        trained = self.record["text"].get("asr") or {}
        asr = asr or trained.get("model")
        if asr is None:
            log.warning(
                "the model reads text (L) but %d segments have none: pass --asr whisper-ct2 (or a manifest "
                "with a text column); they are scored without text",
                len(todo),
            )
            return
        from uniter3m.ingest.asr import make_transcriber

        same = asr == trained.get("model")
        transcriber = make_transcriber(
            asr,
            str(self.device),
            language=trained.get("language") if same else None,
            max_new_tokens=int(trained.get("max_new_tokens") or 128) if same else 128,
        )
        by_id = {s.seg.id: s for s in todo}
        for task in media.file_tasks([s.within("audio") for s in todo]):
            cut = media.segment_audio(task, transcriber.sample_rate)
            texts = transcriber.transcribe([a for _, a, _ in cut], [False] * len(cut))
            for (seg, _, _), (text, _) in zip(cut, texts, strict=True):
                by_id[seg.id].text = text

    def _add_frames(self, segments: list[_Segment], name: str, info: Mapping[str, Any]) -> None:
        from uniter3m.ingest.extractors import ExtractorOptions
        from uniter3m.ingest.faces import FaceOptions
        from uniter3m.ingest.recordings import MediaOptions, media_source

        made = info.get("media")
        if not made:
            raise UserError(
                f"the {name} database the model was trained on ({info['db']}) was not built from recordings "
                "(feature files or an older build), so predict cannot make its features: rebuild it with "
                "`uniter3m build-media-db` and fine-tune again, or give prepared inputs "
                "(EmotionClassifier.predict with arrays)"
            )
        fmt = made["format"]
        kind = "audio" if fmt == "wav" else "video"
        mine = [s for s in segments if s.within(kind)]
        if mine:
            options = ExtractorOptions(**{**made["options"], "device": str(self.device)})
            opts = MediaOptions(
                extractor=made["extractor"],
                detector=made["detector"],
                face=FaceOptions(**made["face"]),
                extract=options,
            )
            source = media_source(fmt, opts, segments=[s.within(kind) for s in mine])
            frames = {u.id: u.feat for u in source.utterances}
            if info["normalisation"]["speaker"] == "recording":
                per_recording: dict[Path, list[str]] = defaultdict(list)
                for s in mine:
                    per_recording[s.recording].append(s.seg.id)
                for uids in per_recording.values():
                    every = np.concatenate([frames[u] for u in uids])
                    if len(every):
                        mean, std = every.mean(0), np.maximum(every.std(0), STD_FLOOR)
                        for u in uids:
                            frames[u] = (frames[u] - mean) / std
            for s in mine:
                s.frames[name] = frames[s.seg.id]
        for s in segments:
            s.frames.setdefault(name, np.zeros((0, info["dim"]), np.float32))


# ----------------------------------------------------------------------------- segments
def list_segments(
    inputs: Sequence[str | os.PathLike], window: float = WINDOW_S, hop: float = HOP_S
) -> list[_Segment]:
    """The segments of files, folders and manifests; recordings without times cut into windows."""
    if window <= 0 or not 0 < hop <= window:
        raise UserError(f"--window {window} --hop {hop}: need window > 0 and 0 < hop <= window")
    out: list[_Segment] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise UserError(
                f"input {path} does not exist; give audio/video files, a folder or a manifest CSV"
            )
        if path.suffix.lower() == ".csv":
            from uniter3m.ingest.asr import manifest_rows

            texts = {r["id"]: r.get("text") for r in manifest_rows(path)[1]}
            for seg in media.read_manifest(path):
                tracks = media.probe(seg.path)
                if seg.start is None and seg.end is None:
                    out += windows(seg, tracks, window, hop, texts.get(seg.id))
                else:
                    end = max(tracks.values(), default=0.0) if seg.end is None else seg.end
                    out.append(_Segment(seg, seg.path, tracks, texts.get(seg.id), (seg.start or 0.0, end)))
            continue
        found, _ = media.folder_segments(path, media.MEDIA_SUFFIXES)
        for seg in found:
            out += windows(seg, media.probe(seg.path), window, hop)
    ids = [s.seg.id for s in out]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise UserError(
            f"inputs give the segment ids {twice[:5]} twice; give each recording once (or a manifest with ids)"
        )
    return out


def windows(
    seg: media.Segment, tracks: dict[str, float], window: float, hop: float, text: str | None = None
) -> list[_Segment]:
    """Fixed windows of `window` s every `hop` s over the longest track; the last one ends at its end."""
    seconds = max(tracks.values(), default=0.0)
    if seconds <= window + 1e-6:
        return [_Segment(seg, seg.path, tracks, text, (0.0, round(seconds, 3)))]
    starts = [*np.arange(0.0, seconds - window, hop), seconds - window]
    out = []
    for k, start in enumerate(starts):
        lo, last = round(float(start), 3), k == len(starts) - 1
        cut = media.Segment(f"{seg.id}@{k:04d}", seg.path, lo, None if last else round(lo + window, 3))
        out.append(_Segment(cut, seg.path, tracks, text, (lo, round(min(lo + window, seconds), 3))))
    return out


# ----------------------------------------------------------------------------- outputs
def write_predictions(
    predictions: Sequence[Prediction],
    classes: Sequence[str],
    out: str | os.PathLike,
    about: Mapping[str, Any],
) -> dict[str, Any]:
    """`predictions.csv`, `predictions.json` and one `timeline_<recording>.png` per recording in `out`."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [p.row() for p in predictions]
    atomic_write_json(folder / "predictions.json", {**about, "classes": list(classes), "predictions": rows})
    header = ["recording", "id", "start", "end", "text", "modalities", "label", *(f"p_{c}" for c in classes)]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    for p in predictions:
        writer.writerow([p.recording, p.id, p.start, p.end, p.text or "", p.modalities, p.label or "",
                         *(p.probabilities.get(c, "") for c in classes)])  # fmt: skip
    atomic_write_bytes(folder / "predictions.csv", buffer.getvalue().encode("utf-8"))
    by_recording: dict[str, list[Prediction]] = defaultdict(list)
    for p in predictions:
        if p.recording is not None:
            by_recording[p.recording].append(p)
    pictures: list[str] = []
    for recording, preds in by_recording.items():
        name = f"timeline_{_stem(recording)}"
        if str(folder / f"{name}.png") in pictures:  # two recordings of one name in different folders
            name += f"_{len(pictures)}"
        picture = folder / f"{name}.png"
        timeline(preds, classes, picture, recording)
        pictures.append(str(picture))
    return {
        "csv": str(folder / "predictions.csv"),
        "json": str(folder / "predictions.json"),
        "pictures": pictures,
    }


def _stem(recording: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(recording).with_suffix("").name)


def timeline(predictions: Sequence[Prediction], classes: Sequence[str], picture: Path, title: str) -> None:
    """Emotion probabilities over time for one recording: a line per class at each segment's centre
    (a step over the segment when there is only one), the predicted class marked along the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = sorted((p for p in predictions if p.probabilities), key=lambda p: p.start or 0.0)
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for c in classes:
        if len(scored) == 1:
            p = scored[0]
            ax.plot([p.start, p.end], [p.probabilities[c]] * 2, label=c, linewidth=2)
        else:
            ax.plot([((p.start or 0) + (p.end or 0)) / 2 for p in scored], [p.probabilities[c] for p in scored],
                    marker="o", label=c)  # fmt: skip
    for p in scored:
        ax.annotate(p.label, (((p.start or 0) + (p.end or 0)) / 2, 1.02), ha="center", fontsize=7,
                    xycoords=("data", "axes fraction"))  # fmt: skip
    ax.set_xlabel("time (s)")
    ax.set_ylabel("probability")
    ax.set_ylim(0, 1)
    ax.set_title(Path(title).name, fontsize=9, pad=14)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(picture, dpi=100)
    plt.close(fig)


def run_predict(
    checkpoint: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    fold: int | None = None,
    asr: str | None = None,
    window: float = WINDOW_S,
    hop: float = HOP_S,
    device: str = "auto",
) -> dict[str, Any]:
    """`uniter3m predict`: classify every segment of `inputs`, write the CSV, JSON and timelines into `out`."""
    clf = EmotionClassifier.from_pretrained(checkpoint, fold=fold, device=device)
    predictions = clf.predict_files(inputs, asr=asr, window=window, hop=hop)
    about = {
        "checkpoint": str(clf.directory),
        "modalities_trained": clf.modalities,
        "segmentation": {
            "manifest_times": "kept",
            "otherwise": "fixed windows",
            "window_s": window,
            "hop_s": hop,
        },
        "asr": asr,
        "inputs": [str(i) for i in inputs],
    }
    written = write_predictions(predictions, clf.classes, out, about)
    return {**written, "predictions": predictions, "checkpoint": str(clf.directory)}
