"""Fine-tuning models: the backbone plus one utterance-level head.

A head is a readout and a classifier. The readout (`model.head` in the downstream config:
`model/pooling.py`) gives one vector per utterance: the pooled [CLS] (`cls`, default), a masked `mean`,
a learned-query `attention`, or `streams` (each stream projected, pooled, concatenated); its weights
are `pool.*`. The classifier (`model.classifier`; weights `head.*`, `cls.predictions.*` for prompt)
reads that vector:
  linear      pooled vector -> dropout + Linear(P, C)
  mlp         pooled vector -> dropout, Linear, GELU, LayerNorm, Linear (UNITER's two-layer head)
  regression  pooled vector -> one score (CMU-MOSI sentiment)
  prompt      the input already holds `[CLS] text <prompt> [SEP]` (built by `data/prompts.py` in the
              data workers) and `prompt_positions` says where its mask token is; the MLM head scores
              the label words of the verbaliser there. Training uses the MLM loss over the whole
              vocabulary (as in pretraining); PREDICTIONS are the argmax over the verbaliser's words
              only, so an out-of-verbaliser word can never be predicted and no random fallback is
              needed (the reference code replaced such words by random labels).

`freeze` gives `model.freeze` its meaning (none, embeddings, layers:N, backbone) and
`trainable_groups` counts what trains; LoRA adapters come from `model/lora.py`.

Building the model for a corpus (checkpoint, streams, tokenizer, verbaliser) is the training
engine's job (`uniter3m/train/assembly.py`); this module knows no corpus.

Saved fine-tuned models are ordinary checkpoint dirs (`config.json` + `model.safetensors`, backbone
under `bert.` as in HF BertFor* models) plus `finetune.json` (head, classifier, classes, verbaliser, prompt,
modalities), so
`UniterModel.from_pretrained` can start a new fine-tuning from them and `load_finetuned` restores
the whole model for evaluation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from uniter3m.errors import ConfigError, DatabaseError, UserError
from uniter3m.fileio import building_dir, write_manifest
from uniter3m.model.config import UniterConfig, deep_merge
from uniter3m.model.heads import ClassificationHead, MlmHead, RegressionHead
from uniter3m.model.io import load_into, read_checkpoint, read_json_file, write_pretrained
from uniter3m.model.lora import apply_lora, has_adapters, merged_copy
from uniter3m.model.pooling import HEADS, TEXT, Pooling
from uniter3m.model.uniter import UniterModel
from uniter3m.streams import StreamTable

log = logging.getLogger(__name__)

FINETUNE_FILE = "finetune.json"
CLASSIFIERS = ("linear", "mlp", "prompt", "regression")  # `model.classifier`


@dataclass
class FinetuneOutput:
    logits: Tensor | None = None  # (B, C) class scores (prompt: MLM logits of the label words)
    scores: Tensor | None = None  # (B,) regression
    vocab_logits: Tensor | None = None  # (B, V) prompt classifier, for the MLM loss
    pooled: Tensor | None = None  # (B, P) what the classifier read (model.head), for feature distillation


@dataclass
class HeadSpec:
    """Everything needed to rebuild the head, saved as finetune.json (`read_spec` reads it back)."""

    classifier: str
    classes: list[str]
    dropout: float = 0.1
    prompt_ids: list[int] | None = None  # the prompt classifier's template; its first soft_prompt ids are
    soft_prompt: int = 0  # placeholders for the backbone's learned prompt vectors (embeddings.soft_prompt)
    verbalizer: dict[str, str] | None = None
    verbalizer_ids: list[int] | None = None
    protocol: str = ""
    modalities: str = "L"
    fold_index: int | None = None
    fold: str | None = None
    head: str = "cls"  # the readout, model/pooling.py
    per_stream: bool = False
    lora: dict[str, Any] | None = None  # adapters kept beside the weights (lora.merge_on_save false)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class FinetuneModel(nn.Module):
    """`uniter` backbone + readout (`pool`) + classifier (`head`; prompt: `cls`);
    `forward(batch) -> FinetuneOutput` on a collated batch."""

    def __init__(self, uniter: UniterModel, spec: HeadSpec):
        super().__init__()
        if spec.classifier not in CLASSIFIERS:
            raise ConfigError(f"model.classifier {spec.classifier!r} is not one of {', '.join(CLASSIFIERS)}")
        if spec.head not in HEADS:
            raise ConfigError(f"model.head {spec.head!r} is not one of {', '.join(HEADS)}")
        self.uniter = uniter
        self.config = uniter.config
        self.spec = spec
        self.new_backbone_weights: set[str] = set()  # backbone weights the checkpoint did not hold
        streams = [TEXT, *uniter.config.frame_streams()]
        self.pool = Pooling(spec.head, uniter.config.hidden_size, streams, spec.per_stream)
        if spec.classifier in ("linear", "mlp"):
            self.head = ClassificationHead(
                self.pool.size,
                len(spec.classes),
                spec.dropout,
                kind=spec.classifier,
                eps=uniter.config.layer_norm_eps,
            )
        elif spec.classifier == "regression":
            self.head = RegressionHead(self.pool.size, spec.dropout)
        else:
            if not spec.prompt_ids or not spec.verbalizer_ids:
                raise ConfigError("the prompt classifier needs prompt ids and verbaliser ids")
            self.cls = nn.ModuleDict(
                {
                    "predictions": MlmHead(
                        uniter.embeddings.word_embeddings,
                        uniter.config.hidden_act,
                        uniter.config.layer_norm_eps,
                    )
                }
            )
            self.register_buffer(
                "verbalizer_ids", torch.tensor(spec.verbalizer_ids, dtype=torch.long), persistent=False
            )

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that start untrained (head, streams the checkpoint lacked): `train.head_lr` applies."""
        named = dict(self.uniter.named_parameters())
        yield from (named[n] for n in sorted(self.new_backbone_weights) if n in named)
        if self.spec.classifier == "prompt":
            # The MLM decoder is tied to the word embeddings: only transform + bias are head-only.
            mlm = self.cls["predictions"]
            yield from mlm.transform.parameters()
            yield mlm.bias
        else:
            yield from self.pool.parameters()
            yield from self.head.parameters()

    def describe(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        t = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return f"{self.spec.classifier} classifier on the {self.spec.head} head, {len(self.spec.classes)} classes, {n / 1e6:.1f}M params ({t / 1e6:.1f}M trainable)"

    def forward(self, prompt_positions: Tensor | None = None, **backbone_inputs: Any) -> FinetuneOutput:
        """Backbone keyword arguments (text, frame streams) -> head output; the prompt classifier also
        needs `prompt_positions` (B,), the mask token of each row."""
        out = self.uniter(**backbone_inputs)
        if self.spec.classifier == "regression":
            pooled = self.pool(out)
            return FinetuneOutput(scores=self.head(pooled), pooled=pooled)
        if self.spec.classifier != "prompt":
            pooled = self.pool(out)
            return FinetuneOutput(logits=self.head(pooled), pooled=pooled)
        if prompt_positions is None:
            raise UserError(
                "the prompt classifier needs prompt_positions (built with the prompt by the data workers)"
            )
        rows = torch.arange(prompt_positions.shape[0], device=prompt_positions.device)
        vocab_logits = self.cls["predictions"](out.last_hidden_state[rows, prompt_positions])
        return FinetuneOutput(logits=vocab_logits[:, self.verbalizer_ids], vocab_logits=vocab_logits)

    def probabilities(self, out: FinetuneOutput) -> Tensor:
        """(B, C) class probabilities: softmax over the classes (prompt: over the verbaliser's words)."""
        return out.logits.float().softmax(dim=-1)

    def predictions(self, out: FinetuneOutput) -> Tensor:
        """Class indices (argmax; ties go to the lowest index, deterministically) or scores."""
        if out.scores is not None:
            return out.scores.float()
        return out.logits.float().argmax(dim=-1)


# ----------------------------------------------------------------------------- building
def check_feature_dims(
    model_config: UniterConfig,
    feat_dims: Mapping[str, int],
    source: str,
    db_paths: Mapping[str, str | None],
    stream_table: StreamTable,
) -> dict[str, Any]:
    """Config overrides adding streams the checkpoint lacks (named and lettered by the run's
    `stream_table`); an error for a dim that differs."""
    overrides: dict[str, Any] = {}
    for stream, dim in feat_dims.items():
        have = model_config.stream(stream).feat_dim
        if have == 0:
            overrides = deep_merge(
                overrides, model_config.with_stream(stream_table.get(stream), feat_dim=int(dim))
            )
        elif have != dim:
            raise DatabaseError(
                f"checkpoint {source} has a {stream} stream of {have}-d features but the {stream} database "
                f"{db_paths.get(stream)} holds {dim}-d features; use the database the checkpoint was trained on, "
                f"start from a checkpoint without a {stream} stream, or leave the stream out of data.modalities"
            )
    return overrides


def load_mlm_head(model: FinetuneModel, init: Path) -> None:
    """The prompt classifier starts from the checkpoint's MLM head: the checkpoint goes through the one
    load path again (`load_into`), which fills `cls.predictions` and rewrites the backbone with the
    values it already holds."""
    loaded = read_checkpoint(init, backbone=UniterModel)
    if not any(k.startswith("cls.predictions.") for k in loaded.state):
        log.warning("%s has no MLM head (cls.predictions.*): the prompt classifier starts untrained", init)
        return
    load_into(model, loaded)


FREEZE_VALUES = "none, embeddings, layers:N (N >= 1) or backbone"


def parse_freeze(value: str) -> tuple[str, int]:
    """`model.freeze` -> (kind, N); N is the number of frozen encoder layers (`layers:N` only)."""
    if value in ("none", "embeddings", "backbone"):
        return value, 0
    kind, _, n = value.partition(":")
    if kind == "layers" and n.isdigit() and int(n) >= 1:
        return kind, int(n)
    raise ConfigError(f"model.freeze {value!r}: use {FREEZE_VALUES}")


def freeze(model: FinetuneModel, value: str) -> None:
    """Stop the gradients of part of the backbone (`model.freeze`):

    none        everything trains;
    embeddings  the input embeddings of every stream (text: words, positions, types; each frame
                stream's `<s>_embeddings`) are frozen;
    layers:N    MEmoBERT's: everything below encoder layer N (every embedding and layers 0..N-1);
    backbone    the whole backbone, pooler included: only the readout (`pool`) and the classifier train.

    Backbone weights the checkpoint did not hold (`new_backbone_weights`: a frame stream new to a
    text checkpoint) never freeze, as a frozen random layer is no pretrained one; the log line of
    `trainable_groups` shows them. The prompt classifier's decoder is tied to the word embeddings and
    freezes with them.
    """
    kind, n = parse_freeze(value)
    layers = model.config.num_hidden_layers
    if n > layers:
        raise ConfigError(f"model.freeze {value!r} but the model has {layers} layers")

    def frozen(name: str) -> bool:
        if kind == "backbone":
            return True
        if kind == "none":
            return False
        if name.split(".", 1)[0].endswith("embeddings"):
            return True
        parts = name.split(".")
        return kind == "layers" and parts[:2] == ["encoder", "layer"] and int(parts[2]) < n

    for name, param in model.uniter.named_parameters():
        if frozen(name) and name not in model.new_backbone_weights:
            param.requires_grad_(False)


def trainable_groups(model: FinetuneModel) -> dict[str, tuple[int, int]]:
    """{group: (trainable, total) parameter counts}: each embedding module, each encoder layer, the
    pooler, the LoRA adapters, and `head` (readout + classifier); logged once per fold."""
    groups: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            group = "lora"
        elif name.startswith("uniter."):
            parts = name.split(".")
            group = ".".join(parts[1:4]) if parts[1] == "encoder" else parts[1]
        else:
            group = "head"
        counts = groups.setdefault(group, [0, 0])
        counts[0] += param.numel() if param.requires_grad else 0
        counts[1] += param.numel()
    return {g: (t, n) for g, (t, n) in groups.items()}


def describe_trainable(groups: Mapping[str, tuple[int, int]]) -> str:
    """`trainable parameters: embeddings 0/11.9M, ..., head 1.9k/1.9k; 3.2M of 22.7M (14.1%)`."""

    def size(n: int) -> str:
        return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)

    trainable = sum(t for t, _ in groups.values())
    total = sum(n for _, n in groups.values())
    parts = ", ".join(f"{g} {size(t)}/{size(n)}" for g, (t, n) in groups.items())
    return f"trainable parameters: {parts}; {size(trainable)} of {size(total)} ({100 * trainable / max(total, 1):.1f}%)"


