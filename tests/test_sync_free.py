"""The training step waits on the device only at logging steps (issue 13 item 2).

A `TorchDispatchMode` counts the operations that force a device->host sync (`_local_scalar_dense`
behind `.item()`/`float()`/`bool()`, `nonzero` behind boolean indexing, copies to the CPU) inside the
training step. Data preparation runs in a DataLoader worker (another process), as in real runs.
With a fused AdamW the step skips non-finite updates on the device, so outside logging steps the
count is 0; the host path (non-fused optimiser) is counted too, to show what the counter sees.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.test_finetune import config, dbs, tiny  # noqa: F401 - the tiny real corpus and checkpoint
from uniter3m.data.collate import Collator
from uniter3m.train.config import load_finetune_config
from uniter3m.train.distributed import Backend
from uniter3m.train.finetune import (
    build_finetune_model,
    make_dataset,
    plan_protocol,
    special_tokens,
    supervised_task,
)
from uniter3m.train.loaders import TaskStream
from uniter3m.train.logs import read_metrics
from uniter3m.train.loop import LoopSettings, TrainLoop, TrainTask, _Window
from uniter3m.train.optim import build_optimizer, warmup_linear_schedule
from uniter3m.train.precision import Precision

SYNC_OPS = {"_local_scalar_dense", "nonzero", "item"}


class SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        kwargs = kwargs or {}
        if name in SYNC_OPS:
            self.counts[name] += 1
        elif name in ("_to_copy", "copy_") and str(kwargs.get("device", "")) == "cpu":
            src = args[0] if args else None
            if isinstance(src, torch.Tensor) and src.device.type != "cpu":
                self.counts["device_to_host"] += 1
        return func(*args, **kwargs)


def _loop(dbs, tiny, out, fused: bool) -> TrainLoop:  # noqa: F811
    cfg = load_finetune_config(config(dbs, tiny, out, top__epochs=1))
    plan = plan_protocol(cfg)
    fold = plan.folds[0]
    special = special_tokens(cfg.data)
    train = make_dataset(cfg.data, fold.train)
    model = build_finetune_model(cfg, plan, {"face": 5, "speech": 4}, special)
    task = supervised_task(model, plan, special)
    stream = TaskStream(
        task, train, Collator(special), task_index=0, seed=0, max_tokens=4096, max_batch_size=8, num_workers=1
    )
    backend = Backend(torch.device("cpu"))
    optimizer = build_optimizer(model, 1e-3, device=backend.device, fused=fused)
    scheduler = warmup_linear_schedule(optimizer, 0, 100)
    settings = LoopSettings(output_dir=str(out), steps=100, log_every=1000, progress=False)
    return TrainLoop(
        settings,
        model,
        [TrainTask("finetune", task, 1.0, stream)],
        backend,
        Precision("fp32", backend.device),
        optimizer,
        scheduler,
    )


def test_the_fused_step_has_no_host_sync_outside_logging_steps(dbs, tiny, tmp_path):  # noqa: F811
    counts = {}
    for fused in (True, False):
        loop = _loop(dbs, tiny, tmp_path / f"run{fused}", fused)
        window = _Window()
        loop.train_step(window)  # warm-up: the worker starts, the first batch arrives
        with SyncCounter() as counter:
            for _ in range(4):
                loop.train_step(window)
        counts[fused] = dict(counter.counts)
        loop._log_window(window)  # a logging step reads the window's numbers once
        assert read_metrics(tmp_path / f"run{fused}", "train")[-1]["loss/finetune"] > 0
        loop.close()
    assert counts[True] == {}, counts[True]
    assert sum(counts[False].values()) >= 4  # the host path reads the step's numbers every step
