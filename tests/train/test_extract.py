"""`uniter3m extract`: one row per id, deterministic in eval mode, pooling as documented, h5 and npz."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from uniter3m.cli import main as cli_main
from uniter3m.data.store import DbWriter
from uniter3m.model.config import UniterConfig
from uniter3m.model.uniter import UniterModel
from uniter3m.train.extract import read_embeddings

VOCAB, FACE_D = 40, 6
SPECIAL = {"cls_id": 1, "sep_id": 2, "mask_id": 3, "pad_id": 0, "unk_id": 4, "vocab_size": VOCAB}
TEXT = {"u0": 5, "u1": 9, "u2": 1, "u3": 12, "u4": 7}
FACE = {"u0": 4, "u1": 0, "u2": 6, "u3": 3, "u4": 5}


def write_dbs(root) -> dict[str, str]:
    rng = np.random.default_rng(0)
    w = DbWriter(root / "txt", "txt")
    for i, (uid, n) in enumerate(TEXT.items()):
        record = {
            "input_ids": rng.integers(5, VOCAB, n).astype(np.int32),
            "word_ids": np.arange(n, dtype=np.int32),
            "emo_flags": np.zeros(n, dtype=np.uint8),
            "text": f"utterance {uid}",
            "labels": {"emotion": ["joy", "anger"][i % 2], "valence": float(i) / 2},
        }
        w.put(uid, record, n)
    w.finish({"tokenizer": {**SPECIAL, "vocab_hash": "test"}})
    w = DbWriter(root / "face", "feat")
    frames = {uid: rng.normal(1.0, 2.0, (t, FACE_D)).astype(np.float32) for uid, t in FACE.items()}
    for uid, x in frames.items():
        w.put(uid, {"feat": x.astype(np.float16)}, len(x))
    every = np.concatenate(list(frames.values()))
    w.finish(
        {
            "dim": FACE_D,
            "dtype": "float16",
            "mean": every.mean(0).tolist(),
            "std": every.std(0).tolist(),
            "empty": 1,
        }
    )
    return {"txt_db": str(root / "txt"), "face_db": str(root / "face")}


@pytest.fixture
def setup(tmp_path):
    dbs = write_dbs(tmp_path)
    torch.manual_seed(0)
    config = UniterConfig.from_dict(
        {
            "vocab_size": VOCAB,
            "hidden_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "max_position_embeddings": 32,
            "face": {"feat_dim": FACE_D, "max_frames": 8},
        }
    )
    UniterModel(config).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "data.json").write_text(json.dumps(dbs))
    return tmp_path


def extract(root, out, *extra) -> dict:
    args = [
        "extract",
        "--checkpoint",
        str(root / "ckpt"),
        "--config",
        str(root / "data.json"),
        "--file",
        str(out),
    ]
    assert cli_main([*args, "--no-progress", *extra]) == 0
    return read_embeddings(out)


def test_one_row_per_id_and_deterministic(setup):
    a = extract(setup, setup / "a.npz", "--batch-size", "2")
    b = extract(setup, setup / "b.npz", "--batch-size", "2")
    assert a["ids"] == list(TEXT) and a["embeddings"].shape == (len(TEXT), 16)
    assert np.array_equal(a["embeddings"], b["embeddings"])
    assert a["modalities"] == "LV" and a["pool"] == "cls"
    assert list(a["labels"]["emotion"]) == ["joy", "anger", "joy", "anger", "joy"]
    assert np.allclose(a["labels"]["valence"], [0.0, 0.5, 1.0, 1.5, 2.0])

    # Batch composition does not change an utterance's vector beyond float rounding.
    c = extract(setup, setup / "c.h5", "--batch-size", "5")
    assert c["ids"] == a["ids"] and c["pool"] == "cls"
    assert list(c["labels"]["emotion"]) == list(a["labels"]["emotion"])
    np.testing.assert_allclose(c["embeddings"], a["embeddings"], atol=1e-5)


def test_pooling_matches_a_direct_forward(setup):
    from uniter3m.data.collate import Collator
    from uniter3m.data.dataset import JoinedDataset
    from uniter3m.data.tokenization import SpecialTokens

    mean = extract(setup, setup / "mean.h5", "--pool", "mean")
    pooler = extract(setup, setup / "pooler.npz", "--pool", "pooler", "--batch-size", "1")
    model = UniterModel.from_pretrained(setup / "ckpt").eval()
    dataset = JoinedDataset(setup / "txt", setup / "face", normalize=True)
    collate = Collator(SpecialTokens.from_dict(SPECIAL))
    for row, uid in enumerate(TEXT):
        batch = collate([dataset[row]])
        with torch.no_grad():
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["txt_mask"],
                face_feat=batch["face_feat"],
                face_mask=batch["face_mask"],
            )
        n_real = TEXT[uid] + 2 + FACE[uid]
        assert int(out.attention_mask.sum()) == n_real
        want_mean = out.last_hidden_state[0, :n_real].mean(0).numpy()  # single item: no padding at all
        np.testing.assert_allclose(mean["embeddings"][row], want_mean, atol=1e-5)
        assert np.array_equal(pooler["embeddings"][row], out.pooler_output[0].numpy())


def test_modalities_and_fine_tuning_config(setup):
    config = {
        "output_dir": str(setup / "ft"),
        "data": {**json.loads((setup / "data.json").read_text()), "modalities": "LV"},
        "protocol": {"name": "generic", "label_column": "emotion"},
        "model": {"init": str(setup / "ckpt")},
    }
    (setup / "ft.json").write_text(json.dumps(config))
    args = [
        "extract",
        "--checkpoint",
        str(setup / "ckpt"),
        "--config",
        str(setup / "ft.json"),
        "--no-progress",
    ]
    assert cli_main([*args, "--file", str(setup / "ft.npz")]) == 0
    text_only = extract(setup, setup / "l.npz", "--modalities", "l")
    both = read_embeddings(setup / "ft.npz")
    assert text_only["modalities"] == "L" and both["modalities"] == "LV"
    assert both["ids"] == text_only["ids"]
    assert not np.allclose(both["embeddings"], text_only["embeddings"])


def test_bad_inputs_are_clear_errors(setup, capsys):
    base = ["extract", "--checkpoint", str(setup / "ckpt"), "--config", str(setup / "data.json")]
    assert cli_main([*base, "--file", str(setup / "x.csv")]) == 2
    assert ".h5 or .npz" in capsys.readouterr().err
    (setup / "exists.npz").write_bytes(b"")
    assert cli_main([*base, "--file", str(setup / "exists.npz")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    (setup / "bad.json").write_text(json.dumps({"txt_db": str(setup / "txt"), "txt": 1}))
    assert cli_main([*base[:-1], str(setup / "bad.json"), "--file", str(setup / "y.npz")]) == 2
    assert "txt: renamed: it is now txt_db" in capsys.readouterr().err
    # A checkpoint without a face stream cannot read the face db: a clear error, not a crash.
    UniterModel(
        UniterConfig.from_dict(
            {
                "vocab_size": VOCAB,
                "hidden_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 8,
            }
        )
    ).save_pretrained(setup / "txt_only")
    args = ["extract", "--checkpoint", str(setup / "txt_only"), "--config", str(setup / "data.json")]
    assert cli_main([*args, "--file", str(setup / "z.npz")]) == 2
    assert "has no face stream" in capsys.readouterr().err
    assert not (setup / "z.npz").exists()
