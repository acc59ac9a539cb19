"""`mtcnn`: the three-stage MTCNN face detector (Zhang et al. 2016) with 5 landmarks, facenet-pytorch weights.

`facenet-pytorch==2.6.0` (MIT) ships the P/R/O-net weights (`data/pnet.pt`, `rnet.pt`, `onet.pt`,
converted from the original Caffe models) but imports torchvision, whose registry build does not load
with our CPU torch; so the three networks are defined here under the same parameter names, and the
cascade (image pyramid, box regression, non-maximum suppression) is ours, in torch + numpy.

Stages, as in the paper: P-net scans a pyramid (scale step 0.709, from faces of `min_size` px) for
12x12 face windows; R-net (24x24) and O-net (48x48) re-score and refine the surviving boxes; O-net
also gives 5 landmarks: eye (image left), eye (image right), nose, mouth corner left, mouth corner right.
Thresholds 0.6, 0.7, 0.7 (the paper's and facenet-pytorch's). Runs in fp32 on the CPU, one frame at a
time (the decoding workers run detectors; `--workers` spreads frames over processes).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from uniter3m.ingest.detectors.base import Detection, Detector
from uniter3m.ingest.extractors.weights import WeightFile, packaged_weights

WEIGHTS = {  # file in facenet-pytorch==2.6.0 -> sha256
    "pnet": "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f",
    "rnet": "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86",
    "onet": "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d",
}
THRESHOLDS = (0.6, 0.7, 0.7)
SCALE_STEP = 0.709
MIN_SIZE = 20  # px: the smallest face searched for, whatever --min-face says
LANDMARKS = ("eye_left", "eye_right", "nose", "mouth_left", "mouth_right")  # left = image left


def weight_files() -> dict[str, WeightFile]:
    return {
        net: packaged_weights("facenet_pytorch", "facenet-pytorch", "faces", f"data/{net}.pt", sha)
        for net, sha in WEIGHTS.items()
    }


@lru_cache(maxsize=1)
def networks() -> tuple[Any, Any, Any]:
    """(P-net, R-net, O-net) with the shipped weights, in eval mode (built once per process)."""
    import torch
    from torch import nn

    def conv(cin: int, cout: int, k: int) -> tuple[nn.Module, nn.Module]:
        return nn.Conv2d(cin, cout, k), nn.PReLU(cout)

    class PNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.prelu1 = conv(3, 10, 3)
            self.conv2, self.prelu2 = conv(10, 16, 3)
            self.conv3, self.prelu3 = conv(16, 32, 3)
            self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

        def forward(self, x: Any) -> tuple[Any, Any]:
            x = nn.functional.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)
            x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
            return self.conv4_2(x), torch.softmax(self.conv4_1(x), 1)[:, 1]

    class RNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.prelu1 = conv(3, 28, 3)
            self.conv2, self.prelu2 = conv(28, 48, 3)
            self.conv3, self.prelu3 = conv(48, 64, 2)
            self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
            self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

        def forward(self, x: Any) -> tuple[Any, Any]:
            x = nn.functional.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
            x = nn.functional.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
            x = self.prelu3(self.conv3(x)).permute(0, 3, 2, 1).flatten(1)  # the Caffe weights' order
            x = self.prelu4(self.dense4(x))
            return self.dense5_2(x), torch.softmax(self.dense5_1(x), 1)[:, 1]

    class ONet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.prelu1 = conv(3, 32, 3)
            self.conv2, self.prelu2 = conv(32, 64, 3)
            self.conv3, self.prelu3 = conv(64, 64, 3)
            self.conv4, self.prelu4 = conv(64, 128, 2)
            self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
            self.dense6_1, self.dense6_2, self.dense6_3 = (nn.Linear(256, n) for n in (2, 4, 10))

        def forward(self, x: Any) -> tuple[Any, Any, Any]:
            x = nn.functional.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
            x = nn.functional.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
            x = nn.functional.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
            x = self.prelu4(self.conv4(x)).permute(0, 3, 2, 1).flatten(1)
            x = self.prelu5(self.dense5(x))
            return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), 1)[:, 1]

    files = weight_files()
    nets = []
    for net, cls in (("pnet", PNet), ("rnet", RNet), ("onet", ONet)):
        module = cls()
        module.load_state_dict(torch.load(files[net].path, map_location="cpu", weights_only=True))
        nets.append(module.eval())
    return nets[0], nets[1], nets[2]


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, best first.

    Overlap = intersection over union, or over the smaller box (`mode="min"`, O-net's last pass: it
    also drops a small box nested in a bigger one). Pixel-inclusive areas, as MTCNN's boxes are.
    """
    x0, y0, x1, y1 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    area = (x1 - x0 + 1) * (y1 - y0 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]) + 1)
        inter = w * h
        denom = np.minimum(area[i], area[rest]) if mode == "min" else area[i] + area[rest] - inter
        order = rest[inter / denom <= threshold]
    return np.asarray(keep, np.int64)


def square(boxes: np.ndarray) -> np.ndarray:
    """Each box made square (side = its longer side) around the same centre."""
    out = boxes.copy()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + (w - side) / 2
    out[:, 1] = boxes[:, 1] + (h - side) / 2
    out[:, 2:4] = out[:, 0:2] + side[:, None]
    return out


