"""Per-task data streams: endless, resumable, and with masks that depend on nothing but a seed.

A task's `prepare` (masking, negatives, modality dropout) runs inside the DataLoader workers with
a `torch.Generator` seeded from (seed, task index, epoch, GLOBAL batch index). The global index
of rank r's p-th batch is p·R + r (the sampler deals global batch g to rank g mod R), so:
- a resumed run prepares every batch exactly as the uninterrupted one did;
- R ranks with 1 micro-batch each see the same inputs as 1 rank accumulating R micro-batches;
- which worker prepares a batch, and how far workers prefetch, changes nothing.

Each DataLoader also gets its own `generator`: otherwise creating an iterator draws its worker
base seed from the global torch RNG, and dropout masks would depend on when epochs roll over.

Validation batches are the dataset order cut by the same token budget, dealt round-robin over
the ranks without padding (no utterance counted twice), with masks seeded by the global batch
index: the figure is the same for any number of ranks and on every validation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from uniter3m.data.sampler import TokenBucketBatchSampler
from uniter3m.errors import UserError

_VALIDATION_SALT = 0x5EED_0F_5A1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (different tuples give unrelated seeds)."""
    words = [int(p) % (1 << 64) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0]) >> 1


def share_workers(total: int, ratios: Sequence[float]) -> list[int]:
    """Each task's DataLoader workers out of one rank's `total` (`batching.num_workers`), in
    proportion to the tasks' mix ratios: whole shares first, the workers left over to the largest
    remainders (ties: the earlier task). A task whose share rounds to 0 prepares its batches in the
    main process. One loader per task with its own workers would otherwise start tasks x workers
    processes (8 objectives x 8 workers on 16 cores: 64 per rank)."""
    weights = np.asarray(ratios, dtype=np.float64)
    shares = total * weights / weights.sum()
    counts = np.floor(shares).astype(np.int64)
    for i in np.argsort(-(shares - counts), kind="stable")[: total - int(counts.sum())]:
        counts[i] += 1
    return counts.tolist()


class _Tagged(Dataset):
    """Dataset whose keys are (index, batch seed) pairs; returns (example, batch seed)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[dict[str, Any], int]:
        index, seed = key
        return self.dataset[index], seed


class _SeededBatches:
    """Wraps the token-bucket sampler: every index of a batch carries that batch's seed."""

    def __init__(self, sampler: TokenBucketBatchSampler, seed: int, task_index: int):
        self.sampler = sampler
        self.seed = seed
        self.task_index = task_index

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        s = self.sampler
        for batch in s:
            # inside the loop the sampler's epoch/position describe the batch just yielded
            global_index = (s.position - 1) * s.num_replicas + s.rank
            seed = mix_seed(self.seed, self.task_index, s.epoch, global_index)
            yield [(i, seed) for i in batch]

    def __len__(self) -> int:
        return len(self.sampler)


class PrepareBatch:
    """collate_fn: pad the examples, then let the task build its inputs with the batch's generator
    (and, with packing on, plan the packed rows from the inputs' final masks)."""

    def __init__(self, collator: Any, task: Any):
        self.collator = collator
        self.task = task
        self.packing = bool(getattr(collator, "packing", False))

    def __call__(self, items: Sequence[tuple[dict[str, Any], int]]) -> dict[str, Any]:
        examples = [example for example, _ in items]
        generator = torch.Generator().manual_seed(items[0][1])
        inputs = self.task.prepare(self.collator(examples), generator)
        if self.packing and isinstance(inputs.get("attention_mask"), torch.Tensor):
            from uniter3m.data.packing import joint_mask, pack_plan

            streams = self.task.stream_table.frame_streams()
            masks = [s.mask_key for s in streams if inputs.get(s.feat_key) is not None]
            inputs.update(
                pack_plan(joint_mask(inputs, masks), getattr(self.collator, "pad_multiple", 8) or 8)
            )
        return inputs


def _loader(
    dataset: Dataset, batches: Any, prepare: PrepareBatch, num_workers: int, seed: int, pin: bool, keep: bool
) -> DataLoader:
    return DataLoader(
        _Tagged(dataset),
        batch_sampler=batches,
        collate_fn=prepare,
        num_workers=num_workers,
        persistent_workers=keep and num_workers > 0,
        pin_memory=pin,
        generator=torch.Generator().manual_seed(seed),
    )


