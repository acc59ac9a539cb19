"""Stopping a run cleanly on SIGTERM (what schedulers send before a kill) or SIGINT.

A signal only raises a flag; the loop checks it after each step, writes a checkpoint and raises
`Preempted` (exit 2): the same command with `--resume auto` continues exactly. A second signal of
the same kind interrupts at once. With several ranks all must stop after the same step, so they
agree in one collective whose answer the host reads (a sync): that is asked only at the loop's
log steps, which read the device anyway, never in the steps between (a signal waits at most
`log_every` steps).
"""

from __future__ import annotations

import signal
from types import FrameType, TracebackType
from typing import Any

import torch

from uniter3m.errors import UserError
from uniter3m.train.distributed import Backend


class Preempted(UserError):
    """SIGTERM/SIGINT during training: the step finished and a checkpoint was written."""


class StopRequest:
    """While entered, SIGTERM and SIGINT set a flag instead of ending the process (main thread only)."""

    def __init__(self) -> None:
        self.raised = False
        self.name = ""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._restore()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._restore()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.raised:  # a second signal: what the process did before the loop does with it, at once
            previous = self._previous.get(signum)
            self._restore()
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt
        self.raised = True
        self.name = signal.Signals(signum).name

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def agreed(self, backend: Backend, ask: bool) -> bool:
        """True on every rank when any rank was signalled (all stop at the same step). One rank
        answers from its flag; several answer only where `ask` (the same steps on every rank)."""
        if backend.world_size == 1:
            return self.raised
        if not ask:
            return False
        t = torch.tensor([1.0 if self.raised else 0.0], device=backend.device)
        backend.all_reduce(t, op="max")
        return bool(t.item())

    def preempted(self, step: int, output_dir: str) -> Preempted:
        """The error that ends a run stopped after `step` (its checkpoint already written)."""
        return Preempted(
            f"{self.name or 'a stop signal'} received: stopped after step {step} with a checkpoint in "
            f"{output_dir}; continue with the same command and --resume auto"
        )
