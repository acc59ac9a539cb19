"""The typed fine-tuning config (`configs/downstream/*.json`).

Every section forbids unknown keys, so a typo is an error listing its dotted path
(`uniter3m.config.load_config`), never a silently ignored setting.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from uniter3m.config import StrictModel, load_config

MODALITY_LETTERS = {"L": "text", "V": "face", "A": "speech"}


def parse_modalities(value: str) -> str:
    """Normalise a modality case like 'lva', 'AV' -> 'LVA' order; error on other letters."""
    letters = value.strip().upper()
    bad = sorted(set(letters) - set(MODALITY_LETTERS))
    if not letters or bad:
        raise ValueError(f"modalities {value!r}: use letters from L (text), V (face), A (speech), e.g. 'LVA'")
    return "".join(c for c in "LVA" if c in letters)


class DataConfig(StrictModel):
    txt_db: str
    face_db: str | None = None
    speech_db: str | None = None
    modalities: str = "L"
    max_txt_len: int = Field(64, ge=2)
    max_frames: int = Field(64, ge=1)
    num_workers: int = Field(0, ge=0)
    # Standardise frame features with the feature db's meta mean/std (label-free statistics).
    normalize: bool = True

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, v: str) -> str:
        return parse_modalities(v)

    @model_validator(mode="after")
    def _dbs_for_modalities(self) -> DataConfig:
        if "V" in self.modalities and not self.face_db:
            raise ValueError("modalities include V (face) but data.face_db is not set")
        if "A" in self.modalities and not self.speech_db:
            raise ValueError("modalities include A (speech) but data.speech_db is not set")
        return self


class ProtocolConfig(StrictModel):
    """See uniter3m/data/protocols.py for the built-in protocols and schemes."""

    name: Literal["iemocap4", "iemocap6", "msp4", "meld", "mosi", "generic"]
    scheme: Literal["split", "session", "speaker"] = "split"
    target: str | None = None  # meld: emotion|sentiment; mosi: binary|7class|regression
    label_column: str | None = None
    classes: list[str] | None = None
    label_map: dict[str, str] | None = None
    drop_labels: list[str] | None = None
    split_column: str = "split"
    split_values: dict[str, list[str]] | None = None
    session_column: str = "session"
    dialogue_column: str = "dialogue"
    speaker_column: str = "speaker"
    valid_fraction: float = Field(0.1, gt=0, lt=1)
    selection_metric: str | None = None


class ModelConfig(StrictModel):
    init: str  # our checkpoint dir or any HF BERT dir
    tokenizer: str | None = None  # for the prompt head; defaults to `init`
    head: Literal["linear", "mlp", "prompt", "regression"] = "linear"
    dropout: float = Field(0.1, ge=0, lt=1)
    freeze_layers: int = Field(0, ge=0)
    freeze_embeddings: bool = False
    prompt: str = "i am [MASK] ."
    verbalizer: dict[str, str] | None = None  # class name -> label word; defaults per protocol


class TrainConfig(StrictModel):
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    lr: float = Field(5e-5, gt=0)
    head_lr: float | None = Field(None, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    class_weighted: bool = False
    patience: int = Field(3, ge=1)  # validations without improvement before stopping
    evals_per_epoch: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)  # cap (for smoke runs)
    seed: int = 42
    device: str = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    progress: bool = True


class FinetuneConfig(StrictModel):
    output_dir: str
    data: DataConfig
    protocol: ProtocolConfig
    model: ModelConfig
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _head_fits_protocol(self) -> FinetuneConfig:
        regression = self.protocol.name == "mosi" and self.protocol.target == "regression"
        if regression != (self.model.head == "regression"):
            raise ValueError(
                "model.head 'regression' goes with protocol mosi/target 'regression' and only with it"
            )
        return self


def load_finetune_config(
    source: str | os.PathLike | Mapping[str, Any], overrides: Iterable[str] = ()
) -> FinetuneConfig:
    return load_config(FinetuneConfig, source, overrides)
