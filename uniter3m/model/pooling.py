"""The fine-tuning head's readout: one vector per utterance from the backbone's hidden states.

`model.head` (fine-tuning config) picks one; `model.per_stream` makes `mean` and `attention` give one
vector per stream, concatenated in the model's stream order (text, then its frame streams). The
classifier (`model.classifier`, `model/finetuning.py`) reads the vector:

  cls        the pooler over [CLS] (`pooler.dense`, tanh): BERT's and MEmoBERT's head input. No weights.
  mean       masked mean over every real position (text and frames); per stream: over each stream's own.
             No weights.
  attention  a learned query scores every real position (`pool.key` = Linear(H, H), `pool.query` (Q, H),
             Q = 1, or one query per stream with per_stream); softmax over the real positions only.
  streams    each stream projected (`pool.proj.<stream>` = Linear(H, H) + GELU), mean-pooled over its real
             positions, concatenated, then an MLP (its classifier defaults to `mlp`): the late-fusion
             baseline.

A stream the batch lacks, or an utterance with no real position in it (no face found), gives zeros
in its slot, so a per-stream head sees "absent", never NaN. Every pooled vector is a masked
reduction: no `.item()`, no boolean indexing (sync-free on GPU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

HEADS = ("cls", "mean", "attention", "streams")  # `model.head`
TEXT = "text"


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """(B, L, H), (B, L) bool -> (B, H): mean over the real positions (zeros for a row without any)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def stream_parts(out: object, streams: Sequence[str]) -> list[tuple[Tensor, Tensor] | None]:
    """(states (B, T, H), mask (B, T)) of each named stream in `out` (a UniterOutput), None where absent."""
    segments = out.segments
    return [
        (out.stream_states[name], out.attention_mask[:, segments[name]]) if name in segments else None
        for name in streams
    ]


class Pooling(nn.Module):
    """`forward(out) -> (B, size)` from a UniterOutput; `size` is what the classifier reads."""

    def __init__(self, kind: str, hidden_size: int, streams: Sequence[str], per_stream: bool = False):
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"unknown head {kind!r}; use one of {', '.join(HEADS)}")
        self.kind = kind
        self.streams = list(streams)
        self.per_stream = per_stream or kind == "streams"
        self.hidden_size = hidden_size
        slots = len(self.streams) if self.per_stream else 1
        self.size = hidden_size * slots
        if kind == "attention":
            self.key = nn.Linear(hidden_size, hidden_size)
            self.query = nn.Parameter(torch.zeros(slots, hidden_size))  # zeros: a plain mean at start
        elif kind == "streams":
            self.proj = nn.ModuleDict({s: nn.Linear(hidden_size, hidden_size) for s in self.streams})
            self.act = nn.GELU()

    def forward(self, out: object) -> Tensor:
        if self.kind == "cls":
            return out.pooler_output
        if not self.per_stream:
            return self._reduce(out.last_hidden_state, out.attention_mask, 0)
        hidden = out.last_hidden_state
        pooled = []
        for slot, (name, part) in enumerate(zip(self.streams, stream_parts(out, self.streams), strict=True)):
            if part is None:
                pooled.append(hidden.new_zeros(hidden.shape[0], self.hidden_size))
                continue
            states, mask = part
            if self.kind == "streams":
                states = self.act(self.proj[name](states))
            pooled.append(self._reduce(states, mask, slot))
        return torch.cat(pooled, dim=-1)

    def _reduce(self, states: Tensor, mask: Tensor, slot: int) -> Tensor:
        if self.kind != "attention":
            return masked_mean(states, mask)
        scores = self.key(states) @ self.query[slot].to(states.dtype) / math.sqrt(self.hidden_size)
        # padding gets a very low finite score, then weight 0: a row with no real position pools to zeros
        # (an -inf row would give NaN weights and NaN gradients)
        scores = scores.float().masked_fill(~mask, -1e9)
        weights = (torch.softmax(scores, dim=-1) * mask).to(states.dtype)
        return (weights.unsqueeze(-1) * states).sum(1)
