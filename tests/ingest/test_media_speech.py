"""`build-media-db --format wav` on real recordings: EmoDB speech in wav and in mp4, manifests, shards, bad input."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from tests.support.media import make_video, read_wav
from uniter3m.cli import main
from uniter3m.data.store import DbReader
from uniter3m.ingest.recordings import ordered_map

pytest.importorskip("av", reason="PyAV is not installed: pip install 'uniter3m[media]'")
pytest.importorskip("opensmile", reason="openSMILE is not installed: pip install 'uniter3m[speech]'")
pytest.importorskip("cv2", reason="OpenCV is not installed: pip install 'uniter3m[media]'")

FILES = ("03a01Fa", "03a01Nc", "08a02Ab")


@pytest.fixture(scope="module")
def emodb(shared_data) -> Path:
    folder = shared_data / "emodb" / "wav"
    if not all((folder / f"{f}.wav").is_file() for f in FILES):
        pytest.skip(f"EmoDB files {FILES} not found under {folder}")
    return folder


@pytest.fixture(scope="module")
def recordings(emodb, tmp_path_factory) -> Path:
    """Two EmoDB wavs, an mp4 whose aac track is the third EmoDB file, and a stray text file."""
    folder = tmp_path_factory.mktemp("recordings")
    for name in FILES[:2]:
        shutil.copy(emodb / f"{name}.wav", folder / f"{name}.wav")
    make_video(folder / "clip.mp4", audio=read_wav(emodb / f"{FILES[2]}.wav"))
    (folder / "notes.txt").write_text("not media")
    return folder


def build(*argv: str) -> int:
    return main(["build-media-db", *argv])


def test_default_build_reads_wav_and_mp4_and_reports_other_files(recordings, emodb, tmp_path, capsys):
    # the two defects: the default dtype failed on real speech, and the mp4 was skipped without a word
    assert build("--input", str(recordings), "--format", "wav", "--out", str(tmp_path / "db")) == 0
    out = capsys.readouterr().out
    assert "ignored files (not read by --format wav): 1: notes.txt" in out
    db = DbReader(tmp_path / "db", "feat")
    assert sorted(db.ids) == ["03a01Fa", "03a01Nc", "clip"]
    assert db.meta["dtype"] == "float32" and db.meta["dim"] == 130
    assert db.meta["source"]["ignored_files"] == ["notes.txt"]
    assert db.meta["source"]["extractor"]["frame_rate"] == 100.0
    # the mp4's aac track carries the same speech as the wav: same frames, same loudness contour
    assert (
        build("--input", str(emodb / f"{FILES[2]}.wav"), "--format", "wav", "--out", str(tmp_path / "ref"))
        == 0
    )
    ref = DbReader(tmp_path / "ref")[FILES[2]]["feat"].astype(np.float64)
    clip = db["clip"]["feat"].astype(np.float64)
    # 2.0 s at 100 frames/s; aac pads its last packet (up to 1024 samples, ~5 frames)
    assert 0 <= len(clip) - len(ref) <= 6 and abs(len(ref) - 200) <= 6
    n = min(len(ref), len(clip))
    loudness = 1  # audspec_lengthL1norm_sma: the loudness contour
    assert np.corrcoef(ref[:n, loudness], clip[:n, loudness])[0, 1] > 0.95


def test_egemaps_and_manifest_segments(emodb, tmp_path):
    wav = emodb / f"{FILES[0]}.wav"
    manifest = tmp_path / "utts.csv"
    manifest.write_text(
        f"id,path,start,end\nfirst,{wav},0,1.0\nsecond,{wav},1.0,2.0\nwhole,{wav},,\ntiny,{wav},0.5,0.505\n"
    )
    out = tmp_path / "db"
    assert (
        build("--manifest", str(manifest), "--format", "wav", "--extractor", "egemaps", "--out", str(out))
        == 0
    )
    db = DbReader(out, "feat")
    assert db.ids == ["first", "second", "whole", "tiny"] and db.meta["dim"] == 25
    assert abs(db.length_of("first") - 100) <= 6 and abs(db.length_of("second") - 100) <= 6
    assert abs(db.length_of("whole") - 200) <= 6
    # 5 ms is shorter than one analysis window: an empty stream, kept and counted
    assert db.length_of("tiny") == 0 and db.meta["empty_ids"] == ["tiny"]
    assert db.meta["source"]["files"] == 1 and db.meta["source"]["segments"] == 4  # decoded once
    # a segment's frames match the same stretch of the whole file (away from the cut's edges)
    whole, second = db["whole"]["feat"].astype(np.float64), db["second"]["feat"].astype(np.float64)
    f0 = 10  # F0semitoneFrom27.5Hz_sma3nz
    assert np.corrcoef(whole[110:180, f0], second[10:80, f0])[0, 1] > 0.9


def test_workers_shards_and_merge_equal_one_build(recordings, tmp_path):
    base = ["--input", str(recordings), "--format", "wav"]
    assert build(*base, "--workers", "2", "--out", str(tmp_path / "all")) == 0
    for k in range(2):
        assert build(*base, "--shard", f"{k}/2", "--out", str(tmp_path / f"s{k}")) == 0
    shards = [DbReader(tmp_path / f"s{k}") for k in range(2)]
    assert sorted(shards[0].ids + shards[1].ids) == ["03a01Fa", "03a01Nc", "clip"] and len(shards[1].ids) == 1
    assert main(["merge-db", str(tmp_path / "m"), str(tmp_path / "s1")]) == 2  # shard 0/2 missing
    assert main(["merge-db", str(tmp_path / "m"), str(tmp_path / "s0"), str(tmp_path / "s1")]) == 0
    merged, whole = DbReader(tmp_path / "m", "feat"), DbReader(tmp_path / "all", "feat")
    assert sorted(merged.ids) == sorted(whole.ids)
    for uid in whole.ids:
        np.testing.assert_array_equal(merged[uid]["feat"], whole[uid]["feat"])
    np.testing.assert_allclose(merged.meta["mean"], whole.meta["mean"], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(merged.meta["std"], whole.meta["std"], rtol=1e-9, atol=1e-9)
    assert merged.meta["frames"] == whole.meta["frames"] and merged.meta["source"]["shard"] is None
    # a shard merged twice: its ids are not unique
    assert (
        main(
            ["merge-db", str(tmp_path / "m2"), str(tmp_path / "s0"), str(tmp_path / "s0"), "--allow-partial"]
        )
        == 2
    )


def _manifest(tmp_path: Path, rows: str) -> Path:
    path = tmp_path / "m.csv"
    path.write_text("id,path,start,end\n" + rows)
    return path


def _signal_handlers(_: int) -> tuple[str, str]:
    return repr(signal.getsignal(signal.SIGTERM)), repr(signal.getsignal(signal.SIGINT))


def test_pool_workers_die_on_sigterm_whatever_handler_the_parent_holds():
    """`--workers N`: a forked worker used to inherit the CLI's SIGTERM handler, which raised inside a worker
    waiting on the pool's task lock; it then outlived `pool.terminate()` and the build hung in `join`."""
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # as the CLI installs one
    try:
        with ordered_map(2) as mapper:
            seen = set(mapper(_signal_handlers, range(4)))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == {(repr(signal.SIG_DFL), repr(signal.SIG_IGN))}  # SIGTERM kills; Ctrl-C is the parent's