class TaskStream:
    """One task's endless stream of prepared batches over a JoinedDataset (resumable).

    `state_dict()` gives the sampler's position counting only the batches this stream has
    handed out (not those the workers prefetched), so a resume repeats none and skips none.
    """

    def __init__(
        self,
        task: Any,
        dataset: Any,
        collator: Any,
        *,
        task_index: int,
        seed: int,
        max_tokens: int,
        max_batch_size: int | None = None,
        pool_size: int = 8192,
        num_workers: int = 0,
        world_size: int = 1,
        rank: int = 0,
        pin_memory: bool = False,
    ):
        self.task = task
        pad_multiple = getattr(collator, "pad_multiple", 1)
        self.sampler = TokenBucketBatchSampler(
            getattr(dataset, "stream_lengths", dataset.lengths),
            max_tokens,
            shuffle=True,
            seed=mix_seed(seed, task_index) % (1 << 31),
            pool_size=pool_size,
            max_batch_size=max_batch_size,
            num_replicas=world_size,
            rank=rank,
            ids=getattr(dataset, "ids", None),
            budget_key="batching.max_tokens",
            pad_multiple=pad_multiple,
        )
        self.loader = _loader(
            dataset,
            _SeededBatches(self.sampler, seed, task_index),
            PrepareBatch(collator, task),
            num_workers,
            mix_seed(seed, task_index, rank, 1),
            pin_memory,
            keep=True,
        )
        self.consumed = 0
        self._iterator: Iterator[dict[str, Any]] | None = None

    def next(self, counted: bool = True) -> dict[str, Any]:
        """The next batch. `counted=False`: fetched ahead of its step, so a checkpoint taken before
        `count_handed_out()` still replays it (the loop's prefetch)."""
        empty_epochs = 0
        while True:
            if self._iterator is None:
                self._iterator = iter(self.loader)
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                empty_epochs += 1
                if empty_epochs > 1:  # two epochs in a row gave nothing: the sampler is empty
                    raise UserError(f"task {self.task.name}: its dataset yields no batches") from None
                continue
            self.consumed += int(counted)
            return batch

    def count_handed_out(self) -> None:
        """A batch fetched with `counted=False` is now used by a step."""
        self.consumed += 1

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict(consumed=self.consumed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self.sampler.load_state_dict(state)
        self.consumed = 0

    def close(self) -> None:
        """Stop this stream's workers (the next `next()` starts fresh ones)."""
        # with persistent workers the live iterator is also kept by the loader itself
        for it in (self._iterator, getattr(self.loader, "_iterator", None)):
            if it is not None and hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()
        self._iterator = None
        self.loader._iterator = None


def validation_loader(
    task: Any,
    dataset: Any,
    collator: Any,
    *,
    task_index: int,
    seed: int,
    max_tokens: int,
    max_batch_size: int | None = None,
    pool_size: int = 8192,
    num_workers: int = 0,
    world_size: int = 1,
    rank: int = 0,
    max_batches: int | None = None,
    pin_memory: bool = False,
    budget_key: str = "batching.val_max_tokens",
) -> DataLoader:
    """This rank's share of the fixed validation batches (see the module docstring)."""
    sampler = TokenBucketBatchSampler(
        getattr(dataset, "stream_lengths", dataset.lengths),
        max_tokens,
        budget_key=budget_key,
        pad_multiple=getattr(collator, "pad_multiple", 1),
        shuffle=False,
        pool_size=pool_size,
        max_batch_size=max_batch_size,
        ids=getattr(dataset, "ids", None),
    )
    every = sampler.global_batches(0)[:max_batches]
    mine = [
        [(i, mix_seed(seed, task_index, _VALIDATION_SALT, g)) for i in batch]
        for g, batch in enumerate(every)
        if g % world_size == rank
    ]
    return _loader(
        dataset,
        mine,
        PrepareBatch(collator, task),
        num_workers,
        mix_seed(seed, task_index, 2),
        pin_memory,
        keep=False,
    )
