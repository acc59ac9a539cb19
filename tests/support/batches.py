"""Model inputs for the tests of packing, compiling and the GPU, without databases."""

from __future__ import annotations

import torch


def ragged_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """Six utterances of random lengths (text 2-12, face 0-9, speech 1-20 positions) as padded
    model inputs: face 7-d, speech 5-d features."""
    g = torch.Generator().manual_seed(seed)
    b, lt, lv, la = 6, 12, 9, 20
    text_len = torch.randint(2, lt + 1, (b,), generator=g)
    face_len = torch.randint(0, lv + 1, (b,), generator=g)
    speech_len = torch.randint(1, la + 1, (b,), generator=g)
    return {
        "input_ids": torch.randint(5, 500, (b, lt), generator=g),
        "attention_mask": torch.arange(lt)[None] < text_len[:, None],
        "face_feat": torch.randn(b, lv, 7, generator=g),
        "face_mask": torch.arange(lv)[None] < face_len[:, None],
        "speech_feat": torch.randn(b, la, 5, generator=g),
        "speech_mask": torch.arange(la)[None] < speech_len[:, None],
    }
