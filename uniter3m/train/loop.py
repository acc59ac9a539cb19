"""The training loop of pretraining AND fine-tuning: task mixing, accumulation, skipping
non-finite steps, validation, checkpoints, exact resume.

Fine-tuning is one task (`tasks/supervised.py`) plus an `Evaluator`: validation then scores the
protocol's metric on the whole validation split, keeps the best model and stops early; its
state is part of every checkpoint, so a resumed fine-tuning selects exactly as an uninterrupted one.

One optimiser step = one task, drawn by its ratio from a generator seeded with (seed, step):
every rank draws the same task (DDP would hang otherwise) and a resumed run draws what the
uninterrupted one drew, with no RNG state to save. The step's `grad_accum` micro-batches all
come from that task's stream.

Compiling (`compile: true`): each task gets its own compiled step (`compiled_steps`), a function
with its own code object, so Dynamo keeps one cache and one recompile budget per objective: a mix
of 12 objectives compiles a few graphs for each (shapes turn dynamic at the first new length)
instead of sharing one budget of 8 graphs and running the rest eager once it is spent.

DDP and heads a step does not use: every task's forward runs through `TaskStep`, one module
holding the model, and that module is what DDP wraps, so each call goes through DDP's forward
(a task calling `model.uniter` and a head directly would bypass it). DDP is built with
`find_unused_parameters=True`: it walks the step's graph and marks the heads of the other tasks
ready, so their gradients stay None on every rank and AdamW leaves them untouched, exactly as a
one-process run would. (The alternative, a zero-weighted touch of every head, would make weight
decay and Adam moments move unused heads and cost a forward through each of them.)

Non-finite steps: each step all-reduces [loss sum, non-finite count, ...] in one collective, so
all ranks skip the same steps; what a skipped step does and when the run stops is `nonfinite.py`.
Batches reach the device through `prefetch.py`; SIGTERM/SIGINT through `preemption.py`.
"""

from __future__ import annotations

import math
import time
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from uniter3m.errors import UserError
from uniter3m.progress import disabled
from uniter3m.train.checkpoint import (
    capture_rng_state,
    check_parameter_digest,
    load_model_weights,
    load_trainer_state,
    parameter_digest,
    restore_rng_state,
    save_checkpoint,
)
from uniter3m.train.distributed import Backend
from uniter3m.train.loaders import TaskStream, mix_seed
from uniter3m.train.logs import MetricsLogger
from uniter3m.train.nonfinite import NonfiniteSteps
from uniter3m.train.optim import clip_gradients
from uniter3m.train.precision import Precision
from uniter3m.train.preemption import StopRequest
from uniter3m.train.prefetch import Prefetcher, to_device


@dataclass
class LoopSettings:
    output_dir: str
    steps: int
    seed: int = 42
    grad_accum: int = 1
    grad_clip: float = 1.0
    val_every: int = 0  # 0 = only at the end
    ckpt_every: int = 0  # 0 = only at the end
    keep_last: int = 3
    log_every: int = 10
    max_nonfinite_in_a_row: int = 10
    progress: bool = True
    stop_after: int | None = None  # end this invocation after this step (with a checkpoint)
    desc: str = "pretrain"  # progress bar label
    databases: dict[str, str] | None = None  # content digest of every database read (checked on resume)
    compile: bool = False  # torch.compile each task's training step (one Dynamo cache per task)
    compile_backend: str = "inductor"  # run config `compile_backend`
    # fetch the next micro-batch while the current one computes and copy it to the device on a
    # side CUDA stream; on the CPU the fetch happens early with no overlap (what tests check)
    prefetch: bool = False


class Evaluator:
    """Replaces the task-metric validation (fine-tuning: protocol metrics, model selection).

    `evaluate(loop)` returns the metrics to log; `should_stop` ends the run early (a checkpoint is
    still written); `state_dict()` / `load_state_dict()` travel in the trainer state.
    """

    should_stop: bool = False

    def evaluate(self, loop: TrainLoop) -> dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class TrainTask:
    """A task in the mix: its key (log name), the Task, its training stream and validation batches."""

    key: str
    task: Any
    ratio: float
    stream: TaskStream
    val_loader: Any = None


