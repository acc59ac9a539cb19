"""The backbone compiles whole (no graph break) and an epoch of real lengths stays within a small
recompile budget once the collator pads every stream to a multiple of 8.

Dynamo is run with its "eager" backend: graph breaks and recompiles are decided by tracing, not by
the code generator, so this checks on CPU in seconds what the GPU step will see.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import torch._dynamo

from uniter3m.data.sampler import TokenBucketBatchSampler
from uniter3m.model.config import UniterConfig
from uniter3m.model.uniter import UniterModel

RECOMPILE_BUDGET = 8  # graphs for a whole epoch of MELD-like lengths (dynamic shapes after the first)


def tiny_model() -> UniterModel:
    torch.manual_seed(0)
    config = UniterConfig(
        vocab_size=1000,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        face={"feat_dim": 6, "max_frames": 128},
        speech={"feat_dim": 5, "max_frames": 512, "position": "sinusoidal"},
    )
    return UniterModel(config).eval()


def inputs(widths: tuple[int, int, int], batch: int, padded: bool) -> dict:
    t, v, a = widths
    masks = [torch.ones(batch, w, dtype=torch.bool) for w in widths]
    if padded:
        for m in masks:
            m[-1, max(1, m.shape[1] // 2) :] = False
    return {
        "input_ids": torch.randint(0, 1000, (batch, t)),
        "attention_mask": masks[0],
        "face_feat": torch.randn(batch, v, 6),
        "face_mask": masks[1],
        "speech_feat": torch.randn(batch, a, 5),
        "speech_mask": masks[2],
        "padded": padded,
    }


@pytest.mark.parametrize("padded", [True, False])
def test_the_backbone_has_no_graph_break_when_the_padding_is_known(padded):
    explained = torch._dynamo.explain(tiny_model())(**inputs((16, 8, 24), 3, padded))
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    # asking the mask instead (padded=None) is what the collator's flag avoids: a host sync and a break
    asked = torch._dynamo.explain(tiny_model())(**dict(inputs((16, 8, 24), 3, True), padded=None))
    assert asked.graph_break_count > 0


def test_an_epoch_of_real_lengths_stays_within_the_recompile_budget(shared_data):
    rows = list(
        csv.DictReader((shared_data / "meld" / "train_sent_emo.csv").open(encoding="utf-8", errors="replace"))
    )
    rng = np.random.default_rng(0)
    text = np.array([min(len(r["Utterance"].split()) * 13 // 10, 60) + 2 for r in rows])
    parts = np.stack([text, rng.integers(1, 64, len(rows)), rng.integers(4, 200, len(rows))], axis=1)
    sampler = TokenBucketBatchSampler(parts, max_tokens=4096, seed=0, pad_multiple=8)
    shapes = {
        (len(b), *((parts[b].max(0) + 7) // 8 * 8)) for b in sampler.batches()
    }  # what the collator allocates per batch
    assert len(shapes) > 50  # the epoch really varies
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(tiny_model(), backend=counting_backend)
    with torch.no_grad():
        for batch, *widths in sorted(shapes)[:: max(1, len(shapes) // 60)]:
            compiled(**inputs(tuple(widths), batch, padded=True))
    assert 1 <= len(graphs) <= RECOMPILE_BUDGET, f"{len(graphs)} graphs for {len(shapes)} batch shapes"
