"""`TokenBucketBatchSampler`: batches bounded by a padded token budget, seeded, resumable, sharded.

One epoch, identical on every rank (it depends only on seed, epoch and the lengths):
1. shuffle all item indices with a generator seeded by (seed, epoch) (no shuffle: keep the order);
2. cut them into pools of `pool_size` items and sort each pool by length, so a batch holds items
   of similar length (little padding) while the pools keep the epoch random;
3. pack each sorted pool greedily: a batch's cost is what the collator allocates for it, its size
   times the sum over streams of each stream's longest item (text, face, speech are padded
   separately, each to a multiple of `pad_multiple`), and it never exceeds `max_tokens` (nor
   `max_batch_size` items);
4. shuffle the order of the batches (so long batches do not all come together);
5. pad the global batch list by repeating batches from its start until its length divides
   `num_replicas`; rank r takes batches r, r + R, r + 2R, ... Every rank thus gets the SAME
   number of batches (collectives never hang); the few repeated batches hold items seen twice
   in that epoch, so evaluation code must de-duplicate by utterance id.

Position: `__iter__` yields the rest of the current epoch from the current position; when it
runs to the end the sampler moves to the next epoch (position 0), so `for batch in loader` in a
loop cycles through fresh epochs. `set_epoch(e)` with a new epoch restarts at position 0; with
the current epoch it keeps the position (so a resumed run may call it as usual).

Resuming: `state_dict()` holds epoch and position; `load_state_dict()` makes the next
`__iter__` yield exactly the remaining batches. A DataLoader with workers pulls batches from the
sampler ahead of the training loop; pass `consumed=` (batches the loop actually received since
the sampler was built or last loaded) and the state is moved back over those still in flight.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from uniter3m.errors import ConfigError, UserError


class TokenBucketBatchSampler(Sampler[list[int]]):
    """Yield lists of dataset indices whose padded cost fits `max_tokens`.

    Args:
        lengths: per-item lengths, either (N,) totals or (N, S) per stream (e.g.
            `JoinedDataset.stream_lengths`: text + 2, then each frame stream's frames); with per-stream
            lengths a batch costs size x sum of per-stream maxima, exactly what the collator pads to.
        max_tokens: the padded token budget of one batch (on one rank).
        shuffle: random epochs (training) or the dataset order with sorted pools (evaluation).
        seed: with the epoch, fixes every batch.
        pool_size: items sorted together; larger = less padding, less randomness.
        max_batch_size: optional cap on the items of one batch.
        num_replicas, rank: the data-parallel world size and this process's rank.
        ids: optional item names, used in error messages.
        pad_multiple: the collator rounds each stream's padded length up to a multiple of this.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        max_tokens: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        pool_size: int = 8192,
        max_batch_size: int | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        ids: Sequence[str] | None = None,
        budget_key: str = "max_tokens",
        pad_multiple: int = 1,
    ):
        self.budget_key = budget_key  # the config key of the budget, named in errors
        parts = np.asarray(lengths, dtype=np.int64)
        self.parts = parts[:, None] if parts.ndim == 1 else parts
        self.pad_multiple = int(pad_multiple)
        if self.pad_multiple < 1:
            raise ConfigError(f"pad_multiple={pad_multiple!r} must be an integer >= 1")
        self.lengths = self.parts.sum(axis=1) if parts.ndim == 2 and len(parts) else parts
        if self.lengths.ndim != 1 or len(self.lengths) == 0:
            raise UserError(
                f"the batch sampler needs a non-empty 1-d list of item lengths (got shape {self.lengths.shape}): "
                "check that the dataset is not empty (the ids of the split or fold, and the data's `missing` rule)"
            )
        if (self.lengths < 0).any():
            raise UserError(
                f"item {int(np.argmin(self.lengths))} has a negative length {int(self.lengths.min())}"
            )
        for name, value, low in (
            ("max_tokens", max_tokens, 1),
            ("pool_size", pool_size, 1),
            ("num_replicas", num_replicas, 1),
            ("rank", rank, 0),
        ):
            if not isinstance(value, (int, np.integer)) or value < low:
                raise ConfigError(f"{name}={value!r} must be an integer >= {low}")
        if max_batch_size is not None and (
            not isinstance(max_batch_size, (int, np.integer)) or max_batch_size < 1
        ):
            raise ConfigError(f"max_batch_size={max_batch_size!r} must be an integer >= 1 or None")
        if rank >= num_replicas:
            raise ConfigError(f"rank={rank} must be smaller than num_replicas={num_replicas}")
        if ids is not None and len(ids) != len(self.lengths):
            raise ConfigError(f"ids has {len(ids)} names for {len(self.lengths)} lengths")
        self.max_tokens = int(max_tokens)
        self._check_budget(ids)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.pool_size = int(pool_size)
        self.max_batch_size = None if max_batch_size is None else int(max_batch_size)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        self.position = 0
        self._yielded = 0  # batches handed out since construction or the last load_state_dict
        self._cache: tuple[int, list[list[int]]] | None = None

    def _padded(self, widths: np.ndarray) -> int:
        """Positions one row holds for these per-stream widths (each rounded up to pad_multiple)."""
        m = self.pad_multiple
        return int(((np.maximum(widths, 0) + m - 1) // m * m).sum())

    def _check_budget(self, ids: Sequence[str] | None) -> None:
        m = self.pad_multiple
        single = ((self.parts + m - 1) // m * m).sum(axis=1)
        over = np.flatnonzero(single > self.max_tokens)
        if len(over) == 0:
            return
        worst = int(over[np.argmax(single[over])])
        name = f"id {ids[worst]!r}" if ids is not None else f"index {worst}"
        raise UserError(
            f"{len(over)} items do not fit in one batch of {self.budget_key}={self.max_tokens}: the longest is {name} "
            f"with {int(single[worst])} padded tokens+frames; raise {self.budget_key} to at least "
            f"{int(single[worst])} or "
            "lower max_txt_len / max_frames"
        )

    # ----------------------------------------------------------------- batches
    def _pack(self, pool: np.ndarray) -> list[list[int]]:
        """Greedy packing of a pool sorted by ascending total length.

        The cost of adding an item is computed per stream (each stream pads to its own longest),
        so a batch never allocates more than `max_tokens` positions."""
        batches: list[list[int]] = []
        cur: list[int] = []
        widths = np.zeros(self.parts.shape[1], dtype=np.int64)
        cap = self.max_batch_size or len(pool)
        for idx in pool.tolist():
            grown = np.maximum(widths, self.parts[idx])
            if cur and ((len(cur) + 1) * max(self._padded(grown), 1) > self.max_tokens or len(cur) >= cap):
                batches.append(cur)
                cur = []
                grown = self.parts[idx].copy()
            cur.append(idx)
            widths = grown
        if cur:
            batches.append(cur)
        return batches

    def global_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of `epoch`, padded to a multiple of num_replicas (rank r takes r::R)."""
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.lengths)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        batches: list[list[int]] = []
        for start in range(0, n, self.pool_size):
            pool = order[start : start + self.pool_size]
            batches += self._pack(pool[np.argsort(self.lengths[pool], kind="stable")])
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        pad = -len(batches) % self.num_replicas
        return batches + [batches[i % len(batches)] for i in range(pad)]

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's batches of `epoch` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self.global_batches(epoch)[self.rank :: self.num_replicas])
        return self._cache[1]

    def __len__(self) -> int:
        """Batches of the current epoch on this rank (the whole epoch, not only what remains)."""
        return len(self.batches())

    @property
    def remaining(self) -> int:
        """Batches the next `__iter__` will yield."""
        return len(self) - self.position

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches()
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            self._yielded += 1
            yield list(batch)
        self.epoch += 1
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` at position 0; the current epoch keeps its (possibly resumed) position."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.position = 0

    # ------------------------------------------------------------------ resume
    def _fingerprint(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "num_replicas": self.num_replicas,
            "max_tokens": self.max_tokens,
            "pool_size": self.pool_size,
            "max_batch_size": self.max_batch_size,
            "shuffle": self.shuffle,
            "n_items": len(self.lengths),
            "lengths_crc32": zlib.crc32(self.parts.tobytes()),
            "pad_multiple": self.pad_multiple,
        }

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """Epoch and position to resume from.

        consumed: batches the training loop received since this sampler was built or last
            loaded; batches the sampler yielded beyond that (prefetched by DataLoader workers)
            are given back, so resuming repeats none and skips none. Default: all yielded.
        """
        epoch, position = self.epoch, self.position
        if consumed is not None:
            back = self._yielded - int(consumed)
            if back < 0:
                raise UserError(
                    f"consumed={consumed} but the sampler has yielded only {self._yielded} batches since it was "
                    "built or loaded: count the batches the loop took from this sampler's loader"
                )
            while back > position:
                back -= position
                epoch -= 1
                position = len(self.batches(epoch))
            position -= back
        return {"epoch": epoch, "position": position, **self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next `__iter__` yields exactly the batches after `state['position']`."""
        saved = {k: state.get(k) for k in self._fingerprint()}
        if saved != self._fingerprint():
            diff = {k: (saved[k], v) for k, v in self._fingerprint().items() if saved[k] != v}
            raise ConfigError(
                "cannot resume the batch sampler exactly: its settings differ from the saved ones "
                f"(key: (saved, now)) {diff}; resume with the same data, world size and batching settings"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        if not 0 <= self.position <= len(self.batches()):
            raise ConfigError(
                f"saved position {self.position} is outside epoch {self.epoch} ({len(self)} batches)"
            )
        self._yielded = 0
