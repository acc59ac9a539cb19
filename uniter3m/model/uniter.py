"""`UniterModel`: one transformer over `[text | face | speech]` of each utterance.

Any subset of the three streams may be given; the joint sequence is their concatenation in that
order, and the joint mask tells attention which positions are real. A stream whose mask row is all
False (an utterance with no face found) simply contributes no positions to that utterance.

Checkpoints are directories with `config.json` + `model.safetensors`; `from_pretrained` also reads
HF BERT-family directories (`model.safetensors` or `pytorch_model.bin`, keys with or without the
`bert.` prefix, or our `uniter.` prefix of models with heads) with no renaming of the text side.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from uniter3m.errors import UserError
from uniter3m.model.config import UniterConfig
from uniter3m.model.embeddings import FrameEmbeddings, TextEmbeddings
from uniter3m.model.encoder import UniterEncoder
from uniter3m.model.io import load_into, read_checkpoint, write_pretrained


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel and/or torch.compile wrappers (or the model itself)."""
    for attr in ("module", "_orig_mod"):
        while hasattr(model, attr) and isinstance(getattr(model, attr), nn.Module):
            model = getattr(model, attr)
    return model


@dataclass
class UniterOutput:
    """last_hidden_state (B, L, H); pooler_output (B, H); attention_mask (B, L) bool; `segments` name -> slice.

    The segment bounds are computed when read, from the per-stream views in `stream_states`: a
    compiled forward returns only tensors, so its graph never depends on a stream's length as a
    Python number (which would recompile it for every length).
    """

    last_hidden_state: Tensor
    pooler_output: Tensor
    attention_mask: Tensor
    stream_states: dict[str, Tensor] = field(default_factory=dict)  # name -> (B, T, H) view

    @property
    def segments(self) -> dict[str, slice]:
        out, start = {}, 0
        for name, states in self.stream_states.items():
            out[name] = slice(start, start + states.shape[1])
            start += states.shape[1]
        return out