# ----------------------------------------------------------------------------- save / load
def save_finetuned(
    model: FinetuneModel, directory: str | os.PathLike, extra: Mapping[str, Any] | None = None
) -> None:
    """Write the model, `finetune.json` (head spec + `extra`), the run's tokenizer files, a model card and
    the manifest, into a new folder that then replaces `directory` whole.

    The tokenizer and the card's config come from the run's resolved `config.json`, two folders up
    (`<output_dir>/fold<K>-<name>/best`), unless `extra["tokenizer"]` names the tokenizer folder.
    """
    from uniter3m.model.card import (
        copy_tokenizer,
        native_loading_note,
        read_run_config,
        run_tokenizer_dir,
        write_model_card,
    )

    directory = Path(directory)
    run_config = read_run_config(directory.parent.parent)
    tok_dir = (extra or {}).get("tokenizer") or run_tokenizer_dir(run_config)
    spec = model.spec.to_dict() | dict(extra or {}) | ({"tokenizer": str(tok_dir)} if tok_dir else {})
    if has_adapters(model) and model.spec.lora is None:  # lora.merge_on_save: plain BERT weights
        model = merged_copy(model)
    with building_dir(directory) as tmp:  # swapped in whole: a kill never mixes two saves
        write_pretrained(model, tmp, extra_files={FINETUNE_FILE: spec})
        copied = copy_tokenizer(tok_dir, tmp)
        text_only = (
            spec.get("modalities") == "L"
            and spec["classifier"] in ("linear", "regression")
            and spec["head"] == "cls"
        )
        export = (
            " As a text-only model with a linear classifier on the cls head it exports to a transformers classifier: "
            "`uniter3m convert --to hf-bert --checkpoint DIR --out HF_DIR` writes a BertForSequenceClassification "
            "(`transformers.pipeline('text-classification', model=HF_DIR)`)."
            if text_only
            else ""
        )
        write_model_card(
            tmp,
            f"uniter3m emotion model ({spec.get('protocol') or 'fine-tuned'}, {spec['classifier']} classifier on "
            f"the {spec['head']} head)",
            f"Fine-tuned on modalities {spec.get('modalities')}, fold {spec.get('fold')}, classes "
            f"{', '.join(map(str, spec['classes']))}; selected at step {spec.get('step')} on the validation split."
            + ("" if copied else " No tokenizer files were found for this run.")
            + export,
            transformers_use=native_loading_note("BertModel")
            + " `uniter3m evaluate --checkpoint DIR` scores it per modality case.",
            sections={
                "Validation metrics (selection)": spec.get("valid"),
                "Data": (run_config or {}).get("data"),
                "Run config": run_config,
            },
        )
        write_manifest(tmp)


