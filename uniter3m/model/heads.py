"""Output heads on top of the backbone's hidden states.

Every head takes hidden states of any leading shape (..., H); objectives gather the masked
positions first, so no head computes outputs nobody reads. Layouts follow HF BERT (MLM) and
UNITER/MEmoBERT (frame heads: `net` = Linear-GELU-LayerNorm, then the output layer), so their
checkpoints map onto these names one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uniter3m.model.encoder import activation


def _transform(hidden_size: int, eps: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.LayerNorm(hidden_size, eps=eps))


class MlmHeadTransform(nn.Module):
    """HF BertPredictionHeadTransform: dense, activation, LayerNorm."""

    def __init__(self, hidden_size: int, hidden_act: str, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.act = activation(hidden_act)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class MlmHead(nn.Module):
    """HF BertLMPredictionHead (`transform.*`, `decoder`, `bias`); decoder weight tied to the word embeddings."""

    def __init__(self, word_embeddings: nn.Embedding, hidden_act: str = "gelu", eps: float = 1e-12):
        super().__init__()
        vocab, hidden = word_embeddings.weight.shape
        self.transform = MlmHeadTransform(hidden, hidden_act, eps)
        self.decoder = nn.Linear(hidden, vocab, bias=False)
        self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, hidden: Tensor) -> Tensor:
        """(..., H) -> (..., vocab) logits."""
        return F.linear(self.transform(hidden), self.decoder.weight, self.bias)


class FrameRegressionHead(nn.Module):
    """Reconstructs input frames: `net`, then the stream's input linear transposed (tied) plus an own bias.

    `weight` is the stream's `feat_linear.weight` (H, D), shared, so the head adds no D×H matrix.
    """

    def __init__(self, feat_linear: nn.Linear, eps: float = 1e-12):
        super().__init__()
        hidden, feat_dim = feat_linear.weight.shape
        self.net = _transform(hidden, eps)
        self.weight = feat_linear.weight
        self.bias = nn.Parameter(torch.zeros(feat_dim))

    def forward(self, hidden: Tensor) -> Tensor:
        """(..., H) -> (..., D) predicted features."""
        return F.linear(self.net(hidden), self.weight.t(), self.bias)


class FrameClassificationHead(nn.Module):
    """Per-frame class logits (for KL to soft labels): `net` = Linear-GELU-LayerNorm-Linear(H, C)."""

    def __init__(self, hidden_size: int, num_classes: int, eps: float = 1e-12):
        super().__init__()
        self.net = nn.Sequential(*_transform(hidden_size, eps), nn.Linear(hidden_size, num_classes))

    def forward(self, hidden: Tensor) -> Tensor:
        return self.net(hidden)


class FrameOrderHead(nn.Module):
    """Scores each frame against every slot position: logits[..., j] = <net(h), position_j>.

    Scoring against the stream's own position table (`FrameEmbeddings.position_table(T)`) rather
    than a fixed Linear(H, max_frames) works for any clip length, sinusoidal positions included, and
    the number of classes is the clip's own frame count. The caller masks slots that are padding.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-12):
        super().__init__()
        self.net = _transform(hidden_size, eps)

    def forward(self, hidden: Tensor, positions: Tensor) -> Tensor:
        """hidden (..., H), positions (T, H) -> (..., T) logits over original slots."""
        return self.net(hidden) @ positions.to(hidden.dtype).t()


class ItmHead(nn.Module):
    """Matched / not matched from the pooled output: Linear(H, 2) (UNITER's `itm_output`)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 2)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.linear(pooled)


class ClassificationHead(nn.Module):
    """Utterance classifier on the pooled output.

    `kind="linear"`: dropout + Linear(H, C). `kind="mlp"`: dropout, Linear(H, M), GELU, LayerNorm,
    Linear(M, C) (UNITER's two-layer head, M = 2H by default). Both keep the layers in `net`.
    """

    def __init__(
        self,
        hidden_size: int,
        num_classes: int,
        dropout: float = 0.1,
        kind: str = "linear",
        mid_size: int | None = None,
        eps: float = 1e-12,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"a classification head needs at least one class, got {num_classes}")
        if kind == "linear":
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_size, num_classes))
        elif kind == "mlp":
            mid = mid_size or 2 * hidden_size
            self.net = nn.Sequential(
                nn.Dropout(dropout),
                nn.Linear(hidden_size, mid),
                nn.GELU(),
                nn.LayerNorm(mid, eps=eps),
                nn.Linear(mid, num_classes),
            )
        else:
            raise ValueError(f"unknown classification head kind {kind!r}; use 'linear' or 'mlp'")
        self.kind = kind

    def forward(self, pooled: Tensor) -> Tensor:
        return self.net(pooled)


class RegressionHead(ClassificationHead):
    """One continuous target per utterance (e.g. MOSI sentiment): (B, H) -> (B,)."""

    def __init__(
        self, hidden_size: int, dropout: float = 0.1, kind: str = "linear", mid_size: int | None = None
    ):
        super().__init__(hidden_size, 1, dropout, kind, mid_size)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.net(pooled).squeeze(-1)
