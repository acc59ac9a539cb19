"""Packing several utterances per encoder row gives the unpacked model's outputs (issue 13 item 3)."""

from __future__ import annotations

import numpy as np
import torch

from tests.support.batches import ragged_inputs
from uniter3m.data.packing import joint_mask, pack_plan
from uniter3m.model.config import UniterConfig
from uniter3m.model.uniter import UniterModel


def test_the_plan_moves_every_real_position_once_into_fewer_rows():
    inputs = ragged_inputs()
    mask = joint_mask(inputs, ["face_mask", "speech_mask"])
    plan = pack_plan(mask)
    src, dst, doc = plan["pack_src"].numpy(), plan["pack_dst"].numpy(), plan["pack_doc"].numpy()
    assert sorted(src.tolist()) == np.flatnonzero(mask.reshape(-1)).tolist()  # each real position once
    assert (
        len(set(dst.tolist())) == len(dst) and doc.shape[0] <= mask.shape[0]
    )  # no more rows than utterances
    assert (doc.reshape(-1)[dst] == src // mask.shape[1]).all()  # each slot knows its utterance
    assert doc.shape[1] == 40 and mask.sum(axis=1).max() == 36  # the longest content, rounded up to 8
    assert doc.size < mask.size  # fewer positions computed than padded


def test_packed_rows_are_as_wide_as_their_content_so_positions_fall_on_meld_lengths(shared_data, tokenizer):
    """MELD's training transcripts through the real tokenizer, frames from each utterance's duration,
    one epoch of token-bucket batches: rows as wide as the padded batch saved 0-3 % of its positions;
    rows as wide as the longest utterance's content compute within a few % of the real positions."""
    from benchmarks.data_throughput import epoch_batches, meld_lengths

    masks = [mask for mask, _ in epoch_batches(meld_lengths(shared_data / "meld", tokenizer), 4096, 8)]
    packed = [pack_plan(mask, 8)["pack_doc"] for mask in masks]
    for mask, doc in zip(masks, packed, strict=True):
        assert doc.shape[1] == -(-mask.sum(axis=1).max() // 8) * 8  # the longest content, rounded up
        assert doc.numel() <= mask.size
    padded, real = sum(m.size for m in masks), sum(int(m.sum()) for m in masks)
    computed = sum(doc.numel() for doc in packed)
    assert computed < 0.85 * padded, computed / padded  # measured: 0.79 (padding 24.8 % -> 4.9 %)
    assert computed < 1.1 * real, computed / real


def test_packed_encoder_equals_the_unpacked_model_on_real_positions():
    torch.manual_seed(0)
    config = UniterConfig(
        vocab_size=500,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        face={"feat_dim": 7},
        speech={"feat_dim": 5, "position": "sinusoidal"},
    )
    model = UniterModel(config).eval()
    inputs = ragged_inputs(1)
    plan = pack_plan(joint_mask(inputs, ["face_mask", "speech_mask"]))
    with torch.no_grad():
        plain = model(**inputs)
        packed = model(**inputs, **plan)
    real = plain.attention_mask
    assert torch.allclose(packed.last_hidden_state[real], plain.last_hidden_state[real], atol=1e-5)
    assert torch.allclose(packed.pooler_output, plain.pooler_output, atol=1e-5)
    assert packed.segments == plain.segments
    # and the gradient flows through the packed path to every stream's input layer
    out = model.train()(**inputs, **plan)
    out.last_hidden_state[real].sum().backward()
    assert model.speech_embeddings.feat_linear.weight.grad.abs().sum() > 0


def test_pretraining_with_packing_matches_pretraining_without(tiny_dbs, tmp_path):
    from safetensors.torch import load_file

    from tests.support.runs import no_dropout, pretrain_config
    from uniter3m.train.checkpoint import find_resume
    from uniter3m.train.pretrain import run_pretrain

    weights = {}
    for packing in (False, True):
        cfg = no_dropout(pretrain_config(tiny_dbs, tmp_path / f"p{packing}", steps=4))
        cfg["batching"]["packing"] = packing
        run_pretrain(cfg)
        weights[packing] = load_file(
            str(find_resume(tmp_path / f"p{packing}", "auto") / "model" / "model.safetensors")
        )
    for key, value in weights[False].items():
        assert torch.allclose(value, weights[True][key], atol=1e-4), key
