"""The tiny corpora, models and run configs that the pretraining, fine-tuning, fault and GPU tests share.

Built with the real builders and the real tokenizer; the fixtures around them are in tests/conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.support import REPO

# The fine-tuning corpus: a few sentences per label, so that a tiny model can learn them.
SENTENCES = {
    "ang": ["i am so angry at you", "this makes me furious", "stop shouting at me now"],
    "hap": ["what a wonderful day", "i love this so much", "that is great news"],
    "exc": ["wow we won the game", "i can not wait for the party"],
    "neu": ["the meeting is at noon", "please pass the salt", "it is on the table"],
    "sad": ["i miss her so much", "nobody came to my party", "i lost my dog today"],
}
FACE_DIM, SPEECH_DIM = 5, 4

# Every pretraining objective, with the options its distinct paths need (compile, sync-free, workers).
FULL_MIX = (
    ("mlm", {}),
    ("melm_wwm", {}),
    ("face_mrfr", {}),
    ("speech_mrfr", {"span": 2}),
    ("face_mrc", {}),
    ("face_fom", {}),
    ("speech_fom", {}),
    ("itm", {}),
    ("itm_hard", {}),
    ("contrastive", {}),
    ("emo_cls", {"label_column": "emotion", "classes": ["anger", "joy", "neutral", "sadness"]}),
    (
        "prompt_cross",
        {
            "label_column": "emotion",
            "verbalizer": {"anger": "angry", "joy": "happy", "neutral": "neutral", "sadness": "sad"},
        },
    ),
)


def build_pretrain_dbs(root: Path, tokenizer: Path) -> dict[str, Path]:
    """A 72-utterance synthetic corpus (text, 6-d face, 8-d speech) through the demo's real build commands."""
    from uniter3m.data.synthetic import SyntheticSpec, generate_corpus
    from uniter3m.train.demo import build_corpus_dbs

    spec = SyntheticSpec(
        n_utterances=72, face_dim=6, speech_dim=8, face_frames=(2, 8), speech_frames=(3, 10), seed=3
    )
    corpus = generate_corpus(root / "corpus", spec)
    texts = {f"txt_{split}": (corpus.transcripts[split], "emotion") for split in ("train", "valid")}
    return build_corpus_dbs(corpus, root, tokenizer, texts)


def pretrain_config(dbs: dict[str, Path], out: Path, **top) -> dict:
    """A 6-step CPU pretraining of a 1-layer model on `build_pretrain_dbs`' corpus; `top` overrides keys."""
    cfg = {
        "output_dir": str(out),
        "seed": 5,
        "device": "cpu",
        "precision": "fp32",
        "model": {
            "config": str(REPO / "configs" / "model" / "tiny.json"),
            "overrides": {
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "max_position_embeddings": 64,
                "face": {"max_frames": 16},
                "speech": {"max_frames": 16},
            },
        },  # fmt: skip
        "datasets": {
            "syn": {
                "txt_db": [str(dbs["txt_train"])],
                "face_db": [str(dbs["face"])],
                "speech_db": [str(dbs["speech"])],
                "valid": {
                    "txt_db": [str(dbs["txt_valid"])],
                    "face_db": [str(dbs["face"])],
                    "speech_db": [str(dbs["speech"])],
                },
                "max_txt_len": 20,
                "max_frames": 10,
            }
        },  # fmt: skip
        "tasks": [
            {"name": "mlm", "dataset": "syn", "ratio": 1.0},
            {"name": "face_mrfr", "dataset": "syn", "ratio": 1.0},
            {"name": "speech_fom", "dataset": "syn", "ratio": 1.0},
            {"name": "itm", "dataset": "syn", "ratio": 1.0},
        ],
        "batching": {"max_tokens": 160, "num_workers": 0, "pool_size": 64},
        "optim": {"lr": 2e-3, "warmup_steps": 2, "betas": [0.9, 0.98], "eps": 1e-6},
        "steps": 6,
        "val_every": 0,
        "ckpt_every": 0,
        "log_every": 2,
        "progress": False,
    }
    cfg.update(top)
    return cfg


