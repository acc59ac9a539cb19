"""Local transformers encoders (`--extractor hf:DIR`) turned into per-frame features.

- `AudioEncoder`: wav2vec 2.0, HuBERT, WavLM, data2vec-audio (any model whose input is raw
  `input_values`): the hidden states of one layer, or the mean of several, optionally mean-pooled
  every K frames (MEmoBERT pooled three 20 ms frames of wav2vec 2.0 base).
- `VisionEncoder`: CLIP/SigLIP vision towers, ViT, DINOv2 (input `pixel_values`): one vector per
  face crop, the CLS token, the mean token or the model's pooled output.

Both run batched, on GPU when present (under autocast in bf16, or fp16 where bf16 is missing),
and give the same features whatever the batch size: audio of different lengths is padded only for
models whose convolutional front end normalises per frame (`feat_extract_norm == "layer"`) and then
run with an attention mask; models with group norm (wav2vec 2.0 base) see the statistics of the
whole input, so they only batch utterances of equal length.
Nothing is downloaded: DIR is a local folder (`save_pretrained` output).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from uniter3m.errors import UserError

AUDIO_FAMILIES = "wav2vec 2.0, HuBERT, WavLM, data2vec-audio"
VISION_FAMILIES = "CLIP/SigLIP vision tower, ViT, DINOv2"
TOKEN_POOLS = ("cls", "mean", "pooler")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def parse_layers(spec: str | None) -> list[int] | None:
    """'-1' / '9' / '6-9' / '6,7,8' / 'all' -> hidden-state indices (0 = the input to the transformer)."""
    if spec is None or spec in {"", "last"}:
        return None
    if spec == "all":
        return [-999]  # resolved once the layer count is known
    layers: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        span = re.fullmatch(r"(\d+)-(\d+)", part)
        try:
            layers.extend(range(int(span[1]), int(span[2]) + 1) if span else [int(part)])
        except ValueError:
            raise UserError(f"--layer must be N, A-B, a comma list or 'all', got {spec!r}") from None
    return layers


def _resolve_layers(layers: list[int] | None, n_states: int, model_dir: Path) -> list[int]:
    if layers is None:
        return [n_states - 1]
    if layers == [-999]:
        return list(range(1, n_states))
    out = []
    for layer in layers:
        idx = layer + n_states if layer < 0 else layer
        if not 0 <= idx < n_states:
            raise UserError(
                f"--layer {layer}: {model_dir} has hidden states 0..{n_states - 1} (0 = before the first "
                f"transformer layer, {n_states - 1} = the last); pick one of them"
            )
        out.append(idx)
    return out


def pick_device(device: str) -> Any:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(device)


def _autocast(device: Any, precision: str) -> Any:
    import torch

    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device.type != "cuda" or precision == "fp32":
        return nullcontext()
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _load(model_dir: Path, kind: str, families: str) -> tuple[Any, Any]:
    """(model in eval mode, its config) from a local folder, with errors that say what to pass."""
    from transformers import AutoConfig, AutoModel

    if not model_dir.is_dir() or not (model_dir / "config.json").is_file():
        raise UserError(
            f"--extractor hf:{model_dir}: no transformers model folder there (a config.json and weights, as "
            f"written by save_pretrained); pass a local {kind} encoder folder ({families})"
        )
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        model = AutoModel.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(
            f"--extractor hf:{model_dir} cannot be loaded as a transformers model ({err})"
        ) from err
    return model.eval(), config


def _preprocessor(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "preprocessor_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _hidden_states(outputs: Any, model_dir: Path) -> tuple[Any, ...]:
    states = getattr(outputs, "hidden_states", None)
    if not states:
        raise UserError(f"{model_dir}: the model returns no hidden states; it is not a supported encoder")
    return states


class _HfEncoder:
    """What both encoders share: the model on its device, the hidden states to read (`layers`), the
    feature size and the `info()` keys every feature db's meta records."""

    def __init__(
        self,
        model_dir: Path,
        model: Any,
        config: Any,
        layers: str | None,
        batch_size: int,
        device: str,
        precision: str,
    ):
        import torch

        if batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {batch_size}")
        self.model_dir = model_dir
        self.device = pick_device(device)
        self.model = model.to(self.device)
        self.precision = precision
        self.batch_size = batch_size
        self.layers = _resolve_layers(parse_layers(layers), int(config.num_hidden_layers) + 1, model_dir)
        self.dim = int(config.hidden_size)
        self.model_type = config.model_type
        self._torch = torch

    def info(self) -> dict[str, Any]:
        return {
            "name": f"hf:{self.model_dir}",
            "model_type": self.model_type,
            "dim": self.dim,
            "layers": self.layers,
            "device": str(self.device),
            "precision": self.precision,
        }

    def _mixed_precision(self) -> Any:
        return _autocast(self.device, self.precision)


