"""Carry weights between uniter3m and other checkpoint formats (docs/DESIGN.md §3 and §5).

Every converter here is a pure function: a source state dict in, a state dict in the target's
names and a `ConversionReport` out. Nothing here touches the disk (`model/io.py` reads checkpoints,
`model/export.py` writes converted folders), so each rule can be tested on tensors alone. The
report is the contract with the user: every source key is either converted or listed as ignored
with a reason, and every key of the target model that no source key filled is listed as new
(freshly initialised, filled in by `io.load_into`).

Our names (the UniterForPretraining namespace): the backbone under `uniter.` with HF BERT names
(`uniter.embeddings.*`, `uniter.encoder.layer.N.*`, `uniter.pooler.dense.*`), frame streams
`uniter.face_embeddings.*` / `uniter.speech_embeddings.*`, heads at the top level
(`cls.predictions.*`, `face_regress.*`, ...). `backbone_only` strips this to UniterModel names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from uniter3m.errors import UserError

StateDict = dict[str, torch.Tensor]

BACKBONE = "uniter."
HF_BACKBONE = "bert."  # our `uniter.` on disk, where HF BertFor* models keep their backbone
TEXT_BACKBONE_PREFIXES = ("embeddings.", "encoder.", "pooler.")
# Learned prompt vectors (config `soft_prompt_tokens`): BERT has no place for them, so an HF export
# writes them to their own file, rows to put into `inputs_embeds` where the prompt had them.
SOFT_PROMPT_KEY = BACKBONE + "embeddings.soft_prompt"
SOFT_PROMPT_FILE = "soft_prompt.safetensors"


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


@dataclass
class ConversionReport:
    """What happened to every key: converted (ours <- source), new (ours, no source), ignored."""

    source_kind: str
    converted: dict[str, str] = field(default_factory=dict)
    new: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # ignored source keys that carried nothing (index buffers, tied or duplicate copies)
    harmless: set[str] = field(default_factory=set)

    def convert(self, ours: str, source: str) -> None:
        self.converted[ours] = source

    def ignore(self, source: str, reason: str, harmless: bool = False) -> None:
        self.ignored[source] = reason
        if harmless:
            self.harmless.add(source)

    def unused(self) -> list[str]:
        """Source keys that held weights and were left out (what a loader calls unexpected)."""
        return sorted(k for k in self.ignored if k not in self.harmless)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source_kind": self.source_kind,
            "counts": {"converted": len(self.converted), "new": len(self.new), "ignored": len(self.ignored)},
            "converted": dict(sorted(self.converted.items())),
            "new": sorted(self.new),
            "ignored": dict(sorted(self.ignored.items())),
            "notes": list(self.notes),
        }

    def summary(self, limit: int = 12) -> str:
        """A few lines for the terminal; the JSON file holds every key."""
        lines = [
            f"converted {len(self.converted)} tensors from {self.source_kind}; "
            f"{len(self.new)} new (freshly initialised); {len(self.ignored)} source keys ignored"
        ]
        for title, keys in (("new", sorted(self.new)), ("ignored", sorted(self.ignored))):
            if keys:
                shown = [k if title == "new" else f"{k} ({self.ignored[k]})" for k in keys[:limit]]
                more = f"  ... and {len(keys) - limit} more" if len(keys) > limit else ""
                lines.append(f"{title}:\n  " + "\n  ".join(shown) + (f"\n{more}" if more else ""))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Small name rules shared by the converters
# --------------------------------------------------------------------------------------------


def rename_layer_norm(key: str) -> str:
    """TF-era LayerNorm names `gamma`/`beta` -> `weight`/`bias` (only as the last name part)."""
    head, _, last = key.rpartition(".")
    last = {"gamma": "weight", "beta": "bias"}.get(last, last)
    return f"{head}.{last}" if head else last


def strip_prefix(key: str, prefixes: Iterable[str]) -> tuple[str, str]:
    """Remove the first matching prefix; returns (prefix or '', rest)."""
    for prefix in prefixes:
        if key.startswith(prefix):
            return prefix, key[len(prefix) :]
    return "", key


def backbone_only(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Our full (pretraining-namespace) state dict -> the keys of a bare UniterModel."""
    return {k[len(BACKBONE) :]: v for k, v in state_dict.items() if k.startswith(BACKBONE)}


