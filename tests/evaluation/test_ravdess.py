"""RAVDESS: the corpus entry, the leave-one-actor-out and 6-fold actor protocols, the corpus builder on
real clips (text, one-frame face, speech dbs by every extractor) and the benchmark on those dbs."""

from __future__ import annotations

import csv
import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.support import REPO
from uniter3m.data.prompts import label_word_ids
from uniter3m.data.store import DbReader
from uniter3m.errors import ConfigError, UserError
from uniter3m.evaluation.baselines import LinearBaseline, speaker_znorm
from uniter3m.evaluation.corpora import corpus
from uniter3m.evaluation.protocols import build_protocol
from uniter3m.ingest.ravdess import build_ravdess, ravdess_rows

ACTORS = [f"{a:02d}" for a in range(1, 25)]
EMOTIONS = corpus("ravdess").target(None).classes


def actor_rows(per_actor: int = 2) -> dict[str, dict[str, str]]:
    return {
        f"a{a}c{i}": {"actor": a, "emotion": EMOTIONS[(i + int(a)) % 8]}
        for a in ACTORS
        for i in range(per_actor)
    }


def fold_actors(rows: dict, fold) -> dict[str, set[str]]:
    return {part: {rows[u]["actor"] for u in getattr(fold, part)} for part in ("train", "valid", "test")}


# ----------------------------------------------------------------------------- corpus entry + protocols
def test_corpus_entry_eight_classes_uar_and_single_word_verbaliser(tokenizer):
    target = corpus("ravdess").target(None)
    assert target.column == "emotion" and len(target.classes) == 8 and target.metric == "uar"
    ids = label_word_ids(tokenizer, target.verbalizer, tokenizer.unk_token_id, "ravdess", target.classes)
    assert list(ids) == list(target.classes) and len(set(ids.values())) == 8  # one WordPiece each


def test_loao_tests_every_actor_once_and_validates_on_the_next():
    rows = actor_rows()
    plan = build_protocol(rows, "ravdess", scheme="loso", speaker_column="actor")
    assert len(plan.folds) == 24 and plan.selection_metric == "uar"
    tested: Counter[str] = Counter()
    for i, fold in enumerate(plan.folds):
        actors = fold_actors(rows, fold)
        assert actors["test"] == {ACTORS[i]} and actors["valid"] == {ACTORS[(i + 1) % 24]}
        assert not (actors["test"] & actors["valid"] or actors["test"] & actors["train"])
        assert not actors["valid"] & actors["train"] and len(actors["train"]) == 22
        assert sorted(fold.train + fold.valid + fold.test) == sorted(rows)
        tested.update(actors["test"])
    assert tested == Counter(ACTORS)


def test_six_fold_split_four_actors_per_fold_next_fold_validates():
    rows = actor_rows()
    plan = build_protocol(
        rows, "ravdess", scheme="speaker_kfold", speaker_column="actor", num_folds=6, valid_speakers=4
    )
    assert [f.name for f in plan.folds][:2] == [
        "01+02+03+04-valid05+06+07+08",
        "05+06+07+08-valid09+10+11+12",
    ]
    tested: Counter[str] = Counter()
    validated: Counter[str] = Counter()
    for i, fold in enumerate(plan.folds):
        actors = fold_actors(rows, fold)
        assert actors["test"] == set(ACTORS[4 * i : 4 * i + 4])
        assert actors["valid"] == set(ACTORS[4 * ((i + 1) % 6) : 4 * ((i + 1) % 6) + 4])
        assert sum(int(a) % 2 for a in actors["test"]) == 2  # 2 male (odd) + 2 female
        assert not (actors["test"] & (actors["valid"] | actors["train"]) or actors["valid"] & actors["train"])
        assert sorted(fold.train + fold.valid + fold.test) == sorted(rows)
        tested.update(actors["test"])
        validated.update(actors["valid"])
    assert tested == validated == Counter(ACTORS)
    one = build_protocol(rows, "ravdess", scheme="speaker_kfold", speaker_column="actor", valid_speakers=1)
    assert [fold_actors(rows, f)["valid"] for f in one.folds][:2] == [{"05"}, {"09"}]  # default 6 folds


