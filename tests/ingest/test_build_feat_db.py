"""`uniter3m build-feat-db`: real OpenFace output, every source format, streaming stats, bad input."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from uniter3m.cli import main
from uniter3m.data.store import DbReader
from uniter3m.ingest.feat_db import RunningMoments


def build(src: Path, fmt: str, out: Path, *extra: str) -> int:
    return main(["build-feat-db", "--input", str(src), "--format", fmt, "--out", str(out), *extra])


def stored_stats(db: DbReader) -> tuple[np.ndarray, np.ndarray]:
    frames = np.concatenate([db[k]["feat"].astype(np.float64) for k in db.ids])
    return frames.mean(axis=0), frames.std(axis=0)


@pytest.fixture
def openface_dir(shared_data, tmp_path) -> Path:
    folder = tmp_path / "openface"
    folder.mkdir()
    shutil.copy(shared_data / "openface" / "OpenFace_Test.csv", folder / "OpenFace_Test.csv")
    return folder


def read_openface(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def write_openface(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def test_openface_real_file(openface_dir, tmp_path, capsys):
    out = tmp_path / "face"
    assert build(openface_dir, "openface", out, "--columns", "AU*_r,pose_*,gaze_*") == 0
    assert "100 frames" in capsys.readouterr().out
    db = DbReader(out, kind="feat")
    meta = db.meta
    assert db.ids == ["OpenFace_Test"] and db.length_of("OpenFace_Test") == 100
    assert meta["dim"] == 17 + 6 + 6 and meta["frames"] == 100 and meta["empty"] == 0
    columns = meta["source"]["columns"]
    assert columns[:2] == ["AU01_r", "AU02_r"] and columns[17] == "pose_Tx" and columns[-1] == "gaze_1_z"
    feat = db["OpenFace_Test"]["feat"]
    assert feat.shape == (100, 29) and feat.dtype == np.float16
    header, rows = read_openface(openface_dir / "OpenFace_Test.csv")
    header = [h.strip() for h in header]
    expected = np.array([[float(r[header.index(c)]) for c in columns] for r in rows])
    np.testing.assert_allclose(feat.astype(np.float64), expected, rtol=1e-3, atol=1e-3)
    mean, std = stored_stats(db)
    np.testing.assert_allclose(meta["mean"], mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(meta["std"], std, rtol=1e-9, atol=1e-12)


def test_openface_drops_failed_and_unsure_frames_and_keeps_faceless_utterances(
    openface_dir, tmp_path, capsys
):
    header, rows = read_openface(openface_dir / "OpenFace_Test.csv")
    names = [h.strip() for h in header]
    success, confidence = names.index("success"), names.index("confidence")
    for r in rows[:10]:
        r[success] = "0"
    for r in rows[10:15]:
        r[confidence] = "0.3"
    write_openface(openface_dir / "OpenFace_Test.csv", header, rows)
    for r in rows:
        r[success] = "0"
    write_openface(openface_dir / "no_face.csv", header, rows)

    out = tmp_path / "face"
    assert (
        build(
            openface_dir,
            "openface",
            out,
            "--columns",
            "AU*_r",
            "--min-confidence",
            "0.5",
            "--dtype",
            "float32",
        )
        == 0
    )
    assert "empty (zero-frame) utterances kept: 1" in capsys.readouterr().out
    db = DbReader(out)
    assert db.length_of("OpenFace_Test") == 85
    empty = db["no_face"]["feat"]
    assert empty.shape == (0, 17) and empty.dtype == np.float32 and db.length_of("no_face") == 0
    assert db.meta["empty"] == 1 and db.meta["empty_ids"] == ["no_face"]
    assert db.meta["frames_dropped"] == {"success == 0": 110, "confidence < 0.5": 5}
    mean, std = stored_stats(db)
    np.testing.assert_allclose(db.meta["mean"], mean, atol=1e-12)


def test_openface_bad_pattern_and_bad_cell_are_named(openface_dir, tmp_path, capsys):
    assert build(openface_dir, "openface", tmp_path / "db", "--columns", "AU*_r,posse_*") == 2
    err = capsys.readouterr().err
    assert "'posse_*' matches no column" in err and "pose_Tx" in err

    header, rows = read_openface(openface_dir / "OpenFace_Test.csv")
    names = [h.strip() for h in header]
    rows[0][names.index("success")] = "0"  # a dropped frame before the bad one must not shift the line
    rows[20][names.index("AU01_r")] = "n/a"
    write_openface(openface_dir / "OpenFace_Test.csv", header, rows)
    assert build(openface_dir, "openface", tmp_path / "db", "--columns", "AU*_r") == 2
    assert "line 22, column 'AU01_r' holds 'n/a'" in capsys.readouterr().err


def test_npz_soft_labels_nested_ids_and_streaming_stats(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "npz"
    (src / "ses1").mkdir(parents=True)
    lengths = {"a": 7, "b": 1, "ses1/c": 30, "ses1/d": 0}
    for uid, t in lengths.items():
        feat = rng.normal(3.0, 2.0, size=(t, 5)).astype(np.float32)
        soft = rng.dirichlet(np.ones(4), size=t).reshape(t, 4)
        np.savez(src / f"{uid}.npz", feat=feat, soft_labels=soft)
    out = tmp_path / "db"
    assert build(src, "npz", out, "--dtype", "float32") == 0
    db = DbReader(out)
    assert sorted(db.ids) == sorted(lengths)
    assert {k: db.length_of(k) for k in db.ids} == lengths
    assert db.meta["soft_label_dim"] == 4 and db.meta["empty"] == 1
    rec = db["ses1/c"]
    assert rec["feat"].shape == (30, 5) and rec["soft_labels"].shape == (30, 4)
    assert rec["soft_labels"].dtype == np.float32
    np.testing.assert_allclose(rec["soft_labels"].sum(axis=1), 1.0, rtol=1e-5)
    assert db["ses1/d"]["soft_labels"].shape == (0, 4)
    mean, std = stored_stats(db)
    np.testing.assert_allclose(db.meta["mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(db.meta["std"], std, rtol=1e-12)
    assert db.meta["frame_histogram"] == {"0": 1, "1": 1, "2-3": 0, "4-7": 1, "8-15": 0, "16-31": 1}


def test_npz_only_array_is_the_frames_and_ambiguous_files_are_errors(tmp_path, capsys):
    src = tmp_path / "npz"
    src.mkdir()
    np.savez(src / "u1.npz", x=np.ones((3, 2)))
    assert build(src, "npz", tmp_path / "db") == 0
    assert DbReader(tmp_path / "db")["u1"]["feat"].shape == (3, 2)
    np.savez(src / "u2.npz", x=np.ones((3, 2)), y=np.ones((3, 2)))
    assert build(src, "npz", tmp_path / "db2") == 2
    assert "u2.npz" in capsys.readouterr().err


def test_h5_nested_datasets_with_soft_label_group(tmp_path):
    path = tmp_path / "speech.h5"
    rng = np.random.default_rng(1)
    with h5py.File(path, "w") as f:
        f["dia1/utt0"] = rng.normal(size=(4, 6))
        f["dia1/utt1"] = rng.normal(size=(2, 6))
        f["solo"] = rng.normal(size=6)  # 1-D: one frame
        f["soft_labels/dia1/utt0"] = np.full((4, 3), 1 / 3)
        f["soft_labels/dia1/utt1"] = np.full((2, 3), 1 / 3)
        f["soft_labels/solo"] = np.full((1, 3), 1 / 3)
    out = tmp_path / "db"
    assert build(path, "h5", out) == 0
    db = DbReader(out)
    assert db.ids == ["dia1/utt0", "dia1/utt1", "solo"]
    assert db["solo"]["feat"].shape == (1, 6) and db["dia1/utt0"]["feat"].dtype == np.float16
    assert db["dia1/utt1"]["soft_labels"].shape == (2, 3) and db.meta["soft_label_dim"] == 3


def test_csv_one_frame_per_utterance(tmp_path):
    src = tmp_path / "utt.csv"
    src.write_text("dia,utt,name,f1,f2,f3\n0,0,anna,1.0,2,\n0,1,bob,3.5,-1,2\n", encoding="utf-8")
    out = tmp_path / "db"
    assert build(src, "csv", out, "--id-col", "dia,utt", "--nan-policy", "drop") == 0
    db = DbReader(out)
    assert db.meta["source"]["columns"] == ["f1", "f2", "f3"]  # numeric columns but the ids
    assert db.meta["source"]["ignored_columns"] == ["name"]
    assert db.ids == ["0_1"]  # the empty cell is a missing value: NaN, dropped by the policy
    assert db.meta["dropped"][0]["id"] == "0_0"
    assert db["0_1"]["feat"].tolist() == [[3.5, -1.0, 2.0]]
    assert build(src, "csv", tmp_path / "db2", "--id-col", "dia,utt", "--columns", "f1,f2") == 0
    assert len(DbReader(tmp_path / "db2")) == 2


def test_nan_and_inf_are_errors_naming_file_id_and_fix(tmp_path, capsys):
    src = tmp_path / "npz"
    src.mkdir()
    np.savez(src / "good.npz", feat=np.ones((2, 3)))
    np.savez(src / "bad.npz", feat=np.array([[1.0, np.inf, 0.0], [np.nan, 1.0, 1.0]]))
    out = tmp_path / "db"
    assert build(src, "npz", out) == 2
    err = capsys.readouterr().err
    assert "bad.npz" in err and "'bad'" in err and "2 NaN/Inf" in err and "--nan-policy drop" in err
    assert not out.exists()  # the half-built database was removed: a rebuild needs no --overwrite
    assert build(src, "npz", out, "--nan-policy", "drop") == 0
    db = DbReader(out)
    assert db.ids == ["good"] and [d["id"] for d in db.meta["dropped"]] == ["bad"]
    assert "dropped utterances: 1 NaN/Inf" in capsys.readouterr().out


def test_csv_inf_cell_and_non_number(tmp_path, capsys):
    src = tmp_path / "utt.csv"
    src.write_text("id,f1,f2\na,1,2\nb,inf,3\n", encoding="utf-8")
    assert build(src, "csv", tmp_path / "db", "--id-col", "id") == 2
    err = capsys.readouterr().err
    assert f"{src} line 3" in err and "'b'" in err
    src.write_text("id,f1,f2\na,1,2\nb,x,3\n", encoding="utf-8")
    assert build(src, "csv", tmp_path / "db", "--id-col", "id", "--columns", "f*") == 2
    assert "line 3, column 'f1' holds 'x'" in capsys.readouterr().err


def test_dimension_mismatch_names_both_files(tmp_path, capsys):
    src = tmp_path / "npz"
    src.mkdir()
    np.savez(src / "a.npz", feat=np.ones((2, 4)))
    np.savez(src / "b.npz", feat=np.ones((2, 5)))
    assert build(src, "npz", tmp_path / "db") == 2
    err = capsys.readouterr().err
    assert "a.npz" in err and "b.npz" in err and "dimension 5" in err and "from 4" in err


def test_float16_overflow_asks_for_float32(tmp_path, capsys):
    src = tmp_path / "npz"
    src.mkdir()
    np.savez(src / "loud.npz", feat=np.full((1, 2), 1e6))
    assert build(src, "npz", tmp_path / "db") == 2
    assert "--dtype float32" in capsys.readouterr().err
    assert build(src, "npz", tmp_path / "db", "--dtype", "float32") == 0


def test_existing_output_missing_input_and_misplaced_flags(tmp_path, capsys):
    src = tmp_path / "npz"
    src.mkdir()
    np.savez(src / "a.npz", feat=np.ones((2, 4)))
    out = tmp_path / "db"
    assert build(src, "npz", out) == 0
    assert build(src, "npz", out) == 2
    assert "--overwrite" in capsys.readouterr().err
    np.savez(src / "b.npz", feat=np.ones((1, 4)))
    assert build(src, "npz", out, "--overwrite") == 0
    assert len(DbReader(out)) == 2

    assert build(tmp_path / "missing", "npz", tmp_path / "db2") == 2
    assert "missing does not exist" in capsys.readouterr().err
    assert build(src, "npz", tmp_path / "db2", "--id-col", "x") == 2
    assert "--id-col (csv only" in capsys.readouterr().err
    assert not (tmp_path / "db2").exists()


def test_running_moments_merge_matches_numpy():
    rng = np.random.default_rng(3)
    batches = [rng.normal(loc=1e4, scale=0.5, size=(n, 3)) for n in (5, 0, 1, 40, 2)]
    moments = RunningMoments(3)
    for b in batches:
        moments.update(b)
    frames = np.concatenate(batches)
    assert moments.n == len(frames)
    np.testing.assert_allclose(moments.mean, frames.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(moments.std, frames.std(axis=0), rtol=1e-9)
