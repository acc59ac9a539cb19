"""Training logs: TensorBoard scalars and a JSONL file with the same numbers (main rank only).

The JSONL file (`<output_dir>/logs/metrics.jsonl`, one `{"step", "split", ...scalars}` object
a line) is what scripts and tests read; TensorBoard (`<output_dir>/logs/tensorboard`) is what
people look at. Other ranks get a logger that drops everything, so callers never branch on rank.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from uniter3m.fileio import atomic_write_bytes


class MetricsLogger:
    """`resume_step`: a resumed run first drops what a crashed run logged after its checkpoint,
    so the JSONL and TensorBoard curves hold each step once."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        enabled: bool,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ):
        self.enabled = enabled
        self.dir = Path(output_dir) / "logs"
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "metrics.jsonl"
        if resume_step is not None and path.is_file():
            kept = [r for r in read_metrics(output_dir) if r.get("step", 0) <= resume_step]
            atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, scalars: dict[str, float], split: str = "train") -> None:
        """Write `scalars` (names like 'loss/mlm') under `split/` at `step`."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        record: dict[str, Any] = {"step": step, "split": split, "time": round(time.time(), 3)}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()})
        assert self._jsonl is not None
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in clean.items():
                self._tb.add_scalar(f"{split}/{name}", value, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(output_dir: str | os.PathLike, split: str | None = None) -> list[dict[str, Any]]:
    """The JSONL records of a run (optionally one split), in order."""
    path = Path(output_dir) / "logs" / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if split is None or r.get("split") == split]
