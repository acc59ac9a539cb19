"""Fine-tuning models: the backbone plus one utterance-level head.

Heads (`head` in the downstream config):
  linear      pooled [CLS] -> dropout + Linear(H, C)
  mlp         pooled [CLS] -> dropout, Linear, GELU, LayerNorm, Linear (UNITER's two-layer head)
  regression  pooled [CLS] -> one score (CMU-MOSI sentiment)
  prompt      `[CLS] text <prompt> [SEP]` with a [MASK] in the prompt (default `i am [MASK] .`); the
              MLM head scores the label words of a verbaliser at the [MASK]. Training uses the MLM
              loss over the whole vocabulary (as in pretraining); PREDICTIONS are the argmax over the
              verbaliser's words only, so an out-of-verbaliser word can never be predicted and no
              random fallback is needed (the reference code replaced such words by random labels).

The model is built from our checkpoint or any HF BERT-family directory. A frame stream the
checkpoint lacks (a text-only BERT) is added with the database's feature dim and initialised
fresh; a stream the checkpoint HAS with another dim than the database is an error, because
loading would silently retrain (or crash on) the input layer.

Saved fine-tuned models are ordinary checkpoint dirs (`config.json` + `model.safetensors`, backbone
under `uniter.`) plus `finetune.json` (head, classes, verbaliser, prompt, modalities), so
`UniterModel.from_pretrained` can start a new fine-tuning from them and `load_finetuned` restores
the whole model for evaluation.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from uniter3m.data.tokenization import SpecialTokens, load_tokenizer, vocab_hash
from uniter3m.errors import ConfigError, DatabaseError, UserError
from uniter3m.model.config import UniterConfig
from uniter3m.model.heads import ClassificationHead, MlmHead, RegressionHead
from uniter3m.model.uniter import (
    UniterModel,
    load_weights,
    read_state_dict,
    split_backbone,
    tied_aliases,
    write_pretrained,
)

log = logging.getLogger(__name__)

FINETUNE_FILE = "finetune.json"
HEAD_TYPES = ("linear", "mlp", "prompt", "regression")
STREAMS = ("face", "speech")

# Default label words (single WordPieces of the bert-base-uncased vocabulary).
DEFAULT_VERBALIZERS: dict[str, dict[str, str]] = {
    "iemocap4": {"ang": "angry", "hap": "happy", "neu": "neutral", "sad": "sad"},
    "iemocap6": {
        "hap": "happy",
        "sad": "sad",
        "neu": "neutral",
        "ang": "angry",
        "exc": "excited",
        "fru": "frustrated",
    },
    "msp4": {"ang": "angry", "hap": "happy", "neu": "neutral", "sad": "sad"},
    "meld": {
        "neutral": "neutral",
        "surprise": "surprised",
        "fear": "afraid",
        "sadness": "sad",
        "joy": "happy",
        "disgust": "disgusted",
        "anger": "angry",
        "negative": "negative",
        "positive": "positive",
    },
    "mosi": {"negative": "negative", "positive": "positive"},
}


@dataclass
class FinetuneOutput:
    logits: Tensor | None = None  # (B, C) class scores (prompt: MLM logits of the label words)
    scores: Tensor | None = None  # (B,) regression
    vocab_logits: Tensor | None = None  # (B, V) prompt head, for the MLM loss


@dataclass
class HeadSpec:
    """Everything needed to rebuild the head, saved as finetune.json."""

    head: str
    classes: list[str]
    dropout: float = 0.1
    prompt_ids: list[int] | None = None
    verbalizer: dict[str, str] | None = None
    verbalizer_ids: list[int] | None = None
    protocol: str = ""
    modalities: str = "L"
    fold_index: int | None = None
    fold: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class FinetuneModel(nn.Module):
    """`uniter` backbone + head; `forward(batch) -> FinetuneOutput` on a collated batch."""

    def __init__(self, uniter: UniterModel, spec: HeadSpec, special: SpecialTokens):
        super().__init__()
        if spec.head not in HEAD_TYPES:
            raise ConfigError(f"model.head {spec.head!r} is not one of {', '.join(HEAD_TYPES)}")
        self.uniter = uniter
        self.config = uniter.config
        self.spec = spec
        self.special = special
        self.new_backbone_weights: set[str] = set()  # backbone weights the checkpoint did not hold
        hidden = uniter.config.hidden_size
        if spec.head in ("linear", "mlp"):
            self.head = ClassificationHead(
                hidden, len(spec.classes), spec.dropout, kind=spec.head, eps=uniter.config.layer_norm_eps
            )
        elif spec.head == "regression":
            self.head = RegressionHead(hidden, spec.dropout)
        else:
            if not spec.prompt_ids or not spec.verbalizer_ids:
                raise ConfigError("the prompt head needs prompt ids and verbaliser ids")
            if spec.prompt_ids.count(special.mask_id) != 1:
                raise ConfigError(f"model.prompt must hold exactly one [MASK]; its ids are {spec.prompt_ids}")
            self.cls = nn.ModuleDict(
                {
                    "predictions": MlmHead(
                        uniter.embeddings.word_embeddings,
                        uniter.config.hidden_act,
                        uniter.config.layer_norm_eps,
                    )
                }
            )
            self.register_buffer("prompt", torch.tensor(spec.prompt_ids, dtype=torch.long), persistent=False)
            self.register_buffer(
                "verbalizer_ids", torch.tensor(spec.verbalizer_ids, dtype=torch.long), persistent=False
            )
            self.mask_offset = spec.prompt_ids.index(special.mask_id)

    @property
    def head_type(self) -> str:
        return self.spec.head

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that start untrained (head, streams the checkpoint lacked): `train.head_lr` applies."""
        named = dict(self.uniter.named_parameters())
        yield from (named[n] for n in sorted(self.new_backbone_weights) if n in named)
        if self.spec.head == "prompt":
            # The MLM decoder is tied to the word embeddings: only transform + bias are head-only.
            mlm = self.cls["predictions"]
            yield from mlm.transform.parameters()
            yield mlm.bias
        else:
            yield from self.head.parameters()

    def describe(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        t = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return f"{self.spec.head} head, {len(self.spec.classes)} classes, {n / 1e6:.1f}M params ({t / 1e6:.1f}M trainable)"

    def forward(self, batch: Mapping[str, Any]) -> FinetuneOutput:
        input_ids, txt_mask = batch["input_ids"], batch["txt_mask"]
        mask_pos = None
        if self.spec.head == "prompt":
            input_ids, txt_mask, mask_pos = self._with_prompt(input_ids, txt_mask)
        out = self.uniter(
            input_ids=input_ids,
            attention_mask=txt_mask,
            face_feat=batch.get("face_feat"),
            face_mask=batch.get("face_mask"),
            speech_feat=batch.get("speech_feat"),
            speech_mask=batch.get("speech_mask"),
        )
        if self.spec.head == "regression":
            return FinetuneOutput(scores=self.head(out.pooler_output))
        if self.spec.head != "prompt":
            return FinetuneOutput(logits=self.head(out.pooler_output))
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        at_mask = out.last_hidden_state[rows, mask_pos]
        vocab_logits = self.cls["predictions"](at_mask)
        return FinetuneOutput(logits=vocab_logits[:, self.verbalizer_ids], vocab_logits=vocab_logits)

    def _with_prompt(self, input_ids: Tensor, txt_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`[CLS] text [SEP]` -> `[CLS] text <prompt> [SEP]`, re-padded; returns the [MASK] positions."""
        lengths = txt_mask.sum(dim=1)  # includes [CLS] and [SEP]
        b, p = input_ids.shape[0], self.prompt.numel()
        width = int(lengths.max()) + p
        if width > self.config.max_position_embeddings:
            raise UserError(
                f"text plus prompt needs {width} positions but the model has {self.config.max_position_embeddings}; "
                "lower data.max_txt_len"
            )
        out = torch.full((b, width), self.special.pad_id, dtype=input_ids.dtype, device=input_ids.device)
        mask = torch.zeros((b, width), dtype=torch.bool, device=input_ids.device)
        for i in range(b):
            n = int(lengths[i])
            out[i, : n - 1] = input_ids[i, : n - 1]
            out[i, n - 1 : n - 1 + p] = self.prompt
            out[i, n - 1 + p] = self.special.sep_id
            mask[i, : n + p] = True
        return out, mask, lengths - 1 + self.mask_offset

    def predictions(self, out: FinetuneOutput) -> Tensor:
        """Class indices (argmax; ties go to the lowest index, deterministically) or scores."""
        if out.scores is not None:
            return out.scores.float()
        return out.logits.float().argmax(dim=-1)


# ----------------------------------------------------------------------------- building
def check_feature_dims(
    model_config: UniterConfig, feat_dims: Mapping[str, int], source: str, db_paths: Mapping[str, str | None]
) -> dict[str, Any]:
    """Config overrides adding streams the checkpoint lacks; an error for a dim that differs."""
    overrides: dict[str, Any] = {}
    for stream, dim in feat_dims.items():
        have = model_config.stream(stream).feat_dim
        if have == 0:
            overrides[stream] = {"feat_dim": int(dim)}
        elif have != dim:
            raise DatabaseError(
                f"checkpoint {source} has a {stream} stream of {have}-d features but the {stream} database "
                f"{db_paths.get(stream)} holds {dim}-d features; use the database the checkpoint was trained on, "
                f"start from a checkpoint without a {stream} stream, or leave the stream out of data.modalities"
            )
    return overrides


def prompt_and_verbalizer(
    tokenizer: Any, prompt: str, verbalizer: Mapping[str, str], classes: list[str], special: SpecialTokens
) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (with the tokenizer's [MASK]) and one id per class's label word."""
    missing = [c for c in classes if c not in verbalizer]
    if missing:
        raise ConfigError(f"model.verbalizer has no word for classes {missing}; give one word per class")
    text = prompt.replace("[MASK]", tokenizer.mask_token)
    prompt_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    word_ids = []
    for c in classes:
        pieces = tokenizer(verbalizer[c], add_special_tokens=False)["input_ids"]
        if len(pieces) != 1 or pieces[0] == special.unk_id:
            raise ConfigError(
                f"model.verbalizer word {verbalizer[c]!r} (class {c!r}) is not one token of the vocabulary "
                f"(it splits into {tokenizer.convert_ids_to_tokens(pieces)}); choose a single-token word"
            )
        word_ids.append(int(pieces[0]))
    if len(set(word_ids)) != len(word_ids):
        raise ConfigError(f"model.verbalizer maps two classes to the same word: {dict(verbalizer)}")
    return prompt_ids, word_ids


def build_finetune_model(
    model_cfg: Any,
    plan: Any,
    feat_dims: Mapping[str, int],
    special: SpecialTokens,
    *,
    modalities: str = "L",
    db_paths: Mapping[str, str | None] | None = None,
    txt_meta: Mapping[str, Any] | None = None,
) -> FinetuneModel:
    """The model for `plan` (a ProtocolPlan) from `model_cfg` (downstream ModelConfig)."""
    init = Path(model_cfg.init)
    if not init.is_dir():
        raise UserError(f"model.init {init} is not a directory; give our checkpoint dir or an HF BERT folder")
    base_config = UniterConfig.from_pretrained(init)
    overrides = check_feature_dims(base_config, feat_dims, str(init), db_paths or {})
    if base_config.vocab_size != special.vocab_size:
        raise DatabaseError(
            f"checkpoint {init} has a {base_config.vocab_size}-word vocabulary but the text db was tokenised with "
            f"{special.vocab_size} words; rebuild the text db with the checkpoint's tokenizer"
        )
    uniter, info = UniterModel.from_pretrained(init, output_loading_info=True, **overrides)
    spec = HeadSpec(
        head=model_cfg.head,
        classes=list(plan.label.classes),
        dropout=model_cfg.dropout,
        protocol=plan.name,
        modalities=modalities,
    )
    if spec.head == "prompt":
        tok_dir = model_cfg.tokenizer or (txt_meta or {}).get("tokenizer", {}).get("name") or str(init)
        tokenizer = load_tokenizer(tok_dir)
        db_hash = (txt_meta or {}).get("tokenizer", {}).get("vocab_hash")
        if db_hash and vocab_hash(tokenizer) != db_hash:
            raise DatabaseError(
                f"tokenizer {tok_dir} differs from the one the text db was built with (vocab hash {db_hash}); "
                "set model.tokenizer to that tokenizer"
            )
        verbalizer = model_cfg.verbalizer or DEFAULT_VERBALIZERS.get(plan.name)
        if verbalizer is None:
            raise ConfigError(f"protocol {plan.name} has no default verbaliser: set model.verbalizer")
        spec.prompt_ids, spec.verbalizer_ids = prompt_and_verbalizer(
            tokenizer, model_cfg.prompt, verbalizer, spec.classes, special
        )
        spec.verbalizer = {c: verbalizer[c] for c in spec.classes}
    model = FinetuneModel(uniter, spec, special)
    model.new_backbone_weights = set(info["missing_keys"])
    if spec.head == "prompt":
        _load_mlm_head(model, init)
    _freeze(model, model_cfg.freeze_layers, model_cfg.freeze_embeddings)
    return model


def _load_mlm_head(model: FinetuneModel, init: Path) -> None:
    _, others = split_backbone(read_state_dict(init))
    head = {k[len("cls.predictions.") :]: v for k, v in others.items() if k.startswith("cls.predictions.")}
    head.pop("decoder.weight", None)  # tied to the word embeddings, loaded with them
    head.pop("decoder.bias", None)
    if not head:
        log.warning("%s has no MLM head (cls.predictions.*): the prompt head starts untrained", init)
        return
    load_weights(model.cls["predictions"], head, init)


def _freeze(model: FinetuneModel, layers: int, embeddings: bool) -> None:
    """Freeze the text embeddings (and with them the tied MLM decoder) and the bottom `layers` layers.

    Frame-stream embeddings stay trainable: they are often new (a text-only checkpoint).
    """
    n = model.config.num_hidden_layers
    if layers > n:
        raise ConfigError(f"model.freeze_layers={layers} but the model has {n} layers")
    frozen = [model.uniter.encoder.layer[i] for i in range(layers)]
    if embeddings or layers > 0:
        frozen.append(model.uniter.embeddings)
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)


# ----------------------------------------------------------------------------- save / load
def save_finetuned(
    model: FinetuneModel, directory: str | os.PathLike, extra: Mapping[str, Any] | None = None
) -> None:
    spec = model.spec.to_dict() | dict(extra or {})
    write_pretrained(model, directory, extra_files={FINETUNE_FILE: spec})


def load_finetuned(directory: str | os.PathLike, special: SpecialTokens) -> FinetuneModel:
    """Restore a model saved by `save_finetuned` (strict: every weight must be there)."""
    directory = Path(directory)
    spec_file = directory / FINETUNE_FILE
    if not spec_file.is_file():
        raise UserError(
            f"{directory} has no {FINETUNE_FILE}: it is not a fine-tuned checkpoint; give a `<fold>/best` dir "
            "written by `uniter3m finetune`"
        )
    raw = json.loads(spec_file.read_text())
    known = set(HeadSpec.__dataclass_fields__)
    spec = HeadSpec(**{k: v for k, v in raw.items() if k in known})
    config = UniterConfig.from_pretrained(directory)
    model = FinetuneModel(UniterModel(config), spec, special)
    state = read_state_dict(directory)
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - tied_aliases(model)
    if missing or result.unexpected_keys:
        raise UserError(
            f"{directory}/model.safetensors does not fit its {FINETUNE_FILE}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]}; the checkpoint is damaged"
        )
    return model