def regress(boxes: np.ndarray, offsets: np.ndarray, inclusive: bool) -> np.ndarray:
    """Boxes moved by the network's offsets (fractions of the box side)."""
    size = boxes[:, 2:4] - boxes[:, 0:2] + (1 if inclusive else 0)
    return np.concatenate([boxes[:, 0:2] + offsets[:, 0:2] * size, boxes[:, 2:4] + offsets[:, 2:4] * size], 1)


def windows(image: Any, boxes: np.ndarray, side: int) -> Any:
    """The boxes cut from `image` (1, 3, H, W), each resized to side x side; clipped to the frame (a box
    wholly outside it gets the edge pixel, which the next network rejects)."""
    import torch

    height, width = image.shape[2:]
    b = np.trunc(boxes).astype(np.int64)
    x0, y0 = np.clip(b[:, 0], 1, width), np.clip(b[:, 1], 1, height)
    x1, y1 = np.clip(b[:, 2], x0, width), np.clip(b[:, 3], y0, height)
    cuts = [
        torch.nn.functional.interpolate(
            image[:, :, y0[k] - 1 : y1[k], x0[k] - 1 : x1[k]], (side, side), mode="area"
        )
        for k in range(len(b))
    ]
    return (torch.cat(cuts) - 127.5) * 0.0078125


class MtcnnDetector(Detector):
    """`options`: a `uniter3m.ingest.faces.FaceOptions` (min_face)."""

    name = "mtcnn"
    landmark_names = LANDMARKS

    def __init__(self, options: Any) -> None:
        super().__init__(options)
        networks()  # load (and check) the weights now: a missing package fails before any decoding

    def info(self) -> dict[str, Any]:
        files = weight_files()
        return {
            "name": self.name,
            "package": files["pnet"].package,
            "version": files["pnet"].version,
            "weights_sha256": {net: f.sha256 for net, f in files.items()},
            "thresholds": list(THRESHOLDS),
            "landmarks": list(LANDMARKS),
        }

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        import torch

        height, width = rgb.shape[:2]
        min_size = max(MIN_SIZE, self.options.min_face * min(height, width))
        with torch.inference_mode():
            image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
            boxes = self._propose(image, min_size)
            if len(boxes):
                boxes = self._refine(image, boxes)
            if not len(boxes):
                return []
            boxes, points = self._output(image, boxes)
        return [
            Detection(box[:4].astype(np.float32), float(box[4]), pts.astype(np.float32))
            for box, pts in zip(boxes, points)
        ]

    def _propose(self, image: Any, min_size: float) -> np.ndarray:
        """P-net over the pyramid: square candidate boxes (x0, y0, x1, y1, score)."""
        import torch

        pnet = networks()[0]
        height, width = image.shape[2:]
        scale, shortest = 12.0 / min_size, min(height, width) * 12.0 / min_size
        found = []
        while shortest >= 12:
            size = (int(height * scale + 1), int(width * scale + 1))
            scaled = torch.nn.functional.interpolate(image, size, mode="area")
            offsets, prob = pnet((scaled - 127.5) * 0.0078125)
            ys, xs = np.nonzero(prob[0].numpy() >= THRESHOLDS[0])
            if len(ys):
                cells = np.stack([xs, ys], 1).astype(np.float64)
                corners = np.concatenate(
                    [np.floor((2 * cells + 1) / scale), np.floor((2 * cells + 12) / scale)], 1
                )
                score = prob[0].numpy()[ys, xs]
                offs = offsets[0].numpy()[:, ys, xs].T
                keep = nms(corners, score, 0.5)
                found.append(np.concatenate([corners, score[:, None], offs], 1)[keep])
            scale, shortest = scale * SCALE_STEP, shortest * SCALE_STEP
        if not found:
            return np.zeros((0, 5))
        cand = np.concatenate(found)
        cand = cand[nms(cand[:, :4], cand[:, 4], 0.7)]
        return np.concatenate([square(regress(cand[:, :4], cand[:, 5:9], False)), cand[:, 4:5]], 1)

    def _refine(self, image: Any, boxes: np.ndarray) -> np.ndarray:
        """R-net: re-scored, regressed, squared boxes."""
        offsets, prob = networks()[1](windows(image, boxes, 24))
        prob, offsets = prob.numpy(), offsets.numpy()
        keep = prob > THRESHOLDS[1]
        boxes, prob, offsets = boxes[keep, :4], prob[keep], offsets[keep]
        order = nms(boxes, prob, 0.7)
        boxes = square(regress(boxes[order], offsets[order], True))
        return np.concatenate([boxes, prob[order, None]], 1)

    def _output(self, image: Any, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """O-net: final boxes (x0, y0, x1, y1, score) best first, and their 5 landmarks (x, y) in pixels."""
        offsets, points, prob = (t.numpy() for t in networks()[2](windows(image, boxes, 48)))
        keep = prob > THRESHOLDS[2]
        boxes, prob, offsets, points = boxes[keep, :4], prob[keep], offsets[keep], points[keep]
        size = boxes[:, 2:4] - boxes[:, 0:2] + 1
        points = np.stack([points[:, :5], points[:, 5:]], 2) * size[:, None] + boxes[:, None, 0:2] - 1
        boxes = regress(boxes, offsets, True)
        order = nms(boxes, prob, 0.7, mode="min")
        return np.concatenate([boxes[order], prob[order, None]], 1), points[order]
