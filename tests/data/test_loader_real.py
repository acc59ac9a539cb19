"""Real inputs through the real builders: MELD transcripts (build-txt-db, real tokenizer) joined
with real OpenFace frames (build-feat-db --format openface) and npz speech frames, read through a
DataLoader with 2 workers, the token-bucket sampler and the collator."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from uniter3m.cli import main
from uniter3m.data.collate import Collator
from uniter3m.data.dataset import JoinedDataset
from uniter3m.data.sampler import TokenBucketBatchSampler
from uniter3m.data.store import DbReader

N_ROWS = 200
FACE_COLUMNS = "AU*_r,AU*_c,pose_*,gaze_*"


def meld_head(shared_data, out):
    with open(shared_data / "meld" / "train_sent_emo.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[: N_ROWS + 1]
    with open(out, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return out


def write_openface_slices(shared_data, folder, ids) -> None:
    """One OpenFace CSV per utterance: a window of 0..11 rows of the real OpenFace 2.x output
    (every 12th utterance gets no row: no face found, kept as an empty stream)."""
    with open(shared_data / "openface" / "OpenFace_Test.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    folder.mkdir()
    for i, uid in enumerate(ids):
        start = (7 * i) % 80
        with open(folder / f"{uid}.csv", "w", newline="") as f:
            csv.writer(f).writerows([header, *rows[start : start + i % 12]])


def write_speech_npz(folder, ids) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for uid in ids:
        np.savez(
            folder / f"{uid}.npz", feat=rng.normal(size=(int(rng.integers(1, 30)), 130)).astype(np.float32)
        )


@pytest.fixture(scope="module")
def meld_dbs(shared_data, minilm_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("meld")
    src = meld_head(shared_data, tmp / "meld_head.csv")
    rc = main(
        [
            "build-txt-db",
            "--input", str(src),
            "--id-col", "Dialogue_ID,Utterance_ID",
            "--text-col", "Utterance",
            "--label-col", "Emotion,Sentiment",
            "--tokenizer", str(minilm_dir),
            "--out", str(tmp / "txt"),
        ]
    )  # fmt: skip
    assert rc == 0
    ids = DbReader(tmp / "txt").ids
    write_openface_slices(shared_data, tmp / "openface", ids)
    write_speech_npz(tmp / "npz", ids)
    for name, fmt, extra in (("face", "openface", ["--columns", FACE_COLUMNS]), ("speech", "npz", [])):
        rc = main(
            ["build-feat-db", "--input", str(tmp / fmt), "--format", fmt, "--out", str(tmp / name), *extra]
        )
        assert rc == 0
    return tmp / "txt", tmp / "face", tmp / "speech"


def make_loader(ds, special, workers):
    sampler = TokenBucketBatchSampler(ds.lengths, max_tokens=400, seed=7, pool_size=64, ids=ds.ids)
    return DataLoader(ds, batch_sampler=sampler, collate_fn=Collator(special), num_workers=workers)


def test_two_workers_give_the_same_batches_as_none(meld_dbs, special, tokenizer):
    txt, face, speech = meld_dbs
    ds = JoinedDataset(txt, face, speech, normalize=True, max_txt_len=32, max_frames={"speech": 20})
    assert len(ds) == DbReader(txt).meta["count"] > 190
    assert ds.special_tokens() == special
    face_dim = DbReader(face).meta["dim"]
    assert face_dim == 47  # 17 AU intensities + 18 AU presences + 6 pose + 6 gaze
    assert ds.report().empty["face"] == len([i for i in range(len(ds)) if i % 12 == 0])
    torch.manual_seed(0)
    serial = list(make_loader(ds, special, 0))
    parallel = list(make_loader(ds, special, 2))
    assert len(serial) == len(parallel) > 5
    for a, b in zip(serial, parallel, strict=True):
        assert a.keys() == b.keys() and a["ids"] == b["ids"] and a["labels"] == b["labels"]
        for key, value in a.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b[key]), key

    seen = [uid for batch in serial for uid in batch["ids"]]
    assert sorted(seen) == sorted(ds.ids)
    for batch in serial:
        per_item = batch["txt_mask"].sum(1) + batch["face_mask"].sum(1) + batch["speech_mask"].sum(1)
        assert len(batch["ids"]) * int(per_item.max()) <= 400
        assert batch["face_feat"].shape[-1] == face_dim and batch["speech_feat"].shape[-1] == 130
        assert set(batch["labels"]) >= {"Emotion", "Sentiment"}
        assert torch.isfinite(batch["face_feat"]).all()
        # zero-frame faces: all-False rows, zero features
        empty = ~batch["face_mask"].any(1)
        assert batch["face_feat"][empty].abs().sum() == 0

    # the text is the MELD utterance: [CLS] tokens [SEP] decode back to it
    batch = serial[0]
    row = batch["input_ids"][0][batch["txt_mask"][0]].tolist()
    assert row[0] == special.cls_id and row[-1] == special.sep_id
    record = DbReader(txt)[batch["ids"][0]]
    assert tokenizer.decode(row[1:-1]).replace(" ", "") == tokenizer.decode(
        record["input_ids"][:32].tolist()
    ).replace(" ", "")
    # normalisation: face features are standardised against the db's statistics
    faces = torch.cat([b["face_feat"][b["face_mask"]] for b in serial])
    assert faces.mean(0).abs().max() < 0.5
