"""`UniterConfig`: the size and layout of the model, typed and saved as JSON next to the weights.

The text side uses the HF BERT field names and meanings, so an HF `config.json` maps onto it
(`from_hf_bert`) and an HF checkpoint loads without renaming. Each frame stream (face, speech)
has its own section; `feat_dim = 0` means the model has no such stream. Face and speech keep
their top-level sections (every saved config has them); more streams go in `streams`, each with
the letter that names it in modality strings. `stream_table` is the model's own stream table
(`uniter3m.streams`): the one the backbone loops over.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from uniter3m.config import StrictModel, format_validation_error, read_json
from uniter3m.errors import ConfigError
from uniter3m.streams import Stream, StreamTable

MODEL_TYPE = "uniter3m"
CONFIG_NAME = "config.json"
# Saved config.json files are HF BERT configs (model_type "bert") that also carry our fields and
# this marker, so transformers reads the text backbone and we read the whole model (see `to_disk`).
FORMAT_KEY = "uniter3m_format"
DISK_FORMAT = 2
HiddenAct = Literal["gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish"]


class FrameStreamConfig(StrictModel):
    """One stream of per-frame features (face, speech, or a declared one)."""

    feat_dim: int = Field(0, ge=0, description="input feature size; 0 = the model has no such stream")
    max_frames: int = Field(512, ge=1, description="rows of the learned position table")
    position: Literal["learned", "sinusoidal"] = Field(
        "learned", description="sinusoidal positions are fixed and work for any frame count"
    )
    projection: bool = Field(
        False,
        description="extra Linear+GELU+LayerNorm after the input linear and its LayerNorm (MEmoBERT projs_linear)",
    )
    soft_label_dim: int = Field(
        0, ge=0, description="classes of the per-frame soft labels (frame classification); 0 = none"
    )
    letter: str | None = Field(
        None, description="modality letter of a declared stream (face is V and speech A by default)"
    )

    @property
    def present(self) -> bool:
        return self.feat_dim > 0


def _blamed(err: ValidationError, source: str, overrides: Mapping[str, Any]) -> str:
    """Where the bad keys of a model config came from: the file, or the overrides applied to it."""

    def given(data: Any, loc: tuple[Any, ...]) -> bool:
        if not loc:  # a check of the whole config: the file and the overrides together
            return False
        for part in loc:
            if not isinstance(data, Mapping) or part not in data:
                return False
            data = data[part]
        return True

    from_overrides = [".".join(map(str, e["loc"])) for e in err.errors() if given(overrides, tuple(e["loc"]))]
    if not from_overrides:
        return source
    return f"model.overrides ({', '.join(from_overrides)}; --set model.overrides.KEY or the run config) applied to {source}"


class UniterConfig(StrictModel):
    model_type: Literal["uniter3m"] = MODEL_TYPE
    vocab_size: int = Field(30522, ge=1)
    hidden_size: int = Field(768, ge=1)
    num_hidden_layers: int = Field(12, ge=1)
    num_attention_heads: int = Field(12, ge=1)
    intermediate_size: int = Field(3072, ge=1)
    hidden_act: HiddenAct = "gelu"
    hidden_dropout_prob: float = Field(0.1, ge=0.0, lt=1.0)
    attention_probs_dropout_prob: float = Field(0.1, ge=0.0, lt=1.0)
    feature_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="dropout on every frame stream's raw input features, before its input linear: "
        "regularises wide per-utterance inputs (6373-d functionals) on small corpora",
    )
    max_position_embeddings: int = Field(512, ge=1)
    type_vocab_size: int = Field(2, ge=1)
    layer_norm_eps: float = Field(1e-12, gt=0.0)
    initializer_range: float = Field(0.02, gt=0.0)
    pad_token_id: int = Field(0, ge=0)
    face: FrameStreamConfig = Field(default_factory=FrameStreamConfig)
    speech: FrameStreamConfig = Field(default_factory=FrameStreamConfig)
    streams: dict[str, FrameStreamConfig] = Field(
        default_factory=dict, description="more frame streams by name, each with its letter"
    )
    speech_type: Literal["shared", "own"] = Field(
        "shared",
        description="'shared': speech frames use the face type id (1) of the text type table; "
        "'own': speech has its own one-row type embedding (MEmoBERT's layout)",
    )
    face_type_id: int = Field(1, ge=0, description="row of embeddings.token_type_embeddings for face frames")
    soft_prompt_tokens: int = Field(
        0,
        ge=0,
        description="learned prompt vectors (`embeddings.soft_prompt`, the prompt task's soft_prompt: N): text "
        "positions that `soft_slots` marks take them instead of a word embedding; no vocabulary row is added",
    )
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> UniterConfig:
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append(
                f"num_attention_heads: {self.num_attention_heads} does not divide hidden_size {self.hidden_size}"
            )
        if self.pad_token_id >= self.vocab_size:
            problems.append(f"pad_token_id: {self.pad_token_id} is not below vocab_size {self.vocab_size}")
        table = StreamTable.default()
        for name, extra in self.streams.items():
            if name in ("face", "speech"):
                problems.append(f"streams.{name}: face and speech have their own sections")
            elif not extra.letter:
                problems.append(f"streams.{name}.letter: a declared stream needs its modality letter")
            else:
                try:
                    table = table.with_stream(name, extra.letter)
                except ConfigError as err:
                    problems.append(f"streams.{name}: {err}")
        uses_type_row = (
            self.face.present
            or (self.speech.present and self.speech_type == "shared")
            or any(s.present for s in self.streams.values())
        )
        if uses_type_row and self.face_type_id >= self.type_vocab_size:
            problems.append(
                f"face_type_id: frame streams use type row {self.face_type_id} but type_vocab_size is "
                f"{self.type_vocab_size}; set type_vocab_size >= {self.face_type_id + 1}"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def stream_table(self) -> StreamTable:
        """Face, speech and the streams declared in `streams`, in that order."""
        return StreamTable.declaring({name: extra.letter for name, extra in self.streams.items()})

    def stream(self, name: str) -> FrameStreamConfig:
        """The section of stream `name`; a stream the model does not define has feat_dim 0."""
        if name in ("face", "speech"):
            return getattr(self, name)
        return self.streams.get(name, FrameStreamConfig())

    def frame_streams(self) -> dict[str, FrameStreamConfig]:
        """The streams this model has (feat_dim > 0), in its table's order."""
        return {
            s.name: self.stream(s.name)
            for s in self.stream_table.frame_streams()
            if self.stream(s.name).present
        }

    def with_stream(self, stream: Stream, **fields: Any) -> dict[str, Any]:
        """Overrides that set `fields` of `stream` (top-level for face/speech, else under streams with
        its letter, so a stream of the training config's table joins the model's)."""
        if stream.name in ("face", "speech"):
            return {stream.name: fields}
        return {"streams": {stream.name: {"letter": stream.letter, **fields}}}

    # -- JSON ------------------------------------------------------------------------------

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], source: str = "model config", **overrides: Any
    ) -> UniterConfig:
        """Validate `data` with `overrides` merged in (nested dicts merge key by key)."""
        merged = deep_merge(from_disk(data), overrides)
        try:
            return cls.model_validate(merged)
        except ValidationError as err:
            raise format_validation_error(err, _blamed(err, source, overrides)) from None

    @classmethod
    def from_json(cls, path: str | os.PathLike, **overrides: Any) -> UniterConfig:
        return cls.from_dict(read_json(path), str(path), **overrides)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_disk(self, architecture: str = "BertModel") -> dict[str, Any]:
        """The saved `config.json`: an HF BERT config (`architecture`, model_type "bert") whose extra
        fields (face, speech, streams, ...) and `uniter3m_format` marker only uniter3m reads."""
        data = self.to_dict()
        data.pop("model_type")
        return {
            "architectures": [architecture],
            "model_type": "bert",
            FORMAT_KEY: DISK_FORMAT,
            **data,
            "position_embedding_type": "absolute",
            "tie_word_embeddings": True,
        }

    @classmethod
    def from_hf_bert(
        cls, config_dict: Mapping[str, Any], source: str = "HF config", **overrides: Any
    ) -> UniterConfig:
        """Our config for an HF BERT-family `config.json` (text side only unless overrides add streams)."""
        kind = config_dict.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise ConfigError(
                f"{source}: position_embedding_type {kind!r} is not supported; only BERT's absolute positions are"
            )
        text_keys = set(cls.model_fields) - {
            "model_type",
            "face",
            "speech",
            "streams",
            "speech_type",
            "face_type_id",
            "soft_prompt_tokens",
        }
        data = {k: v for k, v in config_dict.items() if k in text_keys}
        if data.get("pad_token_id") is None:
            data.pop("pad_token_id", None)
        return cls.from_dict(data, source, **overrides)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> UniterConfig:
        """Read `config.json` from a directory (or the file itself): ours, or an HF BERT-family one."""
        path = Path(path)
        file = path / CONFIG_NAME if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(
                f"{path}: no {CONFIG_NAME}; give a directory written by save_pretrained or an HF BERT model folder"
            )
        data = read_json(file)
        if is_ours(data):
            return cls.from_dict(data, str(file), **overrides)
        return cls.from_hf_bert(data, str(file), **overrides)


def is_ours(data: Mapping[str, Any]) -> bool:
    """A config.json written by uniter3m (this format, or the older model_type "uniter3m" one)."""
    return data.get("model_type") == MODEL_TYPE or FORMAT_KEY in data


def from_disk(data: Mapping[str, Any]) -> dict[str, Any]:
    """Our fields of a saved config.json: the HF view (architectures, model_type "bert", anything
    transformers adds when it re-saves) is dropped; other configs pass unchanged."""
    if FORMAT_KEY not in data:
        return dict(data)
    fields = set(UniterConfig.model_fields)
    return {**{k: v for k, v in data.items() if k in fields}, "model_type": MODEL_TYPE}


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `base` with `extra` merged in, nested sections key by key (config overrides)."""
    out = json.loads(json.dumps(base))
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        elif hasattr(value, "model_dump"):
            out[key] = value.model_dump(mode="json")
        else:
            out[key] = value
    return out
