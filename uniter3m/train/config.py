"""The typed pretraining config (`configs/pretrain/*.json`).

Every section forbids unknown keys; `load_pretrain_config` reports every bad key of a file in
one ConfigError (via `uniter3m.config.load_config`). Beyond types, it checks what would
otherwise fail hours into a run: databases that do not exist, unknown task names, mix ratios
that are all zero, a task pointing at a dataset that is not defined.

Relative paths are taken relative to the current directory (run from the repository root, as
the launch scripts do).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from uniter3m.config import StrictModel, load_config


def _check_db(path: str, where: str) -> str | None:
    p = Path(path)
    if not p.exists():
        return (
            f"{where}: database {p} does not exist (build it with `uniter3m build-txt-db` / `build-feat-db`)"
        )
    if not (p / "meta.json").is_file():
        return f"{where}: {p} has no meta.json (not a database, or its build was interrupted: rebuild it)"
    return None


class DatasetConfig(StrictModel):
    """Text dbs joined with face/speech dbs by utterance id (entry k of each list = corpus k)."""

    txt: list[str] = Field(min_length=1)
    face: list[str] | None = None
    speech: list[str] | None = None
    val_txt: list[str] | None = None
    val_face: list[str] | None = None
    val_speech: list[str] | None = None
    max_txt_len: int = Field(60, ge=1)
    max_frames: int = Field(64, ge=1)
    normalize: bool = True  # z-score frames with the feature db's mean/std
    missing: Literal["error", "drop"] = "error"

    @model_validator(mode="after")
    def _lists_match(self) -> DatasetConfig:
        problems = []
        for prefix, txt in (("", self.txt), ("val_", self.val_txt)):
            for stream in ("face", "speech"):
                dbs = getattr(self, prefix + stream)
                if dbs is not None and txt is not None and len(dbs) != len(txt):
                    problems.append(
                        f"{prefix}{stream} lists {len(dbs)} dbs but {prefix}txt lists {len(txt)}: "
                        "give one per text db, in the same order"
                    )
                if prefix and dbs is not None and txt is None:
                    problems.append(f"{prefix}{stream} is set but val_txt is not")
        for stream in ("face", "speech"):
            if self.val_txt is not None and (getattr(self, stream) is None) != (
                getattr(self, "val_" + stream) is None
            ):
                problems.append(f"{stream} and val_{stream} must both be set or both left out")
        missing = [
            msg
            for key in ("txt", "face", "speech", "val_txt", "val_face", "val_speech")
            for i, db in enumerate(getattr(self, key) or [])
            if (msg := _check_db(db, f"{key}.{i}"))
        ]
        if problems or missing:
            raise ValueError("; ".join(problems + missing))
        return self

    @property
    def has_validation(self) -> bool:
        return bool(self.val_txt)


class TaskConfig(StrictModel):
    """One objective: its registered name, the dataset it reads, its share of steps, its options."""

    name: str
    dataset: str
    ratio: float = Field(1.0, ge=0)
    modalities: str | None = None  # subset of "LVA" read from the dataset; default: all it has
    label: str | None = None  # display/log name; default: `name` (must be unique)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from uniter3m.errors import ConfigError
        from uniter3m.tasks.base import task_class

        try:
            task_class(v)
        except ConfigError as err:  # pydantic collects ValueErrors only
            raise ValueError(str(err)) from None
        return v

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, v: str | None) -> str | None:
        if v is None:
            return v
        letters = v.strip().upper()
        if not letters or set(letters) - set("LVA"):
            raise ValueError(f"{v!r}: use letters from L (text), V (face), A (speech), e.g. 'LVA'")
        return "".join(c for c in "LVA" if c in letters)

    @property
    def key(self) -> str:
        return self.label or self.name


class ModelSection(StrictModel):
    """Build from a model config JSON, or start from a checkpoint (ours or an HF BERT dir)."""

    config: str | None = None  # e.g. configs/model/tiny.json
    init: str | None = None  # a save_pretrained dir or an HF BERT folder
    overrides: dict[str, Any] = Field(default_factory=dict)  # UniterConfig fields, e.g. dropouts

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if not self.config and not self.init:
            raise ValueError(
                "give model.config (a model config JSON) or model.init (a checkpoint dir), or both"
            )
        if self.config and not Path(self.config).is_file():
            raise ValueError(f"model.config {self.config} does not exist (see configs/model/)")
        if self.init and not (Path(self.init) / "config.json").is_file():
            raise ValueError(
                f"model.init {self.init} does not exist or is not a model folder with config.json"
            )
        return self


class BatchingConfig(StrictModel):
    max_tokens: int = Field(4096, ge=1)  # padded tokens + frames per micro-batch on one rank
    max_batch_size: int | None = Field(None, ge=1)
    pool_size: int = Field(8192, ge=1)
    num_workers: int = Field(2, ge=0)
    val_max_tokens: int | None = Field(None, ge=1)  # default: max_tokens


class OptimConfig(StrictModel):
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    final_lr_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    grad_clip: float = Field(1.0, ge=0)  # 0 = no clipping (the norm is still logged)


class PretrainConfig(StrictModel):
    output_dir: str
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # A local tokenizer dir (prompt tasks need its words); default: the folder the text dbs were
    # built with (their meta.json), when it exists.
    tokenizer: str | None = None
    model: ModelSection
    datasets: dict[str, DatasetConfig] = Field(min_length=1)
    tasks: list[TaskConfig] = Field(min_length=1)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    steps: int = Field(ge=1)
    grad_accum: int = Field(1, ge=1)
    val_every: int = Field(1000, ge=0)  # 0 = only at the end
    val_max_batches: int | None = Field(None, ge=1)  # cap per task (global batches); None = all
    ckpt_every: int = Field(1000, ge=0)  # 0 = only at the end
    keep_last: int = Field(3, ge=0)  # 0 = keep every checkpoint
    log_every: int = Field(10, ge=1)
    max_nonfinite_in_a_row: int = Field(10, ge=1)
    progress: bool = True
    # End this invocation after this step (a checkpoint is written there); `--resume auto` goes on.
    # For time-limited jobs: the schedule still spans `steps`.
    stop_after: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _tasks_fit(self) -> PretrainConfig:
        problems = []
        if all(t.ratio == 0 for t in self.tasks):
            problems.append("tasks: every ratio is 0; give at least one task a ratio > 0")
        keys = [t.key for t in self.tasks]
        for k in sorted({k for k in keys if keys.count(k) > 1}):
            problems.append(f"tasks: {k!r} appears twice; give the copies distinct 'label's")
        for i, t in enumerate(self.tasks):
            if t.dataset not in self.datasets:
                problems.append(
                    f"tasks.{i}.dataset: {t.dataset!r} is not defined; defined datasets: {', '.join(self.datasets)}"
                )
        if self.optim.warmup_steps > self.steps:
            problems.append(f"optim.warmup_steps {self.optim.warmup_steps} exceeds steps {self.steps}")
        if self.tokenizer and not Path(self.tokenizer).is_dir():
            problems.append(f"tokenizer directory {self.tokenizer} does not exist")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def active_tasks(self) -> list[TaskConfig]:
        return [t for t in self.tasks if t.ratio > 0]


def load_pretrain_config(
    source: str | os.PathLike | Mapping[str, Any], overrides: Iterable[str] = ()
) -> PretrainConfig:
    """Read, apply `--set key=value` overrides, validate; one ConfigError lists every problem."""
    return load_config(PretrainConfig, source, overrides)
