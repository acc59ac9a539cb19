"""LoRA adapters on the encoder, through peft (`pip install 'uniter3m[peft]'`).

`apply_lora` injects peft's `lora.Linear` into the encoder's `target_modules` (by default every
layer's `attention.self.query` and `.value`) with `inject_adapter_in_model`: the model stays our
module (no PeftModel wrapper), so the training engine, DDP and checkpoints see one plain module. The
adapter weights are named `uniter.encoder.layer.N.attention.self.query.lora_A.default.weight` (and
`lora_B`), the wrapped weight `....query.base_layer.weight`; a training checkpoint keeps them so, and
a resume loads them strictly. Only the adapters, the head (and the pool) and the backbone weights the
checkpoint did not hold (they start random) train.

Our self-attention fuses query/key/value into one matmul of their weights; that would skip the
adapters, so `BertSelfAttention` calls the projections when one of them is wrapped
(`model/encoder.py`). `merged_copy` folds the adapters into the weights (W + B A alpha / r) in a copy:
what `best/` holds by default, a plain BERT-named folder that transformers loads.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import nn

from uniter3m.errors import ConfigError, UserError

PEFT_HINT = "pip install 'uniter3m[peft]'"
ADAPTER = "lora_"


def _peft() -> Any:
    try:
        import peft
    except ImportError as err:
        raise UserError(f"model.lora needs peft, which is not installed: run `{PEFT_HINT}`") from err
    return peft


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: Sequence[str] = ("query", "value"),
) -> None:
    """Adapters on `model.uniter.encoder`'s `target_modules` (last name parts, e.g. "query", "dense")."""
    peft = _peft()
    encoder = model.uniter.encoder
    names = {name.rsplit(".", 1)[-1] for name, m in encoder.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted(set(target_modules) - names)
    if unknown:
        raise ConfigError(
            f"model.lora.target_modules {unknown} name no Linear layer of the encoder; use some of {sorted(names)}"
        )
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none"
    )
    peft.inject_adapter_in_model(config, encoder)
    fresh = getattr(model, "new_backbone_weights", set())
    for name, param in model.uniter.named_parameters():
        param.requires_grad_(ADAPTER in name or name in fresh)


def has_adapters(model: nn.Module) -> bool:
    return any(ADAPTER in name for name, _ in model.named_parameters())


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` with every adapter merged into its wrapped Linear, which takes its place."""
    from peft.tuners.lora import LoraLayer

    merged = copy.deepcopy(model)
    wrapped = [(name, m) for name, m in merged.named_modules() if isinstance(m, LoraLayer)]
    for name, module in wrapped:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent_name), child, module.get_base_layer())
    return merged
