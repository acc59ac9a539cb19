"""Resemblyzer's pretrained speaker encoder as speech frames (`--extractor resemblyzer`, `resemblyzer-utt`).

The network (a 3-layer LSTM, 256 units, over 40 power-mel bands at 16 kHz, 25 ms windows every
10 ms, trained for speaker verification with the GE2E loss) is defined here; only its weights come
from the `Resemblyzer` package (`resemblyzer/pretrained.pt`, Apache-2.0), whose code is not run.
Its states carry more than the speaker: mean+std pooled and fed to a linear classifier they reach
82.5 UAR on EmoDB (leave one speaker out, per-speaker z-norm), the same network untrained 53.4.

- `resemblyzer`: the per-frame states of one LSTM layer (`--layer 1..3`, negative from the end,
  a list is averaged; default the last), 100 frames/s, then `--pool-frames`.
- `resemblyzer-utt`: the package's utterance embedding (partial windows of 1.6 s, each through the
  LSTM and its linear + ReLU head, averaged and L2-normed) as a one-frame stream.

The input is prepared as in training: volume raised (never lowered) to -30 dBFS, then the power mel
spectrogram (librosa, centred frames: 1 + samples // 160 frames). Silences are not trimmed (the
package's VAD step), so frame t is the audio at t * 10 ms of the segment. A signal shorter than one
25 ms window gives an empty stream, which the database builder keeps and counts in meta `empty`.
The LSTM is causal, so padding a batch on the right changes no frame: batch sizes agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from uniter3m.errors import UserError
from uniter3m.ingest.encoders import PRECISIONS, parse_layers, pick_device, pool_frames
from uniter3m.ingest.extractors.base import Extractor, ExtractorOptions, Frames
from uniter3m.ingest.extractors.weights import packaged_weights

WEIGHTS_SHA256 = "39373b86598fa3da9fcddee6142382efe09777e8d37dc9c0561f41f0070f134e"  # Resemblyzer 0.1.4
SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms window
HOP = 160  # 10 ms step: 100 frames/s
N_MELS = 40
HIDDEN = 256
N_LAYERS = 3
TARGET_DBFS = -30.0
PARTIAL_FRAMES = 160  # the utterance embedding's partial windows: 1.6 s ...
PARTIAL_STEP = round(SAMPLE_RATE / 1.3 / HOP)  # ... 1.3 of them per second ...
MIN_COVERAGE = 0.75  # ... the last one kept when at least this much of it is audio


class SpeakerLSTM(nn.Module):
    """The encoder, one `nn.LSTM` per layer so that any layer's states can be read."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.LSTM(N_MELS if k == 0 else HIDDEN, HIDDEN, batch_first=True) for k in range(N_LAYERS)
        )
        self.linear = nn.Linear(HIDDEN, HIDDEN)

    def load_packaged(self, state: dict[str, torch.Tensor]) -> None:
        """Load the package's state dict (one 3-layer `lstm`, `linear`; its GE2E similarity scalars unused)."""
        mapped = {f"linear.{p}": state[f"linear.{p}"] for p in ("weight", "bias")}
        for k in range(N_LAYERS):
            for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                mapped[f"layers.{k}.{p}_l0"] = state[f"lstm.{p}_l{k}"]
        self.load_state_dict(mapped)

    def states(self, mels: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
        """(B, T, HIDDEN): the mean of the per-frame outputs of `layers` (1-based) for mels (B, T, N_MELS)."""
        picked, x = [], mels
        for k in range(max(layers)):
            x = self.layers[k](x)[0]
            if k + 1 in layers:
                picked.append(x)
        return torch.stack(picked).mean(0)

    def embed(self, mels: torch.Tensor) -> torch.Tensor:
        """(B, HIDDEN) L2-normed embeddings of equal-length partial windows (B, T, N_MELS)."""
        last = self.states(mels, [N_LAYERS])[:, -1]
        raw = torch.relu(self.linear(last))
        return raw / torch.linalg.vector_norm(raw, dim=1, keepdim=True)


def resolve_layers(spec: str | None) -> list[int]:
    """--layer '3' / '-1' / '2,3' / 'all' -> 1-based LSTM layers (default the last)."""
    parsed = parse_layers(spec)
    if parsed is None:
        return [N_LAYERS]
    if parsed == [-999]:
        return list(range(1, N_LAYERS + 1))
    out = []
    for layer in parsed:
        idx = layer + N_LAYERS + 1 if layer < 0 else layer
        if not 1 <= idx <= N_LAYERS:
            raise UserError(
                f"--layer {layer}: resemblyzer has LSTM layers 1..{N_LAYERS} (-1 = the last); pick one of them"
            )
        out.append(idx)
    return out


def raise_volume(signal: np.ndarray) -> np.ndarray:
    """The signal scaled up to TARGET_DBFS RMS when quieter (as the encoder's training data was); silence as is."""
    rms = float(np.sqrt(np.mean(np.square(signal, dtype=np.float64))))
    gain_db = TARGET_DBFS - 20 * np.log10(rms) if rms > 0 else 0.0
    return (signal * 10 ** (gain_db / 20)).astype(np.float32) if gain_db > 0 else signal


class Resemblyzer(Extractor):
    """Per-frame LSTM states of Resemblyzer's speaker encoder; see the module docstring."""

    name = "resemblyzer"
    modality = "speech"
    sample_rate = SAMPLE_RATE

    def __init__(self, arg: str | None, options: ExtractorOptions) -> None:
        self.refuse_argument(arg)
        super().__init__(arg, options)
        if options.pool_frames < 1:
            raise UserError(f"--pool-frames must be >= 1, got {options.pool_frames}")
        if options.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {options.batch_size}")
        if options.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {options.precision!r}")
        try:
            import librosa
        except ImportError:
            raise UserError(
                f"--extractor {self.name} needs librosa; install it with pip install 'uniter3m[resemblyzer]'"
            ) from None
        self._melspectrogram = librosa.feature.melspectrogram
        self.weights = packaged_weights(
            "resemblyzer", "Resemblyzer", "resemblyzer", "pretrained.pt", WEIGHTS_SHA256
        )
        self.layers = resolve_layers(options.layer)
        self.device = pick_device(options.device)
        self.torch_dtype = (
            torch.bfloat16
            if options.precision == "bf16"
            else (torch.float16 if options.precision == "fp16" else torch.float32)
        )
        self.net = SpeakerLSTM()
        self.net.load_packaged(
            torch.load(self.weights.path, map_location="cpu", weights_only=True)["model_state"]
        )
        self.net.to(self.device, self.torch_dtype).eval()
        self.dim = HIDDEN
        self.frame_rate = SAMPLE_RATE / HOP / options.pool_frames

    def info(self) -> dict[str, Any]:
        return {
            **super().info(),
            **self.weights.info(),
            "layers": self.layers,
            "pool_frames": self.options.pool_frames,
            "sample_rate": SAMPLE_RATE,
            "mel": {
                "n_mels": N_MELS,
                "window_ms": 1000 * N_FFT / SAMPLE_RATE,
                "step_ms": 1000 * HOP / SAMPLE_RATE,
            },
            "volume_dbfs": TARGET_DBFS,
            "min_samples": N_FFT,
            "device": str(self.device),
            "precision": str(self.torch_dtype).removeprefix("torch."),
        }

    def mel(self, signal: np.ndarray) -> np.ndarray:
        """(1 + len // HOP, N_MELS) float32 power mel frames of one 16 kHz signal (volume already raised)."""
        return (
            self._melspectrogram(y=signal, sr=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS)
            .astype(np.float32)
            .T
        )

    def _run(self, fn: Any, mels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(mels).to(self.device, self.torch_dtype)
            return fn(x).float().cpu().numpy()

    def extract(self, inputs: Sequence[np.ndarray]) -> list[Frames]:
        out = [Frames(np.zeros((0, self.dim), np.float32)) for _ in inputs]
        todo = sorted((i for i, x in enumerate(inputs) if len(x) >= N_FFT), key=lambda i: len(inputs[i]))
        size = self.options.batch_size
        for start in range(0, len(todo), size):
            batch = todo[start : start + size]
            mels = [self.mel(raise_volume(np.asarray(inputs[i], np.float32))) for i in batch]
            padded = np.zeros((len(batch), max(len(m) for m in mels), N_MELS), np.float32)
            for row, m in enumerate(mels):
                padded[row, : len(m)] = m
            states = self._run(lambda x: self.net.states(x, self.layers), padded)
            for row, (i, m) in enumerate(zip(batch, mels)):
                out[i] = Frames(pool_frames(states[row, : len(m)], self.options.pool_frames))
        return out


def partial_starts(n_samples: int) -> list[int]:
    """First mel frame of each 1.6 s partial window of the utterance embedding (as Resemblyzer cuts them)."""
    n_frames = int(np.ceil((n_samples + 1) / HOP))
    starts = list(range(0, max(1, n_frames - PARTIAL_FRAMES + PARTIAL_STEP + 1), PARTIAL_STEP))
    coverage = (n_samples - starts[-1] * HOP) / (PARTIAL_FRAMES * HOP)
    return starts[:-1] if coverage < MIN_COVERAGE and len(starts) > 1 else starts


class ResemblyzerUtterance(Resemblyzer):
    """Resemblyzer's utterance embedding as one 256-d frame per utterance (frame_rate 0: one per utterance)."""

    name = "resemblyzer-utt"
    frame_rate = 0.0

    def __init__(self, arg: str | None, options: ExtractorOptions) -> None:
        if options.layer is not None:
            raise UserError(f"--extractor {self.name} embeds with the last layer and its head; drop --layer")
        super().__init__(arg, options)
        self.frame_rate = ResemblyzerUtterance.frame_rate  # the parent set its per-frame rate

    def info(self) -> dict[str, Any]:
        return {**super().info(), "layers": None, "pool_frames": None, "partial_frames": PARTIAL_FRAMES}

    def extract(self, inputs: Sequence[np.ndarray]) -> list[Frames]:
        out = [Frames(np.zeros((0, self.dim), np.float32)) for _ in inputs]
        todo = [i for i, x in enumerate(inputs) if len(x) >= N_FFT]
        size = self.options.batch_size
        for start in range(0, len(todo), size):
            batch, partials = todo[start : start + size], []
            for i in batch:
                starts = partial_starts(len(inputs[i]))
                wav = raise_volume(np.asarray(inputs[i], np.float32))
                wav = np.pad(wav, (0, max(0, (starts[-1] + PARTIAL_FRAMES) * HOP - len(wav))))
                mel = self.mel(wav)
                partials.append(np.stack([mel[s : s + PARTIAL_FRAMES] for s in starts]))
            embeds = self._run(self.net.embed, np.concatenate(partials))
            bounds = np.cumsum([len(p) for p in partials])[:-1]
            for i, part in zip(batch, np.split(embeds, bounds)):
                mean = part.mean(0)
                out[i] = Frames((mean / np.linalg.norm(mean))[None].astype(np.float32))
        return out
