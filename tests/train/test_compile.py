"""The backbone compiles whole (no graph break) and an epoch of real lengths stays within a small
recompile budget (shapes turn dynamic after the first: no padding to a multiple is needed), as does
each objective's training step in the full mix.

Dynamo is run with its "eager" backend: graph breaks and recompiles are decided by tracing, not by
the code generator, so this checks on CPU in seconds what the GPU step will see.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import torch._dynamo

from tests.support.runs import FULL_MIX
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


@pytest.mark.parametrize("padded", [True, False, None])
def test_the_backbone_has_no_graph_break(padded):
    """The collator's flag (True/False) and a plain call that does not give it (None, how a
    transformers user calls the model): while compiling, the all-True check is skipped, not asked."""
    explained = torch._dynamo.explain(tiny_model())(
        **dict(inputs((16, 8, 24), 3, bool(padded)), padded=padded)
    )
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]


def test_a_plain_compiled_call_equals_the_eager_one():
    model, x = tiny_model(), inputs((16, 8, 24), 3, False)
    del x["padded"]
    with torch.no_grad():
        eager = model(**x).last_hidden_state
        compiled = torch.compile(model, backend="eager")(**x).last_hidden_state
    assert torch.allclose(eager, compiled, atol=1e-5)


def test_an_epoch_of_real_lengths_stays_within_the_recompile_budget(shared_data):
    rows = list(
        csv.DictReader((shared_data / "meld" / "train_sent_emo.csv").open(encoding="utf-8", errors="replace"))
    )
    rng = np.random.default_rng(0)
    text = np.array([min(len(r["Utterance"].split()) * 13 // 10, 60) + 2 for r in rows])
    parts = np.stack([text, rng.integers(1, 64, len(rows)), rng.integers(4, 200, len(rows))], axis=1)
    sampler = TokenBucketBatchSampler(parts, max_tokens=4096, seed=0)
    shapes = {(len(b), *parts[b].max(0)) for b in sampler.batches()}  # what the collator allocates per batch
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


GRAPHS_PER_OBJECTIVE = 6  # Dynamo's recompile limit is 8 per compiled step
STEPS_PER_OBJECTIVE, MAX_TOKENS = 6, 1536  # 6: every objective is drawn (seed 5)


@pytest.fixture(scope="module")
def meld_like_dbs(tmp_path_factory, tokenizer_dir):
    """A synthetic corpus with MELD-like lengths: log-normal durations (median 3 s), 2-40 words,
    1-64 face and 4-64 speech frames, some utterances without a face."""
    import math

    from uniter3m.data.synthetic import SyntheticSpec, generate_corpus
    from uniter3m.train.demo import build_corpus_dbs

    root = tmp_path_factory.mktemp("meld_like")
    spec = SyntheticSpec(
        n_utterances=150,
        face_dim=6,
        speech_dim=8,
        carrier_words=(2, 40),
        face_frames=(1, 64),
        speech_frames=(4, 64),
        duration_lognormal=(math.log(3.0), 0.6),
        seed=11,
    )
    corpus = generate_corpus(root / "corpus", spec)
    texts = {f"txt_{split}": (corpus.transcripts[split], "emotion") for split in ("train", "valid")}
    return build_corpus_dbs(corpus, root, tokenizer_dir, texts)


def test_each_objective_compiles_a_bounded_number_of_graphs(meld_like_dbs, tmp_path):
    """The full mix of 12 objectives, compiled (`compile_backend: eager`: Dynamo's tracing, no code
    generation), over MELD-like lengths: each objective has its own compiled step and cache, its
    shapes turn dynamic after the first, and it stays under the recompile limit (hitting it fails
    the run instead of running that objective eager). Dynamo's tracing is what costs (about 2.5 s of
    CPU a graph, 2-3 graphs an objective), not the steps, so the run is as short as still shows the
    bound: 6 steps an objective of batches whose widths, sizes and modality sets vary from step to step
    (the capped speech width included: a third graph when it first falls below 64)."""
    from collections import Counter

    from torch._dynamo.utils import clear_compilation_metrics, get_compilation_metrics

    from tests.support.runs import pretrain_config
    from uniter3m.train.pretrain import run_pretrain

    cfg = pretrain_config(
        meld_like_dbs,
        tmp_path / "run",
        steps=len(FULL_MIX) * STEPS_PER_OBJECTIVE,
        log_every=50,
        compile=True,
        compile_backend="eager",
        val_max_batches=1,
    )
    cfg["model"]["overrides"].update(
        max_position_embeddings=128, face={"max_frames": 64}, speech={"max_frames": 64}
    )
    cfg["datasets"]["syn"].update(max_txt_len=60, max_frames=64)
    cfg["batching"].update(max_tokens=MAX_TOKENS, pool_size=256)
    cfg["tasks"] = [{"name": n, "dataset": "syn", "ratio": 1.0, "options": o} for n, o in FULL_MIX]
    torch._dynamo.reset()
    clear_compilation_metrics()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        run_pretrain(cfg)
    metrics = get_compilation_metrics()
    compiles = Counter(m.co_name for m in metrics)
    assert set(compiles) == {f"step_{n}" for n, _ in FULL_MIX}, compiles  # each its own; no graph break
    assert all(1 <= n <= GRAPHS_PER_OBJECTIVE for n in compiles.values()), compiles
    recompiles = [m for m in metrics if m.cache_size > 0]
    assert len(recompiles) >= len(FULL_MIX) // 2  # the shapes did vary within objectives...
    assert all(m.shape_env_guard_count for m in recompiles)  # ...and the later graphs have symbolic sizes
    print(f"graphs per objective: {dict(compiles)}; {sum(compiles.values())} graphs in all")
