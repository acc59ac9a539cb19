"""Masking statistics and invariants of uniter3m.tasks.masking and the tasks' prepare() step."""

from __future__ import annotations

import random

import pytest
import torch

from uniter3m.errors import ConfigError
from uniter3m.tasks.base import TaskContext, build_task
from uniter3m.tasks.fom import shuffle_frames
from uniter3m.tasks.masking import (
    ACTION_KEEP,
    ACTION_MASK,
    ACTION_RANDOM,
    ReplaceRates,
    SpanSpec,
    choose_frames,
    choose_span_units,
    corrupt_frames,
    span_starts,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def synthetic_text(special, batch: int, max_words: int, seed: int = 0, emo_rate: float = 0.2):
    """Random [CLS] w.. [SEP] pad.. rows; words of 1-3 pieces, random emotion words, varied lengths."""
    rng = random.Random(seed)
    rows = []
    for _ in range(batch):
        ids, wid, emo = [special.cls_id], [-1], [False]
        for w in range(rng.randint(1, max_words)):
            is_emo = rng.random() < emo_rate
            for _ in range(rng.randint(1, 3)):
                ids.append(rng.randint(1000, 29000))
                wid.append(w)
                emo.append(is_emo)
        rows.append((ids + [special.sep_id], wid + [-1], emo + [False]))
    length = max(len(r[0]) for r in rows)

    def pad(values, fill):
        return [v + [fill] * (length - len(v)) for v in values]

    return {
        "ids": [f"u{i}" for i in range(batch)],
        "input_ids": torch.tensor(pad([r[0] for r in rows], special.pad_id)),
        "txt_mask": torch.tensor(pad([[True] * len(r[0]) for r in rows], False)),
        "word_ids": torch.tensor(pad([r[1] for r in rows], -1)),
        "emo_flags": torch.tensor(pad([r[2] for r in rows], False)),
        "labels": {},
    }


def per_unit(values: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` per (sample, unit id); units < 0 are ignored."""
    size = int(units.max()) + 1
    out = torch.zeros(units.shape[0], size, dtype=torch.long)
    return out.scatter_add_(1, units.clamp(min=0), (values & (units >= 0)).long())


@pytest.fixture(scope="module")
def context(special):
    return TaskContext(special)


def test_mlm_rates_80_10_10_and_specials_never_masked(context, special):
    batch = synthetic_text(special, 3000, 40, seed=1)
    inputs = build_task("mlm", context).prepare(batch, gen(1))
    targets = inputs["mlm_targets"]
    is_target = targets >= 0
    real = batch["txt_mask"] & (batch["input_ids"] != special.cls_id) & (batch["input_ids"] != special.sep_id)
    assert not (is_target & ~real).any(), "[CLS], [SEP] or padding became a target"
    assert torch.equal(targets[is_target], batch["input_ids"][is_target]), "targets are the original ids"
    rate = is_target.sum() / real.sum()
    assert abs(rate - 0.15) < 0.01
    masked = inputs["input_ids"][is_target]
    original = batch["input_ids"][is_target]
    frac_mask = (masked == special.mask_id).float().mean()
    frac_keep = (masked == original).float().mean()
    frac_random = 1 - frac_mask - frac_keep
    assert abs(frac_mask - 0.8) < 0.02 and abs(frac_keep - 0.1) < 0.015 and abs(frac_random - 0.1) < 0.015
    # non-targets are untouched, random replacements never produce special ids
    assert torch.equal(inputs["input_ids"][~is_target], batch["input_ids"][~is_target])
    assert not torch.isin(masked[masked != special.mask_id], torch.tensor(sorted(special.ids))).any()
    # every sample with a real token has at least one target
    assert is_target.any(1).all()


def test_wwm_masks_whole_words_with_one_action(context, special):
    batch = synthetic_text(special, 1500, 30, seed=2)
    inputs = build_task("wwm", context).prepare(batch, gen(2))
    words = batch["word_ids"]
    pieces = per_unit(torch.ones_like(words, dtype=torch.bool), words)
    hits = per_unit(inputs["mlm_targets"] >= 0, words)
    masks = per_unit(inputs["input_ids"] == special.mask_id, words)
    exists = pieces > 0
    assert ((hits == 0) | (hits == pieces)).all(), "a word was partly masked"
    assert ((masks == 0) | (masks == pieces)).all(), "pieces of a word got different actions"
    rate = (exists & (hits > 0)).sum() / exists.sum()
    assert abs(rate - 0.15) < 0.015


@pytest.mark.parametrize("name", ["melm", "melm_wwm"])
def test_melm_rates(context, special, name):
    batch = synthetic_text(special, 3000, 30, seed=3, emo_rate=0.1)
    inputs = build_task(name, context).prepare(batch, gen(3))
    targets = inputs["mlm_targets"] >= 0
    real = batch["word_ids"] >= 0
    if name == "melm_wwm":
        units = batch["word_ids"]
    else:
        units = torch.where(
            real, torch.arange(real.shape[1]).expand_as(real), torch.full_like(real, -1, dtype=torch.long)
        )
    exists = per_unit(real, units) > 0
    emo = per_unit(batch["emo_flags"], units) > 0
    chosen = per_unit(targets, units) > 0
    n, e = exists.sum(1).float(), (exists & emo).sum(1).float()
    emo_rate = (chosen & emo).sum() / (exists & emo).sum()
    assert abs(emo_rate - 0.5) < 0.03
    # long samples only: in short ones the at-least-one rule visibly adds to the other words
    long = (n > e) & (n >= 12)
    other_hits = (chosen & exists & ~emo).sum(1)[long].sum()
    other_expected = (0.15 * n - 0.5 * e).clamp(min=0)[long].sum()
    assert abs(other_hits / other_expected - 1.0) < 0.06
    assert abs((chosen & exists).sum() / exists.sum() - 0.15) < 0.02


def test_melm_every_word_emotional_and_empty_text(context, special):
    batch = synthetic_text(special, 200, 4, seed=4, emo_rate=1.0)
    inputs = build_task("melm_wwm", context).prepare(batch, gen(4))
    targets = inputs["mlm_targets"] >= 0
    assert targets.any(1).all()
    assert not torch.isnan(inputs["input_ids"].float()).any()
    # a text that is only [CLS] [SEP] has no targets and no error
    bare = synthetic_text(special, 2, 1, seed=5)
    bare["input_ids"] = torch.tensor([[special.cls_id, special.sep_id]] * 2)
    bare["txt_mask"] = torch.ones(2, 2, dtype=torch.bool)
    bare["word_ids"] = torch.full((2, 2), -1)
    bare["emo_flags"] = torch.zeros(2, 2, dtype=torch.bool)
    out = build_task("melm", context).prepare(bare, gen(0))
    assert not (out["mlm_targets"] >= 0).any()


def test_prepare_is_deterministic_for_a_generator(context, special):
    batch = synthetic_text(special, 16, 20, seed=6)
    task = build_task("melm_wwm", context)
    a, b = task.prepare(batch, gen(7)), task.prepare(batch, gen(7))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["mlm_targets"], b["mlm_targets"])
    c = task.prepare(batch, gen(8))
    assert not torch.equal(a["mlm_targets"], c["mlm_targets"])


def frame_batch(lengths, dim=4, seed=0):
    g = gen(seed)
    length = max(max(lengths), 1)
    feat = torch.zeros(len(lengths), length, dim)
    real = torch.zeros(len(lengths), length, dtype=torch.bool)
    for b, n in enumerate(lengths):
        feat[b, :n] = torch.randn(n, dim, generator=g) + 5  # padding stays 0, real frames never are
        real[b, :n] = True
    return feat, real


def test_independent_frames_rate_and_at_least_one():
    feat, real = frame_batch([100] * 200 + [1, 3, 0])
    units = choose_frames(real, 0.15, gen(0))
    chosen = units >= 0
    assert not (chosen & ~real).any()
    assert abs(chosen[:200].float().mean() - 0.15) < 0.01
    assert chosen[200:202].any(1).all() and not chosen[202].any()


def test_spans_contiguous_non_overlapping_and_rates():
    lengths = [120] * 300
    feat, real = frame_batch(lengths, seed=1)
    units = choose_span_units(real, 0.15, SpanSpec((6,)), gen(1))
    chosen = units >= 0
    assert abs(chosen.float().mean() - 0.15) < 0.01
    for b in range(0, 300, 7):
        for k in units[b][units[b] >= 0].unique().tolist():
            pos = torch.nonzero(units[b] == k).flatten()
            assert len(pos) == 6 and torch.equal(pos, torch.arange(pos[0], pos[0] + 6)), "span not contiguous"
    # the last frame (and the first) can be covered
    assert chosen[:, -1].any() and chosen[:, 0].any()
    masking = corrupt_frames(feat, real, units, ReplaceRates(), gen(2))
    span_actions = []
    for b in range(300):
        for k in units[b][units[b] >= 0].unique().tolist():
            acts = masking.actions[b][units[b] == k]
            assert (acts == acts[0]).all(), "frames of one span got different actions"
            span_actions.append(int(acts[0]))
    acts = torch.tensor(span_actions)
    for action, rate in ((ACTION_MASK, 0.8), (ACTION_RANDOM, 0.1), (ACTION_KEEP, 0.1)):
        assert abs((acts == action).float().mean() - rate) < 0.03
    # mask action -> model frame mask; random -> a real frame; keep -> unchanged
    assert torch.equal(masking.frame_mask, masking.actions == ACTION_MASK)
    kept = masking.actions == ACTION_KEEP
    assert torch.equal(masking.feat[kept], feat[kept])
    replaced = masking.actions == ACTION_RANDOM
    assert (masking.feat[replaced].abs().sum(-1) > 0).all()
    untouched = ~masking.targets
    assert torch.equal(masking.feat[untouched], feat[untouched])


def test_short_and_empty_clips():
    for length in (1, 2, 5):
        starts, span = span_starts(length, 10, 0.15, gen(length))
        assert len(starts) == 1 and 1 <= span <= length and starts[0] + span <= length
    assert span_starts(0, 10, 0.15, gen(0)) == ([], 0)
    feat, real = frame_batch([0, 0], seed=2)
    units = choose_span_units(real, 0.15, SpanSpec((5,)), gen(0))
    assert not (units >= 0).any()
    masking = corrupt_frames(feat, real, units, ReplaceRates(), gen(0))
    assert not masking.targets.any()


def test_every_position_coverable_by_spans():
    covered = torch.zeros(23, dtype=torch.bool)
    g = gen(3)
    for _ in range(200):
        starts, span = span_starts(23, 4, 0.15, g)
        for s in starts:
            covered[s : s + span] = True
    assert covered.all()


def test_shuffle_frames_moves_every_chosen_frame():
    feat, real = frame_batch([40, 2, 1, 0, 17], dim=3, seed=4)
    shuffled, targets = shuffle_frames(feat, real, 0.15, gen(5))
    for b, n in enumerate([40, 2, 1, 0, 17]):
        slots = torch.nonzero(targets[b] >= 0).flatten()
        if n < 2:
            assert len(slots) == 0
            continue
        assert len(slots) >= 2
        origin = targets[b, slots]
        assert sorted(origin.tolist()) == sorted(slots.tolist()), (
            "shuffle is a permutation of the chosen slots"
        )
        assert (origin != slots).all(), "a shuffled frame stayed in place"
        assert torch.equal(shuffled[b, slots], feat[b, origin])
        rest = torch.ones(feat.shape[1], dtype=torch.bool)
        rest[slots] = False
        assert torch.equal(shuffled[b, rest], feat[b, rest])


def test_bad_rates_are_config_errors(context):
    with pytest.raises(ConfigError, match="sum to 1"):
        ReplaceRates(0.8, 0.1, 0.2)
    with pytest.raises(ConfigError, match="mask_prob"):
        build_task("mlm", context, mask_prob=0)
    with pytest.raises(ConfigError, match="span"):
        build_task("face_mrfr", context, span=0)
