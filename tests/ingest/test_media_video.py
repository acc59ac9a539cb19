"""`build-media-db --format video`: faces found where the astronaut is and nowhere else (real Haar detector)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.support.media import FRAME_H, FRAME_W, HEAD_PX, HEAD_TOP, head_left, make_video
from uniter3m.cli import main
from uniter3m.data.store import DbReader

pytest.importorskip("av", reason="PyAV is not installed: pip install 'uniter3m[media]'")
pytest.importorskip("cv2", reason="OpenCV is not installed: pip install 'uniter3m[media]'")
pytest.importorskip("skimage", reason="scikit-image is not installed: pip install scikit-image")


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """12 frames at 6 fps (2 s): the head moves right 8 px a frame; frames 3 and 7 are blank."""
    return make_video(tmp_path_factory.mktemp("video") / "astro.mp4")


def build(*argv: str) -> int:
    return main(["build-media-db", "--format", "video", *argv])


def test_geometric_boxes_follow_the_face_and_blank_frames_are_skipped(video, tmp_path):
    assert build("--input", str(video), "--fps", "6", "--out", str(tmp_path / "db")) == 0
    db = DbReader(tmp_path / "db", "feat")
    assert db.meta["dim"] == 4 and db.meta["dtype"] == "float16"
    assert db.meta["frames_dropped"] == {"no face": 2} and db.meta["empty"] == 0
    feat = db["astro"]["feat"].astype(np.float64)
    kept = [i for i in range(12) if i not in (3, 7)]
    assert len(feat) == len(kept)
    cx = np.array([(head_left(i) + HEAD_PX / 2) / FRAME_W for i in kept])
    # the detected box centre follows the head (within 8 % of the frame width), the face is in the upper half
    assert np.abs(feat[:, 0] - cx).max() < 0.08
    assert np.all(feat[:, 1] < (HEAD_TOP + HEAD_PX) / FRAME_H) and np.all(feat[:, 2] > 0.15)
    assert db.meta["source"]["extractor"]["frame_rate"] == 6.0


def test_fps_sampling_manifest_segments_and_faceless_utterance(video, tmp_path):
    blank = make_video(tmp_path / "blank.mp4", frames=6, blank=tuple(range(6)))
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"id,path,start,end\nfirst,{video},0,1.0\nlast,{video},1.0,2.0\nnone,{blank},,\n")
    argv = ["--manifest", str(manifest), "--fps", "3", "--extractor", "pixels", "--face-size", "32"]
    assert build(*argv, "--out", str(tmp_path / "db")) == 0
    db = DbReader(tmp_path / "db", "feat")
    assert db.meta["dim"] == 32 * 32  # grey crops, flattened
    # 3 fps takes frames 0, 2, 4 (first second) and 6, 8, 10 (second): none of them blank
    assert db.length_of("first") == 3 and db.length_of("last") == 3
    # a video without any face: an empty stream, kept and counted, never a made-up frame
    assert db.length_of("none") == 0 and db.meta["empty_ids"] == ["none"]
    assert db.meta["frames_dropped"] == {"no face": 3}
    crop = db["first"]["feat"][0].astype(np.float64).reshape(32, 32)
    assert 0 <= crop.min() and crop.max() <= 1 and crop.std() > 0.05  # a face, not the flat grey background


def test_track_keeps_the_face_near_the_last_one(tmp_path):
    import av

    from tests.support.media import head

    # a big face on the left and a smaller one on the right: largest picks left, track keeps the first one kept
    path = tmp_path / "two.mp4"
    out = av.open(str(path), "w")
    stream = out.add_stream("libx264", rate=4)
    stream.width, stream.height, stream.pix_fmt = 480, 180, "yuv420p"
    import cv2

    big, small = cv2.resize(head(), (160, 160)), head()
    for i in range(4):
        image = np.full((180, 480, 3), 128, np.uint8)
        image[20:140, 340:460] = small
        if i > 0:  # only the small face at first
            image[5:165, 10:170] = big
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    for select, side in (("largest", "left"), ("track", "right")):
        db_path = tmp_path / select
        assert build("--input", str(path), "--fps", "4", "--face-select", select, "--out", str(db_path)) == 0
        cx = DbReader(db_path)["two"]["feat"].astype(np.float64)[1:, 0]
        assert np.all(cx < 0.5) if side == "left" else np.all(cx > 0.5), (select, cx)


def test_bad_video_inputs(video, tmp_path, capsys):
    import wave

    with wave.open(str(tmp_path / "voice.wav"), "wb") as f:
        f.setnchannels(1), f.setsampwidth(2), f.setframerate(16000)
        f.writeframes(np.zeros(1600, np.int16).tobytes())
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(video.read_bytes()[:2000])
    cases = {
        f"a,{tmp_path / 'voice.wav'},,\n": ["voice.wav", "'a'", "no video track", "--format wav"],
        f"a,{cut},,\n": ["cut.mp4", "'a'", "re-export"],
        f"a,{video},1,5\n": ["'a'", "ends at 5", "last frame", "fix the manifest"],
    }
    for row, needles in cases.items():
        manifest = tmp_path / "m.csv"
        manifest.write_text("id,path,start,end\n" + row)
        assert build("--manifest", str(manifest), "--out", str(tmp_path / "db")) == 2
        err = capsys.readouterr().err
        assert all(n in err for n in needles), err
        assert not (tmp_path / "db" / "meta.json").exists()
    assert build("--input", str(video), "--face-size", "4", "--out", str(tmp_path / "db")) == 2
    assert "--face-size" in capsys.readouterr().err
    assert build("--input", str(video), "--extractor", "compare", "--out", str(tmp_path / "db")) == 2
    err = capsys.readouterr().err
    assert (
        "--extractor compare gives speech features, not face" in err
        and "geometric" in err
        and "pixels" in err
    )
    assert build("--input", str(video), "--detector", "nope", "--out", str(tmp_path / "db")) == 2
    assert "unknown face detector 'nope'; known:" in capsys.readouterr().err


def test_workers_give_the_same_database(video, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        (folder / f"v{i}.mp4").write_bytes(video.read_bytes())
    for workers in ("1", "3"):
        assert build("--input", str(folder), "--workers", workers, "--out", str(tmp_path / workers)) == 0
    one, three = DbReader(tmp_path / "1"), DbReader(tmp_path / "3")
    assert one.ids == three.ids == ["v0", "v1", "v2"]
    for uid in one.ids:
        np.testing.assert_array_equal(one[uid]["feat"], three[uid]["feat"])
    meta = json.loads((tmp_path / "3" / "meta.json").read_text())
    assert meta["source"]["workers"] == 3 and meta["frames_dropped"] == {
        "no face": 3
    }  # 5 fps lands on blank frame 3 only
