"""Protocols: label maps, drops (counted), folds (never empty), on synthetic rows and the real IEMOCAP file."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from uniter3m.errors import ConfigError, UserError
from uniter3m.evaluation.protocols import build_protocol


def iemocap_like(sessions=5, per_speaker=4, labels=("neu", "exc", "hap", "fru", "ang", "sad")):
    rows = {}
    for s in range(1, sessions + 1):
        for g in "MF":
            for d in range(2):
                dialogue = f"Ses0{s}{g}_impro0{d}"
                for t in range(per_speaker):
                    spk = g if t % 2 == 0 else ("F" if g == "M" else "M")
                    rows[f"{dialogue}_{t}"] = {
                        "label": labels[(s + t + d) % len(labels)],
                        "speaker": spk,
                        "dialogue": dialogue,
                        "split": "test" if s == 5 else ("valid" if d == 1 and s == 1 else "train"),
                    }
    return rows


def test_iemocap4_merges_excited_and_counts_drops():
    rows = {
        "a": {"label": "exc", "split": "train"},
        "b": {"label": "hap", "split": "valid"},
        "c": {"label": "fru", "split": "test"},
        "d": {"label": "sad", "split": "test"},
        "e": {"label": "fru", "split": "train"},
    }
    plan = build_protocol(rows, "iemocap4")
    classes = plan.label.classes
    assert classes[plan.targets["a"]] == "hap" and classes[plan.targets["b"]] == "hap"
    assert "c" not in plan.targets and plan.dropped == {"fru": 2}
    assert plan.selection_metric == "uar"
    assert plan.folds[0].sizes() == {"train": 1, "valid": 1, "test": 1}


def test_unknown_label_value_names_value_and_count():
    rows = {str(i): {"label": "bored" if i < 3 else "neu", "split": "train"} for i in range(6)}
    with pytest.raises(UserError, match=r"'bored' \(3 rows\)"):
        build_protocol(rows, "iemocap6")


def test_empty_split_is_an_error():
    rows = {str(i): {"label": "neu", "split": "train" if i else "test"} for i in range(4)}
    with pytest.raises(UserError, match="empty valid split"):
        build_protocol(rows, "iemocap6")


def test_leave_one_session_out_folds():
    rows = iemocap_like()
    plan = build_protocol(rows, "iemocap6", scheme="session", valid_fraction=0.3)
    assert [f.name for f in plan.folds] == [f"session-Ses0{s}" for s in range(1, 6)]
    for fold in plan.folds:
        held = fold.name.split("-")[1]
        assert all(u.startswith(held) for u in fold.test)
        assert not any(u.startswith(held) for u in fold.train + fold.valid)
        # validation holds whole dialogues, never split between train and valid
        assert not {u.rsplit("_", 1)[0] for u in fold.valid} & {u.rsplit("_", 1)[0] for u in fold.train}
        assert set(fold.train) | set(fold.valid) | set(fold.test) == set(plan.targets)


def test_leave_one_speaker_out_validates_on_the_other_speaker():
    rows = iemocap_like()
    plan = build_protocol(rows, "iemocap6", scheme="speaker")
    assert len(plan.folds) == 10
    for fold in plan.folds:
        session, spk = fold.name.split("-")
        assert {rows[u]["speaker"] for u in fold.test} == {spk}
        assert {rows[u]["speaker"] for u in fold.valid} == {"M", "F"} - {spk}
        assert all(u.startswith(session) for u in fold.test + fold.valid)
        assert not any(u.startswith(session) for u in fold.train)


def test_msp_improv_twelve_folds_from_session_column():
    rows = {
        f"MSP-S{s}-{g}-{i}": {"label": "AHNS"[i % 4], "speaker": g, "session": f"S{s}"}
        for s in range(1, 7)
        for g in "MF"
        for i in range(4)
    }
    plan = build_protocol(rows, "msp4", scheme="speaker")
    assert len(plan.folds) == 12
    assert sorted(Counter(plan.targets.values()).values()) == [12, 12, 12, 12]


def test_meld_and_mosi_targets():
    meld = {
        f"{sp}_{i}": {"Emotion": e, "Sentiment": "neutral", "split": sp}
        for sp in ("train", "dev", "test")
        for i, e in enumerate(["joy", "anger"])
    }
    plan = build_protocol(meld, "meld")
    assert plan.selection_metric == "weighted_f1" and plan.folds[0].sizes() == {
        "train": 2,
        "valid": 2,
        "test": 2,
    }
    assert build_protocol(meld, "meld", target="sentiment").label.classes == (
        "negative",
        "neutral",
        "positive",
    )
    mosi = {
        f"{sp}{i}": {"score": s, "split": sp}
        for sp in ("train", "valid", "test")
        for i, s in enumerate([-2.6, -0.2, 0.0, 1.4])
    }
    binary = build_protocol(mosi, "mosi", target="binary")
    assert [binary.targets[f"test{i}"] for i in range(4)] == [0, 0, 1, 1] and binary.selection_metric == "wa"
    seven = build_protocol(mosi, "mosi", target="7class")
    assert [seven.label.classes[seven.targets[f"test{i}"]] for i in range(4)] == ["-3", "0", "0", "1"]
    reg = build_protocol(mosi, "mosi", target="regression")
    assert reg.regression and reg.targets["test0"] == -2.6 and reg.selection_metric == "mae"
    with pytest.raises(ConfigError, match="target"):
        build_protocol(mosi, "mosi", target="ternary")


def test_real_iemocap_file_protocols(shared_data):
    rows = {}
    with open(shared_data / "iemocap6_text" / "iemocap6.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            rows[f"{r['dialogue']}_{r['turn']}"] = r
    given = build_protocol(rows, "iemocap6")
    assert given.folds[0].sizes() == {"train": 5163, "valid": 647, "test": 1623}
    four = build_protocol(rows, "iemocap4", scheme="session")
    assert four.dropped == {"fru": 1849}
    assert len(four.folds) == 5 and sum(len(f.test) for f in four.folds) == 7433 - 1849
    spk = build_protocol(rows, "iemocap4", scheme="speaker")
    assert len(spk.folds) == 10
    assert sum(len(f.test) for f in spk.folds) == 7433 - 1849


def test_corpus_recipes_read_the_real_files(shared_data):
    from uniter3m.ingest.corpora import iemocap_rows, meld_rows, mosi_utterances

    rows, feats = mosi_utterances(shared_data / "mosi_bclstm")
    assert len(rows) == 2199 and len(feats["audio"][0]) == 73 and len(feats["video"][0]) == 100
    splits = Counter(r["split"] for r in rows)
    assert splits["test"] == 752 and splits["train"] + splits["valid"] == 1447
    videos = {s: {r["video"] for r in rows if r["split"] == s} for s in splits}
    assert not videos["valid"] & videos["train"] and not videos["test"] & (videos["train"] | videos["valid"])
    assert len(videos["valid"]) == 8
    assert all((r["score"] >= 0) == (r["binary"] == 1) for r in rows)
    plan = build_protocol({r["id"]: r for r in rows}, "mosi", target="binary")
    assert plan.folds[0].sizes()["test"] == 752

    iemocap = list(iemocap_rows(shared_data / "iemocap6_text" / "iemocap6.jsonl"))
    assert len(iemocap) == 7433 and {r["session"] for r in iemocap} == {f"Ses0{i}" for i in range(1, 6)}
    meld = list(meld_rows(shared_data / "meld"))
    assert Counter(r["split"] for r in meld) == {"train": 9989, "dev": 1109, "test": 2610}
    assert len({r["id"] for r in meld}) == len(meld)


def test_generic_protocol_classes_default_to_the_column_values():
    rows = {
        f"{sp}{i}": {"emotion": e, "split": sp}
        for sp in ("train", "valid", "test")
        for i, e in enumerate("cab")
    }
    plan = build_protocol(rows, "generic", label_column="emotion")
    assert plan.label.classes == ("a", "b", "c") and plan.targets["test0"] == 2
    with pytest.raises(ConfigError, match="label_column"):
        build_protocol(rows, "generic")