class AudioEncoder(_HfEncoder):
    """Frames of a local audio encoder; `encode(list of mono float32 arrays) -> list of (T, D)`."""

    def __init__(
        self,
        model_dir: Path,
        layers: str | None = None,
        pool_frames: int = 1,
        batch_size: int = 8,
        device: str = "auto",
        precision: str = "auto",
    ):
        model, config = _load(model_dir, "audio", AUDIO_FAMILIES)
        if getattr(model, "main_input_name", None) != "input_values" or not hasattr(
            model, "_get_feat_extract_output_lengths"
        ):
            raise UserError(
                f"--extractor hf:{model_dir} holds a {config.model_type!r} model, not an audio encoder; pass a "
                f"folder of one of: {AUDIO_FAMILIES}"
            )
        if pool_frames < 1:
            raise UserError(f"--pool-frames must be >= 1, got {pool_frames}")
        super().__init__(model_dir, model, config, layers, batch_size, device, precision)
        self.pool_frames = pool_frames
        pre = _preprocessor(model_dir)
        self.sample_rate = int(pre.get("sampling_rate", 16000))
        self.normalize = bool(pre.get("do_normalize", True))
        self.maskable = getattr(config, "feat_extract_norm", "layer") == "layer"
        stride = int(np.prod(getattr(config, "conv_stride", [320])))
        self.frame_rate = self.sample_rate / stride / pool_frames

    def info(self) -> dict[str, Any]:
        return {
            **super().info(),
            "pool_frames": self.pool_frames,
            "sample_rate": self.sample_rate,
            "frame_rate": self.frame_rate,
            "normalize": self.normalize,
        }

    def n_frames(self, n_samples: int) -> int:
        """Encoder frames for a signal of `n_samples` (0 when it is shorter than the receptive field)."""
        if n_samples <= 0:
            return 0
        out = self.model._get_feat_extract_output_lengths(self._torch.tensor([n_samples]))
        return max(int(out[0]), 0)

    def encode(self, signals: Sequence[np.ndarray]) -> list[np.ndarray]:
        """(T, D) float32 per signal; a signal too short for one frame gives (0, D)."""
        out: list[np.ndarray | None] = [None] * len(signals)
        order = sorted(range(len(signals)), key=lambda i: len(signals[i]))
        todo = []
        for i in order:
            if self.n_frames(len(signals[i])) == 0:
                out[i] = np.zeros((0, self.dim), np.float32)
            else:
                todo.append(i)
        batch: list[int] = []
        for i in todo:
            if batch and (
                len(batch) == self.batch_size
                or (not self.maskable and len(signals[i]) != len(signals[batch[0]]))
            ):
                self._run(signals, batch, out)
                batch = []
            batch.append(i)
        if batch:
            self._run(signals, batch, out)
        return out  # type: ignore[return-value]

    def _run(self, signals: Sequence[np.ndarray], batch: list[int], out: list[np.ndarray | None]) -> None:
        torch = self._torch
        lengths = [len(signals[i]) for i in batch]
        values = np.zeros((len(batch), max(lengths)), np.float32)
        mask = np.zeros((len(batch), max(lengths)), np.int64)
        for row, i in enumerate(batch):
            x = np.asarray(signals[i], np.float32)
            if self.normalize:
                x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
            values[row, : len(x)] = x
            mask[row, : len(x)] = 1
        kwargs: dict[str, Any] = {"input_values": torch.from_numpy(values).to(self.device)}
        if self.maskable and min(lengths) != max(lengths):
            kwargs["attention_mask"] = torch.from_numpy(mask).to(self.device)
        with torch.inference_mode(), self._mixed_precision():
            states = _hidden_states(self.model(**kwargs, output_hidden_states=True), self.model_dir)
            hidden = torch.stack([states[k].float() for k in self.layers]).mean(0)
        hidden = hidden.float().cpu().numpy()
        for row, i in enumerate(batch):
            frames = hidden[row, : self.n_frames(lengths[row])]
            out[i] = pool_frames(frames, self.pool_frames)


