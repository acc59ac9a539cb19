"""AdamW with BERT's weight-decay rule, warmup + linear decay, gradient clipping.

Biases and LayerNorm parameters get no weight decay (as in BERT): decaying a LayerNorm gain
towards 0 fights the normalisation, and biases have no scale to regularise. Parameters shared
between modules (the MLM decoder tied to the word embeddings) are counted once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from uniter3m.errors import ConfigError


def no_decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that must not be decayed: biases and every LayerNorm parameter."""
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(module, nn.LayerNorm | nn.RMSNorm) or p_name == "bias" or p_name.endswith("_bias"):
                names.add(full)
    return names


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights and undecayed biases/LayerNorm, each tensor once."""
    skip = no_decay_parameter_names(model)
    decay, no_decay, seen = [], [], set()
    for name, param in model.named_parameters():  # named_parameters already drops duplicates
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (no_decay if name in skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
    device: torch.device | None = None,
    head_parameters: Iterable[nn.Parameter] = (),
    head_lr: float | None = None,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step on CUDA, multi-tensor (foreach) elsewhere.

    `head_parameters` (weights that start untrained, in fine-tuning) get `head_lr` when given.
    `fused` (default: on CUDA) also lets the training loop skip non-finite steps on the device.
    """
    if lr <= 0:
        raise ConfigError(f"learning rate must be > 0 (got {lr})")
    if weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0 (got {weight_decay})")
    if fused is None:
        fused = device is not None and device.type == "cuda"
    groups = parameter_groups(model, weight_decay)
    if head_lr is not None:
        heads = {id(p) for p in head_parameters}
        split = []
        for g in groups:
            body = [p for p in g["params"] if id(p) not in heads]
            head = [p for p in g["params"] if id(p) in heads]
            split += [dict(g, params=body)] if body else []
            split += [dict(g, params=head, lr=head_lr)] if head else []
        groups = split
    return torch.optim.AdamW(
        groups,
        lr=lr,
        betas=betas,
        eps=eps,
        fused=True if fused else None,
        foreach=None if fused else True,
    )


def warmup_linear_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, final_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """lr rises linearly from 0 over `warmup_steps`, then falls linearly to `final_ratio`·lr at
    `total_steps` (and stays there). Its state (the step count) is checkpointed.

    With `final_ratio` 0 this is `transformers.get_linear_schedule_with_warmup` itself (the field's
    schedule, same numbers as HF Trainer); a floor above 0 is the same line, stopped at the floor.
    """
    if total_steps <= 0:
        raise ConfigError(f"the number of steps must be > 0 (got {total_steps})")
    if not 0 <= warmup_steps <= total_steps:
        raise ConfigError(
            f"warmup steps must be between 0 and the number of steps {total_steps} (got {warmup_steps})"
        )
    if final_ratio == 0:
        from transformers import get_linear_schedule_with_warmup

        return get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        span = max(total_steps - warmup_steps, 1)
        progress = min((step - warmup_steps) / span, 1.0)
        return 1.0 - (1.0 - final_ratio) * progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` (<= 0: measure only) and return the total norm before clipping.

    A non-finite norm is returned as is (the caller then skips the step); clipping never
    turns inf/nan gradients into finite ones.
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=False)
    return torch.nn.utils.get_total_norm([p.grad for p in params])
