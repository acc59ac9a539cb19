"""EmoDB: the loso protocol, the corpus recipe on real EmoDB files, and missing-modality
fine-tuning (`modality_cases`) on the databases that recipe builds."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support import REPO
from uniter3m.data.collate import Collator
from uniter3m.data.store import DbReader
from uniter3m.data.tokenization import SpecialTokens
from uniter3m.errors import ConfigError
from uniter3m.evaluation.protocols import build_protocol
from uniter3m.ingest.corpora import build_emodb
from uniter3m.tasks.base import text_absent
from uniter3m.train.assembly import build_dataset, build_finetune_model, data_tokenizer, feature_dims
from uniter3m.train.config import load_finetune_config
from uniter3m.train.finetune import run_finetune, supervised_task
from uniter3m.train.folds import plan_protocol

SPEAKERS = ["03", "08", "09", "10", "11", "12", "13", "14", "15", "16"]


def speaker_rows(per_speaker: int = 3) -> dict[str, dict[str, str]]:
    emotions = ["anger", "sadness", "neutral"]
    return {
        f"{s}u{i}": {"speaker": s, "emotion": emotions[i % 3]} for s in SPEAKERS for i in range(per_speaker)
    }


# ----------------------------------------------------------------------------- loso scheme
def test_loso_never_validates_or_trains_on_the_test_speaker():
    rows = speaker_rows()
    plan = build_protocol(rows, "emodb", scheme="loso", valid_speakers=2)
    assert len(plan.folds) == 10 and plan.selection_metric == "uar"
    valid_count: Counter[str] = Counter()
    for i, fold in enumerate(plan.folds):
        spk = {part: {rows[u]["speaker"] for u in getattr(fold, part)} for part in ("train", "valid", "test")}
        assert spk["test"] == {SPEAKERS[i]}
        assert len(spk["valid"]) == 2 and SPEAKERS[i] not in spk["valid"] | spk["train"]
        assert not spk["valid"] & spk["train"] and len(spk["train"]) == 7
        assert sorted(fold.train + fold.valid + fold.test) == sorted(rows)
        valid_count.update(spk["valid"])
    assert set(valid_count.values()) == {2}  # every speaker validates equally often
    again = build_protocol(rows, "emodb", scheme="loso", valid_speakers=2)
    assert [f.valid for f in again.folds] == [f.valid for f in plan.folds]  # deterministic


def test_loso_explicit_map_and_its_errors():
    rows = speaker_rows(1)
    chosen = {s: ["09"] if s != "09" else ["03"] for s in SPEAKERS}
    plan = build_protocol(rows, "emodb", scheme="loso", valid_speakers=chosen)
    assert plan.folds[0].name == "03-valid09" and plan.folds[0].valid == ["09u0"]
    with pytest.raises(ConfigError, match="validates on itself"):
        build_protocol(rows, "emodb", scheme="loso", valid_speakers={**chosen, "09": ["09"]})
    with pytest.raises(ConfigError, match="no entry for test speaker '16'"):
        build_protocol(rows, "emodb", scheme="loso", valid_speakers={s: ["03"] for s in SPEAKERS[1:-1]})
    with pytest.raises(ConfigError, match="give 1..8"):
        build_protocol(rows, "emodb", scheme="loso", valid_speakers=9)


# ----------------------------------------------------------------------------- the recipe, real files
@pytest.fixture(scope="module")
def emodb_dbs(tmp_path_factory, shared_data, minilm_dir):
    """The recipe on 12 real EmoDB files (3 speakers x 4), via a csv listing them in place."""
    src = shared_data / "emodb"
    with (src / "emodb.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    picked = []
    for spk in ("03", "08", "10"):
        mine = [r for r in rows if r["speaker"] == spk]
        picked += [
            next(r for r in mine if r["emotion"] == e) for e in ("anger", "sadness", "neutral", "fear")
        ]
    data = tmp_path_factory.mktemp("emodb_data")
    (data / "emodb").mkdir()
    with (data / "emodb" / "emodb.csv").open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "wav": str(src / r["wav"])} for r in picked)  # absolute: nothing copied
    out = tmp_path_factory.mktemp("emodb_db")
    metas = build_emodb(data, out, minilm_dir, split_dbs=True, pool_frames=[10], speaker_norm=True)
    return out, metas, picked


def test_recipe_builds_text_frames_pooled_and_speaker_normalised_dbs(emodb_dbs):
    out, metas, picked = emodb_dbs
    ids = sorted(r["id"] for r in picked)
    txt = DbReader(out / "emodb_txt", kind="txt")
    assert sorted(txt.ids) == ids
    rec = txt[picked[0]["id"]]
    assert rec["labels"]["emotion"] == picked[0]["emotion"] and rec["labels"]["speaker"] == "03"
    assert sorted(DbReader(out / "emodb_txt_spk08", kind="txt").ids) == sorted(
        r["id"] for r in picked if r["speaker"] == "08"
    )
    raw = DbReader(out / "emodb_compare", kind="feat")
    pooled = DbReader(out / "emodb_compare_p10", kind="feat")
    assert raw.meta["dim"] == pooled.meta["dim"] == 130
    assert pooled.meta["source"]["extractor"]["frame_rate"] == 10
    uid = picked[0]["id"]
    full, ten = np.asarray(raw[uid]["feat"]), np.asarray(pooled[uid]["feat"])
    assert 190 <= len(full) <= 200 and len(ten) == -(-len(full) // 10)  # 2.0 s files at 100 frames/s
    np.testing.assert_allclose(ten[0], full[:10].mean(0), rtol=1e-4, atol=1e-4)
    norm = DbReader(out / "emodb_compare_p10_spk", kind="feat")
    frames = np.concatenate([np.asarray(norm[r["id"]]["feat"]) for r in picked if r["speaker"] == "10"])
    np.testing.assert_allclose(frames.mean(0), 0, atol=1e-4)
    assert np.all((frames.std(0) > 0.99) | (frames.std(0) < 1e-3))  # unit variance (constant dims: 0)
    assert metas["emotion_counts"] == {"anger": 3, "sadness": 3, "neutral": 3, "fear": 3}


# ----------------------------------------------------------------------------- modality_cases
def emodb_config(out: Path, db: Path, **extra) -> dict:
    cfg = json.loads((REPO / "configs/downstream/emodb_loso_cases.json").read_text())
    cfg["data"].update(txt_db=str(db / "emodb_txt"), speech_db=str(db / "emodb_compare_p10_spk"))
    cfg.update(output_dir=str(out), epochs=2, patience=5, class_weighted=False, **extra)
    cfg["model"]["config"] = str(REPO / "configs/model/tiny.json")
    cfg["batching"]["max_batch_size"] = 4
    return cfg


def test_modality_cases_must_fit_the_modalities(emodb_dbs, tmp_path):
    db = emodb_dbs[0]
    cfg = emodb_config(tmp_path, db)
    cfg["data"]["modalities"] = "A"
    with pytest.raises(ConfigError, match="outside data.modalities A"):
        load_finetune_config(cfg)
    with pytest.raises(ConfigError, match="lists a set twice"):
        load_finetune_config(emodb_config(tmp_path, db, modality_sets=["LA", "AL"]))


def test_training_draws_every_case(emodb_dbs, tmp_path):
    cfg = load_finetune_config(emodb_config(tmp_path, emodb_dbs[0]))
    plan = plan_protocol(cfg)
    meta = data_tokenizer(cfg.data)
    special = SpecialTokens.from_dict(meta)
    dataset = build_dataset(cfg.data, ids=plan.folds[0].train)
    model = build_finetune_model(cfg, plan, feature_dims(dataset), meta)
    task = supervised_task(model, plan, special, modality_sets=cfg.modality_sets)
    batch = Collator(special)([dataset[i] for i in range(4)])
    gen = torch.Generator().manual_seed(0)
    seen = Counter()
    for _ in range(60):
        inputs = task.prepare(batch, gen)
        streams = set(task.batch_streams(inputs)) - ({"L"} if text_absent(_txt(inputs), special) else set())
        seen["".join(sorted(streams, key="LA".index))] += 1
    assert set(seen) == {"L", "A", "LA"} and min(seen.values()) >= 10


def _txt(inputs: dict) -> dict:
    return {"input_ids": inputs["input_ids"], "txt_mask": inputs["attention_mask"]}


def test_selection_uses_the_mean_over_cases(emodb_dbs, tmp_path):
    cfg = emodb_config(tmp_path / "run", emodb_dbs[0])
    result = run_finetune(cfg, fold=0)["folds"][0]
    assert result["modality_sets"] == ["L", "A", "LA"]
    assert set(result["test_sets"]) == {"L", "A", "LA"}
    values = []
    for entry in result["history"]:
        valid = entry["valid"]
        mean = np.mean([valid[f"{c}_uar"] for c in ("L", "A", "LA")])
        assert valid["uar"] == pytest.approx(mean, abs=1e-3)
        values.append(valid["uar"])
    assert result["best_valid"] == pytest.approx(max(values), abs=1e-3)
    assert result["best_step"] == result["history"][int(np.argmax(values))]["step"]


def _load_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("emodb_benchmark", REPO / "benchmarks" / "emodb.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vote_takes_the_majority_and_breaks_ties_on_validation():
    bench = _load_benchmark()
    classes = ["anger", "neutral", "sadness"]
    gold = {"u1": "anger", "u2": "neutral", "u3": "sadness"}

    def member(valid_uar: float, preds: list[str]) -> dict:
        return {"fold": 4, "valid_uar": valid_uar, "classes": classes,
                "predictions": {u: (gold[u], p) for u, p in zip(gold, preds, strict=True)}}  # fmt: skip

    members = [
        member(60.0, ["anger", "anger", "neutral"]),
        member(90.0, ["anger", "neutral", "sadness"]),  # best on validation: wins the 3-way tie on u3
        member(70.0, ["neutral", "sadness", "anger"]),
    ]
    fold = bench.vote_fold(members)
    # u1: 2 of 3 say anger (right); u2: anger / neutral / sadness tie -> the 90-validation member's neutral
    # (right); u3: neutral / sadness / anger tie -> sadness (right)
    assert fold["uar"] == 100.0 and fold["fold"] == 4
    assert fold["valid_uar"] == pytest.approx(220 / 3)
    # the same members in another order vote the same way
    assert bench.vote_fold(members[::-1])["uar"] == 100.0
    # with the tie-breaker demoted, the tie goes elsewhere and the score drops
    members[1]["valid_uar"] = 10.0
    assert bench.vote_fold(members)["uar"] < 100.0
    assert bench.member_seeds(2, 3) == [2, 1002, 2002]