def pool_frames(frames: np.ndarray, k: int) -> np.ndarray:
    """Mean of every k consecutive frames; a shorter tail group is the mean of what is left."""
    if k == 1 or len(frames) == 0:
        return np.ascontiguousarray(frames, dtype=np.float32)
    n = -(-len(frames) // k)
    sums = np.add.reduceat(frames.astype(np.float64), np.arange(0, len(frames), k), axis=0)
    counts = np.minimum(k, len(frames) - np.arange(n) * k)[:, None]
    return (sums / counts).astype(np.float32)


class VisionEncoder(_HfEncoder):
    """One vector per image of a local vision encoder; `encode(uint8 (N, H, W, C)) -> (N, D)`."""

    def __init__(
        self,
        model_dir: Path,
        pool: str = "cls",
        layers: str | None = None,
        batch_size: int = 64,
        device: str = "auto",
        precision: str = "auto",
    ):
        model, config = _load(model_dir, "vision", VISION_FAMILIES)
        if hasattr(model, "vision_model") and getattr(model, "main_input_name", None) != "pixel_values":
            model, config = (
                model.vision_model,
                config.vision_config,
            )  # a full CLIP/SigLIP: keep its image tower
        elif getattr(model, "main_input_name", None) != "pixel_values":
            raise UserError(
                f"--extractor hf:{model_dir} holds a {config.model_type!r} model, not a vision encoder; pass a "
                f"folder of one of: {VISION_FAMILIES}"
            )
        if pool not in TOKEN_POOLS:
            raise UserError(f"--pool must be one of {', '.join(TOKEN_POOLS)}, got {pool!r}")
        super().__init__(model_dir, model, config, layers, batch_size, device, precision)
        self.pool = pool
        size = getattr(config, "image_size", 224)
        self.image_size = int(size if isinstance(size, int) else size[0])
        pre = _preprocessor(model_dir)
        self.mean = np.asarray(pre.get("image_mean", [0.5, 0.5, 0.5]), np.float32)
        self.std = np.asarray(pre.get("image_std", [0.5, 0.5, 0.5]), np.float32)

    def info(self) -> dict[str, Any]:
        return {
            **super().info(),
            "pool": self.pool,
            "image_size": self.image_size,
            "image_mean": self.mean.tolist(),
            "image_std": self.std.tolist(),
        }

    def encode(self, images: np.ndarray) -> np.ndarray:
        """(N, D) float32 for N uint8 images (grey ones are repeated to three channels)."""
        import cv2

        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        out = []
        for lo in range(0, len(images), self.batch_size):
            chunk = images[lo : lo + self.batch_size]
            resized = np.stack(
                [
                    cv2.resize(im, (self.image_size, self.image_size), interpolation=cv2.INTER_LINEAR)
                    for im in chunk
                ]
            )
            if resized.ndim == 3:
                resized = resized[..., None]
            if resized.shape[-1] == 1:
                resized = np.repeat(resized, 3, axis=-1)
            pixels = (resized.astype(np.float32) / 255.0 - self.mean) / self.std
            out.append(self._run(pixels.transpose(0, 3, 1, 2)))
        return np.concatenate(out)

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        torch = self._torch
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device)
        with torch.inference_mode(), self._mixed_precision():
            outputs = self.model(pixel_values=x, output_hidden_states=True)
            if self.pool == "pooler":
                pooled = getattr(outputs, "pooler_output", None)
                if pooled is None:
                    raise UserError(f"{self.model_dir} has no pooled output; use --pool cls or mean")
                return pooled.float().cpu().numpy()
            states = _hidden_states(outputs, self.model_dir)
            hidden = torch.stack([states[k].float() for k in self.layers]).mean(0)
            vec = hidden[:, 0] if self.pool == "cls" else hidden.mean(1)
        return vec.float().cpu().numpy()