def no_dropout(cfg: dict) -> dict:
    """`cfg` with the model's dropout off: runs that must agree to the bit or to a tolerance."""
    cfg["model"]["overrides"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return cfg


def build_finetune_dbs(root: Path, tokenizer: Path) -> Path:
    """48 utterances under `root`: text db (labels emo/split/score), one-frame face (5-d) and speech (4-d) dbs."""
    from uniter3m.ingest.feat_db import FeatDbSpec, build_feat_db
    from uniter3m.ingest.text_db import TextDbSpec, build_text_db

    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    rows, face, speech = [], [], []
    labels = list(SENTENCES)
    for i in range(48):
        emo = labels[i % len(labels)]
        text = SENTENCES[emo][i % len(SENTENCES[emo])]
        split = "train" if i < 28 else ("valid" if i < 38 else "test")
        score = {"ang": -2.0, "sad": -1.5, "neu": 0.0, "hap": 1.5, "exc": 2.5}[emo] + 0.1 * (i % 3)
        rows.append({"id": f"u{i:02d}", "text": text, "emo": emo, "split": split, "score": score})
        signal = labels.index(emo)
        face.append([signal + 0.1 * float(x) for x in torch.randn(FACE_DIM, generator=gen)])
        speech.append([-signal + 0.1 * float(x) for x in torch.randn(SPEECH_DIM, generator=gen)])
    (root / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_text_db(
        TextDbSpec(
            input=root / "t.jsonl",
            id_cols=["id"],
            text_col="text",
            tokenizer=tokenizer,
            out=root / "txt",
            label_cols=["emo", "split", "score"],
            lexicon="none",
            progress=False,
        )
    )
    for name, vecs in (("face", face), ("speech", speech)):
        lines = ["id," + ",".join(f"f{j}" for j in range(len(vecs[0])))]
        lines += [f"{r['id']}," + ",".join(f"{v:.5f}" for v in vec) for r, vec in zip(rows, vecs)]
        (root / f"{name}.csv").write_text("\n".join(lines) + "\n")
        build_feat_db(
            FeatDbSpec(
                input=root / f"{name}.csv",
                format="csv",
                out=root / name,
                id_cols=["id"],
                dtype="float32",
                progress=False,
            )
        )
    return root


def tiny_checkpoint(path: Path, **streams) -> Path:
    """A saved 2-layer, 32-wide UniterModel (seed 0) with the BERT vocabulary; `streams` set stream configs."""
    from uniter3m.model.config import UniterConfig
    from uniter3m.model.uniter import UniterModel

    torch.manual_seed(0)
    config = UniterConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        **streams,
    )
    UniterModel(config).save_pretrained(path)
    return path


def finetune_config(dbs: Path, model: Path, out: Path, **over) -> dict:
    """A 2-epoch CPU fine-tuning of `model` on `build_finetune_dbs`' corpus; `over` as `section__key=value`
    (`top__key` for a top-level key)."""
    cfg = {
        "output_dir": str(out),
        "data": {
            "txt_db": str(dbs / "txt"),
            "face_db": str(dbs / "face"),
            "speech_db": str(dbs / "speech"),
            "modalities": "LVA",
            "max_txt_len": 16,
        },
        "protocol": {"name": "iemocap4", "label_column": "emo"},
        "model": {"init": str(model), "classifier": "linear"},
        "epochs": 2,
        "batching": {"max_batch_size": 8, "max_tokens": 4096},
        "optim": {"lr": 1e-3},
        "evals_per_epoch": 2,
        "patience": 10,
        "seed": 1,
        "device": "cpu",
        "progress": False,
    }
    for key, value in over.items():
        section, name = key.split("__")
        if section == "top":
            cfg[name] = value
        else:
            cfg[section][name] = value
    return cfg
