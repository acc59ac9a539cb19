"""`uniter3m build-txt-db`: real MELD transcripts, record layout, and every bad-input rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from uniter3m.cli import main
from uniter3m.data.lexicon import load_emotion_lexicon
from uniter3m.data.store import DbReader


def build(
    src: Path, out: Path, tok_dir: Path, *extra: str, id_col: str = "id", text_col: str = "text"
) -> int:
    return main(
        [
            "build-txt-db",
            "--input", str(src),
            "--id-col", id_col,
            "--text-col", text_col,
            "--tokenizer", str(tok_dir),
            "--out", str(out),
            *extra,
        ]
    )  # fmt: skip


def write_csv(path: Path, rows: list[tuple[str, ...]], header: str = "id,text,emotion") -> Path:
    lines = [header] + [",".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_meld_train_real(shared_data, minilm_dir, tokenizer, special, tmp_path, capsys):
    out = tmp_path / "meld"
    rc = build(
        shared_data / "meld" / "train_sent_emo.csv",
        out,
        minilm_dir,
        "--label-col", "Emotion,Sentiment",
        id_col="Dialogue_ID,Utterance_ID",
        text_col="Utterance",
    )  # fmt: skip
    assert rc == 0
    assert "9989 utterances" in capsys.readouterr().out
    db = DbReader(out, kind="txt")
    meta = db.meta
    assert len(db) == meta["count"] == 9989
    assert meta["skipped"] == [] and meta["truncated"] == 0
    assert meta["label_columns"] == ["Emotion", "Sentiment"]
    assert sum(meta["label_counts"]["Emotion"].values()) == 9989
    assert set(meta["label_counts"]["Emotion"]) == {
        "anger",
        "disgust",
        "fear",
        "joy",
        "neutral",
        "sadness",
        "surprise",
    }
    assert set(meta["label_counts"]["Sentiment"]) == {"negative", "neutral", "positive"}
    # special ids come from the tokenizer, as SpecialTokens reads them
    assert {k: meta["tokenizer"][k] for k in special.to_dict()} == special.to_dict()
    assert len(meta["tokenizer"]["vocab_hash"]) == 16
    assert sum(meta["length_histogram"].values()) == 9989

    rec = db["0_0"]
    assert rec["text"].startswith("also I was the point person on my company’s transition")
    assert rec["labels"] == {"Emotion": "neutral", "Sentiment": "neutral"}
    expected = tokenizer(rec["text"], add_special_tokens=False)["input_ids"]
    assert rec["input_ids"].tolist() == expected
    assert rec["input_ids"].dtype == np.int32 and rec["emo_flags"].dtype == np.uint8
    lengths = {k: db.length_of(k) for k in db.ids[:50]}
    for key in db.ids[:50]:
        r = db[key]
        ids = r["input_ids"]
        assert special.cls_id not in ids and special.sep_id not in ids
        assert len(ids) == len(r["word_ids"]) == len(r["emo_flags"]) == lengths[key]
        assert np.all(np.diff(r["word_ids"]) >= 0) and r["word_ids"][0] == 0
    assert meta["lexicon"]["emotion_tokens"] > 1000


def test_record_layout_word_ids_and_emotion_flags(minilm_dir, tokenizer, tmp_path):
    src = write_csv(tmp_path / "t.csv", [("u1", '"I am heartless, joyous and happy."', "joy")])
    out = tmp_path / "db"
    assert build(src, out, minilm_dir, "--label-col", "emotion") == 0
    rec = DbReader(out)["u1"]
    tokens = tokenizer.convert_ids_to_tokens(rec["input_ids"].tolist())
    assert tokens == ["i", "am", "heart", "##less", ",", "joy", "##ous", "and", "happy", "."]
    assert rec["word_ids"].tolist() == [0, 1, 2, 2, 3, 4, 4, 5, 6, 7]
    # NRC emotion words, wordpieces joined back: heart+less, joy+ous, happy
    assert rec["emo_flags"].tolist() == [0, 0, 1, 1, 0, 1, 1, 0, 1, 0]
    assert rec["labels"] == {"emotion": "joy"}


def test_nrc_rule_counts_only_the_eight_emotions_and_word_list_files(tmp_path):
    nrc = load_emotion_lexicon("nrc")
    assert "happy" in nrc.words and "despair" in nrc.words
    assert "abba" not in nrc.words  # positive only: polarity, not an emotion
    assert nrc.info["words"] == len(nrc.words) and "trust" in nrc.info["rule"]
    listing = tmp_path / "words.txt"
    listing.write_text(
        "# my words\nHappy\nsad\t# trailing comment\nfear\tanger\t1\ncalm\tjoy\t0\n", encoding="utf-8"
    )
    words = load_emotion_lexicon(str(listing)).words
    assert set(words) == {"happy", "sad", "fear"}
    assert load_emotion_lexicon("none").words == {}


def test_jsonl_several_id_columns_and_soft_labels(minilm_dir, tmp_path):
    rows = [
        {"dialogue": "d1", "turn": 0, "text": "Hello there.", "label": "neu", "soft": [0.7, 0.2, 0.1]},
        {"dialogue": "d1", "turn": 1, "text": "I hate this!", "label": "ang", "soft": "[0.1, 0.8, 0.1]"},
    ]
    src = tmp_path / "x.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    out = tmp_path / "db"
    rc = build(src, out, minilm_dir, "--label-col", "label", "--label-col", "turn", "--soft-label-col", "soft",
               "--lexicon", "none", id_col="dialogue,turn")  # fmt: skip
    assert rc == 0
    db = DbReader(out)
    assert db.ids == ["d1_0", "d1_1"]
    assert db["d1_1"]["labels"] == {"label": "ang", "turn": 1}
    soft = db["d1_1"]["soft_labels"]
    assert soft.dtype == np.float32 and soft.tolist() == pytest.approx([0.1, 0.8, 0.1])
    assert db.meta["soft_label_dim"] == 3
    assert db.meta["label_counts"]["turn"] == {"0": 1, "1": 1}
    assert db["d1_0"]["emo_flags"].sum() == 0


@pytest.mark.parametrize(
    ("cells", "message"),
    [
        (['"[0.5, 0.5]"', '"[0.2, 0.3, 0.5]"'], "row 1 has 2"),
        (['"[0.5, 0.5]"', "oops"], "not a JSON list"),
        (['"[0.5, 1.5]"', '"[0.5, 0.5]"'], "outside [0, 1]"),
    ],
)
def test_bad_soft_labels_are_errors_naming_the_row(minilm_dir, tmp_path, capsys, cells, message):
    src = write_csv(
        tmp_path / "s.csv", [("a", "good", cells[0]), ("b", "bad", cells[1])], header="id,text,soft"
    )
    assert build(src, tmp_path / "db", minilm_dir, "--soft-label-col", "soft") == 2
    err = capsys.readouterr().err
    assert message in err and str(src) in err
    assert not (tmp_path / "db").exists()


def test_empty_texts_are_skipped_with_row_and_reason(minilm_dir, tmp_path, capsys):
    src = write_csv(
        tmp_path / "e.csv", [("a", "fine", "x"), ("b", "", "x"), ("c", '"   "', "x"), ("d", "ok", "x")]
    )
    out = tmp_path / "db"
    assert build(src, out, minilm_dir) == 0
    assert "skipped: 2 empty text" in capsys.readouterr().out
    db = DbReader(out)
    assert db.ids == ["a", "d"]
    assert db.meta["skipped"] == [
        {"row": 2, "id": "b", "reason": "empty text"},
        {"row": 3, "id": "c", "reason": "empty text"},
    ]


def test_non_utf8_text_names_the_row_and_the_fix(minilm_dir, tmp_path, capsys):
    src = tmp_path / "latin.csv"
    src.write_bytes(b'id,text\na,hello\nb,"two\nlines"\nc,caf\xe9 \xff\xfe\n')
    out = tmp_path / "db"
    assert build(src, out, minilm_dir) == 2
    err = capsys.readouterr().err
    assert str(src) in err and "row 3 (line 5)" in err and "--encoding" in err
    assert not out.exists()
    assert build(src, out, minilm_dir, "--encoding", "latin-1") == 0
    assert DbReader(out)["c"]["text"] == "café ÿþ"


def test_over_long_text_is_truncated_and_counted(minilm_dir, tmp_path, capsys):
    src = write_csv(
        tmp_path / "l.csv", [("a", "one two three four five six seven", "x"), ("b", "short", "x")]
    )
    out = tmp_path / "db"
    assert build(src, out, minilm_dir, "--max-len", "5") == 0
    assert "truncated to 5 tokens: 1" in capsys.readouterr().out
    db = DbReader(out)
    assert len(db) == 2 and db.meta["truncated"] == 1 and db.meta["truncated_ids"] == ["a"]
    assert len(db["a"]["input_ids"]) == len(db["a"]["word_ids"]) == db.length_of("a") == 5
    assert db["a"]["text"] == "one two three four five six seven"


def test_existing_output_is_refused_unless_overwrite(minilm_dir, tmp_path, capsys):
    src = write_csv(tmp_path / "o.csv", [("a", "hello", "x")])
    out = tmp_path / "db"
    assert build(src, out, minilm_dir) == 0
    assert build(src, out, minilm_dir) == 2
    assert "--overwrite" in capsys.readouterr().err
    write_csv(src, [("a", "hello", "x"), ("b", "again", "x")])
    assert build(src, out, minilm_dir, "--overwrite") == 0
    assert len(DbReader(out)) == 2


def test_missing_input_missing_column_and_duplicate_id(minilm_dir, tmp_path, capsys):
    assert build(tmp_path / "nope.csv", tmp_path / "db", minilm_dir) == 2
    assert "nope.csv does not exist" in capsys.readouterr().err

    src = write_csv(tmp_path / "c.csv", [("a", "hello", "x")])
    assert build(src, tmp_path / "db", minilm_dir, text_col="Utterance") == 2
    err = capsys.readouterr().err
    assert "--text-col 'Utterance'" in err and "'text'" in err

    write_csv(src, [("a", "hello", "x"), ("b", "hi", "x"), ("a", "again", "x")])
    assert build(src, tmp_path / "db", minilm_dir) == 2
    err = capsys.readouterr().err
    assert "'a'" in err and "row 1" in err and "row 3" in err and "--id-col" in err

    src.write_text("id,text\na,hello,extra\n", encoding="utf-8")
    assert build(src, tmp_path / "db", minilm_dir) == 2
    assert "row 1 (line 2) has 3 fields" in capsys.readouterr().err
    assert not (tmp_path / "db").exists()
