"""`fer`: the facial-expression CNN of `facial-emotion-recognition==0.3.4` (MIT) on aligned 48x48 grey crops.

The package ships a plain torch state dict (`model/model.pkl`, trained on FER2013, 7 classes) but its
code imports torchvision and facenet-pytorch, so the network is defined here with the same parameter
names and only the weights are read. Frame feature: the 256-d penultimate layer (after its ReLU).
Soft labels: the class probabilities. The network ends in a sigmoid and the package reads its output
as log-probabilities (`exp(output)`, argmax); the probabilities here are that, normalised to sum to
1, i.e. softmax(sigmoid(logits)) -- the same ranking as the package, and flat by construction (the
largest ratio between two classes is e). Input: grey, resized to 48x48, x / 127.5 - 1 (the package's
ToTensor + Normalize(0.5, 0.5)). Checked against the package's own network on the astronaut
(tests/ingest/test_extractors_face.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from uniter3m.errors import UserError
from uniter3m.ingest.extractors.base import Extractor, ExtractorOptions, FaceTrack, Frames
from uniter3m.ingest.extractors.weights import packaged_weights

WEIGHTS = "model/model.pkl"  # in facial-emotion-recognition==0.3.4
WEIGHTS_SHA256 = "d2789940007ee6175130fefd3ed9a523a1afa4475fbdafbf64f2948db6c29537"
CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")  # the package's index order
INPUT = 48
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def build_network() -> Any:
    """The package's NetworkV2(in_c=1, nl=32, out_f=7) under its parameter names; also gives the embedding."""
    from torch import nn

    def block(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(cin, cout, 3, stride), nn.BatchNorm2d(cout), nn.ReLU()
        )

    class FerNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv_1, self.conv_2 = block(1, 32, 1), block(32, 64, 2)
            self.conv_3, self.conv_4 = block(64, 128, 2), block(128, 256, 2)
            self.linear = nn.Sequential(nn.Linear(256 * 6 * 6, 256), nn.ReLU(), nn.Linear(256, len(CLASSES)))

        def forward(self, x: Any) -> tuple[Any, Any]:
            """(penultimate embedding (N, 256), logits before the sigmoid (N, 7))."""
            x = self.conv_4(self.conv_3(self.conv_2(self.conv_1(x))))
            embedding = self.linear[1](self.linear[0](x.flatten(1)))
            return embedding, self.linear[2](embedding)

    return FerNet()


def torch_dtype(device: Any, precision: str) -> Any:
    """The dtype the network runs in: fp32 on CPU by default, bf16 (fp16 without it) on a GPU."""
    import torch

    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be auto or one of {', '.join(PRECISIONS)}, got {precision!r}")
    return getattr(torch, PRECISIONS[precision])


class FerExtractor(Extractor):
    name = "fer"
    modality = "face"
    dim = 256
    crop_size = INPUT
    colour = "grey"
    soft_label_dim = len(CLASSES)

    def __init__(self, arg: str | None, options: ExtractorOptions) -> None:
        import torch

        from uniter3m.ingest.encoders import pick_device

        self.refuse_argument(arg)
        if options.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {options.batch_size}")
        super().__init__(arg, options)
        self.frame_rate = options.fps
        self.weights = packaged_weights(
            "facial_emotion_recognition", "facial-emotion-recognition", "faces", WEIGHTS, WEIGHTS_SHA256
        )
        self.device = pick_device(options.device)
        self.torch_dtype = torch_dtype(self.device, options.precision)
        state = torch.load(self.weights.path, map_location="cpu", weights_only=True)["network"]
        self.network = build_network()
        self.network.load_state_dict(state)
        self.network.eval().to(self.device, self.torch_dtype)

    def info(self) -> dict[str, Any]:
        return {
            **super().info(),
            **self.weights.info(),
            "classes": list(CLASSES),
            "soft_labels": "softmax(sigmoid(logits)): the package's exp(output), normalised",
            "input": f"{INPUT}x{INPUT} grey, x/127.5 - 1",
            "precision": str(self.torch_dtype).removeprefix("torch."),
        }

    def extract(self, inputs: Sequence[FaceTrack]) -> list[Frames]:
        sizes = [len(track.crops) for track in inputs]
        pixels = [prepare(track.crops) for track in inputs]
        flat = np.concatenate(pixels) if pixels else np.zeros((0, 1, INPUT, INPUT), np.float32)
        feat, soft = self.run(flat)
        cuts = np.cumsum(sizes)[:-1]
        return [Frames(f, s) for f, s in zip(np.split(feat, cuts), np.split(soft, cuts))]

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 1, 48, 48) float32 network input -> (embeddings (N, 256), probabilities (N, 7)), batched."""
        import torch

        feats = [np.zeros((0, self.dim), np.float32)]
        probs = [np.zeros((0, self.soft_label_dim), np.float32)]
        step = self.options.batch_size
        with torch.inference_mode():
            for lo in range(0, len(pixels), step):
                x = torch.from_numpy(pixels[lo : lo + step]).to(self.device, self.torch_dtype)
                embedding, logits = self.network(x)
                feats.append(embedding.float().cpu().numpy())
                probs.append(torch.softmax(torch.sigmoid(logits.float()), 1).cpu().numpy())
        return np.concatenate(feats), np.concatenate(probs)


def prepare(crops: np.ndarray) -> np.ndarray:
    """Aligned crops (N, S, S, 1 or 3) uint8, S >= 48 -> the network input (N, 1, 48, 48) float32."""
    import cv2

    if crops.ndim != 4 or crops.shape[1] != crops.shape[2] or crops.shape[3] not in (1, 3):
        raise UserError(f"fer takes square face crops (N, S, S, 1 or 3), got shape {crops.shape}")
    if crops.shape[1] < INPUT:
        raise UserError(
            f"face crops of {crops.shape[1]} px are smaller than the fer network's {INPUT}x{INPUT} input; "
            f"give it crops of {INPUT} px or more"
        )
    grey = []
    for crop in crops:
        if crop.shape[2] == 3:
            crop = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
        if crop.shape[0] != INPUT:
            crop = cv2.resize(crop, (INPUT, INPUT), interpolation=cv2.INTER_AREA)
        grey.append(crop.reshape(INPUT, INPUT))
    out = np.asarray(grey, np.float32).reshape(-1, 1, INPUT, INPUT)
    return out / 127.5 - 1.0