@pytest.mark.parametrize(
    "case, needles",
    [
        ("twice", ["'a' is on lines 2 and 3", "unique"]),
        ("start_after_end", ["'a'", "start 1.5 s >= end 1", "end > start"]),
        ("zero_length", ["'a'", "start 1 s >= end 1"]),
        ("end_past_file", ["'a'", "ends at 9", "lasts 2.000 s", "fix the manifest"]),
        ("missing_file", ["'a'", "nope.wav", "does not exist"]),
        ("truncated", ["cut.mp4", "'a'", "re-export"]),
        ("no_audio", ["silent.mp4", "'a'", "no audio track", "--format video"]),
    ],
)
def test_bad_recordings_name_the_file_id_and_fix(case, needles, emodb, recordings, tmp_path, capsys):
    wav = emodb / f"{FILES[0]}.wav"
    rows = {
        "twice": f"a,{wav},0,1\na,{wav},1,2\n",
        "start_after_end": f"a,{wav},1.5,1\n",
        "zero_length": f"a,{wav},1,1\n",
        "end_past_file": f"a,{wav},1,9\n",
        "missing_file": f"a,{tmp_path / 'nope.wav'},,\n",
    }
    if case == "truncated":
        data = (recordings / "clip.mp4").read_bytes()
        (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 3])
        rows[case] = f"a,{tmp_path / 'cut.mp4'},,\n"
    if case == "no_audio":
        make_video(tmp_path / "silent.mp4", frames=3)
        rows[case] = f"a,{tmp_path / 'silent.mp4'},,\n"
    manifest = _manifest(tmp_path, rows[case])
    assert build("--manifest", str(manifest), "--format", "wav", "--out", str(tmp_path / "db")) == 2
    err = capsys.readouterr().err
    assert all(n in err for n in needles), err
    assert not (tmp_path / "db" / "meta.json").exists()  # nothing that looks complete


def test_same_id_from_two_files_and_feature_formats(recordings, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(recordings / "03a01Fa.wav", folder / "x.wav")
    shutil.copy(recordings / "clip.mp4", folder / "x.mp4")
    assert build("--input", str(folder), "--format", "wav", "--out", str(tmp_path / "db")) == 2
    err = capsys.readouterr().err
    assert "x.wav" in err and "x.mp4" in err and "'x'" in err and "--manifest" in err
    assert build("--input", str(folder), "--format", "npz", "--out", str(tmp_path / "db")) == 2
    assert "use `uniter3m build-feat-db`" in capsys.readouterr().err
    assert (
        build("--input", str(folder), "--format", "wav", "--shard", "2/2", "--out", str(tmp_path / "db")) == 2
    )
    assert "0 <= K < N" in capsys.readouterr().err


def test_meta_reports_upsampling(emodb, tmp_path):
    # EmoDB here is 22.05 kHz, above openSMILE's 16 kHz: nothing upsampled; an 8 kHz file is counted
    samples, rate = read_wav(emodb / f"{FILES[0]}.wav")
    import wave

    low = samples[:: rate // 8000 + 1][: 8000 * 2]
    with wave.open(str(tmp_path / "low.wav"), "wb") as f:
        f.setnchannels(1), f.setsampwidth(2), f.setframerate(8000)
        f.writeframes((low * 32767).astype(np.int16).tobytes())
    assert build("--input", str(tmp_path / "low.wav"), "--format", "wav", "--out", str(tmp_path / "db")) == 0
    meta = json.loads((tmp_path / "db" / "meta.json").read_text())
    assert meta["source"]["upsampled"] == 1 and meta["source"]["upsampled_ids"] == ["low"]