class TaskStep(nn.Module):
    """Runs one task's forward on the model; the module DDP wraps (see the module docstring)."""

    def __init__(self, model: nn.Module, tasks: Mapping[str, Any]):
        super().__init__()
        self.model = model
        self._tasks = dict(tasks)  # plain dict: tasks are not modules and hold no parameters

    def forward(self, key: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
        out = self._tasks[key].forward(self.model, inputs)
        return {"loss": out.loss, "n_targets": out.n_targets, "metrics": out.metrics}


@dataclass
class _Window:
    """Numbers gathered between two log lines."""

    start: float = field(default_factory=time.perf_counter)
    losses: dict[str, list[float]] = field(default_factory=dict)
    samples: float = 0.0
    positions: float = 0.0
    steps: int = 0
    data_wait: float = 0.0
    grad_norms: list[float] = field(default_factory=list)
    # the sync-free step keeps its numbers on the device until the window is logged
    device_losses: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # key -> [sum, count]
    device_norm: list[torch.Tensor] = field(default_factory=list)  # [sum, count]


class TrainLoop:
    """Owns the step counter and everything that a checkpoint must restore.

    Build order matters for exact resume: construct the model, call `__init__` (which loads the
    checkpoint's weights BEFORE wrapping the model for DDP), then `run()`.
    """

    def __init__(
        self,
        settings: LoopSettings,
        model: nn.Module,
        tasks: Sequence[TrainTask],
        backend: Backend,
        precision: Precision,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        resume_from: str | Path | None = None,
        evaluator: Evaluator | None = None,
    ):
        self.s = settings
        self.evaluator = evaluator
        self.model = model
        self.tasks = list(tasks)
        self.ratios = np.array([t.ratio for t in self.tasks], dtype=np.float64)
        if not len(self.tasks) or self.ratios.sum() <= 0:
            raise UserError("no task has a ratio > 0: give at least one task a positive ratio")
        self.ratios = self.ratios / self.ratios.sum()
        self.backend = backend
        self.precision = precision
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.step = 0
        self.nonfinite = NonfiniteSteps(settings.max_nonfinite_in_a_row, report=backend.is_main)
        self.batches = Prefetcher(backend.device)
        self.last_validation: dict[str, float] = {}
        if resume_from is not None:
            self._load(Path(resume_from))
        else:
            # Same parameters on every rank come from the model seed; dropout differs per rank.
            torch.manual_seed(mix_seed(self.s.seed, backend.rank, 3) % (1 << 63))
        self.step_module = backend.wrap_model(TaskStep(model, {t.key: t.task for t in self.tasks}))
        self.compiled = (
            compiled_steps([t.key for t in self.tasks], self.s.compile_backend) if self.s.compile else {}
        )
        backend.broadcast_initial_state(self.step_module, optimizer)
        self.logger = MetricsLogger(
            self.s.output_dir,
            enabled=backend.is_main,
            resume_step=self.step if resume_from is not None else None,
        )

    # ------------------------------------------------------------------ task mixing
    def task_for_step(self, step: int) -> TrainTask:
        """The task of `step`: a pure function of (seed, step), identical on every rank."""
        rng = np.random.default_rng([mix_seed(self.s.seed, 0x7A5C), step])
        return self.tasks[int(rng.choice(len(self.tasks), p=self.ratios))]

    # ------------------------------------------------------------------ one step
    @property
    def sync_free(self) -> bool:
        """A fused AdamW skips a non-finite step on the device (`found_inf`), so the host never waits
        for the step's numbers; they are read when the window is logged. fp16's GradScaler and
        non-fused optimisers take the host path."""
        return bool(getattr(self.optimizer, "defaults", {}).get("fused")) and self.precision.scaler is None

    def train_step(self, window: _Window) -> None:
        if self.sync_free:
            self._train_step_on_device(window)
        else:
            self._train_step_on_host(window)

    def _forward_backward(self, t: TrainTask, window: _Window) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """The step's micro-batches: (loss sum, non-finite count) on the device, samples, real positions."""
        device = self.backend.device
        self.step_module.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        nonfinite = torch.zeros((), dtype=torch.float64, device=device)
        samples = positions = 0
        for micro in range(self.s.grad_accum):
            wait = time.perf_counter()
            batch = self.batches.take(t.key, t.stream)
            window.data_wait += time.perf_counter() - wait
            samples += batch.samples
            positions += batch.positions
            sync = micro == self.s.grad_accum - 1
            with self.backend.no_sync(self.step_module, sync):
                with self.precision.autocast():
                    run = self.compiled.get(t.key)
                    out = (
                        run(self.step_module, t.key, batch.inputs)
                        if run
                        else self.step_module(t.key, batch.inputs)
                    )
                loss = out["loss"].float()
                self.precision.backward(loss / self.s.grad_accum)
            if self.s.prefetch:  # the step is queued on the device: fetch and copy the next batch now
                following = t if not sync else self.task_for_step(self.step + 1)
                self.batches.fetch_ahead(following.key, following.stream)
            finite = torch.isfinite(loss.detach())
            loss_sum += torch.where(finite, loss.detach(), 0.0).double()
            nonfinite += (~finite).double()
        self.backend.sync_gradients(self.step_module)
        return loss_sum, nonfinite, samples, positions

    def _train_step_on_device(self, window: _Window) -> None:
        t = self.task_for_step(self.step)
        loss_sum, nonfinite, samples, positions = self._forward_backward(t, window)
        stats = torch.stack([loss_sum, nonfinite])
        self.backend.all_reduce(stats)  # a collective on the device: no host wait
        self.precision.unscale_(self.optimizer)
        norm = clip_gradients(self._params(), self.s.grad_clip).to(stats.device)
        bad = (stats[1] > 0) | ~torch.isfinite(norm)
        self.optimizer.found_inf = bad.float()  # fused AdamW leaves weights, moments and step alone
        self.optimizer.grad_scale = None
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf, self.optimizer.grad_scale
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        n = self.s.grad_accum * self.backend.world_size
        good = (~bad).double()
        acc = window.device_losses.setdefault(t.key, [torch.zeros_like(stats[0]), torch.zeros_like(stats[0])])
        acc[0] += torch.where(bad, 0.0, stats[0] / n)
        acc[1] += good
        if not window.device_norm:
            window.device_norm = [torch.zeros_like(stats[0]), torch.zeros_like(stats[0])]
        window.device_norm[0] += torch.where(bad, 0.0, norm.double())
        window.device_norm[1] += good
        self.nonfinite.count_on_device(bad, t.key)
        self.step += 1
        window.steps += 1
        window.samples += samples * self.backend.world_size  # exact sums are reduced at log time
        window.positions += positions * self.backend.world_size

    def _read_device_window(self, window: _Window) -> None:
        """Bring the sync-free step's numbers to the host (once per logged window)."""
        for key, (total, count) in window.device_losses.items():
            c = float(count)
            if c:
                window.losses.setdefault(key, []).append(float(total) / c)
        if window.device_norm and float(window.device_norm[1]):
            window.grad_norms.append(float(window.device_norm[0]) / float(window.device_norm[1]))
        window.device_losses, window.device_norm = {}, []
        self.nonfinite.settle(self.step)

    def _train_step_on_host(self, window: _Window) -> None:
        t = self.task_for_step(self.step)
        loss_sum, nonfinite, samples, positions = self._forward_backward(t, window)
        stats = torch.stack([loss_sum, nonfinite]).cpu()
        stats = torch.cat([stats, torch.tensor([samples, positions], dtype=torch.float64)])
        self.backend.all_reduce(stats)
        loss_sum, nonfinite, samples, positions = stats.tolist()
        grad_norm = float("nan")
        stepped = False
        if nonfinite == 0:
            self.precision.unscale_(self.optimizer)
            grad_norm = float(clip_gradients(self._params(), self.s.grad_clip))
            if math.isfinite(grad_norm) or self.precision.scaler is not None:
                stepped = self.precision.step(self.optimizer)  # fp16: the scaler skips inf steps itself
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        # fp16's scaler skipping an overflow is loss scaling at work, not a non-finite step
        self.nonfinite.count(
            bool(nonfinite) or (self.precision.scaler is None and not math.isfinite(grad_norm)),
            self.step,
            t.key,
        )
        window.steps += 1
        window.samples += samples
        window.positions += positions
        if nonfinite == 0:
            n = self.s.grad_accum * self.backend.world_size
            window.losses.setdefault(t.key, []).append(loss_sum / n)
        if stepped and math.isfinite(grad_norm):
            window.grad_norms.append(grad_norm)

    def _params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict[str, float]:
        """The evaluator's metrics, or the tasks' validation metrics; logged either way."""
        if self.evaluator is not None:
            result = self.evaluator.evaluate(self)
        else:
            result = self.validate_tasks()
        self.last_validation = result
        self.logger.log(self.step, result, split="val")
        return result

    @torch.no_grad()
    def validate_tasks(self) -> dict[str, float]:
        """Every rank scores its share of each task's fixed validation batches; sums are gathered.

        A numerator with a class dimension (per-class counts, a `chance` metric) is summed per class
        and reported as its largest entry over the denominator, so the majority is the whole set's."""
        was_training = self.model.training
        self.model.eval()
        local: dict[str, dict[str, list[float]]] = {}
        for t in self.tasks:
            if t.val_loader is None:
                continue
            sums = local.setdefault(t.key, {"loss": [0.0, 0.0]})
            for inputs in t.val_loader:
                inputs = to_device(inputs, self.backend.device)
                with self.precision.autocast():
                    out = t.task.forward(self.model, inputs)
                n = float(out.n_targets)
                if n > 0:
                    sums["loss"][0] += float(out.loss) * n
                    sums["loss"][1] += n
                for name, (num, den) in out.metrics.items():
                    acc = sums.setdefault(name, [0.0, 0.0])
                    acc[0] = acc[0] + _numerator(num)
                    acc[1] += float(den)
        self.model.train(was_training)
        merged: dict[str, list[float]] = {}
        for part in self.backend.all_gather_object(local):
            for key, metrics in part.items():
                for name, (num, den) in metrics.items():
                    acc = merged.setdefault(f"{key}/{name}", [0.0, 0.0])
                    acc[0] += num
                    acc[1] += den
        return {
            name: (float(np.max(num)) / den if den > 0 else float("nan"))
            for name, (num, den) in sorted(merged.items())
        }

    # ------------------------------------------------------------------ checkpoints
    def _local_state(self) -> dict[str, Any]:
        return {
            "rng": capture_rng_state(),
            "loaders": {t.key: t.stream.state_dict() for t in self.tasks},
            "tasks": {t.key: t.task.state_dict() for t in self.tasks},  # per rank (e.g. itm_rank's queue)
            "param_digest": parameter_digest(self.model),
        }

    def save(self) -> None:
        """Every rank contributes its RNG and loader positions; the main rank writes atomically.

        Each rank also sends a digest of its parameters: ranks that drifted apart (a bug, or a
        broken interconnect) stop the run here instead of training on silently.
        """
        self.nonfinite.settle(self.step)  # the sync-free step's counts, brought to the host
        ranks = self.backend.all_gather_object(self._local_state())
        digests = {r["param_digest"] for r in ranks}
        if len(digests) > 1:
            raise UserError(
                f"at step {self.step} the ranks hold different parameters "
                f"({[r['param_digest'][:12] for r in ranks]}); the data-parallel run is broken"
            )
        if self.backend.is_main:
            state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "precision": self.precision.state_dict(),
                "ranks": ranks,
                "world_size": self.backend.world_size,
                **self.nonfinite.state_dict(),
                "evaluator": self.evaluator.state_dict() if self.evaluator is not None else None,
                "databases": self.s.databases,
                "last_validation": self.last_validation,
            }
            save_checkpoint(self.s.output_dir, self.step, self.model, state, keep_last=self.s.keep_last)
        self.backend.barrier()

    def _load(self, checkpoint: Path) -> None:
        from uniter3m.train.session import check_databases

        load_model_weights(self.model, checkpoint / "model")
        state = load_trainer_state(checkpoint)
        check_parameter_digest(self.model, state, checkpoint)
        check_databases(state.get("databases"), checkpoint)
        if state["world_size"] != self.backend.world_size:
            raise UserError(
                f"{checkpoint} was written by {state['world_size']} ranks but this run has {self.backend.world_size}; "
                "exact resume needs the same number of ranks (or start a new run from its model/ folder)"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.precision.load_state_dict(state["precision"])
        mine = state["ranks"][self.backend.rank]
        missing = [t.key for t in self.tasks if t.key not in mine["loaders"]]
        if missing:
            raise UserError(
                f"{checkpoint} has no loader position for task(s) {missing}: resume with the task list it was trained with"
            )
        self.batches.drop()
        for t in self.tasks:
            t.stream.load_state_dict(mine["loaders"][t.key])
            t.task.load_state_dict(mine.get("tasks", {}).get(t.key, {}))
        restore_rng_state(mine["rng"])
        self.step = int(state["step"])
        self.nonfinite.load_state_dict(state)
        self.last_validation = dict(state.get("last_validation") or {})
        if self.evaluator is not None and state.get("evaluator") is not None:
            self.evaluator.load_state_dict(state["evaluator"])

    # ------------------------------------------------------------------ the run
    def _log_window(self, window: _Window) -> _Window:
        """Log `window` (its device numbers read into it first); returns the next, empty window."""
        self._read_device_window(window)
        elapsed = max(time.perf_counter() - window.start, 1e-9)
        scalars: dict[str, float] = {f"loss/{k}": float(np.mean(v)) for k, v in window.losses.items()}
        scalars["lr"] = float(self.scheduler.get_last_lr()[0])
        if window.grad_norms:
            scalars["grad_norm"] = float(np.mean(window.grad_norms))
        scalars["samples_per_s"] = window.samples / elapsed
        scalars["positions_per_s"] = window.positions / elapsed  # tokens + frames, padding excluded
        scalars["data_wait_share"] = window.data_wait / elapsed
        scalars["skipped_nonfinite"] = float(self.nonfinite.skipped)
        self.logger.log(self.step, scalars, split="train")
        return _Window()

    def run(self) -> dict[str, float]:
        """Train up to `steps`, validating and checkpointing on schedule; returns the last validation."""
        from tqdm.auto import tqdm

        bar = tqdm(
            total=self.s.steps,
            initial=self.step,
            desc=self.s.desc,
            disable=disabled(self.backend.is_main and self.s.progress),
            dynamic_ncols=True,
        )
        window = _Window()
        resumed_at = self.step if self.step > 0 else -1
        saved_at, validated_at = resumed_at, -1
        end = self.s.steps if self.s.stop_after is None else min(self.s.steps, self.s.stop_after)
        with StopRequest() as stop, bar:
            while self.step < end and not (self.evaluator is not None and self.evaluator.should_stop):
                self.train_step(window)
                bar.update(1)
                if stop.agreed(self.backend, ask=self.step % self.s.log_every == 0):
                    if saved_at != self.step:
                        self.save()
                    raise stop.preempted(self.step, self.s.output_dir)
                if self.step % self.s.log_every == 0:
                    logged, window = window, self._log_window(window)
                    if logged.losses:  # keys in a fixed (sorted) order, so the bar does not jump
                        bar.set_postfix(
                            {k: f"{np.mean(logged.losses[k]):.3f}" for k in sorted(logged.losses)},
                            refresh=False,
                        )
                if self.s.val_every and self.step % self.s.val_every == 0:
                    self.validate()
                    validated_at = self.step
                if self.s.ckpt_every and self.step % self.s.ckpt_every == 0:
                    self.save()
                    saved_at = self.step
                if self.evaluator is not None and self.evaluator.should_stop:
                    break
            if window.steps:
                self._log_window(window)
            if validated_at != self.step and not (self.evaluator is not None and self.evaluator.should_stop):
                self.validate()
            if saved_at != self.step:
                self.save()
        return self.last_validation

    def apply_lr_change(self, old: float, new: float, head: bool = False) -> None:
        """A resumed run's new learning rate: the schedule continues from the step it reached, scaled to `new`."""
        for group, base in zip(self.optimizer.param_groups, list(self.scheduler.base_lrs), strict=True):
            if math.isclose(group.get("initial_lr", base), old):
                group["initial_lr"] = new
        self.scheduler.base_lrs = [new if math.isclose(b, old) else b for b in self.scheduler.base_lrs]
        for group, base, factor in zip(
            self.optimizer.param_groups,
            self.scheduler.base_lrs,
            [f(self.scheduler.last_epoch) for f in self.scheduler.lr_lambdas],
            strict=True,
        ):
            group["lr"] = base * factor

    def close(self) -> None:
        """Stop loader workers and close logs; the caller then drops its references and shuts down."""
        self.batches.drop()
        for t in self.tasks:
            t.stream.close()
        self.logger.close()
        self.step_module = None  # type: ignore[assignment]


def _run_task(step_module: nn.Module, key: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
    return step_module(key, inputs)


def compiled_steps(keys: Sequence[str], backend: str) -> dict[str, Callable]:
    """One compiled step per task key: `_run_task` copied with its own code object, since Dynamo
    keeps its graphs and its recompile limit per code object. `dynamic=None`: the first new shape
    recompiles with symbolic sizes, so an epoch of varied lengths costs a few graphs per task."""
    out = {}
    for key in keys:  # named by the task: Dynamo's logs and compile metrics say whose step it is
        code = _run_task.__code__.replace(co_name=f"step_{key}")
        fn = types.FunctionType(code, _run_task.__globals__, code.co_name)
        out[key] = torch.compile(fn, backend=backend)
    return out


def _numerator(value: torch.Tensor) -> float | np.ndarray:
    """A metric numerator as a float, or per-class counts as an array (summed per class, then
    reduced to their largest entry: the majority rate that `tasks/chance.py` reports)."""
    value = value.detach().double().cpu()
    return float(value) if value.numel() == 1 else value.reshape(-1).numpy()


__all__ = [
    "Evaluator",
    "LoopSettings",
    "TaskStep",
    "TrainLoop",
    "TrainTask",
    "compiled_steps",
]
