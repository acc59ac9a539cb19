"""`uniter3m inspect`: human-readable and JSON views of text and feature databases, broken folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from uniter3m.cli import main
from uniter3m.data.store import DbWriter


@pytest.fixture
def text_db(minilm_dir, tmp_path) -> Path:
    src = tmp_path / "t.csv"
    src.write_text("id,text,emotion\na,I am so happy!,joy\nb,,neu\nc,Leave me alone.,ang\nd,Fine.,neu\n")
    out = tmp_path / "txt"
    args = ["--input", str(src), "--id-col", "id", "--text-col", "text", "--label-col", "emotion"]
    assert main(["build-txt-db", *args, "--tokenizer", str(minilm_dir), "--out", str(out)]) == 0
    return out


@pytest.fixture
def feat_db(tmp_path) -> Path:
    src = tmp_path / "npz"
    src.mkdir()
    for name, t in (("a", 3), ("c", 0), ("d", 9)):
        np.savez(src / f"{name}.npz", feat=np.arange(t * 4, dtype=np.float32).reshape(t, 4))
    np.savez(src / "bad.npz", feat=np.full((2, 4), np.nan))
    out = tmp_path / "feat"
    assert (
        main(
            [
                "build-feat-db",
                "--input",
                str(src),
                "--format",
                "npz",
                "--out",
                str(out),
                "--nan-policy",
                "drop",
            ]
        )
        == 0
    )
    return out


def inspect_json(path: Path, capsys) -> dict:
    capsys.readouterr()
    assert main(["inspect", str(path), "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # exactly one JSON object on one line
    return json.loads(out)


def test_text_db_json_and_text(text_db, tokenizer, capsys):
    info = inspect_json(text_db, capsys)
    assert info["kind"] == "txt" and info["count"] == 3
    assert info["label_counts"] == {"emotion": {"ang": 1, "joy": 1, "neu": 1}}
    assert info["tokenizer"]["vocab_size"] == len(tokenizer)
    assert info["skipped"] == [{"row": 2, "id": "b", "reason": "empty text"}]
    assert info["lengths"]["unit"] == "tokens" and info["lengths"]["max"] == 5  # i am so happy !
    assert info["record_layout"]["input_ids"] == "int32[5]"

    assert main(["inspect", str(text_db)]) == 0
    text = capsys.readouterr().out
    assert "txt database, 3 utterances" in text
    assert "label emotion (3 values):" in text and "joy: 1 (33.3%)" in text
    assert "skipped rows: 1" in text and "row 2 id b: empty text" in text
    assert f"vocab {len(tokenizer)}" in text


def test_feature_db_json_and_text(feat_db, capsys):
    info = inspect_json(feat_db, capsys)
    assert info["kind"] == "feat" and info["count"] == 3 and info["dim"] == 4
    assert info["empty"] == 1 and info["frames"] == 12
    assert info["lengths"] == {
        "unit": "frames",
        "min": 0,
        "max": 9,
        "mean": 4.0,
        "p50": 3,
        "p95": 9,
        "histogram": {"0": 1, "1": 0, "2-3": 1, "4-7": 0, "8-15": 1},
    }
    assert [d["id"] for d in info["dropped"]] == ["bad"]
    assert len(info["mean"]) == len(info["std"]) == 4

    assert main(["inspect", str(feat_db)]) == 0
    text = capsys.readouterr().out
    assert "feat database, 3 utterances" in text and "dim 4, dtype float16" in text
    assert "empty (zero-frame) utterances: 1" in text
    assert "dropped utterances: 1" in text and "bad: NaN/Inf" in text


def test_minimal_meta_from_another_builder_still_shows_dim(tmp_path, capsys):
    writer = DbWriter(tmp_path / "raw", "feat")
    writer.put("x", {"feat": np.zeros((2, 7), dtype=np.float16)}, 2)
    writer.finish({})
    info = inspect_json(tmp_path / "raw", capsys)
    assert info["dim"] == 7 and info["count"] == 1
    assert main(["inspect", str(tmp_path / "raw")]) == 0


def test_missing_interrupted_and_foreign_folders_are_errors(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err

    writer = DbWriter(tmp_path / "half", "txt")
    writer.put("a", {"input_ids": np.zeros(1, dtype=np.int32)}, 1)
    writer.abort()  # no meta.json: an interrupted build
    assert main(["inspect", str(tmp_path / "half")]) == 2
    assert "interrupted" in capsys.readouterr().err

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "meta.json").write_text('{"format": "something-else"}')
    assert main(["inspect", str(foreign)]) == 2
    assert "is not a uniter3m-lmdb database" in capsys.readouterr().err