def to_full_namespace(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Accept either a UniterModel or a UniterForPretraining state dict; return the latter's names."""
    if any(k.startswith(BACKBONE) for k in state_dict):
        return dict(state_dict)
    return {BACKBONE + k: v for k, v in state_dict.items()}


_STREAM = re.compile(r"^uniter\.(\w+)_embeddings\.")


def frame_stream(key: str) -> str | None:
    """`uniter.<name>_embeddings.*` -> name (any frame stream); None for the text side and heads."""
    match = _STREAM.match(key)
    return match.group(1) if match else None


def _is_position_ids(key: str) -> bool:
    return key.endswith("position_ids")


# --------------------------------------------------------------------------------------------
# HF BERT family (BERT with or without `bert.`, RoBERTa) -> ours
# --------------------------------------------------------------------------------------------

ROBERTA_POSITION_OFFSET = 2  # RoBERTa numbers positions from padding_idx + 1 (= 2: its pad id is 1)


def roberta_position_offset(config: Mapping[str, Any] | None) -> int:
    """padding_idx + 1: the first row of a RoBERTa position table that a real token uses."""
    pad = (config or {}).get("pad_token_id")
    return ROBERTA_POSITION_OFFSET if pad is None else int(pad) + 1


# HF MLM head names -> ours (ours keep BERT's `cls.predictions.*` names).
_ROBERTA_LM_HEAD = {
    "lm_head.dense.weight": "cls.predictions.transform.dense.weight",
    "lm_head.dense.bias": "cls.predictions.transform.dense.bias",
    "lm_head.layer_norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "lm_head.layer_norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "lm_head.decoder.weight": "cls.predictions.decoder.weight",
    "lm_head.bias": "cls.predictions.bias",
    "lm_head.decoder.bias": "cls.predictions.bias",
}


def hf_family(state_dict: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> str:
    """'roberta' or 'bert', from the config's model_type or the key names."""
    model_type = str((config or {}).get("model_type", "")).lower()
    if model_type in {"roberta", "xlm-roberta", "camembert"}:
        return "roberta"
    if any(k.startswith("roberta.") or k.startswith("lm_head.") for k in state_dict):
        return "roberta"
    return "bert"


def convert_hf_bert(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None
) -> tuple[StateDict, ConversionReport]:
    """An HF BERT-family state dict (BertModel, BertFor*, RobertaModel, RobertaFor*) -> ours.

    RoBERTa's position table starts at row padding_idx + 1 = 2 (rows 0-1 are never used for
    real tokens), so the first two rows are sliced off: our position i is RoBERTa's i + 2, which
    gives identical embeddings for every real token of a right-padded sequence.
    """
    family = hf_family(state_dict, config)
    offset = roberta_position_offset(config)
    report = ConversionReport(source_kind=f"hf-{family}")
    out: StateDict = {}
    for key, tensor in state_dict.items():
        name = rename_layer_norm(key)
        _, name = strip_prefix(name, ("bert.", "roberta.", "model."))
        if _is_position_ids(name):
            report.ignore(key, "index buffer, not a weight (positions are computed)", harmless=True)
            continue
        if family == "roberta" and name == "embeddings.position_embeddings.weight":
            tensor = tensor[offset:]
            report.note(
                f"RoBERTa position table: rows 0-{offset - 1} (padding offset) were dropped, "
                f"{tensor.shape[0]} positions kept"
            )
        _place_bert(out, report, name, key, tensor)
    resolve_tied(out, report)
    return out, report


def _place_bert(
    out: StateDict, report: ConversionReport, name: str, source: str, tensor: torch.Tensor
) -> None:
    """A weight under its BERT name (HF or renamed TF) into ours: the text backbone and the MLM head
    (HF's and RoBERTa's names) are kept, the NSP head and anything else are reported as ignored."""
    if name.startswith(TEXT_BACKBONE_PREFIXES):
        _put(out, report, BACKBONE + name, source, tensor)
    elif name.startswith("cls.predictions."):
        ours = "cls.predictions.bias" if name == "cls.predictions.decoder.bias" else name
        _put(out, report, ours, source, tensor)
    elif name in _ROBERTA_LM_HEAD:
        _put(out, report, _ROBERTA_LM_HEAD[name], source, tensor)
    elif name.startswith("cls.seq_relationship."):
        report.ignore(source, "BERT next-sentence head: uniter3m has no NSP task")
    else:
        report.ignore(source, "not part of a BERT encoder or its MLM head")


def _put(out: StateDict, report: ConversionReport, ours: str, source: str, tensor: torch.Tensor) -> None:
    if ours in out:
        previous = report.converted[ours]
        if torch.equal(out[ours], tensor):
            report.ignore(source, f"duplicate of {previous} (same values)", harmless=True)
            return
        raise UserError(
            f"source keys {previous!r} and {source!r} both map to {ours!r} with different values; "
            "the checkpoint mixes two models: convert each separately"
        )
    out[ours] = tensor
    report.convert(ours, source)


# --------------------------------------------------------------------------------------------
# Original Google BERT TensorFlow checkpoints -> ours
# --------------------------------------------------------------------------------------------

_TF_OPTIMISER_PARTS = ("adam_m", "adam_v", "global_step", "Momentum", "RMSProp")
_TF_EMBEDDING_TABLES = ("word_embeddings", "position_embeddings", "token_type_embeddings")


def tf_bert_name(variable: str) -> str | None:
    """`bert/encoder/layer_3/attention/self/query/kernel` -> `encoder.layer.3.attention.self.query.weight`.

    Returns None for optimiser slots and step counters (not weights). `cls/predictions/*` keeps
    its `cls.predictions.` prefix; everything under `bert/` loses it.
    """
    parts = variable.split("/")
    if any(p in _TF_OPTIMISER_PARTS for p in parts):
        return None
    if parts[0] == "bert":
        parts = parts[1:]
    renamed: list[str] = []
    for part in parts:
        layer = re.fullmatch(r"layer_(\d+)", part)
        if layer:
            renamed += ["layer", layer.group(1)]
        elif part in ("kernel", "gamma", "output_weights"):
            renamed.append("weight")
        elif part in ("beta", "output_bias"):
            renamed.append("bias")
        else:
            renamed.append(part)
    if renamed and renamed[-1] in _TF_EMBEDDING_TABLES:
        renamed.append("weight")
    return ".".join(renamed)


def convert_tf_bert(variables: Mapping[str, np.ndarray]) -> tuple[StateDict, ConversionReport]:
    """Variables of a Google BERT checkpoint (name -> array) -> ours.

    Dense kernels are stored (in, out) in TF and transposed to torch's (out, in). The MLM decoder
    is tied to the word embeddings in that code, so it has no variable of its own.
    """
    report = ConversionReport(source_kind="tf-bert")
    out: StateDict = {}
    for variable in sorted(variables):
        name = tf_bert_name(variable)
        if name is None:
            report.ignore(variable, "optimiser state or step counter, not a weight")
            continue
        tensor = torch.from_numpy(np.array(variables[variable], copy=True))
        if variable.endswith("/kernel"):
            tensor = tensor.t().contiguous()
        _place_bert(out, report, name, variable, tensor)
    resolve_tied(out, report)
    return out, report


# --------------------------------------------------------------------------------------------
# UNITER / MEmoBERT research checkpoints (model_step_N.pt) -> ours
# --------------------------------------------------------------------------------------------

# Their frame-stream module -> our stream; their part names -> ours.
_STREAM_MODULES = {"img_embeddings.": "face", "speech_embeddings.": "speech"}
_STREAM_PARTS = {
    "img_linear.": "feat_linear.",
    "speech_linear.": "feat_linear.",
    "img_layer_norm.": "feat_layer_norm.",
    "speech_layer_norm.": "feat_layer_norm.",
    "position_embeddings.": "position_embeddings.",
    "LayerNorm.": "LayerNorm.",
    "token_type_embeddings.": "token_type_embeddings.",
    # MEmoBERT: Sequential(Dropout, Linear, GELU, LayerNorm, Dropout); ours: projs_linear, GELU, projs_layer_norm.
    "projs_linear.1.": "projs_linear.",
    "projs_linear.3.": "projs_layer_norm.",
    "projs_linear.weight": "projs_linear.weight",  # a plain Linear, as ours
    "projs_linear.bias": "projs_linear.bias",
}
_STREAM_IGNORED = {
    "pos_linear.": "UNITER box-geometry input (7-d region boxes): uniter3m frames use slot positions instead",
    "pos_layer_norm.": "UNITER box-geometry input (7-d region boxes): uniter3m frames use slot positions instead",
}
# Text-embedding extras of MEmoBERT's SentiLARE variant, which uniter3m does not have.
_SENTILARE_EMBEDDINGS = ("word_senti_embedding", "pos_tag_embedding", "utt_senti_embedding")

# Their head prefix -> ours, for heads whose layout is the same on both sides (see heads.py).
HEAD_RENAMES = {
    "cls.predictions.": "cls.predictions.",
    "feat_regress.": "face_regress.",
    "speech_feat_regress.": "speech_regress.",
    "region_classifier.": "face_classifier.",
    "itm_output.": "itm.linear.",
    # MEmoBERT's MELM multitask head, EmoClassification(cls_type="vqa"): Sequential(Linear(H, 2H), GELU,
    # LayerNorm(2H), Linear(2H, C)); ours keeps a Dropout first, so each layer's index is one higher.
    "emomelm_classifier.output.0.": "emo_word_classifier.net.1.",
    "emomelm_classifier.output.2.": "emo_word_classifier.net.3.",
    "emomelm_classifier.output.3.": "emo_word_classifier.net.4.",
}
# Heads of theirs that do not carry over (reported as ignored, with the reason).
_IGNORED_HEADS = {
    "vfom_output.": "frame-order head of another design (a Linear over max_frames slots); uniter3m's scores "
    "each slot against the position table, so it starts fresh",
    "sfom_output.": "frame-order head of another design (a Linear over max_frames slots); uniter3m's scores "
    "each slot against the position table, so it starts fresh",
    "emo_classifier.": "two-layer weak-label emotion head; uniter3m's pretraining emo_classifier is one Linear, "
    "so it starts fresh",
    "output.": "fine-tuned classifier: fine-tune a new head from the converted backbone "
    "(uniter3m finetune with model.init = the output folder)",
    "eitm_output.": "emotion-word ITM head: no uniter3m task uses it",
    "emomelm_classifier.net.": "MELM multi-task head of the older UNITER code (hidden width H); uniter3m's "
    "emo_word_classifier is 2H wide (MEmoBERT's uniter3m code), so it starts fresh",
    "pos_tag_predictions.": "SentiLARE POS head: not in uniter3m",
    "senti_word_predictions.": "SentiLARE word-sentiment head: not in uniter3m",
    "senti_utt_predictions.": "SentiLARE utterance-sentiment head: not in uniter3m",
}


def convert_uniter(
    state_dict: Mapping[str, torch.Tensor], flavour: str = "memobert"
) -> tuple[StateDict, ConversionReport]:
    """A UNITER or MEmoBERT state dict (pretraining or fine-tuned) -> ours.

    Their backbone lives under `uniter.` (or `bert.`: their BERT converter only replaced that
    substring); `gamma`/`beta` are LayerNorm weight/bias. Their frame mask table
    `mask_embedding.weight` is 2 x D with row 0 unused (zeroed at every call): row 1, the vector
    added to a zeroed masked frame, becomes our stream's mask vector. Faces used row 1 of the text
    token-type table there, as ours do; a speech stream with its own one-row type table keeps it.
    """
    report = ConversionReport(source_kind=flavour)
    out: StateDict = {}
    for key, tensor in state_dict.items():
        _, name = strip_prefix(rename_layer_norm(key), ("module.",))  # DDP-wrapped, saved unwrapped
        prefix, rest = strip_prefix(name, ("uniter.", "bert."))
        if prefix:
            _convert_uniter_backbone(out, report, key, rest, tensor)
        else:
            _convert_uniter_head(out, report, key, name, tensor)
    resolve_tied(out, report)
    _drop_unused_speech_type(out, report)
    return out, report


def _drop_unused_speech_type(out: StateDict, report: ConversionReport) -> None:
    """MEmoBERT builds speech's own one-row type table whenever `speech_visual_use_same_type` is false,
    but a model without a visual stream never reads it: speech then adds row 1 of the text type table
    (`_compute_speech_embeddings`: `not self.use_visual or ...`). Such a table is dropped, so the
    inferred config gives speech the shared row, as their forward did."""
    own = BACKBONE + "speech_embeddings.token_type_embeddings.weight"
    has_face = any(k.startswith(BACKBONE + "face_embeddings.") for k in out)
    if own in out and not has_face:
        del out[own]
        source = report.converted.pop(own)
        report.ignore(
            source,
            "unused in MEmoBERT: a model without a visual stream gives speech the shared type row "
            "(token_type_embeddings row 1), so uniter3m uses speech_type 'shared'",
        )


def _convert_uniter_backbone(
    out: StateDict, report: ConversionReport, key: str, name: str, tensor: torch.Tensor
) -> None:
    if _is_position_ids(name):
        report.ignore(key, "index buffer, not a weight (positions are computed)", harmless=True)
        return
    if name.startswith("embeddings.") and name.split(".")[1] in _SENTILARE_EMBEDDINGS:
        report.ignore(key, "SentiLARE text-embedding extra: not in uniter3m")
        return
    if name.startswith(TEXT_BACKBONE_PREFIXES):
        _put(out, report, BACKBONE + name, key, tensor)
        return
    module, rest = strip_prefix(name, _STREAM_MODULES)
    if not module:
        report.ignore(key, "unknown backbone module (not text, image/face or speech embeddings)")
        return
    stream = _STREAM_MODULES[module]
    if rest == "mask_embedding.weight":
        if tensor.dim() != 2 or tensor.shape[0] != 2:
            raise UserError(
                f"{key} has shape {tuple(tensor.shape)}; UNITER/MEmoBERT mask tables are 2 x feature dim "
                "(row 1 = the mask vector): is this checkpoint from another code base?"
            )
        _put(out, report, f"{BACKBONE}{stream}_embeddings.mask_embedding", key, tensor[1].clone())
        report.note(f"{stream} mask vector = row 1 of {key} (row 0 is unused there)")
        return
    for part, reason in _STREAM_IGNORED.items():
        if rest.startswith(part):
            report.ignore(key, reason)
            return
    part, tail = strip_prefix(rest, _STREAM_PARTS)
    if not part:
        report.ignore(key, f"unknown part of the {stream} embeddings")
        return
    _put(out, report, f"{BACKBONE}{stream}_embeddings.{_STREAM_PARTS[part]}{tail}", key, tensor)


def _convert_uniter_head(
    out: StateDict, report: ConversionReport, key: str, name: str, tensor: torch.Tensor
) -> None:
    for theirs, reason in _IGNORED_HEADS.items():
        if name.startswith(theirs):
            report.ignore(key, reason)
            return
    theirs, tail = strip_prefix(name, HEAD_RENAMES)
    if not theirs:
        report.ignore(key, "unknown key (not a UNITER/MEmoBERT backbone or head weight)")
        return
    if theirs == "cls.predictions." and tail == "decoder.bias":
        tail = "bias"  # HF-style tie of the decoder bias to the head bias
    _put(out, report, HEAD_RENAMES[theirs] + tail, key, tensor)


# --------------------------------------------------------------------------------------------
# Tied weights, model config, fitting to the target model
# --------------------------------------------------------------------------------------------

# Our head weights that ARE a backbone weight (stored once): head key -> backbone key.
TIED = {
    "cls.predictions.decoder.weight": BACKBONE + "embeddings.word_embeddings.weight",
    "face_regress.weight": BACKBONE + "face_embeddings.feat_linear.weight",
    "speech_regress.weight": BACKBONE + "speech_embeddings.feat_linear.weight",
}

# Which heads of UniterForPretraining a converted state dict needs (head name -> key prefix).
HEAD_OF_PREFIX = {
    "mlm": "cls.predictions.",
    "face_regress": "face_regress.",
    "speech_regress": "speech_regress.",
    "face_classifier": "face_classifier.",
    "itm": "itm.",
    "emo_word_classifier": "emo_word_classifier.",
}


def resolve_tied(out: StateDict, report: ConversionReport) -> None:
    """Drop head copies of tied weights; keep the backbone weight (uniter3m ties them).

    A copy with the same values is the tie itself. A copy with other values (an untied source)
    cannot be kept: the backbone weight wins and the report says so.
    """
    for head_key, backbone_key in TIED.items():
        if head_key not in out:
            continue
        tensor, source = out.pop(head_key), report.converted.pop(head_key)
        if backbone_key not in out:
            _put(out, report, backbone_key, source, tensor)
            report.note(
                f"{backbone_key} taken from {source}, the tied head weight (the source had no other copy)"
            )
        elif torch.equal(out[backbone_key], tensor):
            report.ignore(
                source, f"tied to {report.converted[backbone_key]} (same values), stored once", harmless=True
            )
        else:
            report.ignore(
                source,
                f"differs from {report.converted[backbone_key]} but uniter3m ties the two: "
                f"{report.converted[backbone_key]} is kept",
            )


def heads_of(state: Mapping[str, Any]) -> list[str]:
    """The UniterForPretraining heads a converted state dict has weights for, in HEADS order."""
    return [head for head, prefix in HEAD_OF_PREFIX.items() if any(k.startswith(prefix) for k in state)]


def head_sizes(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Class counts of the heads whose size the config does not hold (UniterForPretraining's
    `emo_word_classes`), read from a converted state dict's last layer."""
    last = state.get("emo_word_classifier.net.4.weight")
    return {} if last is None else {"emo_word_classes": int(last.shape[0])}


def infer_config(
    state: Mapping[str, torch.Tensor],
    base: Mapping[str, Any] | None = None,
    report: ConversionReport | None = None,
    flavour: str | None = None,
) -> dict[str, Any]:
    """A UniterConfig dict from the shapes of a converted state dict (ours, full namespace).

    Research checkpoints carry no config. Sizes are read from the tensors; the head count cannot
    be, so it comes from `base` (their model config JSON) or defaults to hidden/64 (BERT's head
    size), which the report notes. Values in `base` win; a base that contradicts the tensors then
    fails in `io.check_config_fits`, naming the key.

    MEmoBERT's two position layouts: a stream with a learned table keeps it; a stream without one
    has fixed sinusoidal positions when `base` sets `use_sinusoid_position_embedding` or, with no
    such key, for `flavour="memobert"` (their code drops the table only for sinusoids). UNITER's
    image stream has no table either (box geometry); it gets a learned one, which starts fresh.
    """
    word = state.get(BACKBONE + "embeddings.word_embeddings.weight")
    if word is None:
        raise UserError(
            "the checkpoint has no word embeddings (uniter.embeddings.word_embeddings.weight or "
            "bert.embeddings.word_embeddings.weight): it is not a UNITER/MEmoBERT model state dict"
        )
    layers = {int(m.group(1)) for k in state if (m := re.match(r"uniter\.encoder\.layer\.(\d+)\.", k))}
    if not layers:
        raise UserError("the checkpoint has no encoder layers (uniter.encoder.layer.N.*)")
    vocab, hidden = word.shape
    data: dict[str, Any] = {
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "num_hidden_layers": max(layers) + 1,
        "intermediate_size": int(state[BACKBONE + "encoder.layer.0.intermediate.dense.weight"].shape[0]),
    }
    for field_name, key in (
        ("max_position_embeddings", "embeddings.position_embeddings.weight"),
        ("type_vocab_size", "embeddings.token_type_embeddings.weight"),
    ):
        if BACKBONE + key in state:
            data[field_name] = int(state[BACKBONE + key].shape[0])
    sinusoid = (base or {}).get("use_sinusoid_position_embedding")
    for stream in ("face", "speech"):
        linear = state.get(f"{BACKBONE}{stream}_embeddings.feat_linear.weight")
        if linear is None:
            continue
        section: dict[str, Any] = {"feat_dim": int(linear.shape[1])}
        positions = state.get(f"{BACKBONE}{stream}_embeddings.position_embeddings.weight")
        if positions is not None:
            if sinusoid:
                raise UserError(
                    f"the model config sets use_sinusoid_position_embedding but the checkpoint holds a learned "
                    f"{stream} position table {tuple(positions.shape)}: pass the config it was trained with"
                )
            section["max_frames"] = int(positions.shape[0])
        elif sinusoid or (sinusoid is None and flavour == "memobert"):
            section["position"] = "sinusoidal"
            if report is not None:
                why = "the model config sets" if sinusoid else "no position table: MEmoBERT's layout with"
                report.note(f"{stream} positions are sinusoidal ({why} use_sinusoid_position_embedding)")
        section["projection"] = f"{BACKBONE}{stream}_embeddings.projs_linear.weight" in state
        classifier = state.get(f"{stream}_classifier.net.3.weight")
        if classifier is not None:
            section["soft_label_dim"] = int(classifier.shape[0])
        data[stream] = section
    if f"{BACKBONE}speech_embeddings.token_type_embeddings.weight" in state:
        data["speech_type"] = "own"
    base = {k: v for k, v in (base or {}).items() if k in BERT_CONFIG_KEYS}
    if "num_attention_heads" not in base:
        heads = max(1, hidden // 64)
        data["num_attention_heads"] = heads
        if report is not None:
            report.note(
                f"num_attention_heads = {heads} (hidden {hidden} / 64) is a guess: the checkpoint does not "
                "record it; pass the model config JSON it was trained with (--model-config) if it differs"
            )
    return {**data, **base}


# The text-encoder keys an HF BERT config.json and ours share (in HF's order).
BERT_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "initializer_range",
    "layer_norm_eps",
)


# --------------------------------------------------------------------------------------------
# Ours -> an HF BERT directory (text encoder only)
# --------------------------------------------------------------------------------------------

_HF_TEXT_KEYS = re.compile(
    r"(embeddings\.(word_embeddings|position_embeddings|token_type_embeddings|LayerNorm)\.|encoder\.|pooler\.)"
)


def export_hf_bert(
    state: Mapping[str, torch.Tensor], with_mlm_head: bool = True
) -> tuple[StateDict, ConversionReport]:
    """Our state dict (UniterModel or UniterForPretraining names) -> HF BERT names.

    Without an MLM head the keys are BertModel's (no prefix). With one, they are
    BertForMaskedLM's (`bert.` + `cls.predictions.*`), which BertModel also loads.
    Frame streams and other heads have no place in BERT and are reported as ignored.
    """
    report = ConversionReport(source_kind="uniter3m")
    full = to_full_namespace(state)
    has_mlm = with_mlm_head and any(k.startswith("cls.predictions.") for k in full)
    prefix = "bert." if has_mlm else ""
    out: StateDict = {}
    for key, tensor in full.items():
        name = key[len(BACKBONE) :] if key.startswith(BACKBONE) else None
        if name is not None and _HF_TEXT_KEYS.match(name):
            _put(out, report, prefix + name, key, tensor)
        elif has_mlm and key.startswith("cls.predictions."):
            if key == "cls.predictions.decoder.weight":
                report.ignore(key, "tied to the word embeddings (HF ties them too)", harmless=True)
            else:
                _put(out, report, key, key, tensor)
        elif frame_stream(key):
            report.ignore(key, "frame-stream weight: BERT has no face/speech input")
        elif key == SOFT_PROMPT_KEY:
            report.ignore(key, f"learned prompt vectors: no place in BERT; written to {SOFT_PROMPT_FILE}")
        else:
            report.ignore(key, "head or buffer with no place in a BERT text encoder")
    if has_mlm and "cls.predictions.bias" in out:
        out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"].clone()
        report.note("cls.predictions.decoder.bias written as a copy of cls.predictions.bias (HF ties them)")
    return out, report


def hf_bert_config(config: Mapping[str, Any], architecture: str = "BertModel") -> dict[str, Any]:
    """Our config dict -> an HF BERT `config.json` (text side only)."""
    keys = (*BERT_CONFIG_KEYS, "pad_token_id")
    missing = [k for k in keys if k not in config]
    if missing:
        raise UserError(f"the model config lacks {missing}: is it a uniter3m config.json?")
    return {
        "architectures": [architecture],
        "model_type": "bert",
        **{k: config[k] for k in keys},
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
    }


def export_hf_classifier(
    state: Mapping[str, torch.Tensor], classifier: str, classes: Sequence[str]
) -> tuple[StateDict, ConversionReport]:
    """A fine-tuned text model (`uniter.*` + `head.net.*`) -> BertForSequenceClassification names.

    Only a `linear` classifier (dropout + Linear on the pooled [CLS], exactly HF's classifier) or a
    linear `regression` one has an HF equivalent; any other classifier is a UserError.
    """
    if classifier not in ("linear", "regression"):
        raise UserError(
            f"a {classifier!r} classifier has no BertForSequenceClassification equivalent (only 'linear' and "
            "'regression' ones do): fine-tune with model.classifier=linear to export a classifier, or pass "
            "--no-head to export the encoder alone"
        )
    report = ConversionReport(source_kind="uniter3m")
    out: StateDict = {}
    full = to_full_namespace(state)
    for key, tensor in full.items():
        name = key[len(BACKBONE) :] if key.startswith(BACKBONE) else None
        if name is not None and _HF_TEXT_KEYS.match(name):
            _put(out, report, HF_BACKBONE + name, key, tensor)
        elif key in ("head.net.1.weight", "head.net.1.bias"):
            _put(out, report, "classifier." + key.rsplit(".", 1)[1], key, tensor)
        elif frame_stream(key):
            report.ignore(key, "frame-stream weight: BERT has no face/speech input")
        else:
            report.ignore(key, "no place in BertForSequenceClassification")
    if "classifier.weight" not in out:
        raise UserError(
            "the checkpoint has no linear classifier (head.net.1.*): is it a fine-tuned `best` dir?"
        )
    rows = out["classifier.weight"].shape[0]
    if rows != (1 if classifier == "regression" else len(classes)):
        raise UserError(f"the classifier has {rows} outputs but finetune.json lists {len(classes)} classes")
    return out, report


def hf_classifier_config(
    config: Mapping[str, Any], classifier: str, classes: Sequence[str]
) -> dict[str, Any]:
    """HF config of a BertForSequenceClassification export: labels by index, the problem type."""
    labels = ["score"] if classifier == "regression" else list(classes)
    return {
        **hf_bert_config(config, "BertForSequenceClassification"),
        "id2label": {str(i): c for i, c in enumerate(labels)},
        "label2id": {c: i for i, c in enumerate(labels)},
        "problem_type": "regression" if classifier == "regression" else "single_label_classification",
    }
