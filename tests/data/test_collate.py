"""Collator: examples -> the batch dict of DEVELOPERS.md."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uniter3m.data.collate import Collator
from uniter3m.errors import UserError


def example(uid, n, face=None, speech=None, face_soft=None, soft=None, labels=None):
    ex = {
        "id": uid,
        "input_ids": np.arange(2000, 2000 + n, dtype=np.int64),
        "word_ids": np.arange(n, dtype=np.int64) // 2,
        "emo_flags": np.arange(n) % 2 == 1,
        "labels": labels if labels is not None else {"emotion": f"e-{uid}"},
        "face": face,
        "face_soft": face_soft,
        "speech": speech,
    }
    if soft is not None:
        ex["soft_labels"] = soft
    return ex


def frames(t, d, value):
    return np.full((t, d), value, dtype=np.float32)


def test_text_is_cls_tokens_sep_right_padded(special):
    batch = Collator(special)([example("a", 3), example("b", 1)])
    sp = special
    assert batch["ids"] == ["a", "b"]
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (2, 5)
    assert batch["input_ids"].tolist() == [
        [sp.cls_id, 2000, 2001, 2002, sp.sep_id],
        [sp.cls_id, 2000, sp.sep_id, sp.pad_id, sp.pad_id],
    ]
    assert batch["txt_mask"].dtype == torch.bool
    assert batch["txt_mask"].tolist() == [[True] * 5, [True, True, True, False, False]]
    assert batch["word_ids"].tolist() == [[-1, 0, 0, 1, -1], [-1, 0, -1, -1, -1]]
    assert batch["emo_flags"].tolist() == [[False, False, True, False, False], [False] * 5]
    assert batch["labels"] == {"emotion": ["e-a", "e-b"]}
    assert not any(k.startswith(("face", "speech")) for k in batch) and "soft_labels" not in batch


def test_frames_padded_with_masks_and_soft_labels(special):
    col = Collator(special)
    batch = col(
        [
            example("a", 2, face=frames(3, 4, 1.0), speech=frames(1, 2, 5.0), face_soft=frames(3, 8, 0.5)),
            example("b", 2, face=frames(0, 4, 0.0), speech=frames(2, 2, 7.0), face_soft=frames(0, 8, 0.0)),
        ]
    )
    assert batch["face_feat"].shape == (2, 3, 4) and batch["face_feat"].dtype == torch.float32
    assert batch["face_mask"].tolist() == [[True] * 3, [False] * 3]  # zero-frame: all-False row
    assert batch["face_feat"][1].abs().sum() == 0 and batch["face_feat"][0].min() == 1.0
    assert batch["face_soft"].shape == (2, 3, 8) and batch["face_soft"][0, 2, 7] == 0.5
    assert batch["speech_feat"].shape == (2, 2, 2) and batch["speech_mask"].tolist() == [
        [True, False],
        [True, True],
    ]
    assert batch["speech_feat"][0, 1].abs().sum() == 0


def test_batch_with_no_frames_at_all_still_works(special):
    batch = Collator(special)([example("a", 1, face=frames(0, 6, 0)), example("b", 0, face=frames(0, 6, 0))])
    assert batch["face_feat"].shape == (2, 0, 6) and batch["face_mask"].shape == (2, 0)
    assert batch["input_ids"].tolist()[1][:2] == [special.cls_id, special.sep_id]  # L off: [CLS] [SEP]


def test_utterance_soft_labels_and_label_columns(special):
    soft = np.array([0.2, 0.8], dtype=np.float32)
    batch = Collator(special)(
        [
            example("a", 1, soft=soft, labels={"emotion": "joy", "sentiment": "pos"}),
            example("b", 1, soft=soft[::-1], labels={"emotion": "sad"}),
        ]
    )
    assert batch["soft_labels"].shape == (2, 2) and batch["soft_labels"][1, 0].item() == pytest.approx(0.8)
    assert batch["labels"] == {"emotion": ["joy", "sad"], "sentiment": ["pos", None]}


def test_max_txt_len_caps_text(special):
    batch = Collator(special, max_txt_len=2)([example("a", 6)])
    assert batch["input_ids"].tolist() == [[special.cls_id, 2000, 2001, special.sep_id]]
    assert batch["word_ids"].tolist() == [[-1, 0, 0, -1]]


def test_inconsistent_batches_raise_naming_ids(special):
    col = Collator(special)
    with pytest.raises(UserError, match="no face: 'b'"):
        col([example("a", 1, face=frames(1, 3, 0)), example("b", 1)])
    with pytest.raises(UserError, match="differ in shape"):
        col([example("a", 1, face=frames(1, 3, 0)), example("b", 1, face=frames(1, 4, 0))])
    with pytest.raises(UserError, match="without soft_labels"):
        col([example("a", 1, soft=np.ones(2, np.float32)), example("b", 1)])
    with pytest.raises(UserError, match="empty batch"):
        col([])


def test_pad_multiple_rounds_every_stream_width_and_keeps_masks_exact(special):
    batch = Collator(special, pad_multiple=8)(
        [
            example("a", 3, face=frames(9, 4, 1.0), speech=frames(2, 3, 2.0)),
            example("b", 1, face=frames(0, 4, 0.0), speech=frames(5, 3, 1.0)),
        ]
    )
    assert batch["input_ids"].shape == (2, 8) and batch["txt_mask"].sum(1).tolist() == [5, 3]
    assert batch["face_feat"].shape == (2, 16, 4) and batch["face_mask"].sum(1).tolist() == [9, 0]
    assert batch["speech_feat"].shape == (2, 8, 3) and batch["speech_mask"].sum(1).tolist() == [2, 5]
    assert (batch["input_ids"][0, 5:] == special.pad_id).all() and (batch["face_feat"][0, 9:] == 0).all()
