"""Transcripts from recordings with a local Whisper-family model (`build-txt-db --asr DIR`).

When a corpus comes as recordings plus a manifest (`id,path,start,end` and label columns) but no
transcript, each utterance's audio is decoded (PyAV, mono, at the model's sampling rate), cut to
its segment, and transcribed in batches by a `transformers` speech-to-text model saved in a local
folder (`save_pretrained` output: model + processor). The transcripts, with the manifest's other
columns, become an ordinary JSONL input of `build_text_db`, so the text database gets exactly the
builder's checks and meta (plus `source.asr`: the model and its settings).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uniter3m.errors import UserError
from uniter3m.ingest import media
from uniter3m.progress import disabled

MANIFEST_COLUMNS = ("id", "path", "start", "end")


class Transcriber:
    """A local speech-to-text model (Whisper and its kin); batched, on the GPU when there is one."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "auto",
        batch_size: int = 8,
        language: str | None = None,
        max_new_tokens: int = 128,
    ):
        import torch
        from transformers import AutoConfig, AutoModelForSpeechSeq2Seq, AutoProcessor

        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise UserError(
                f"--asr {self.model_dir}: not a model folder (no config.json); give a local Whisper-family folder "
                "written by save_pretrained (model and processor)"
            )
        config = AutoConfig.from_pretrained(self.model_dir)
        if not getattr(config, "is_encoder_decoder", False) or not hasattr(config, "num_mel_bins"):
            raise UserError(
                f"--asr {self.model_dir}: a {config.model_type!r} model is not a speech-to-text model; give a "
                "Whisper-family folder (encoder-decoder on log-mel features)"
            )
        try:
            self.processor = AutoProcessor.from_pretrained(self.model_dir)
        except (OSError, ValueError) as err:
            raise UserError(
                f"--asr {self.model_dir}: no processor (feature extractor + tokenizer) there ({err}); save it with "
                "processor.save_pretrained(DIR)"
            ) from err
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.model = (
            AutoModelForSpeechSeq2Seq.from_pretrained(self.model_dir, torch_dtype=dtype)
            .to(self.device)
            .eval()
        )
        self.dtype = dtype
        self.sample_rate = int(self.processor.feature_extractor.sampling_rate)
        self.batch_size = max(1, int(batch_size))
        self.language = language
        self.max_new_tokens = int(max_new_tokens)
        self._torch = torch

    def info(self) -> dict[str, Any]:
        return {
            "model": str(self.model_dir),
            "model_type": self.model.config.model_type,
            "sample_rate": self.sample_rate,
            "language": self.language,
            "max_new_tokens": self.max_new_tokens,
        }

    def transcribe(self, audios: Sequence[np.ndarray]) -> list[str]:
        """One transcript per mono float32 signal at `sample_rate`, in batches of `batch_size`."""
        out: list[str] = []
        for start in range(0, len(audios), self.batch_size):
            chunk = [np.asarray(a, dtype=np.float32) for a in audios[start : start + self.batch_size]]
            features = self.processor(
                chunk, sampling_rate=self.sample_rate, return_tensors="pt"
            ).input_features
            kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens}
            if self.language:
                kwargs["language"] = self.language
            with self._torch.no_grad():
                ids = self.model.generate(features.to(self.device, self.dtype), **kwargs)
            out += [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return out


def manifest_rows(manifest: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The manifest's header and rows (every column: id, path, start, end and labels)."""
    with open(manifest, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def transcribe_manifest(
    manifest: Path, transcriber: Transcriber, out: Path, text_col: str = "text", progress: bool = False
) -> dict[str, Any]:
    """Write `out` (JSONL): every manifest row with `text_col` = the transcript of its segment.

    A manifest that already has `text_col` is refused (its transcripts would be silently replaced).
    Returns `source.asr` for the text db's meta: the model, its settings, counts.
    """
    header, rows = manifest_rows(manifest)
    if text_col in header:
        raise UserError(
            f"{manifest} already has a {text_col!r} column: it has transcripts, so build without --asr "
            f"(or name another --text-col for the ASR output)"
        )
    segments = media.read_manifest(manifest)
    by_id = {row["id"]: row for row in rows}
    texts: dict[str, str] = {}
    tasks = media.file_tasks(segments)
    from tqdm.auto import tqdm

    for task in tqdm(tasks, desc="asr", unit="file", disable=disabled(progress)):
        cut = media.segment_audio(task, transcriber.sample_rate)
        empty = [seg.id for seg, audio, _ in cut if len(audio) == 0]
        if empty:
            raise UserError(
                f"{task.path}: segment(s) {empty} hold no audio; fix their start/end in {manifest}"
            )
        for (seg, _, _), text in zip(cut, transcriber.transcribe([a for _, a, _ in cut]), strict=True):
            texts[seg.id] = text
    with open(out, "w", encoding="utf-8") as f:
        for seg in segments:
            row = {k: v for k, v in by_id[seg.id].items() if k not in ("path", "start", "end")}
            f.write(json.dumps({**row, text_col: texts[seg.id]}, ensure_ascii=False) + "\n")
    return {
        **transcriber.info(),
        "manifest": str(manifest),
        "utterances": len(segments),
        "empty_transcripts": sum(not t for t in texts.values()),
    }
