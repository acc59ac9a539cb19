"""The one rule for optimiser steps whose loss or gradient norm is not finite.

Such a step is skipped (no weight, moment or step-count change; the scheduler still advances,
since the step counter is the schedule's clock) and counted; `max_nonfinite_in_a_row` skipped
steps in a row stop the run with an error naming the step and the task. Both step paths feed the
same counters and print the same line: the host path reports every step as it ends; the sync-free
path keeps its counts on the device (`count_on_device`) and reports them when the host reads
them (`settle`: at log steps and checkpoints), the longest streak in between included, so no run
of skips escapes the limit. fp16's GradScaler skipping an overflowed step is loss scaling at work,
not a non-finite step: the caller does not count it.
"""

from __future__ import annotations

import sys

import torch

from uniter3m.errors import UserError


class NonfiniteSteps:
    """Counters of skipped steps (in this run, in a row now) and the limit that stops the run."""

    def __init__(self, limit: int, report: bool):
        self.limit = limit
        self.report = report  # print the skip lines (the main rank)
        self.skipped = 0
        self.in_a_row = 0
        self._task = "?"  # the task of the last step counted on the device
        # on the device: [skipped since the last settle, in a row now, longest run since the last settle]
        self._device: torch.Tensor | None = None

    def count(self, bad: bool, step: int, task: str) -> None:
        """The host path: step `step` (of task `task`) ended, skipped when `bad`."""
        self._apply(int(bad), self.in_a_row + 1 if bad else 0, self.in_a_row + 1 if bad else 0, step, task)

    def count_on_device(self, bad: torch.Tensor, task: str) -> None:
        """The sync-free path: `bad` (a 0-d bool on the device) says whether this step was skipped."""
        bad = bad.double()
        if self._device is None:
            self._device = _fresh_counts(self.in_a_row, bad.device)
        streak = (self._device[1] + 1) * bad
        self._device = torch.stack([self._device[0] + bad, streak, torch.maximum(self._device[2], streak)])
        self._task = task

    def settle(self, step: int) -> None:
        """Read the device counts (one transfer) and apply the rule to them; a no-op on the host path."""
        if self._device is None:
            return
        skipped, in_a_row, longest = (int(v) for v in self._device.tolist())
        self._device = _fresh_counts(in_a_row, self._device.device)
        self._apply(skipped, in_a_row, longest, step, self._task)

    def _apply(self, skipped: int, in_a_row: int, longest: int, step: int, task: str) -> None:
        self.skipped += skipped
        self.in_a_row = in_a_row
        if skipped and self.report:
            print(
                f"step {step} (task {task}): {skipped} step(s) with a non-finite loss or gradient norm skipped "
                f"({in_a_row} in a row, {self.skipped} in this run; the run stops at {self.limit} in a row)",
                file=sys.stderr,
            )
        if longest >= self.limit:
            raise UserError(
                f"training stopped at step {step} (task {task}): {longest} steps in a row had a non-finite loss or "
                "gradient norm; lower optim.lr, raise warmup, check the task's data for NaN/Inf, or use bf16/fp32 "
                "instead of fp16"
            )

    def state_dict(self) -> dict[str, int]:
        """The counters a checkpoint keeps (call `settle` first)."""
        return {"skipped_nonfinite": self.skipped, "nonfinite_in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped = int(state["skipped_nonfinite"])
        self.in_a_row = int(state["nonfinite_in_a_row"])
        self._device = None  # rebuilt from `in_a_row` by the next device count


def _fresh_counts(in_a_row: int, device: torch.device) -> torch.Tensor:
    """[0, in_a_row, 0] made on the device by fills (`torch.tensor(..., device=)` copies from the host and waits)."""
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    counts[1] = float(in_a_row)
    return counts
