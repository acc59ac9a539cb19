"""Training-split-only text dbs for task-adaptive text pretraining (issue 12 §4b).

    .venv/bin/python benchmarks/tapt_dbs.py --data ../shared/data --tokenizer $TOK --out db

writes, from the shared corpus files and with the corpus row readers (uniter3m.ingest.corpora)
and the real text-db builder:

  meld_txt_train      MELD train_sent_emo.csv      (labels Emotion, Sentiment, Speaker, split)
  meld_txt_dev        MELD dev_sent_emo.csv        (pretraining validation)
  mosi_txt_train      MOSI training videos minus the recipe's validation videos (labels binary, ...)
  mosi_txt_valid      the recipe's validation videos
  iemocap_txt_s1234_train  IEMOCAP Sessions 1-4, the TRAINING part of the iemocap4 leave-one-session-out
                           fold 5 (test = Session 5): the validation dialogues of that fold are left out
  iemocap_txt_s1234_valid  that fold's validation dialogues (pretraining validation)

No test utterance is written anywhere (MELD test, MOSI test videos, IEMOCAP Session 5): the script
checks it before it returns. The IEMOCAP dbs carry NO emotion label (only speaker, dialogue,
session): the fine-tuning runs with 10 % of the labels must not see the other 90 % through a
pretraining objective, so IEMOCAP is text-only material (MLM/WWM/MELM) and the prompt task reads
labels of MELD and MOSI training utterances only. The IEMOCAP fold is computed with the protocol
code itself (`session_folds`, valid_fraction 0.1 as in configs/downstream/iemocap4_loso.json), over
all IEMOCAP utterances (a dialogue validates or not whatever its labels), so it is the same
dialogue split the fine-tuning uses.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from uniter3m.evaluation.protocols import session_folds
from uniter3m.ingest.corpora import iemocap_rows, meld_rows, mosi_utterances, text_db_from_rows

TEST_SESSION = "Ses05"


def iemocap_fold_parts(data: Path, valid_fraction: float = 0.1) -> dict[str, list[dict[str, Any]]]:
    """IEMOCAP rows of the session fold whose test session is Session 5: train / valid / test."""
    rows = {r["id"]: r for r in iemocap_rows(data / "iemocap6_text" / "iemocap6.jsonl")}
    folds = session_folds(rows, list(rows), "session", "dialogue", valid_fraction)
    (fold,) = [f for f in folds if f.name == f"session-{TEST_SESSION}"]
    return {part: [rows[u] for u in getattr(fold, part)] for part in ("train", "valid", "test")}


def build(data: Path, tokenizer: Path, out: Path) -> dict[str, dict]:
    metas: dict[str, dict] = {}
    meld = list(meld_rows(data / "meld"))
    mosi, _ = mosi_utterances(data / "mosi_bclstm")
    iemocap = iemocap_fold_parts(data)
    test_ids = {r["id"] for r in meld if r["split"] == "test"}
    test_ids |= {r["id"] for r in mosi if r["split"] == "test"}
    test_ids |= {r["id"] for r in iemocap["test"]}
    no_label = ("id", "text", "speaker", "dialogue", "session")
    parts: dict[str, tuple[list[dict[str, Any]], list[str]]] = {
        "meld_txt_train": (
            [r for r in meld if r["split"] == "train"],
            ["Emotion", "Sentiment", "Speaker", "split"],
        ),
        "meld_txt_dev": (
            [r for r in meld if r["split"] == "dev"],
            ["Emotion", "Sentiment", "Speaker", "split"],
        ),
        "mosi_txt_train": ([r for r in mosi if r["split"] == "train"], ["binary", "score", "video", "split"]),
        "mosi_txt_valid": ([r for r in mosi if r["split"] == "valid"], ["binary", "score", "video", "split"]),
        "iemocap_txt_s1234_train": (
            [{k: r[k] for k in no_label} for r in iemocap["train"]],
            ["speaker", "dialogue", "session"],
        ),
        "iemocap_txt_s1234_valid": (
            [{k: r[k] for k in no_label} for r in iemocap["valid"]],
            ["speaker", "dialogue", "session"],
        ),
    }
    for name, (rows, _) in parts.items():
        leaked = [r["id"] for r in rows if r["id"] in test_ids]
        if leaked:
            raise AssertionError(f"{name}: {len(leaked)} test utterances, e.g. {leaked[:3]}")
    if any(
        r["session"] == TEST_SESSION
        for name in ("iemocap_txt_s1234_train", "iemocap_txt_s1234_valid")
        for r in parts[name][0]
    ):
        raise AssertionError("an IEMOCAP Session 5 utterance reached a pretraining db")
    for name, (rows, labels) in parts.items():
        metas[name] = text_db_from_rows(rows, out / name, tokenizer, labels, overwrite=False, lexicon="nrc")
    return metas


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the shared data folder (../shared/data)")
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    for name, meta in build(args.data, args.tokenizer, args.out).items():
        print(f"{args.out / name}: {meta['count']} records, skipped {len(meta.get('skipped', []))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
