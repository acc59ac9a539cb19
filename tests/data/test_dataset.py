"""JoinedDataset over small real LMDB databases built with DbWriter."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from uniter3m.data.dataset import JoinedDataset
from uniter3m.data.store import DbReader, DbWriter
from uniter3m.errors import ConfigError, DatabaseError

FACE_DIM, SPEECH_DIM, SOFT = 6, 4, 3


def write_txt(path, lengths: dict[str, int], soft: bool = False, vocab_hash: str = "v1"):
    w = DbWriter(path, "txt")
    for uid, n in lengths.items():
        rec = {
            "input_ids": np.arange(1000, 1000 + n, dtype=np.int32),
            "word_ids": (np.arange(n) // 2).astype(np.int32),
            "emo_flags": (np.arange(n) % 3 == 0).astype(np.uint8),
            "text": f"text of {uid}",
            "labels": {"emotion": f"emo-{uid}", "speaker": "A"},
        }
        if soft:
            rec["soft_labels"] = np.full(SOFT, 1 / SOFT, dtype=np.float32)
        w.put(uid, rec, n)
    tokenizer = {
        "cls_id": 101,
        "sep_id": 102,
        "mask_id": 103,
        "pad_id": 0,
        "unk_id": 100,
        "vocab_size": 30522,
    }
    w.finish({"tokenizer": {**tokenizer, "vocab_hash": vocab_hash}})
    return path


def write_feat(path, frames: dict[str, np.ndarray], soft: bool = False, dtype=np.float16):
    w = DbWriter(path, "feat")
    for uid, x in frames.items():
        rec = {"feat": x.astype(dtype)}
        if soft:
            rec["soft_labels"] = np.tile(np.arange(SOFT, dtype=np.float32), (len(x), 1))
        w.put(uid, rec, len(x))
    allf = np.concatenate(list(frames.values())).astype(np.float64)
    dim = next(iter(frames.values())).shape[1]
    w.finish(
        {
            "dim": dim,
            "dtype": np.dtype(dtype).name,
            "mean": allf.mean(0).tolist(),
            "std": allf.std(0).tolist(),
            "soft_label_dim": SOFT if soft else 0,
            "empty": sum(len(x) == 0 for x in frames.values()),
        }
    )
    return path


def frames_for(lengths: dict[str, int], dim: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {uid: rng.normal(3.0, 2.0, size=(t, dim)).astype(np.float32) for uid, t in lengths.items()}


@pytest.fixture
def corpus(tmp_path):
    txt = {"u0": 5, "u1": 9, "u2": 1, "u3": 12, "u4": 7}
    face = {"u0": 4, "u1": 0, "u2": 10, "u3": 3, "u4": 6}
    speech = {"u0": 8, "u1": 2, "u2": 5, "u3": 0, "u4": 11}
    return {
        "txt": write_txt(tmp_path / "txt", txt, soft=True),
        "face": write_feat(tmp_path / "face", frames_for(face, FACE_DIM, 1), soft=True),
        "speech": write_feat(tmp_path / "speech", frames_for(speech, SPEECH_DIM, 2)),
        "n": (txt, face, speech),
    }


def test_example_follows_the_contract(corpus):
    ds = JoinedDataset(corpus["txt"], corpus["face"], corpus["speech"])
    txt, face, speech = corpus["n"]
    assert len(ds) == 5 and ds.ids == list(txt) and ds.modalities == "LVA"
    ex = ds[ds.ids.index("u1")]
    assert ex["id"] == "u1"
    assert ex["input_ids"].dtype == np.int64 and ex["input_ids"].tolist() == list(range(1000, 1009))
    assert ex["word_ids"].dtype == np.int64 and ex["emo_flags"].dtype == bool and len(ex["emo_flags"]) == 9
    assert ex["labels"] == {"emotion": "emo-u1", "speaker": "A"}
    assert ex["soft_labels"].dtype == np.float32 and ex["soft_labels"].shape == (SOFT,)
    # zero-frame face stays an empty (0, D) stream, never a made-up frame
    assert ex["face"].shape == (0, FACE_DIM) and ex["face"].dtype == np.float32
    assert ex["face_soft"].shape == (0, SOFT)
    assert ex["speech"].shape == (2, SPEECH_DIM) and ex["speech"].dtype == np.float32
    assert ex["speech"].flags.writeable
    expected = [txt[u] + 2 + face[u] + speech[u] for u in ds.ids]
    assert ds.lengths.tolist() == expected
    assert ds.report().empty == {"face": 1, "speech": 1}


def test_reader_objects_are_accepted_and_features_round_trip(corpus):
    face_db = DbReader(corpus["face"])
    ds = JoinedDataset(DbReader(corpus["txt"]), face_db)
    assert ds.streams == ("face",) and ds[0]["speech"] is None
    stored = face_db["u2"]["feat"].astype(np.float32)
    np.testing.assert_array_equal(ds[2]["face"], stored)
    with pytest.raises(DatabaseError, match="is a 'feat' database where a 'txt' one was expected"):
        JoinedDataset(face_db)


def test_normalisation_uses_meta_mean_and_floored_std(tmp_path):
    x = np.array([[1.0, 5.0, 2.0], [3.0, 5.0, 6.0]], dtype=np.float32)  # dim 1 is constant: std 0
    write_txt(tmp_path / "t", {"a": 2, "b": 2})
    write_feat(tmp_path / "f", {"a": x, "b": x[::-1]}, dtype=np.float32)
    ds = JoinedDataset(tmp_path / "t", tmp_path / "f", normalize=True, std_floor=0.5)
    mean = np.array([2.0, 5.0, 4.0], dtype=np.float32)
    std = np.maximum(np.array([1.0, 0.0, 2.0], dtype=np.float32), 0.5)
    np.testing.assert_allclose(ds[0]["face"], (x - mean) / std, rtol=1e-6)
    assert np.isfinite(ds[1]["face"]).all()
    # a db without statistics is refused for normalize=True, with the fix
    w = DbWriter(tmp_path / "nostats", "feat")
    w.put("a", {"feat": x}, 2)
    w.put("b", {"feat": x}, 2)
    w.finish({"dim": 3, "dtype": "float32"})
    with pytest.raises(DatabaseError, match="normalize=False"):
        JoinedDataset(tmp_path / "t", tmp_path / "nostats", normalize=True)
    assert JoinedDataset(tmp_path / "t", tmp_path / "nostats")[0]["face"].shape == (2, 3)


def test_truncation_is_counted_and_never_drops(corpus, caplog):
    txt, face, speech = corpus["n"]
    with caplog.at_level(logging.INFO, logger="uniter3m.data.dataset"):
        ds = JoinedDataset(
            corpus["txt"],
            corpus["face"],
            corpus["speech"],
            max_txt_len=6,
            max_frames={"face": 4, "speech": 5},
        )
    assert len(ds) == 5
    rep = ds.report()
    assert rep.truncated == {"text": 3, "face": 2, "speech": 2}  # txt 9,12,7; face 10,6; speech 8,11
    assert "truncated (text)" in caplog.text
    ex = ds[ds.ids.index("u3")]
    assert len(ex["input_ids"]) == len(ex["word_ids"]) == len(ex["emo_flags"]) == 6
    assert ex["face"].shape == (3, FACE_DIM)  # under the cap: untouched
    ex = ds[ds.ids.index("u2")]
    assert ex["face"].shape == (4, FACE_DIM) and ex["face_soft"].shape == (4, SOFT)
    expected = [min(txt[u], 6) + 2 + min(face[u], 4) + min(speech[u], 5) for u in ds.ids]
    assert ds.lengths.tolist() == expected
    both = JoinedDataset(corpus["txt"], corpus["face"], corpus["speech"], max_frames=3)
    assert both.report().truncated == {"text": 0, "face": 3, "speech": 3}


def test_missing_feature_ids_raise_with_count_and_examples(tmp_path, caplog):
    ids = {f"u{i}": 3 for i in range(10)}
    write_txt(tmp_path / "t", ids)
    write_feat(tmp_path / "f", frames_for({f"u{i}": 2 for i in range(3)}, FACE_DIM, 0))
    with pytest.raises(DatabaseError) as err:
        JoinedDataset(tmp_path / "t", tmp_path / "f")
    msg = str(err.value)
    assert "7 utterances" in msg and "'u3'" in msg and "..." in msg and "missing='drop'" in msg
    assert str(tmp_path / "f") in msg
    with caplog.at_level(logging.WARNING, logger="uniter3m.data.dataset"):
        ds = JoinedDataset(tmp_path / "t", tmp_path / "f", missing="drop")
    assert ds.ids == ["u0", "u1", "u2"]
    assert ds.report().dropped == 7 and ds.report().dropped_missing == {"face": 7}
    assert "dropping 7 utterances with no face record" in caplog.text
    with pytest.raises(ConfigError, match="not a policy"):
        JoinedDataset(tmp_path / "t", tmp_path / "f", missing="ignore")


def test_lists_of_corpora_join_and_unequal_lists_raise(tmp_path):
    a_txt = write_txt(tmp_path / "a_t", {"a0": 2, "a1": 3})
    a_face = write_feat(tmp_path / "a_f", frames_for({"a0": 1, "a1": 2}, FACE_DIM, 0))
    b_txt = write_txt(tmp_path / "b_t", {"b0": 4})
    b_face = write_feat(tmp_path / "b_f", frames_for({"b0": 5}, FACE_DIM, 1))
    ds = JoinedDataset([a_txt, b_txt], [a_face, b_face])
    assert ds.ids == ["a0", "a1", "b0"] and ds.lengths.tolist() == [5, 7, 11]
    assert ds[2]["face"].shape == (5, FACE_DIM)
    with pytest.raises(ConfigError, match="txt_dbs has 2 databases but face_dbs has 1"):
        JoinedDataset([a_txt, b_txt], [a_face])
    with pytest.raises(ConfigError, match="speech_dbs has 3"):
        JoinedDataset([a_txt, b_txt], [a_face, b_face], [a_face, b_face, a_face])
    with pytest.raises(DatabaseError, match="'a0' is in both"):
        JoinedDataset([a_txt, a_txt])
    other_vocab = write_txt(tmp_path / "c_t", {"c0": 1}, vocab_hash="v2")
    with pytest.raises(DatabaseError, match="different tokenizers"):
        JoinedDataset([a_txt, other_vocab])
    assert ds.special_tokens().cls_id == 101 and ds.special_tokens().vocab_size == 30522
    odd = write_feat(tmp_path / "odd", frames_for({"b0": 1}, FACE_DIM + 1, 2))
    with pytest.raises(DatabaseError, match="different feature dims"):
        JoinedDataset([a_txt, b_txt], [a_face, odd])


def test_modalities_and_id_filter(corpus, tmp_path):
    txt, face, _ = corpus["n"]
    # speech is not opened when "A" is off: a path that does not exist is fine
    ds = JoinedDataset(corpus["txt"], corpus["face"], tmp_path / "nowhere", modalities="V")
    assert ds.modalities == "V" and ds.streams == ("face",)
    ex = ds[0]
    assert ex["input_ids"].shape == (0,) and ex["labels"]["emotion"] == "emo-u0" and ex["speech"] is None
    assert ds.lengths.tolist() == [2 + face[u] for u in ds.ids]
    with pytest.raises(ConfigError, match="no speech database was given"):
        JoinedDataset(corpus["txt"], corpus["face"], modalities="LA")
    with pytest.raises(ConfigError, match="unknown stream 'X'"):
        JoinedDataset(corpus["txt"], modalities="LX")
    sub = JoinedDataset(corpus["txt"], corpus["face"], ids=["u3", "u1"])
    assert sub.ids == ["u1", "u3"] and sub.lengths.tolist() == [txt["u1"] + 2, txt["u3"] + 2 + face["u3"]]
    with pytest.raises(DatabaseError, match="1 requested ids .* 'zz'"):
        JoinedDataset(corpus["txt"], ids=["u0", "zz"])


def test_bad_feature_record_names_db_and_id(tmp_path):
    write_txt(tmp_path / "t", {"a": 2})
    w = DbWriter(tmp_path / "f", "feat")
    w.put("a", {"feat": np.zeros((3, 5), np.float32)}, 3)
    w.finish({"dim": 4, "dtype": "float32"})
    ds = JoinedDataset(tmp_path / "t", tmp_path / "f")
    with pytest.raises(DatabaseError, match=r"record 'a' has feat of shape \(3, 5\), expected \(T, 4\)"):
        ds[0]
