"""Sequence packing: several utterances per row, attention confined to each (issue 13 item 3).

Multimodal batches are ragged three times over (text, face and speech each padded to their own
longest), so a padded batch spends much of its matmuls on padding. Packing moves the REAL
positions of the joint sequence `[text | frame streams]` of every utterance into as few rows as
fit, and the encoder attends only within an utterance (a document mask). Embeddings (with their
positions) are computed before packing and the states are put back after the encoder, so the
pooler, the heads and every objective see the same (B, L, H) tensor as without packing.

The plan is computed here, on the CPU, in the data workers, from the final masks of a batch: the
model only gathers and scatters with index tensors of known size (no host sync).

Attention in packed rows uses SDPA with a boolean document mask (every backend supports it, and
it is exact); `flex` uses FlexAttention's block mask, which also skips the masked blocks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch


def joint_mask(inputs: Mapping[str, Any], stream_masks: Sequence[str]) -> np.ndarray:
    """The (B, L) keep-mask of the joint sequence, in the model's order: text, then each frame stream."""
    parts = [inputs["attention_mask"]] + [
        inputs[k] for k in stream_masks if isinstance(inputs.get(k), torch.Tensor)
    ]
    return np.concatenate([p.numpy().astype(bool) for p in parts], axis=1)


def pack_plan(mask: np.ndarray, multiple: int = 8) -> dict[str, torch.Tensor]:
    """First-fit-decreasing packing of each row's real positions into rows as wide as the longest
    utterance's real content (rounded up to `multiple`), not as the padded batch: a token-bucket
    batch is padded per stream, so its joint width exceeds every utterance's content, and rows that
    wide saved 0-3 % of the positions on MELD lengths; these compute 17 % (pad_multiple 1) to 21 %
    (8) fewer than the padded batch, within 1-5 % of the real positions
    (`benchmarks/data_throughput.py --meld`). Never more rows than utterances, none wider than the
    padded batch rounded up to `multiple`.

    Returns `pack_src` (N,) flat positions in the (B, L) batch, `pack_dst` (N,) flat positions in
    the (P, Lp) packed batch, and `pack_doc` (P, Lp): the utterance of each packed slot, -1 for padding.
    """
    b, length = mask.shape
    counts = mask.sum(axis=1)
    width = max(int(counts.max(initial=0)), 1)
    width = (width + multiple - 1) // multiple * multiple
    rows: list[list[int]] = []
    room: list[int] = []
    for utt in np.argsort(-counts, kind="stable").tolist():
        need = int(counts[utt])
        if need == 0:
            continue
        for r, free in enumerate(room):
            if free >= need:
                rows[r].append(utt)
                room[r] -= need
                break
        else:
            rows.append([utt])
            room.append(width - need)
    doc = np.full((max(len(rows), 1), width), -1, dtype=np.int64)
    src, dst = [], []
    for r, utts in enumerate(rows):
        start = 0
        for utt in sorted(utts):
            real = np.flatnonzero(mask[utt])
            src.append(utt * length + real)
            dst.append(r * width + start + np.arange(len(real)))
            doc[r, start : start + len(real)] = utt
            start += len(real)
    empty = np.zeros(0, dtype=np.int64)
    return {
        "pack_src": torch.from_numpy(np.concatenate(src) if src else empty),
        "pack_dst": torch.from_numpy(np.concatenate(dst) if dst else empty),
        "pack_doc": torch.from_numpy(doc),
    }