def test_six_fold_errors_name_the_setting():
    rows = actor_rows(1)
    with pytest.raises(ConfigError, match="num_folds 25: with 24 speakers give 2..24"):
        build_protocol(rows, "ravdess", scheme="speaker_kfold", speaker_column="actor", num_folds=25)
    with pytest.raises(ConfigError, match="give 1..19"):
        build_protocol(rows, "ravdess", scheme="speaker_kfold", speaker_column="actor", valid_speakers=20)
    with pytest.raises(ConfigError, match="takes a count"):
        build_protocol(
            rows, "ravdess", scheme="speaker_kfold", speaker_column="actor", valid_speakers={"01": ["02"]}
        )
    with pytest.raises(UserError, match="no 'actor' value"):
        build_protocol({"x": {"emotion": "sad"}}, "ravdess", scheme="speaker_kfold", speaker_column="actor")


def test_real_rows_give_24_folds_of_60_clips(shared_data):
    rows = {r["id"]: r for r in ravdess_rows(shared_data / "ravdess")}
    plan = build_protocol(rows, "ravdess", scheme="loso", speaker_column="actor")
    assert len(rows) == 1440 and {len(f.test) for f in plan.folds} == {60} and len(plan.folds) == 24


# ----------------------------------------------------------------------------- the builder, real clips
def subset(shared_data: Path, folder: Path, drop_face: str | None = None) -> list[dict[str, str]]:
    """ravdess.csv and face_au.csv of 3 actors x 4 clips, audio paths absolute (nothing copied)."""
    src = shared_data / "ravdess"
    with (src / "ravdess.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    picked = [
        r
        for r in rows
        if r["actor"] in ("01", "02", "03")
        and r["emotion"] in ("neutral", "happy", "sad", "angry")
        and r["statement"] == r["repetition"] == "1"
        and r["intensity"] == "normal"
    ]
    (folder / "ravdess").mkdir(parents=True)
    with (folder / "ravdess" / "ravdess.csv").open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "audio": str(src / r["audio"])} for r in picked)
    ids = {r["id"] for r in picked} - {drop_face}
    with (src / "face_au.csv").open(encoding="utf-8", newline="") as f:
        faces = list(csv.reader(f))
    with (folder / "ravdess" / "face_au.csv").open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([faces[0], *(r for r in faces[1:] if r[0] in ids)])
    return picked


@pytest.fixture(scope="module")
def ravdess_dbs(tmp_path_factory, shared_data, minilm_dir):
    data = tmp_path_factory.mktemp("ravdess_data")
    picked = subset(shared_data, data)
    out = tmp_path_factory.mktemp("ravdess_db")
    metas = build_ravdess(data, out, minilm_dir, split_dbs=True, pool_frames=[10], speaker_norm=True)
    return out, metas, picked


