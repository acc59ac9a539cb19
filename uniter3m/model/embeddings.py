"""Input embeddings: BERT's text embeddings and ONE class for any per-frame feature stream.

Parameter names follow HF BERT (`word_embeddings`, `position_embeddings`, `token_type_embeddings`,
`LayerNorm`) so BERT checkpoints load without renaming. A frame stream maps features to the hidden
size (`feat_linear` -> `feat_layer_norm`), adds positions in slot order and a type vector, then
LayerNorm and dropout, as UNITER's image embeddings do.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from uniter3m.errors import UserError
from uniter3m.model.config import FrameStreamConfig, UniterConfig


class TextEmbeddings(nn.Module):
    """word + position + token type, LayerNorm, dropout (HF BertEmbeddings).

    `soft_prompt` (config `soft_prompt_tokens` > 0): N learned vectors that stand in for the word
    embedding at the positions `soft_slots` marks (slot k >= 0 takes vector k, -1 keeps the word), so
    a prompt can hold learned "words" with no vocabulary row (a tokenizer would split `[unused1]`).
    """

    def __init__(self, config: UniterConfig):
        super().__init__()
        h = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, h, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, h)
        self.LayerNorm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.register_buffer(
            "position_ids", torch.arange(config.max_position_embeddings).unsqueeze(0), persistent=False
        )
        n = config.soft_prompt_tokens
        self.soft_prompt = nn.Parameter(torch.zeros(n, h)) if n else None

    def forward(
        self, input_ids: Tensor, token_type_ids: Tensor | None = None, soft_slots: Tensor | None = None
    ) -> Tensor:
        length = input_ids.shape[1]
        if length > self.position_embeddings.num_embeddings:
            raise UserError(
                f"text of {length} tokens is longer than max_position_embeddings "
                f"{self.position_embeddings.num_embeddings}; truncate the text (data max_txt_len)"
            )
        x = self.word_embeddings(input_ids)
        if soft_slots is not None:
            if self.soft_prompt is None:
                raise UserError(
                    "the batch marks soft-prompt positions (soft_slots) but the model has no learned prompt "
                    "vectors: build it with soft_prompt_tokens = the prompt task's soft_prompt"
                )
            slots = soft_slots.to(x.device)
            soft = self.soft_prompt.to(x.dtype)[slots.clamp(min=0)]
            x = torch.where((slots >= 0).unsqueeze(-1), soft, x)
        x = x + self.position_embeddings(self.position_ids[:, :length])
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


def sinusoidal_positions(num_positions: int, dim: int, device=None, dtype=torch.float32) -> Tensor:
    """The fixed table of "Attention is all you need": sin on even, cos on odd channels."""
    pos = torch.arange(num_positions, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(num_positions, dim, device=device, dtype=torch.float32)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table.to(dtype)


class FrameEmbeddings(nn.Module):
    """Embeddings of one frame stream (face or speech); the same class serves both.

    `mask_embedding` (a learned vector in feature space) replaces the frames that a masked-frame
    objective hides, before the input linear, so the model never sees their features.
    `token_type_embeddings` exists only when the stream has its own type (speech in MEmoBERT's
    layout); otherwise the caller passes the shared type vector.
    """

    def __init__(self, stream: FrameStreamConfig, config: UniterConfig, own_type: bool = False):
        super().__init__()
        if not stream.present:
            raise UserError("FrameEmbeddings needs a stream with feat_dim > 0")
        h = config.hidden_size
        self.feat_dim = stream.feat_dim
        self.feature_dropout = nn.Dropout(config.feature_dropout)  # on the raw features (identity at 0)
        self.feat_linear = nn.Linear(stream.feat_dim, h)
        self.feat_layer_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        # optional projection block, MEmoBERT's layout: Linear -> GELU -> LayerNorm
        self.projs_linear = nn.Linear(h, h) if stream.projection else None
        self.projs_layer_norm = nn.LayerNorm(h, eps=config.layer_norm_eps) if stream.projection else None
        self.sinusoidal = stream.position == "sinusoidal"
        if self.sinusoidal:
            self.position_embeddings = None
            self.register_buffer("sinusoid", sinusoidal_positions(stream.max_frames, h), persistent=False)
        else:
            self.position_embeddings = nn.Embedding(stream.max_frames, h)
        self.token_type_embeddings = nn.Embedding(1, h) if own_type else None
        self.LayerNorm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.mask_embedding = nn.Parameter(torch.zeros(stream.feat_dim))

    def position_table(self, num_frames: int) -> Tensor:
        """(num_frames, hidden) positions of slots 0..num_frames-1 (also what frame-order heads score)."""
        if self.sinusoidal:
            if num_frames <= self.sinusoid.shape[0]:
                return self.sinusoid[:num_frames]
            return sinusoidal_positions(
                num_frames, self.sinusoid.shape[1], self.sinusoid.device, self.sinusoid.dtype
            )
        if num_frames > self.position_embeddings.num_embeddings:
            raise UserError(
                f"{num_frames} frames exceed max_frames {self.position_embeddings.num_embeddings} of a learned "
                "position table; cap the frames in the data config, raise max_frames or use sinusoidal positions"
            )
        return self.position_embeddings.weight[:num_frames]

    def forward(
        self, feat: Tensor, type_embedding: Tensor | None = None, frame_mask: Tensor | None = None
    ) -> Tensor:
        """feat (B, T, D) -> (B, T, hidden); frame_mask (B, T) bool marks frames to hide."""
        if feat.shape[-1] != self.feat_dim:
            raise UserError(
                f"frame features have dim {feat.shape[-1]} but the model expects {self.feat_dim}; "
                "use the database the model was built for or set the stream's feat_dim in the model config"
            )
        feat = feat.to(self.feat_linear.weight.dtype)
        if frame_mask is not None:
            feat = torch.where(frame_mask.unsqueeze(-1), self.mask_embedding.to(feat.dtype), feat)
        x = self.feat_layer_norm(self.feat_linear(self.feature_dropout(feat)))
        if self.projs_linear is not None:
            x = self.projs_layer_norm(nn.functional.gelu(self.projs_linear(x)))
        x = x + self.position_table(feat.shape[1])
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings.weight[0]
        elif type_embedding is not None:
            x = x + type_embedding
        return self.dropout(self.LayerNorm(x))
