"""TokenBucketBatchSampler: budget, determinism, resume, sharding."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from uniter3m.data.sampler import TokenBucketBatchSampler
from uniter3m.errors import ConfigError, UserError


@pytest.fixture
def lengths():
    rng = np.random.default_rng(0)
    return rng.integers(0, 120, size=1000)


def cost(batch, lengths):
    return len(batch) * max(int(lengths[i]) for i in batch)


def test_budget_holds_and_each_item_appears_once(lengths):
    s = TokenBucketBatchSampler(lengths, max_tokens=600, pool_size=200, seed=1)
    batches = list(s)
    assert batches and all(batch for batch in batches)
    assert max(cost(b, lengths) for b in batches) <= 600
    flat = sorted(itertools.chain.from_iterable(batches))
    assert flat == list(range(len(lengths)))
    # bucketing: padding stays small against the unsorted packing of the same budget
    padded = sum(cost(b, lengths) for b in batches)
    assert padded < 1.3 * lengths.sum()
    capped = list(TokenBucketBatchSampler(lengths, max_tokens=600, max_batch_size=4))
    assert max(len(b) for b in capped) == 4


def test_same_seed_and_epoch_give_same_batches(lengths):
    a = TokenBucketBatchSampler(lengths, max_tokens=500, seed=3)
    b = TokenBucketBatchSampler(lengths, max_tokens=500, seed=3)
    first = list(a)
    assert first == list(b)
    assert a.epoch == 1 and a.position == 0  # a full pass moves to the next epoch
    assert list(a) != first  # epoch 1 differs
    b.set_epoch(1)
    assert list(b) == list(TokenBucketBatchSampler(lengths, max_tokens=500, seed=3).batches(1))
    assert list(TokenBucketBatchSampler(lengths, max_tokens=500, seed=4)) != first
    ordered = TokenBucketBatchSampler(lengths, max_tokens=500, shuffle=False)
    assert list(ordered) == list(TokenBucketBatchSampler(lengths, max_tokens=500, shuffle=False, seed=9))


def test_resume_yields_exactly_the_remaining_batches(lengths):
    s = TokenBucketBatchSampler(lengths, max_tokens=400, seed=5)
    s.set_epoch(2)
    full = s.batches()
    it = iter(s)
    taken = [next(it) for _ in range(7)]
    state = s.state_dict()
    assert state["epoch"] == 2 and state["position"] == 7
    resumed = TokenBucketBatchSampler(lengths, max_tokens=400, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the usual loop call keeps the resumed position
    assert resumed.remaining == len(full) - 7
    assert taken + list(resumed) == full
    assert resumed.epoch == 3


def test_resume_gives_back_prefetched_batches_across_an_epoch_boundary(lengths):
    s = TokenBucketBatchSampler(lengths, max_tokens=400, seed=5)
    n0 = len(s)
    stream = itertools.chain(iter(s), iter(s))  # epoch 0 then epoch 1, as a cycling loader would
    pulled = [next(stream) for _ in range(n0 + 3)]  # a prefetching loader pulled 3 of epoch 1 ...
    consumed = n0 - 2  # ... while the loop has used all but 2 of epoch 0
    state = s.state_dict(consumed=consumed)
    assert (state["epoch"], state["position"]) == (0, n0 - 2)
    resumed = TokenBucketBatchSampler(lengths, max_tokens=400, seed=5)
    resumed.load_state_dict(state)
    assert list(resumed) == pulled[consumed:n0]
    state = s.state_dict(consumed=n0 + 1)  # the loop is one batch into epoch 1
    assert (state["epoch"], state["position"]) == (1, 1)
    resumed.load_state_dict(state)
    assert list(resumed)[:2] == pulled[n0 + 1 : n0 + 3]
    with pytest.raises(UserError, match="yielded only"):
        s.state_dict(consumed=10**6)


def test_load_refuses_other_settings(lengths):
    state = TokenBucketBatchSampler(lengths, max_tokens=400).state_dict()
    with pytest.raises(ConfigError, match="num_replicas"):
        TokenBucketBatchSampler(lengths, max_tokens=400, num_replicas=2).load_state_dict(state)
    with pytest.raises(ConfigError, match="lengths_crc32"):
        TokenBucketBatchSampler(lengths[::-1].copy(), max_tokens=400).load_state_dict(state)


@pytest.mark.parametrize("replicas", [2, 3, 7])
def test_ranks_get_equal_batch_counts_and_cover_all_items(lengths, replicas):
    ranks = [
        TokenBucketBatchSampler(lengths, max_tokens=700, seed=2, num_replicas=replicas, rank=r)
        for r in range(replicas)
    ]
    per_rank = [list(s) for s in ranks]
    assert len({len(b) for b in per_rank}) == 1 and len(ranks[0]) == len(per_rank[0])
    glob = ranks[0].global_batches(0)
    assert len(glob) % replicas == 0
    for r, batches in enumerate(per_rank):
        assert batches == glob[r::replicas]
    covered = set(itertools.chain.from_iterable(itertools.chain.from_iterable(per_rank)))
    assert covered == set(range(len(lengths)))


def test_more_ranks_than_batches_repeat_batches(lengths):
    short = lengths[:3]
    ranks = [TokenBucketBatchSampler(short, max_tokens=10_000, num_replicas=4, rank=r) for r in range(4)]
    assert [len(s) for s in ranks] == [1, 1, 1, 1]


def test_budget_smaller_than_one_sample_raises_naming_it():
    with pytest.raises(
        UserError, match=r"id 'long' with 90 padded tokens\+frames; raise max_tokens to at least 90"
    ):
        TokenBucketBatchSampler([10, 90, 20], max_tokens=50, ids=["a", "long", "c"])
    with pytest.raises(UserError, match="index 1 with 90"):
        TokenBucketBatchSampler([10, 90, 20], max_tokens=50)
    with pytest.raises(UserError, match="non-empty"):
        TokenBucketBatchSampler([], max_tokens=50)
    with pytest.raises(ConfigError, match="rank=2 must be smaller"):
        TokenBucketBatchSampler([1], max_tokens=5, num_replicas=2, rank=2)


@pytest.mark.parametrize("pad_multiple", [1, 8])
def test_cost_equals_what_the_collator_allocates_and_never_exceeds_the_budget(shared_data, pad_multiple):
    """Per-stream lengths (MELD train token counts + face/speech frame counts): every batch's padded
    allocation, text and each frame stream padded to its own longest, stays within max_tokens."""
    import csv

    rows = list(
        csv.DictReader((shared_data / "meld" / "train_sent_emo.csv").open(encoding="utf-8", errors="replace"))
    )
    rng = np.random.default_rng(0)
    text = np.array([len(r["Utterance"].split()) * 13 // 10 + 2 for r in rows])  # ~ word pieces + [CLS]/[SEP]
    face = rng.integers(0, 64, len(rows))
    speech = rng.integers(4, 300, len(rows))
    parts = np.stack([text, face, speech], axis=1)
    sampler = TokenBucketBatchSampler(parts, max_tokens=4096, seed=1, pad_multiple=pad_multiple)
    m = pad_multiple
    allocated = [len(b) * int(((parts[b].max(0) + m - 1) // m * m).sum()) for b in sampler.batches()]
    assert max(allocated) <= 4096
    assert sorted(i for b in sampler.batches() for i in b) == list(range(len(rows)))
    # the old cost (size x longest total) underestimated: here it is checked to be a lower bound
    old = [len(b) * int(parts[b].sum(1).max()) for b in sampler.batches()]
    assert all(o <= a for o, a in zip(old, allocated, strict=True))
    assert np.mean(allocated) > 0.8 * 4096 * 0.5  # batches are still filled, not tiny
