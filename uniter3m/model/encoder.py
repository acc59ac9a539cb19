"""BERT encoder layers with HF parameter names, attention through `F.scaled_dot_product_attention`.

Names match HF BertModel (`layer.N.attention.self.query`, `attention.output.dense`, ...), so BERT
checkpoints load as they are. For speed the three projections run as one matmul over the
concatenated weights, and the padding mask becomes an additive bias of the compute dtype once per
forward (not once per layer); a batch without padding passes no mask, so SDPA may pick flash attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from uniter3m.model.config import UniterConfig

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def activation(name: str):
    return _ACTIVATIONS[name]


def attention_bias(mask: Tensor, dtype: torch.dtype, padded: bool | None = None) -> Tensor | None:
    """(B, L) bool keep-mask -> additive (B, 1, 1, L) bias, or None when nothing is padded.

    `padded` is the collator's answer to "does this batch hold padding?" (it knows, on the CPU);
    None asks the mask (a device->host sync) in eager mode; while compiling it never asks (a graph
    break) and builds the bias, which is exact for an all-True mask too (transformers does the same).
    A row with no valid key at all (an utterance whose every stream is empty) would make softmax
    divide 0 by 0; such rows attend to every position instead: finite, and the caller ignores them.
    """
    if padded is False or (padded is None and not torch.compiler.is_compiling() and bool(mask.all())):
        return None
    keep = mask | ~mask.any(dim=1, keepdim=True)
    bias = torch.zeros(keep.shape, dtype=dtype, device=mask.device)
    bias.masked_fill_(~keep, torch.finfo(dtype).min)
    return bias[:, None, None, :]


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls produce for `x` here: the autocast dtype when autocast is on."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class BertSelfAttention(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        b, n, h = x.shape
        if all(type(m) is nn.Linear for m in (self.query, self.key, self.value)):
            weight = torch.cat((self.query.weight, self.key.weight, self.value.weight))
            qkv_bias = torch.cat((self.query.bias, self.key.bias, self.value.bias))
            qkv = F.linear(x, weight, qkv_bias)
        else:  # adapters (LoRA, model/lora.py) wrap a projection: call each so their terms count
            qkv = torch.cat((self.query(x), self.key(x), self.value(x)), dim=-1)
        qkv = qkv.view(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, head_dim)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.dropout_p if self.training else 0.0
        )
        return out.transpose(1, 2).reshape(b, n, h)


class BertOutput(nn.Module):
    """Dense back to the hidden size, dropout, residual, LayerNorm: the end of the attention block
    (`in_size` = hidden size) and of the feed-forward block (`in_size` = intermediate size)."""

    def __init__(self, config: UniterConfig, in_size: int):
        super().__init__()
        self.dense = nn.Linear(in_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertOutput(config, config.hidden_size)

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        return self.output(self.self(x, bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config, config.intermediate_size)

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        x = self.attention(x, bias)
        return self.output(self.intermediate(x), x)


class UniterEncoder(nn.Module):
    """A stack of BERT layers; recomputes each layer in backward when gradient checkpointing is on."""

    def __init__(self, config: UniterConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = config.gradient_checkpointing

    def forward(self, hidden: Tensor, mask: Tensor, padded: bool | None = None) -> Tensor:
        """hidden (B, L, H), mask (B, L) bool (True = real position) -> (B, L, H)."""
        return self.run_layers(hidden, attention_bias(mask, compute_dtype(hidden), padded))

    def forward_packed(self, hidden: Tensor, src: Tensor, dst: Tensor, doc: Tensor) -> Tensor:
        """The same layers on packed rows (see `uniter3m/data/packing.py`): the real positions of
        `hidden` (B, L, H) are moved to rows (P, Lp) where each attends only within its utterance
        (`doc`), then put back; padding positions come back as zeros."""
        b, length, h = hidden.shape
        rows, width = doc.shape
        flat = hidden.reshape(b * length, h)
        packed = flat.new_zeros(rows * width, h).index_copy(0, dst, flat.index_select(0, src))
        same = doc[:, :, None] == doc[:, None, :]  # padding slots attend to padding only: finite, unused
        dtype = compute_dtype(hidden)
        bias = torch.zeros(same.shape, dtype=dtype, device=hidden.device).masked_fill_(
            ~same, torch.finfo(dtype).min
        )
        out = self.run_layers(packed.view(rows, width, h), bias[:, None])
        out = out.reshape(rows * width, -1)
        return (
            out.new_zeros(b * length, out.shape[-1])
            .index_copy(0, src, out.index_select(0, dst))
            .view(b, length, -1)
        )

    def run_layers(self, hidden: Tensor, bias: Tensor | None) -> Tensor:
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layer:
            if recompute:
                hidden = checkpoint(layer, hidden, bias, use_reentrant=False)
            else:
                hidden = layer(hidden, bias)
        return hidden
