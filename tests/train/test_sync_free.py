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
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from tests.support.runs import FULL_MIX, finetune_config, pretrain_config
from uniter3m.data.collate import Collator
from uniter3m.data.tokenization import SpecialTokens
from uniter3m.train.assembly import build_dataset, build_finetune_model, data_tokenizer
from uniter3m.train.config import load_finetune_config
from uniter3m.train.distributed import Backend
from uniter3m.train.finetune import supervised_task
from uniter3m.train.folds import plan_protocol
from uniter3m.train.loaders import TaskStream
from uniter3m.train.logs import read_metrics
from uniter3m.train.loop import LoopSettings, TrainLoop, TrainTask, _Window
from uniter3m.train.optim import build_optimizer, warmup_linear_schedule
from uniter3m.train.precision import Precision

SYNC_OPS = {"_local_scalar_dense", "nonzero", "item"}


def _from_the_data_loader() -> bool:
    """A DataLoader drawing its workers' base seed (`.item()` on a CPU tensor when an epoch's iterator
    starts) is data loading, not the step; on a GPU it touches no device tensor."""
    import traceback

    return any("torch/utils/data/" in frame.filename for frame in traceback.extract_stack())


class SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        kwargs = kwargs or {}
        if name in SYNC_OPS and not _from_the_data_loader():
            self.counts[name] += 1
        elif name in ("_to_copy", "copy_") and str(kwargs.get("device", "")) == "cpu":
            src = args[0] if args else None
            if isinstance(src, torch.Tensor) and src.device.type != "cpu":
                self.counts["device_to_host"] += 1
        return func(*args, **kwargs)


def _names_a_device(args: tuple, kwargs: dict) -> bool:
    return kwargs.get("device") is not None or any(
        isinstance(a, torch.device | torch.Tensor)
        or (isinstance(a, str) and a.split(":")[0] in ("cpu", "cuda"))
        for a in args
    )


class HostCopies(TorchFunctionMode):
    """Counts host->device copies that block: on CUDA a `.to(device)` of a tensor the step did not make
    (a task's constant, kept on the CPU) without `non_blocking`, or `torch.tensor(..., device=)`, copies
    from pageable memory and waits for the GPU. On the CPU those copies do nothing, so what is counted is
    the call: a tensor made or moved inside the step (the batch, copied non-blocking) is not one."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: Counter[str] = Counter()
        self._made: set[int] = set()
        self._keep: list[torch.Tensor] = []  # ids stay unique while the mode is on

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (torch.tensor, torch.as_tensor) and kwargs.get("device") not in (None, "cpu"):
            # device "cpu" by name stays on the CPU on any machine (the foreach AdamW's step increment)
            self.copies[f"torch.{func.__name__}(device=...)"] += 1
        elif func in (torch.Tensor.to, torch.Tensor.cuda) and not kwargs.get("non_blocking"):
            source = args[0]
            if _names_a_device(args[1:], kwargs) and id(source) not in self._made:
                self.copies[
                    f"Tensor.{func.__name__} of a tensor from before the step {tuple(source.shape)}"
                ] += 1
        for value in out if isinstance(out, tuple | list) else (out,):
            if isinstance(value, torch.Tensor):
                self._made.add(id(value))
                self._keep.append(value)
        return out


def _loop(dbs, tiny, out, fused: bool) -> TrainLoop:
    cfg = load_finetune_config(finetune_config(dbs, tiny, out, top__epochs=1))
    plan = plan_protocol(cfg)
    fold = plan.folds[0]
    meta = data_tokenizer(cfg.data)
    special = SpecialTokens.from_dict(meta)
    train = build_dataset(cfg.data, ids=fold.train)
    model = build_finetune_model(cfg, plan, {"face": 5, "speech": 4}, meta)
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


def test_the_fused_step_has_no_host_sync_outside_logging_steps(dbs, tiny, tmp_path):
    counts = {}
    for fused in (True, False):
        loop = _loop(dbs, tiny, tmp_path / f"run{fused}", fused)
        window = _Window()
        loop.train_step(window)  # warm-up: the worker starts, the first batch arrives
        with SyncCounter() as counter, HostCopies() as copies:
            for _ in range(4):
                loop.train_step(window)
        counts[fused] = dict(counter.counts)
        assert not copies.copies, copies.copies
        loop._log_window(window)  # a logging step reads the window's numbers once
        assert read_metrics(tmp_path / f"run{fused}", "train")[-1]["loss/finetune"] > 0
        loop.close()
    assert counts[True] == {}, counts[True]
    assert sum(counts[False].values()) >= 4  # the host path reads the step's numbers every step


def test_every_pretraining_objective_steps_without_a_host_sync(tiny_dbs, tmp_path, monkeypatch):
    """A real pretraining run mixing the objectives (fused AdamW, data prepared in a worker): the
    steps between logging steps dispatch no sync-forcing operation, whatever the task."""
    from uniter3m.train.loop import TrainLoop
    from uniter3m.train.pretrain import run_pretrain

    cfg = pretrain_config(tiny_dbs, tmp_path / "run", steps=80, log_every=1000)
    cfg["tasks"] = [{"name": n, "dataset": "syn", "ratio": 1.0, "options": o} for n, o in FULL_MIX]
    cfg["batching"]["num_workers"] = len(FULL_MIX)  # the budget of a rank: one worker per objective
    cfg["optim"]["fused"] = True
    seen: dict[str, list[dict]] = {}
    original = TrainLoop.train_step

    def counted(self, window):
        key = self.task_for_step(self.step).key
        with SyncCounter() as counter, HostCopies() as copies:
            original(self, window)
        seen.setdefault(key, []).append(dict(counter.counts) | dict(copies.copies))

    monkeypatch.setattr(TrainLoop, "train_step", counted)
    run_pretrain(cfg)
    assert set(seen) == {t["name"] for t in cfg["tasks"]}, sorted(seen)
    offending = {k: [c for c in v if c] for k, v in seen.items() if any(v)}
    assert not offending, offending