def test_builder_text_face_and_every_speech_extractor(ravdess_dbs, shared_data):
    out, metas, picked = ravdess_dbs
    assert len(picked) == 12 and metas["emotion_counts"] == {"neutral": 3, "happy": 3, "sad": 3, "angry": 3}
    ids = sorted(r["id"] for r in picked)
    txt = DbReader(out / "ravdess_txt", kind="txt")
    assert sorted(txt.ids) == ids
    first = picked[0]
    assert txt[first["id"]]["labels"] == {k: first[k] for k in txt[first["id"]]["labels"]}
    assert txt[first["id"]]["labels"]["actor"] == "01" and txt[first["id"]]["text"] == first["text"]
    assert sorted(DbReader(out / "ravdess_txt_actor02", kind="txt").ids) == sorted(
        r["id"] for r in picked if r["actor"] == "02"
    )
    face = DbReader(out / "ravdess_face", kind="feat")
    with (shared_data / "ravdess" / "face_au.csv").open(encoding="utf-8", newline="") as f:
        au = {r[0]: [float(v) for v in r[1:]] for r in csv.reader(f) if r[0] == first["id"]}
    np.testing.assert_allclose(np.asarray(face[first["id"]]["feat"]), [au[first["id"]]], rtol=1e-6)
    seconds = float(first["seconds"])
    dims = {"compare": 130, "egemaps": None, "functionals": 6373, "resemblyzer": 256}
    for name, dim in dims.items():
        db = DbReader(out / f"ravdess_{name}", kind="feat")
        frames = np.asarray(db[first["id"]]["feat"])
        assert dim is None or db.meta["dim"] == dim
        if name == "functionals":
            assert frames.shape[0] == 1 and not (out / "ravdess_functionals_p10").exists()
            continue
        assert 100 * seconds - 10 <= len(frames) <= 100 * seconds + 2  # 100 frames/s (less the last window)
        pooled = np.asarray(DbReader(out / f"ravdess_{name}_p10", kind="feat")[first["id"]]["feat"])
        assert len(pooled) == -(-len(frames) // 10)
        np.testing.assert_allclose(pooled[0], frames[:10].mean(0), rtol=1e-3, atol=1e-3)
    norm = DbReader(out / "ravdess_face_spk", kind="feat")
    actor3 = np.concatenate([np.asarray(norm[r["id"]]["feat"]) for r in picked if r["actor"] == "03"])
    np.testing.assert_allclose(actor3.mean(0), 0, atol=1e-5)
    assert (out / "ravdess_resemblyzer_p10_spk").is_dir() and (out / "ravdess_functionals_spk").is_dir()


def test_builder_refuses_a_clip_without_face_values(tmp_path, shared_data, minilm_dir):
    picked = subset(shared_data, tmp_path / "data", drop_face="03-01-04-01-01-01-02")
    assert any(r["id"] == "03-01-04-01-01-01-02" for r in picked)
    with pytest.raises(UserError, match="first id '03-01-04-01-01-01-02'"):
        build_ravdess(tmp_path / "data", tmp_path / "db", minilm_dir, extractors=["functionals"])
    assert not (tmp_path / "db" / "ravdess_txt").exists()  # checked before anything is built


def test_builder_refuses_an_unknown_extractor(tmp_path, shared_data, minilm_dir):
    subset(shared_data, tmp_path / "data")
    with pytest.raises(UserError, match="unknown extractor 'mfcc'"):
        build_ravdess(tmp_path / "data", tmp_path / "db", minilm_dir, extractors=["mfcc"])


# ----------------------------------------------------------------------------- the baselines
def test_linear_baselines_match_plain_sklearn_fits():
    """The Gram-matrix SVM and the span-of-training-rows logistic regression are the plain fits."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 120)
    x = rng.normal(size=(120, 400)) + 0.5 * np.eye(4)[y].repeat(100, axis=1)  # wider than the 80 rows
    train, test = list(range(80)), list(range(80, 120))
    for c in (1e-3, 1e-1, 10.0):
        svm = SVC(kernel="linear", C=c).fit(x[train], y[train]).predict(x[test])
        np.testing.assert_array_equal(LinearBaseline(x, y, "svm").fit_predict(c, train, [test])[0], svm)
        lr = LogisticRegression(C=c, max_iter=5000).fit(x[train], y[train]).predict(x[test])
        np.testing.assert_array_equal(LinearBaseline(x, y, "logreg").fit_predict(c, train, [test])[0], lr)
    with pytest.raises(ConfigError, match="'knn' is not one of svm, logreg"):
        LinearBaseline(x, y, "knn")


def test_baseline_fold_chooses_c_on_validation_only():
    rows = actor_rows(8)  # every actor: each class once
    plan = build_protocol(rows, "ravdess", scheme="loso", speaker_column="actor")
    ids, fold = list(rows), plan.folds[3]
    index = {u: i for i, u in enumerate(ids)}
    y = np.array([plan.targets[u] for u in ids])
    x = np.random.default_rng(1).normal(size=(len(ids), 48))
    x[:, :8] += 0.7 * np.eye(8)[y]  # one weakly informative dimension per class
    x = speaker_znorm(x, [rows[u]["actor"] for u in ids])
    grid = (1e-4, 1e-2, 1.0)
    res = LinearBaseline(x, y, "svm").fold(index, fold, 8, grid=grid, refit=True)
    assert res["C"] in grid and res["valid_uar"] > 25 and set(res["refit"]) == set(res["test"])
    shuffled = y.copy()
    test_rows = [index[u] for u in fold.test]
    shuffled[test_rows] = (y[test_rows] + 3) % 8  # other test labels: the same C, another test score
    other = LinearBaseline(x, shuffled, "svm").fold(index, fold, 8, grid=grid)
    assert (other["C"], other["valid_uar"]) == (res["C"], res["valid_uar"])
    assert other["test"]["uar"] != res["test"]["uar"]


# ----------------------------------------------------------------------------- the benchmark
def _load_benchmark():
    spec = importlib.util.spec_from_file_location("ravdess_benchmark", REPO / "benchmarks" / "ravdess.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_baselines_two_folds_and_uniter3m_one_fold(ravdess_dbs, tmp_path):
    bench = _load_benchmark()
    db = ravdess_dbs[0]
    common = ["--db", str(db), "--protocol", "loao", "--seeds", "1"]
    bench.main(
        [
            *common,
            "--out",
            str(tmp_path / "base"),
            "--folds",
            "0",
            "1",
            "--contenders",
            ",".join(bench.BASELINES),
        ]
    )
    table = json.loads((tmp_path / "base" / "results.json").read_text())["table"]
    assert set(table) == set(bench.BASELINES)
    for name, row in table.items():
        assert [f["fold"] for f in row["folds"]] == [0, 1] and row["seeds"] == "deterministic"
        assert all(f["C"] in bench.GRID and 0 <= f["uar"] <= 100 for f in row["folds"]), name
    steps = [
        "--set",
        "steps=2",
        "--set",
        "epochs=1",
        "--set",
        "batching.max_batch_size=4",
        "--set",
        "class_weighted=false",
    ]
    bench.main(
        [*common, "--out", str(tmp_path / "ft"), "--folds", "0", "--contenders", "VA,VA_cases", *steps]
    )
    result = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert set(result["table"]) == {"VA", "VA_cases"} and result["table"]["VA"]["seeds"] == 1
    assert set(result["cases"]) == {"VA", "VA_cases"} and set(result["cases"]["VA"]) == set(bench.CASES)
    assert "| VA_cases |" in (tmp_path / "ft" / "table.md").read_text()


def test_methods_benchmark_pretrains_each_fold_on_its_training_actors_only(shared_data, tmp_path):
    spec = importlib.util.spec_from_file_location(
        "ravdess_methods", REPO / "benchmarks" / "ravdess_methods.py"
    )
    methods = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(methods)
    rows = {r["id"]: r for r in ravdess_rows(shared_data / "ravdess")}
    config = json.loads(methods.CONFIG.read_text())["protocol"]
    plan = build_protocol(rows, "ravdess", **{k: v for k, v in config.items() if k != "name"})
    actor = {uid: row["actor"] for uid, row in rows.items()}
    for fold in plan.folds:
        train, valid = methods.pretraining_actors(fold, actor)
        test = {actor[u] for u in fold.test}
        assert len(train) == 16 and len(valid) == 4 and not (set(train) | set(valid)) & test
        cfg = methods.pretrain_config(tmp_path / "db", tmp_path / "pre", train, valid, steps=100)
        data = cfg["datasets"]["ravdess"]
        assert data["txt_db"] == [str(tmp_path / "db" / f"ravdess_txt_actor{a}") for a in train]
        assert len(data["face_db"]) == len(data["speech_db"]) == 16 and cfg["optim"]["warmup_steps"] == 10
    assert all("{fold}" in s for s in methods.CONTENDERS["pretrained@0.1"] if s.startswith("model.init"))
