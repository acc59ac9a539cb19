"""One small interface over the ways a run can be distributed.

The launcher decides the backend, nothing else in the code does:
- started by `horovodrun` (env `HOROVOD_RANK`), or by mpirun (Open MPI / PMI / PMIx / MVAPICH
  world-size variables) with a Horovod built with MPI: Horovod. Parameters and optimiser state are
  broadcast from rank 0 at start and gradients are all-reduced after the last micro-batch.
- started by `torchrun` (env `RANK` + `WORLD_SIZE`): torch.distributed, NCCL on GPU, gloo on CPU,
  and the model wrapped in DistributedDataParallel.
- otherwise: a single process whose collectives are identities.

Task heads that a step does not use: the DDP wrapper is built with `find_unused_parameters=True`
(its default here). Each step trains ONE task on every rank, so the set of used heads is the same
on all ranks and DDP's per-step graph walk marks the others ready; their gradients stay `None` and
AdamW leaves them alone, exactly as a one-process run would. Horovod gets the same outcome from
`sync_gradients`, which all-reduces a "has a gradient" flag before the gradients themselves.

Clean shutdown (gloo): drop every reference to the DDP model and the optimiser, then call
`backend.shutdown()`, which runs `gc.collect()` before `destroy_process_group()`; otherwise a
rank can abort at exit with "terminate called without an active exception".
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from uniter3m.errors import UserError
from uniter3m.model.uniter import unwrap

REDUCE_OPS = ("sum", "avg", "max", "min")


# What MPI launchers (mpirun, `horovodrun` without --gloo when Horovod has MPI, srun --mpi) set instead
# of HOROVOD_RANK: Open MPI, MPICH / Intel MPI (PMI), PMIx, MVAPICH.
MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")


def mpi_world_size(env: Mapping[str, str] | None = None) -> int:
    """Processes an MPI launcher started (1 when none did)."""
    env = os.environ if env is None else env
    for name in MPI_SIZE_VARS:
        if env.get(name, "").isdigit():
            return int(env[name])
    return 1


def detect_launcher(env: Mapping[str, str] | None = None) -> str:
    """'horovod', 'torch', 'mpi' or 'single', from the environment the launcher left.

    `horovodrun --gloo` sets HOROVOD_RANK/HOROVOD_SIZE; torchrun sets RANK/WORLD_SIZE; mpirun (and
    horovodrun on MPI) set only its MPI's variables (`mpi`: Horovod over MPI, never N lone copies).
    """
    env = os.environ if env is None else env
    if "HOROVOD_RANK" in env and "HOROVOD_SIZE" in env:
        return "horovod"
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torch"
    if mpi_world_size(env) > 1:
        return "mpi"
    return "single"


class Backend:
    """A single process: every collective is the identity. Subclasses do the real work."""

    name = "single"

    def __init__(self, device: torch.device, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def local_world_size(self) -> int:
        """Processes on this node (torchrun's LOCAL_WORLD_SIZE, Horovod's HOROVOD_LOCAL_SIZE), 1 alone."""
        for key in ("LOCAL_WORLD_SIZE", "HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"):
            if os.environ.get(key, "").isdigit():
                return int(os.environ[key])
        return 1

    # -- collectives (tensors may live on any device; results come back on the same one) --
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce `tensor` over ranks IN PLACE and return it. `op` is one of REDUCE_OPS."""
        _check_op(op)
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (picklable objects)."""
        return [obj]

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite `tensor` in place with rank `src`'s value and return it."""
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj

    def barrier(self) -> None:
        pass

    # -- training hooks --
    def wrap_model(self, model: nn.Module, find_unused_parameters: bool = True) -> nn.Module:
        """The model to call in the training step (DDP for torch.distributed)."""
        return model

    def broadcast_initial_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Make every rank start from rank 0's parameters and optimiser state (Horovod needs this)."""

    def no_sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward+backward: skip the gradient sync unless `sync`."""
        return contextlib.nullcontext()

    def sync_gradients(self, model: nn.Module) -> None:
        """Average gradients over ranks after the last micro-batch (no-op where DDP already did)."""

    def shutdown(self) -> None:
        """Release the process group. Delete DDP models and optimisers before calling this."""
        gc.collect()


class TorchBackend(Backend):
    name = "torch"

    def __init__(
        self, device: torch.device, rank: int, world_size: int, local_rank: int, grad_sync: str = "ddp"
    ):
        super().__init__(device, rank, world_size, local_rank)
        import torch.distributed as dist

        self._dist = dist
        # "ddp": DistributedDataParallel with find_unused_parameters (overlaps communication with
        # backward; walks the graph each step). "allreduce": no wrapper; after the last micro-batch
        # the gradients that any rank has are averaged in one flat collective, as the Horovod path does
        # (no graph walk, no unused-parameter search; one small flag collective per step).
        if grad_sync not in ("ddp", "allreduce"):
            raise UserError(f"grad_sync={grad_sync!r}: use 'ddp' or 'allreduce'")
        self.grad_sync = grad_sync
        # NCCL only moves CUDA tensors, gloo only CPU ones.
        self._comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        _check_op(op)
        work = tensor.to(self._comm_device)
        red = {"sum": "SUM", "avg": "SUM", "max": "MAX", "min": "MIN"}[op]
        self._dist.all_reduce(work, op=getattr(self._dist.ReduceOp, red))
        if op == "avg":
            work /= self.world_size
        if work is not tensor:
            tensor.copy_(work)
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj)
        return out

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        work = tensor.to(self._comm_device)
        self._dist.broadcast(work, src=src)
        if work is not tensor:
            tensor.copy_(work)
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        self._dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self._dist.get_backend() == "nccl":
            self._dist.barrier(device_ids=[self.device.index or 0])
        else:
            self._dist.barrier()

    def wrap_model(self, model: nn.Module, find_unused_parameters: bool = True) -> nn.Module:
        if self.grad_sync == "allreduce":
            for tensor in [*model.parameters(), *model.buffers()]:  # what DDP would broadcast
                self.broadcast(tensor.data, 0)
            return model
        # DDP broadcasts rank 0's parameters and buffers at construction.
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=find_unused_parameters
        )

    def broadcast_initial_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        # Parameters: DDP did it. Optimiser state is either empty (fresh) or loaded by every rank
        # from the same checkpoint (resume), so it is equal already.
        pass

    def no_sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        if not sync and isinstance(model, nn.parallel.DistributedDataParallel):
            return model.no_sync()
        return contextlib.nullcontext()

    def sync_gradients(self, model: nn.Module) -> None:
        if self.grad_sync != "allreduce":
            return  # DDP averaged them during backward
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        params = [p for p in unwrap(model).parameters() if p.requires_grad]
        if not params:
            return
        # A parameter no rank used keeps grad None (AdamW skips it, as in one process); one that some
        # rank used gets the average, with zeros from the ranks that did not.
        has = torch.tensor(
            [p.grad is not None for p in params], dtype=torch.float32, device=self._comm_device
        )
        self._dist.all_reduce(has)
        used = [p for p, n in zip(params, has.tolist(), strict=True) if n > 0]
        for p in used:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in used]
        flat = _flatten_dense_tensors(grads).to(self._comm_device)
        self._dist.all_reduce(flat)
        flat = flat.div_(self.world_size).to(grads[0].device)
        for g, avg in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(avg)

    def shutdown(self) -> None:
        gc.collect()
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


class HorovodBackend(Backend):
    name = "horovod"

    def __init__(self, hvd: Any, device: torch.device):
        super().__init__(device, hvd.rank(), hvd.size(), hvd.local_rank())
        self._hvd = hvd
        self._ops = {"sum": hvd.Sum, "avg": hvd.Average, "max": hvd.Max, "min": hvd.Min}

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        _check_op(op)
        out = self._hvd.allreduce(tensor.detach(), op=self._ops[op])
        tensor.copy_(out)
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        return list(self._hvd.allgather_object(obj))

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        self._hvd.broadcast_(tensor, root_rank=src)
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return self._hvd.broadcast_object(obj, root_rank=src)

    def barrier(self) -> None:
        self._hvd.barrier()

    def broadcast_initial_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self._hvd.broadcast_parameters(unwrap(model).state_dict(), root_rank=0)
        # Only a loaded (resumed) state needs broadcasting: for an EMPTY state Horovod first runs an
        # optimiser step with zero gradients to create it, and AdamW's weight decay and step count
        # would then move every parameter before training starts.
        if optimizer is not None and optimizer.state_dict()["state"]:
            self._hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    def sync_gradients(self, model: nn.Module) -> None:
        params = [p for p in unwrap(model).parameters() if p.requires_grad]
        if not params:
            return
        # A parameter that no rank used keeps grad None (AdamW then skips it, as in one process);
        # one that some rank used gets the average, with zeros from the ranks that did not.
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
        has_grad = self._hvd.allreduce(has_grad, op=self._hvd.Sum)
        used = [p for p, n in zip(params, has_grad.tolist()) if n > 0]
        for p in used:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        averaged = self._hvd.grouped_allreduce([p.grad for p in used], op=self._hvd.Average)
        for p, g in zip(used, averaged):
            p.grad.copy_(g)

    def shutdown(self) -> None:
        gc.collect()
        self._hvd.shutdown()


def _check_op(op: str) -> None:
    if op not in REDUCE_OPS:
        raise ValueError(f"unknown reduce op {op!r}; use one of {REDUCE_OPS}")


def pick_device(local_rank: int, device: str | None) -> torch.device:
    """The device a process computes on ('auto': this rank's GPU if any); a GPU that is not there is a UserError."""
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise UserError(f"device {device!r}: {err}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            )
            raise UserError(
                f"device {device!r} was asked for but {why}; use the CPU (--device cpu, or --set device=cpu)"
            )
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    return dev


def init_backend(device: str | None = None, timeout_minutes: float = 30.0, grad_sync: str = "ddp") -> Backend:
    """Start the backend the launcher asks for; `device` is 'auto' (GPU if any), 'cuda' or 'cpu'."""
    launcher = detect_launcher()
    if launcher in ("horovod", "mpi"):
        started = "horovodrun" if launcher == "horovod" else f"an MPI launcher ({mpi_world_size()} processes)"
        try:
            import horovod.torch as hvd
        except ImportError as err:
            raise UserError(
                f"the process was started by {started} but horovod.torch cannot be imported "
                f"({err}); build it with scripts/install_horovod.sh, or launch with torchrun"
            ) from err
        if launcher == "mpi" and not hvd.mpi_built():
            raise UserError(
                f"the process was started by {started}, but this Horovod was built without MPI "
                "(scripts/install_horovod.sh builds Gloo only): every process would train alone. Launch with "
                "`horovodrun --gloo -np N -H localhost:N ...` or torchrun instead"
            )
        hvd.init()
        return HorovodBackend(hvd, pick_device(hvd.local_rank(), device))
    if launcher == "torch":
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = pick_device(local_rank, device)
        if not dist.is_initialized():
            dist.init_process_group(
                backend="nccl" if dev.type == "cuda" else "gloo",
                timeout=datetime.timedelta(minutes=timeout_minutes),
                device_id=dev if dev.type == "cuda" else None,
            )
        return TorchBackend(dev, dist.get_rank(), dist.get_world_size(), local_rank, grad_sync)
    return Backend(pick_device(0, device))


@contextlib.contextmanager
def distributed_session(device: str | None = None) -> Iterator[Backend]:
    """`with distributed_session() as backend:` — init, and shut down even on an exception.

    The body must drop its DDP model and optimiser (let them go out of scope or `del` them)
    before leaving the block.
    """
    backend = init_backend(device)
    try:
        yield backend
    finally:
        backend.shutdown()
