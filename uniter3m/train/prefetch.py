"""Moving batches to the device, and fetching the next one while the current step computes.

With prefetch on, the loop asks for the next micro-batch right after the current backward is
queued (the next step's task is a function of (seed, step), so it is known): on CUDA the batch
is copied on a side stream, overlapping the step in flight, and the main stream waits on an event
before using it. The task's stream does not count a batch fetched ahead until the loop takes it
(`TaskStream.next(counted=False)`, then `count_handed_out()`), so a checkpoint written in between
records the position before it and a resumed run replays it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from uniter3m.train.loaders import TaskStream


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor in nested dicts/lists/tuples to `device` (other values unchanged)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def record_stream(obj: Any, stream: torch.cuda.Stream) -> None:
    """Tell the CUDA allocator that every tensor in `obj` (nested) is used on `stream`."""
    if isinstance(obj, torch.Tensor):
        if obj.is_cuda:
            obj.record_stream(stream)
    elif isinstance(obj, dict):
        for value in obj.values():
            record_stream(value, stream)
    elif isinstance(obj, list | tuple):
        for value in obj:
            record_stream(value, stream)


def positions_of(inputs: Mapping[str, Any]) -> int:
    """Real (unpadded) sequence positions of a CPU batch: text tokens (`attention_mask`) + every frame
    stream's frames (a `<s>_mask` beside its `<s>_feat`). Counted with numpy, before the batch moves
    to the device, so it never waits on it."""
    total = 0
    for key, mask in inputs.items():
        frames = key.endswith("_mask") and f"{key[: -len('_mask')]}_feat" in inputs
        if (key == "attention_mask" or frames) and isinstance(mask, torch.Tensor):
            total += int(mask.numpy().sum())
    return total


def batch_size_of(inputs: Mapping[str, Any]) -> int:
    ids = inputs.get("ids")
    if ids is not None:
        return len(ids)
    return int(inputs["input_ids"].shape[0])


@dataclass
class DeviceBatch:
    """A task's micro-batch on (or on its way to) the device, with what the logs count of it."""

    key: str
    inputs: dict[str, Any]
    samples: int
    positions: int
    copied: torch.cuda.Event | None = None  # recorded on the side stream after the copy


class Prefetcher:
    """Hands the loop its micro-batches on the device; holds at most one fetched ahead."""

    def __init__(self, device: torch.device):
        self.device = device
        self._ahead: DeviceBatch | None = None
        self._copy_stream: torch.cuda.Stream | None = None  # made when first needed

    def _fetch(self, key: str, stream: TaskStream, counted: bool) -> DeviceBatch:
        """The next batch of `stream`; one fetched ahead (not counted) is copied on the side stream."""
        inputs = stream.next(counted=counted)
        size, positions = batch_size_of(inputs), positions_of(inputs)
        side = None if counted else self._copy_stream
        if side is None:
            return DeviceBatch(key, to_device(inputs, self.device), size, positions)
        with torch.cuda.stream(side):
            moved = to_device(inputs, self.device)
            copied = torch.cuda.Event()
            copied.record(side)
        return DeviceBatch(key, moved, size, positions, copied)

    def fetch_ahead(self, key: str, stream: TaskStream) -> None:
        """Fetch task `key`'s next batch before its step and start the copy (on CUDA on a side
        stream, overlapping the step in flight). Its stream counts it only when `take` hands it out."""
        if self._ahead is not None:
            return
        if self.device.type == "cuda" and self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        self._ahead = self._fetch(key, stream, counted=False)

    def take(self, key: str, stream: TaskStream) -> DeviceBatch:
        """The batch fetched ahead for task `key` (now counted), or a fresh one."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return self._fetch(key, stream, counted=True)
        if ahead.key != key:  # cannot happen: the next task is a function of (seed, step)
            raise RuntimeError(f"prefetched a batch of {ahead.key} for a step of {key}")
        stream.count_handed_out()
        if ahead.copied is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ahead.copied)
            record_stream(ahead.inputs, current)  # memory made on the side stream is used on this one
        return ahead

    def drop(self) -> None:
        """Forget a batch fetched ahead (its stream never counted it: a resume replays it)."""
        self._ahead = None
