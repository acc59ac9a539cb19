"""Mixed precision through torch.autocast (docs/DESIGN.md §3; apex is not used).

`auto` means bf16 on a GPU that supports it (no loss scaling needed: bf16 has fp32's range),
fp16 on an older GPU (with a GradScaler, whose state is checkpointed), and fp32 on CPU, where
autocast gives little and changes numerics the CPU tests compare exactly.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from uniter3m.errors import ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(requested: str, device: torch.device) -> str:
    """The concrete precision ('fp32', 'bf16' or 'fp16') for `requested` on `device`."""
    if requested not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"precision {requested!r} is not one of auto, fp32, bf16, fp16")
    if requested == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "fp16" and device.type != "cuda":
        raise ConfigError("precision 'fp16' needs a CUDA GPU (loss scaling); on CPU use 'fp32' or 'bf16'")
    return requested


class Precision:
    """Autocast context + optional fp16 loss scaling, with one call per training-step phase.

    Usage per optimiser step:
        with prec.autocast(): loss = ...
        prec.backward(loss)            # scaled in fp16
        prec.unscale_(optimizer)       # before clipping
        stepped = prec.step(optimizer) # False when fp16 found inf/nan grads and skipped
    """

    def __init__(self, requested: str, device: torch.device):
        self.name = resolve_precision(requested, device)
        self.device = device
        self.dtype = _DTYPES.get(self.name, torch.float32)
        self.scaler: torch.amp.GradScaler | None = (
            torch.amp.GradScaler(device.type) if self.name == "fp16" else None
        )

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Apply the optimiser step; returns whether it really stepped."""
        if self.scaler is None:
            optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= scale  # the scale drops exactly when the step was skipped

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