def saved_head_layout(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record a run folder saved (`finetune.json`, its config's `model` section) in today's names.
    Before `model.classifier` existed, `head` held the classifier kind and `pool` the readout (absent
    before pooling heads: cls). Only what a run folder saved is read this way: a config a user gives
    with the old meaning gets the ConfigError that names `model.classifier`."""
    if "classifier" in record or record.get("head") not in CLASSIFIERS:
        return dict(record)
    new = {k: v for k, v in record.items() if k != "pool"}
    new.update(classifier=record["head"], head=record.get("pool", "cls"))
    return new


def read_spec(directory: str | os.PathLike) -> dict[str, Any]:
    """`finetune.json` of a saved model, in today's names (`saved_head_layout`)."""
    return saved_head_layout(read_json_file(Path(directory) / FINETUNE_FILE))


def load_finetuned(directory: str | os.PathLike) -> FinetuneModel:
    """Restore a model saved by `save_finetuned` (strict: every weight must be there)."""
    directory = Path(directory)
    if not (directory / FINETUNE_FILE).is_file():
        raise UserError(
            f"{directory} has no {FINETUNE_FILE}: it is not a fine-tuned checkpoint; give a `<fold>/best` dir "
            "written by `uniter3m finetune`"
        )
    raw = read_spec(directory)
    known = set(HeadSpec.__dataclass_fields__)
    spec = HeadSpec(**{k: v for k, v in raw.items() if k in known})
    loaded = read_checkpoint(directory, "uniter3m", backbone=UniterModel)
    model = FinetuneModel(UniterModel(loaded.config), spec)
    if spec.lora:  # saved with its adapters unmerged (lora.merge_on_save false)
        apply_lora(model, **spec.lora)
    load_into(model, loaded, strict=True)
    return model
