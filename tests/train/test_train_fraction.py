"""protocol.train_fraction: fewer training labels, stratified and fixed by protocol.subset_seed, on a
small real IEMOCAP text db (built from the shared file with the real builder and the MiniLM
tokenizer); and the IEMOCAP part of the task-adaptive pretraining dbs (benchmarks/tapt_dbs.py)."""

from __future__ import annotations

import importlib.util
import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from tests.support import REPO
from uniter3m.errors import ConfigError
from uniter3m.evaluation.protocols import build_protocol
from uniter3m.ingest.corpora import iemocap_rows
from uniter3m.ingest.text_db import TextDbSpec, build_text_db
from uniter3m.train.config import load_finetune_config
from uniter3m.train.folds import plan_protocol


@pytest.fixture(scope="module")
def iemocap_db(shared_data, minilm_dir, tmp_path_factory) -> Path:
    """Two IEMOCAP dialogues per session (about 350 utterances), all labels kept."""
    rows, seen = [], Counter()
    for r in iemocap_rows(shared_data / "iemocap6_text" / "iemocap6.jsonl"):
        dialogues = {x["dialogue"] for x in rows if x["session"] == r["session"]}
        if r["dialogue"] in dialogues or len(dialogues) < 2:
            rows.append(r)
            seen[r["session"]] += 1
    tmp = tmp_path_factory.mktemp("iemocap_small")
    spec = TextDbSpec(
        id_cols=["id"],
        text_col="text",
        tokenizer=minilm_dir,
        out=tmp / "iemocap_txt",
        label_cols=["label", "speaker", "split", "dialogue", "session"],
    )
    build_text_db(spec, rows)
    return tmp / "iemocap_txt"


def _plan(db: Path, seed: int = 42, **protocol):
    cfg = load_finetune_config(
        {
            "output_dir": "unused",
            "data": {"txt_db": str(db), "modalities": "L"},
            "protocol": {"name": "iemocap4", "scheme": "session", "valid_fraction": 0.3, **protocol},
            "model": {"init": "default", "classifier": "linear"},
            "seed": seed,
        }
    )
    return plan_protocol(cfg)


def test_train_fraction_is_stratified_deterministic_and_leaves_valid_test_alone(iemocap_db, caplog):
    full = _plan(iemocap_db)
    with caplog.at_level(logging.INFO, logger="uniter3m.evaluation.protocols"):
        part = _plan(iemocap_db, train_fraction=0.25)
    assert len(part.folds) == len(full.folds) == 5
    classes = full.label.classes
    for f_full, f_part in zip(full.folds, part.folds, strict=True):
        assert f_part.valid == f_full.valid and f_part.test == f_full.test  # untouched, same order
        assert set(f_part.train) <= set(f_full.train)
        n_full = Counter(classes[full.targets[u]] for u in f_full.train)
        n_part = Counter(classes[part.targets[u]] for u in f_part.train)
        assert set(n_part) == set(n_full)  # every class present stays present
        for c, n in n_full.items():
            assert n_part[c] == max(1, round(0.25 * n))  # stratified: the share of each class
        assert part.train_kept[f_part.name] == {c: [n_part[c], n_full[c]] for c in sorted(n_full)}
        assert f"keeps {len(f_part.train)} of {len(f_full.train)}" in caplog.text
    # Deterministic, and fixed by subset_seed, not by the training seed.
    again = _plan(iemocap_db, seed=7, train_fraction=0.25)
    assert [f.train for f in again.folds] == [f.train for f in part.folds]
    other = _plan(iemocap_db, train_fraction=0.25, subset_seed=1)
    assert [f.train for f in other.folds] != [f.train for f in part.folds]
    assert [len(f.train) for f in other.folds] == [len(f.train) for f in part.folds]
    assert [f.test for f in other.folds] == [f.test for f in full.folds]


def test_train_fraction_bounds_and_the_default_keeps_everything():
    rows = {
        f"u{i}": {"label": "ang" if i % 2 else "sad", "split": s}
        for i, s in enumerate(["train"] * 6 + ["valid", "test"])
    }
    assert build_protocol(rows, "iemocap4").folds[0].train == [f"u{i}" for i in range(6)]
    assert build_protocol(rows, "iemocap4", train_fraction=1.0).train_kept == {}
    small = build_protocol(rows, "iemocap4", train_fraction=0.01)
    assert small.train_kept["split"] == {"ang": [1, 3], "sad": [1, 3]}  # never a class emptied
    with pytest.raises(ConfigError, match="train_fraction"):
        build_protocol(rows, "iemocap4", train_fraction=0.0)
    with pytest.raises(Exception, match="train_fraction"):
        load_finetune_config(
            {
                "output_dir": "x",
                "data": {"txt_db": "db"},
                "protocol": {"name": "iemocap4", "train_fraction": 1.5},
                "model": {"init": "default"},
            }
        )


def test_tapt_iemocap_part_holds_no_test_session_and_matches_the_fine_tuning_fold(shared_data):
    spec = importlib.util.spec_from_file_location("tapt_dbs", REPO / "benchmarks" / "tapt_dbs.py")
    tapt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tapt)
    parts = tapt.iemocap_fold_parts(shared_data)
    assert {r["session"] for r in parts["test"]} == {"Ses05"}
    assert "Ses05" not in {r["session"] for r in parts["train"] + parts["valid"]}
    # The same dialogues train / validate as in the iemocap4 fold 5 of the fine-tuning protocol.
    rows = {}
    with open(shared_data / "iemocap6_text" / "iemocap6.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            rows[f"{r['dialogue']}_{r['turn']}"] = r
    fold = build_protocol(rows, "iemocap4", scheme="session").folds[4]
    assert fold.name == "session-Ses05"
    assert set(fold.train) <= {r["id"] for r in parts["train"]}
    assert set(fold.valid) <= {r["id"] for r in parts["valid"]}
