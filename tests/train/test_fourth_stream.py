"""A fourth stream (`pose`, letter P) added through configuration and a feature database only.

No code knows the word "pose": the configs declare `"streams": {"pose": "P"}` and point
`pose_db` at a database built with the ordinary builder. Pretraining then runs masked frame
regression and frame order on it, fine-tuning reads it, `evaluate` scores L, P, LP and LVAP,
and `extract` writes embeddings with it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from uniter3m.cli import main
from uniter3m.data.collate import Collator
from uniter3m.errors import ConfigError, UserError
from uniter3m.ingest.feat_db import FeatDbSpec, build_feat_db
from uniter3m.ingest.text_db import TextDbSpec, build_text_db
from uniter3m.model.config import UniterConfig
from uniter3m.model.uniter import UniterModel
from uniter3m.streams import StreamTable
from uniter3m.train.extract import read_embeddings

WORDS = {
    "ang": "i am so angry at you",
    "hap": "what a wonderful day",
    "neu": "the meeting is at noon",
    "sad": "i miss her so much",
}
DIMS = {"face": 5, "speech": 4, "pose": 6}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, minilm_dir):
    """40 utterances; every stream's frames carry the emotion, pose with 3-7 frames each."""
    root = tmp_path_factory.mktemp("pose")
    rng = np.random.default_rng(0)
    labels = list(WORDS)
    rows = []
    for i in range(40):
        emo = labels[i % 4]
        split = "train" if i < 24 else ("valid" if i < 32 else "test")
        rows.append({"id": f"u{i:02d}", "text": WORDS[emo], "emo": emo, "split": split})
        for stream, dim in DIMS.items():
            folder = root / f"{stream}_npz"
            folder.mkdir(exist_ok=True)
            frames = 3 + i % 5
            base = np.linspace(0, 1, frames)[:, None] * (1 + labels.index(emo))
            feat = base + 0.1 * rng.standard_normal((frames, dim))
            np.savez(folder / f"u{i:02d}.npz", feat=feat.astype(np.float32))
    (root / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_text_db(
        TextDbSpec(
            input=root / "t.jsonl",
            id_cols=["id"],
            text_col="text",
            tokenizer=minilm_dir,
            out=root / "txt",
            label_cols=["emo", "split"],
            lexicon="none",
            progress=False,
        )
    )
    for stream in DIMS:
        build_feat_db(
            FeatDbSpec(
                input=root / f"{stream}_npz", format="npz", out=root / stream, dtype="float32", progress=False
            )
        )
    return root


def test_a_pose_stream_from_configuration_and_a_database_only(corpus, tmp_path, capsys):
    dbs = {f"{s}_db": str(corpus / s) for s in DIMS}
    pretrain = {
        "output_dir": str(tmp_path / "pre"),
        "seed": 0,
        "device": "cpu",
        "precision": "fp32",
        "progress": False,
        "streams": {"pose": "P"},
        "model": {
            "config": "configs/model/tiny.json",
            "overrides": {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64},
        },
        "datasets": {
            "d": {
                "txt_db": str(corpus / "txt"),
                **dbs,
                "max_frames": 8,
                "valid": {"txt_db": str(corpus / "txt"), **dbs},
            }
        },
        "tasks": [
            {"name": "pose_mrfr", "dataset": "d", "ratio": 1.0},
            {"name": "pose_fom", "dataset": "d", "ratio": 1.0, "options": {"shuffle_prob": 0.5}},
            {"name": "mlm", "dataset": "d", "ratio": 1.0},
        ],
        "batching": {"max_tokens": 512},
        "optim": {"lr": 1e-3},
        "steps": 6,
        "val_every": 0,
        "ckpt_every": 0,
        "log_every": 2,
    }
    (tmp_path / "pre.json").write_text(json.dumps(pretrain))
    assert main(["pretrain", "--config", str(tmp_path / "pre.json")]) == 0
    model_dir = tmp_path / "pre" / "checkpoints" / "step_000006" / "model"
    saved = json.loads((model_dir / "config.json").read_text())
    assert saved["streams"]["pose"]["letter"] == "P" and saved["streams"]["pose"]["feat_dim"] == 6
    heads = json.loads((model_dir / "heads.json").read_text())["heads"]
    assert {"pose_regress", "pose_fom"} <= set(heads)
    from uniter3m.train.logs import read_metrics

    val = read_metrics(tmp_path / "pre", "val")[-1]
    assert val["pose_fom/acc"] >= 0 and np.isfinite(val["pose_mrfr/loss"])

    finetune = {
        "output_dir": str(tmp_path / "ft"),
        "device": "cpu",
        "precision": "fp32",
        "progress": False,
        "streams": {"pose": "P"},
        "data": {"txt_db": str(corpus / "txt"), **dbs, "modalities": "LVAP", "max_frames": 8},
        "protocol": {"name": "iemocap4", "label_column": "emo"},
        "model": {"init": str(model_dir), "classifier": "linear"},
        "epochs": 2,
        "batching": {"max_batch_size": 8},
        "optim": {"lr": 1e-3},
    }
    (tmp_path / "ft.json").write_text(json.dumps(finetune))
    assert main(["finetune", "--config", str(tmp_path / "ft.json")]) == 0
    best = tmp_path / "ft" / "fold00-split" / "best"
    result = json.loads((best.parent / "metrics.json").read_text())
    assert result["modalities"] == "LVAP" and len(result["predictions"]) == 8
    capsys.readouterr()

    # evaluate reads the run's resolved config: no --config needed
    assert main(["evaluate", "--checkpoint", str(best), "--modality-sets", "L,P,LP,LVAP"]) == 0
    table = json.loads((best.parent / "modalities.json").read_text())
    assert [r["modalities"] for r in table["rows"]] == ["L", "P", "LP", "LVAP"]
    assert table["rows"][-1]["metrics"]["wa"] == pytest.approx(result["test"]["wa"])

    out = tmp_path / "emb.npz"
    assert main(["extract", "--checkpoint", str(best), "--file", str(out), "--no-progress"]) == 0
    emb = read_embeddings(out)
    assert emb["embeddings"].shape == (40, 32) and emb["modalities"] == "LVAP"
    with_pose = emb["embeddings"]
    assert (
        main(
            [
                "extract",
                "--checkpoint",
                str(best),
                "--file",
                str(tmp_path / "l.npz"),
                "--modalities",
                "L",
                "--no-progress",
            ]
        )
        == 0
    )
    without = read_embeddings(tmp_path / "l.npz")["embeddings"]
    assert not np.allclose(with_pose, without)  # the pose frames reach the embedding
    assert torch.isfinite(torch.from_numpy(with_pose)).all()


def test_stream_tables_are_values_that_travel_with_their_holders(special):
    """Two tables live side by side in one process; a pose collator pads pose in a spawned worker
    (which inherits no state from this process) because the table travels inside it."""
    default = StreamTable.default()
    pose = default.with_stream("pose", "p")
    assert default.names() == ("face", "speech") and pose.names() == ("face", "speech", "pose")
    assert pose.with_stream("pose", "P") is pose and pose.parse_modalities("pvl") == "LVP"
    with pytest.raises(ConfigError, match="already used by stream 'pose'"):
        pose.with_stream("gaze", "P")
    with pytest.raises(ConfigError, match="already has the letter P"):
        pose.with_stream("pose", "Q")
    with pytest.raises(ConfigError, match="unknown stream 'P'"):
        default.parse_modalities("LP")

    sizes = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "num_hidden_layers": 1}
    with_pose = UniterConfig(**sizes, face={"feat_dim": 5}, streams={"pose": {"letter": "P", "feat_dim": 6}})
    plain = UniterConfig(**sizes, face={"feat_dim": 5})
    assert with_pose.stream_table == pose and plain.stream_table == default

    rng = np.random.default_rng(0)
    examples = [
        {
            "id": f"u{i}",
            "input_ids": np.arange(2000, 2003, dtype=np.int64),
            "word_ids": np.arange(3, dtype=np.int64),
            "emo_flags": np.zeros(3, dtype=bool),
            "labels": {},
            "face": None,
            "face_soft": None,
            "speech": None,
            "speech_soft": None,
            "pose": rng.standard_normal((2 + i, 6)).astype(np.float32),
            "pose_soft": None,
        }
        for i in range(2)
    ]
    loader = torch.utils.data.DataLoader(
        examples,
        batch_size=2,
        collate_fn=Collator(special, stream_table=pose),
        num_workers=1,
        multiprocessing_context="spawn",
    )
    (batch,) = list(loader)
    assert batch["pose_feat"].shape == (2, 3, 6) and batch["pose_mask"].sum().item() == 5
    assert "pose_feat" not in Collator(special)(examples)  # the default table has no pose

    out = UniterModel(with_pose)(
        input_ids=batch["input_ids"], attention_mask=batch["txt_mask"],
        pose_feat=batch["pose_feat"], pose_mask=batch["pose_mask"],
    )  # fmt: skip
    assert list(out.segments) == ["text", "pose"] and out.segments["pose"] == slice(5, 8)
    with pytest.raises(UserError, match="unknown inputs \\['pose_feat'"):
        UniterModel(plain)(input_ids=batch["input_ids"], pose_feat=batch["pose_feat"])