class UniterPooler(nn.Module):
    """tanh(dense(h)) of each utterance's first real position ([CLS] whenever text is present)."""

    def __init__(self, config: UniterConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        first = mask.int().argmax(dim=1)  # 0 for a row with no real position: finite, ignored
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
        return torch.tanh(self.dense(picked))


def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation: normal(0, std) weights, zero biases, LayerNorm 1/0."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, FrameEmbeddings):
        nn.init.normal_(module.mask_embedding, std=std)
    elif isinstance(module, TextEmbeddings) and module.soft_prompt is not None:
        nn.init.normal_(module.soft_prompt, std=std)


class UniterModel(nn.Module):
    """The backbone. Frame streams come from its config's stream table (`config.stream_table`):
    stream `name` has the module `<name>_embeddings` and takes `<name>_feat`, `<name>_mask` and
    `<name>_frame_mask` in `forward`; face and speech are spelled out in the signature only so
    that existing callers keep working, and any declared stream goes through `**frames`."""

    def __init__(self, config: UniterConfig):
        super().__init__()
        self.config = config
        # fixed with the modules: forward loops over the streams of the config the model was built from
        self.frame_streams = config.stream_table.frame_streams()
        self.embeddings = TextEmbeddings(config)
        self.face_embeddings: FrameEmbeddings | None = None  # weight names of every checkpoint
        self.speech_embeddings: FrameEmbeddings | None = None
        for name, section in config.frame_streams().items():
            own = name == "speech" and config.speech_type == "own"
            setattr(self, f"{name}_embeddings", FrameEmbeddings(section, config, own_type=own))
        self.encoder = UniterEncoder(config)
        self.pooler = UniterPooler(config)
        self.apply(lambda m: init_bert_weights(m, config.initializer_range))

    @property
    def gradient_checkpointing(self) -> bool:
        return self.encoder.gradient_checkpointing

    def gradient_checkpointing_enable(self, enable: bool = True) -> None:
        self.encoder.gradient_checkpointing = enable

    def stream_embeddings(self, name: str) -> FrameEmbeddings | None:
        return getattr(self, f"{name}_embeddings", None)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        face_feat: Tensor | None = None,
        face_mask: Tensor | None = None,
        speech_feat: Tensor | None = None,
        speech_mask: Tensor | None = None,
        face_frame_mask: Tensor | None = None,
        speech_frame_mask: Tensor | None = None,
        padded: bool | None = None,
        pack_src: Tensor | None = None,
        pack_dst: Tensor | None = None,
        pack_doc: Tensor | None = None,
        soft_slots: Tensor | None = None,
        **frames: Tensor | None,
    ) -> UniterOutput:
        """`padded=False` promises every mask given is all True (the collator knows; the model then
        passes SDPA no mask, without asking the device); None checks the masks. `pack_*` (a plan of
        `uniter3m.data.packing.pack_plan`) runs the encoder on packed rows; the output is the same.
        `soft_slots` (B, L) puts learned prompt vector k at the text positions holding k (-1: the word)."""
        frames.update(
            face_feat=face_feat,
            face_mask=face_mask,
            face_frame_mask=face_frame_mask,
            speech_feat=speech_feat,
            speech_mask=speech_mask,
            speech_frame_mask=speech_frame_mask,
        )
        known = {k for s in self.frame_streams for k in (s.feat_key, s.mask_key, s.frame_mask_key)}
        unknown = sorted(k for k, v in frames.items() if v is not None and k not in known)
        if unknown:
            raise UserError(
                f"UniterModel got unknown inputs {unknown}; the model's frame streams are "
                f"{self.config.stream_table.describe()} (declare a new one in the model config's `streams` section)"
            )
        parts: list[Tensor] = []
        masks: list[Tensor] = []
        names: list[str] = []

        def add(name: str, emb: Tensor, mask: Tensor | None) -> None:
            if mask is None:
                mask = torch.ones(emb.shape[:2], dtype=torch.bool, device=emb.device)
            elif mask.shape != emb.shape[:2]:
                raise UserError(f"{name} mask has shape {tuple(mask.shape)}, expected {tuple(emb.shape[:2])}")
            parts.append(emb)
            masks.append(mask.to(device=emb.device, dtype=torch.bool))
            names.append(name)

        if input_ids is not None:
            add("text", self.embeddings(input_ids, token_type_ids, soft_slots), attention_mask)
        for stream in self.frame_streams:
            feat = frames.get(stream.feat_key)
            if feat is None:
                continue
            module = self.stream_embeddings(stream.name)
            if module is None:
                raise UserError(
                    f"the batch has a {stream.name} stream but the model has none ({stream.name}.feat_dim = 0 "
                    f"in its config); give the model a {stream.name} stream or leave {stream.letter} out of "
                    "the data's modalities"
                )
            type_embedding = self._type_embedding(stream.name)
            add(
                stream.name,
                module(feat, type_embedding, frames.get(stream.frame_mask_key)),
                frames.get(stream.mask_key),
            )
        if not parts:
            raise UserError("UniterModel needs at least one stream: input_ids or a frame stream's features")

        hidden = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        mask = masks[0] if len(masks) == 1 else torch.cat(masks, dim=1)
        if pack_doc is not None:
            hidden = self.encoder.forward_packed(hidden, pack_src, pack_dst, pack_doc)
        else:
            hidden = self.encoder(hidden, mask, padded)
        views = torch.split(hidden, [p.shape[1] for p in parts], dim=1)
        return UniterOutput(hidden, self.pooler(hidden, mask), mask, dict(zip(names, views, strict=True)))

    def _type_embedding(self, stream: str) -> Tensor | None:
        """The shared frame type vector (row `face_type_id` of the text type table), or None for an own type."""
        if stream == "speech" and self.config.speech_type == "own":
            return None
        return self.embeddings.token_type_embeddings.weight[self.config.face_type_id]

    # -- checkpoints ------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `config.json` + `model.safetensors` atomically (weights first, config last)."""
        write_pretrained(self, directory)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, output_loading_info: bool = False, **config_overrides: Any
    ) -> UniterModel | tuple[UniterModel, dict[str, Any]]:
        """Load ours or an HF BERT-family directory through the one reader and `load_into` (`model.io`).

        Missing text/encoder weights are an error; frame streams the checkpoint lacks start fresh
        and are reported (`info["missing_keys"]`, `info["new_streams"]`), as are unused weights.
        """
        loaded = read_checkpoint(directory, backbone=UniterModel)
        model = cls(loaded.model_config(**config_overrides))
        info = load_into(model, loaded)
        return (model, info) if output_loading_info else model
