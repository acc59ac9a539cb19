"""Model weights in and out of folders: ONE reader, ONE `load_into`, ONE writer.

Reading: `read_weights(path)` is the only function that opens a weights file (safetensors, a torch
pickle `.pt`/`.bin`, a folder of them or their sharded index); `read_tf_checkpoint` opens Google's
TF releases. `read_checkpoint` turns any supported source (our folders, HF BERT-family folders,
Google TF BERT, UNITER/MEmoBERT state dicts) into ONE form, `LoadedCheckpoint`: the state dict in
our full (UniterForPretraining) namespace, the `UniterConfig` it describes and a
`ConversionReport`. A config that does not describe its weights is an error naming the key, both
shapes and the field to fix. `read_saved` reads the weights of a folder we wrote without its config
(a resumed module may have none).

Loading: `load_into(model, source, strict=...)` is the one way weights enter a model — behind
`from_pretrained` (so `model.init`), `uniter3m convert`, fine-tuned `best/` folders and resume.
Non-strict, it refuses to leave a backbone weight at its random initial value: only the frame
streams the checkpoint lacks (`uniter.<name>_embeddings.*`), the pooler of a checkpoint with an MLM
head (HF *ForMaskedLM saves none), learned prompt vectors (`soft_prompt_tokens`) and the patterns in
`allow_new` may start fresh; heads may always start fresh. Strict, every weight of the model must come from the checkpoint and every tensor of
the checkpoint must find a place. Everything fresh or unused is reported.

Writing: `write_pretrained` (config.json + model.safetensors + manifest.json, backbone under `bert.`
as in HF BertFor* models; `read_weights` checks the manifest of every folder that has one) and
`write_weights` (an atomic safetensors file). Nothing here imports the model classes: they import
this module, and hand `read_checkpoint` the backbone class it checks against.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from uniter3m.errors import ConfigError, UserError
from uniter3m.fileio import atomic_write_bytes, atomic_write_json, check_manifest, write_manifest
from uniter3m.model import conversion as conv
from uniter3m.model.config import CONFIG_NAME, UniterConfig, is_ours
from uniter3m.model.conversion import BACKBONE, HF_BACKBONE, frame_stream

log = logging.getLogger(__name__)

FLAVOURS = ("auto", "uniter3m", "hf-bert", "tf-bert", "memobert", "uniter")
WEIGHTS_NAME = "model.safetensors"
WEIGHT_FILES = (WEIGHTS_NAME, "pytorch_model.bin")
HEADS_FILE = "heads.json"
TOKENIZER_FILE = "tokenizer_meta.json"  # the tokenizer a model was trained with (name, vocab_hash, size)
TF_INSTALL_HINT = "pip install 'uniter3m[tf]'"
# The pooler may start fresh when the checkpoint is an MLM model: BertForMaskedLM and RoBERTa's
# MLM save none, and only a classifier on top of it ever trains one.
POOLER = "uniter.pooler.*"
MLM_HEAD = "cls.predictions."
TEXT_PARTS = ("uniter.embeddings.", "uniter.encoder.")


# ------------------------------------------------------------------------------------ names
def disk_key(key: str) -> str:
    """A weight's name on disk: the backbone of a model with heads is `bert.` (HF BertFor* names), not
    `uniter.`, so transformers' BertModel / BertForMaskedLM load the text side of our directories."""
    return HF_BACKBONE + key[len(BACKBONE) :] if key.startswith(BACKBONE) else key


def model_key(key: str) -> str:
    """Inverse of `disk_key` (directories saved with `uniter.` keys pass unchanged)."""
    return BACKBONE + key[len(HF_BACKBONE) :] if key.startswith(HF_BACKBONE) else key


def tied_aliases(model: nn.Module) -> set[str]:
    """State-dict names that are a second name of an already-named parameter (tied weights)."""
    named = {name for name, _ in model.named_parameters()}
    return {name for name, _ in model.named_parameters(remove_duplicate=False)} - named


# ------------------------------------------------------------------------------------ writing
def write_weights(file: str | os.PathLike, state: Mapping[str, Tensor]) -> None:
    """`state` as a safetensors file, written atomically (contiguous CPU copies)."""
    from safetensors.torch import save

    tensors = {k: t.detach().contiguous().cpu() for k, t in state.items()}
    atomic_write_bytes(Path(file), save(tensors, metadata={"format": "pt"}))


def write_pretrained(
    model: nn.Module, directory: str | os.PathLike, extra_files: Mapping[str, Any] | None = None
) -> None:
    """Save `model.config` and the weights (weights first, config last); tied copies of a tensor are
    stored once (safetensors forbids twins). `extra_files` are JSON files written beside them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    skip = tied_aliases(model)
    state = {disk_key(k): t for k, t in model.state_dict().items() if k not in skip}
    write_weights(directory / WEIGHTS_NAME, state)
    for name, content in (extra_files or {}).items():
        atomic_write_json(directory / name, content)
    record = getattr(model, "tokenizer_record", None)
    if record:
        atomic_write_json(directory / TOKENIZER_FILE, dict(record))
    architecture = "BertForMaskedLM" if any(k.startswith(MLM_HEAD) for k in state) else "BertModel"
    atomic_write_json(directory / CONFIG_NAME, model.config.to_disk(architecture))
    write_manifest(directory)  # callers that add files (tokenizer, card) write it again last


# ------------------------------------------------------------------------------------ reading
@dataclass
class LoadedCheckpoint:
    """A checkpoint read into our names: what `load_into` and `uniter3m convert` work from.

    `config` is None only for `read_saved` (weights read for a strict load into an existing model).
    """

    state: dict[str, Tensor]
    config: UniterConfig | None
    report: conv.ConversionReport
    source: Path
    flavour: str
    # heads.json of our pretraining dirs; head sizes read from the weights (`conv.head_sizes`) of research ones
    meta: dict[str, Any] = field(default_factory=dict)
    tokenizer_dir: Path | None = None

    @property
    def streams(self) -> set[str]:
        """Frame streams the checkpoint has weights for."""
        return {s for k in self.state if (s := frame_stream(k))}

    @property
    def heads(self) -> list[str]:
        """UniterForPretraining heads with weights here (heads.json wins for our dirs)."""
        return list(self.meta.get("heads") or conv.heads_of(self.state))

    def model_config(self, **overrides: Any) -> UniterConfig:
        """The checkpoint's config with overrides merged in (nested dicts merge key by key)."""
        if self.config is None:
            raise UserError(f"{self.source} was read without its config; read it with read_checkpoint")
        if not overrides:
            return self.config
        return UniterConfig.from_dict(self.config.to_dict(), f"config of {self.source}", **overrides)


def read_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """The raw tensors of a weights file or of a folder, on CPU, without running pickled code.

    A file is safetensors (by suffix) or a torch pickle of a state dict (`.pt`, `.bin`; research
    checkpoints that wrap it in `{"model": ...}` or `{"state_dict": ...}` are unwrapped). A folder
    holds model.safetensors, pytorch_model.bin or a sharded index of either. A damaged or foreign
    file is a UserError naming it (never a SafetensorError or a pickle dump).
    """
    path = Path(path)
    if path.is_dir():
        check_manifest(path)  # a folder we wrote: its bytes must be what was written
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return read_weights(path / name)
            index = path / f"{name}.index.json"
            if index.is_file():
                weight_map = read_json_file(index).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise UserError(f"{index} has no weight_map: the index is damaged; re-download it")
                state: dict[str, Tensor] = {}
                for shard in sorted(set(weight_map.values())):
                    state.update(read_weights(path / shard))
                return state
        raise UserError(
            f"{path}: no {' or '.join(WEIGHT_FILES)} (nor a sharded index of them); give a directory "
            "written by save_pretrained or an HF BERT model folder with its weights"
        )
    if not path.is_file():
        raise UserError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own error type on a damaged header
            raise UserError(
                f"{path} cannot be read as safetensors ({type(err).__name__}: {err}); the file is damaged"
            ) from err
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise UserError(
            f"{path} cannot be read as a PyTorch state dict ({type(err).__name__}: {err}); it must be a file "
            "written by torch.save(model.state_dict(), ...) holding only tensors"
        ) from err
    return _unwrap_state_dict(obj, path)


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    def is_state(value: Any) -> bool:
        return (
            isinstance(value, Mapping) and bool(value) and all(isinstance(v, Tensor) for v in value.values())
        )

    if is_state(obj):
        return dict(obj)
    for wrapper in ("model", "state_dict", "model_state_dict", "module"):
        if isinstance(obj, Mapping) and is_state(obj.get(wrapper)):
            return dict(obj[wrapper])
    raise UserError(
        f"{path} holds a {type(obj).__name__} that is not a state dict (name -> tensor); save the model with "
        "torch.save(model.state_dict(), path)"
    )


def find_tf_checkpoint(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """A Google BERT release folder (or checkpoint prefix) -> (checkpoint prefix, bert_config.json)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        indexes = sorted(folder.glob("*.ckpt*.index")) or sorted(folder.glob("*.index"))
        if len(indexes) != 1:
            found = ", ".join(p.name for p in indexes) or "none"
            raise UserError(
                f"{path}: expected one TensorFlow checkpoint (*.ckpt.index), found {found}; "
                "give the checkpoint prefix, e.g. DIR/bert_model.ckpt"
            )
        prefix = str(indexes[0])[: -len(".index")]
    else:
        prefix = str(path)[: -len(".index")] if str(path).endswith(".index") else str(path)
        if not Path(prefix + ".index").is_file():
            raise UserError(
                f"{prefix}.index does not exist; give the prefix of a TF checkpoint (DIR/bert_model.ckpt)"
            )
    config_file = folder / "bert_config.json"
    if not config_file.is_file():
        raise UserError(
            f"{folder} has no bert_config.json; it ships next to bert_model.ckpt in Google's release"
        )
    return prefix, read_json_file(config_file)


def read_tf_checkpoint(prefix: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every variable of a TF checkpoint (`.../bert_model.ckpt`, without `.index`)."""
    try:
        import tensorflow as tf  # noqa: PLC0415 - optional dependency
    except ImportError as err:
        raise UserError(
            f"reading the TensorFlow checkpoint {prefix} needs TensorFlow, which is not installed: "
            f"run `{TF_INSTALL_HINT}` (or convert it to an HF directory elsewhere and use --from hf-bert)"
        ) from err
    try:
        reader = tf.train.load_checkpoint(str(prefix))
    except Exception as err:  # TF raises several types (NotFoundError, DataLossError, ...)
        raise UserError(
            f"cannot read the TensorFlow checkpoint {prefix}: {err}; give the prefix shared by "
            "bert_model.ckpt.index and bert_model.ckpt.data-*"
        ) from err
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def read_json_file(file: Path) -> dict[str, Any]:
    """A JSON object of a model folder; a damaged file is a ConfigError naming it."""
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(
            f"{file} is not valid JSON ({err}); the file is damaged: restore or rewrite it"
        ) from err
    if not isinstance(data, dict):
        raise ConfigError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def detect_flavour(path: str | os.PathLike) -> str:
    """Which reader a path needs: ours or HF (config.json), tf-bert (bert_config.json)."""
    path = Path(path)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        data = read_json_file(path / CONFIG_NAME)
        return "uniter3m" if is_ours(data) else "hf-bert"
    if path.is_dir() and (path / "bert_config.json").is_file():
        return "tf-bert"
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist{hub_hint(path)}")
    if path.suffix in (".pt", ".pth") or (path.is_dir() and any(path.glob("model_step_*.pt"))):
        raise UserError(
            f"{path} is a research state dict without a config: convert it first with "
            f"`uniter3m convert --from memobert|uniter --checkpoint {path} --out DIR`, or pass flavour='memobert'|'uniter'"
        )
    if path.is_file():
        raise UserError(
            f"{path} is a file; give the checkpoint directory that holds it (with its {CONFIG_NAME})"
        )
    raise UserError(
        f"{path}: no {CONFIG_NAME}; give a directory written by save_pretrained, an HF BERT-family model "
        "folder or a Google BERT release folder (bert_config.json + bert_model.ckpt)"
    )


def hub_hint(path: Path) -> str:
    """For a missing path that looks like a Hub id (`bert-base-uncased`, `org/name`): how to get it locally."""
    text = str(path)
    if path.is_absolute() or text.startswith(".") or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", text):
        return ""
    return (
        f"; model directories are local paths only (no downloads at run time): if {text!r} is a Hugging Face "
        f"Hub id, fetch it once with `hf download {text} --local-dir models/{text.split('/')[-1]}` "
        f"(or `huggingface-cli download`) and give that folder"
    )


def read_checkpoint(
    path: str | os.PathLike,
    flavour: str = "auto",
    *,
    backbone: Callable[[UniterConfig], nn.Module],
    model_config: str | os.PathLike | Mapping[str, Any] | None = None,
) -> LoadedCheckpoint:
    """Read a checkpoint of any supported kind into our names, checked against its config.

    `backbone` is the model class a config describes (`UniterModel`; passed in because the model
    imports this module): built on the meta device, its shapes are what the weights must have.
    `model_config` is the UNITER/MEmoBERT model config JSON (head count, activation,
    `use_sinusoid_position_embedding`, ...); other kinds carry their own config.
    """
    path = Path(path)
    if flavour not in FLAVOURS:
        raise UserError(f"unknown checkpoint kind {flavour!r}; use one of {', '.join(FLAVOURS)}")
    if model_config is not None and flavour not in ("uniter", "memobert"):
        raise UserError(
            "a model config applies to UNITER/MEmoBERT checkpoints only (others carry config.json)"
        )
    if flavour == "auto":
        flavour = detect_flavour(path)
    if flavour == "uniter3m":
        loaded = _read_ours(path)
    elif flavour == "hf-bert":
        loaded = _read_hf(path)
    elif flavour == "tf-bert":
        loaded = _read_tf(path)
    else:
        loaded = _read_research(path, flavour, model_config)
    check_config_fits(loaded, backbone)
    return loaded


def read_saved(directory: str | os.PathLike) -> LoadedCheckpoint:
    """The weights of a folder we wrote (`write_pretrained`, or a bare module's safetensors), in model
    names, without reading its config: for a strict load into a model that already exists."""
    directory = Path(directory)
    report = conv.ConversionReport(source_kind="uniter3m")
    state = _our_names(read_weights(directory), report)
    return LoadedCheckpoint(state, None, report, directory, "uniter3m", {}, directory)


def read_config(path: str | os.PathLike, **overrides: Any) -> UniterConfig:
    """The config of ours or an HF directory in our terms (RoBERTa positions offset), weights unread."""
    path = Path(path)
    flavour = detect_flavour(path)
    if flavour == "uniter3m":
        return UniterConfig.from_dict(
            read_json_file(path / CONFIG_NAME), str(path / CONFIG_NAME), **overrides
        )
    if flavour == "tf-bert":
        return UniterConfig.from_hf_bert(read_json_file(path / "bert_config.json"), str(path), **overrides)
    hf_config = read_json_file(path / CONFIG_NAME)
    return _hf_config(path, hf_config, conv.hf_family({}, hf_config), None, **overrides)


def _our_names(raw: Mapping[str, Tensor], report: conv.ConversionReport) -> dict[str, Tensor]:
    """Keys as written by `write_pretrained` -> model names (`bert.` -> `uniter.`; the backbone of a
    bare UniterModel folder gets `uniter.` too); other keys (heads, a bare module's) pass unchanged."""
    state: dict[str, Tensor] = {}
    for key, tensor in raw.items():
        name = model_key(key)
        if name.endswith("position_ids"):  # transformers < 4.31 re-saves this index buffer
            report.ignore(key, "index buffer, not a weight (positions are computed)", harmless=True)
            continue
        if not name.startswith(BACKBONE) and (
            name.startswith(conv.TEXT_BACKBONE_PREFIXES) or frame_stream(BACKBONE + name)
        ):
            name = BACKBONE + name
        state[name] = tensor
        report.convert(name, key)
    return state


def _read_ours(path: Path) -> LoadedCheckpoint:
    config = UniterConfig.from_dict(read_json_file(path / CONFIG_NAME), str(path / CONFIG_NAME))
    report = conv.ConversionReport(source_kind="uniter3m")
    state = _our_names(read_weights(path), report)
    meta = read_json_file(path / HEADS_FILE) if (path / HEADS_FILE).is_file() else {}
    return LoadedCheckpoint(state, config, report, path, "uniter3m", meta, path)


def _read_hf(path: Path) -> LoadedCheckpoint:
    if not (path / CONFIG_NAME).is_file():
        raise UserError(f"{path} has no {CONFIG_NAME}; give the directory of an HF BERT-family model")
    hf_config = read_json_file(path / CONFIG_NAME)
    raw = read_weights(path)
    state, report = conv.convert_hf_bert(raw, hf_config)
    config = _hf_config(path, hf_config, conv.hf_family(raw, hf_config), report)
    return LoadedCheckpoint(state, config, report, path, report.source_kind, {}, path)


def _hf_config(
    path: Path,
    hf_config: Mapping[str, Any],
    family: str,
    report: conv.ConversionReport | None,
    **overrides: Any,
) -> UniterConfig:
    overrides = dict(overrides)
    if family == "roberta" and "max_position_embeddings" not in overrides:
        # our position i is RoBERTa's i + padding_idx + 1: the table loses those rows
        kept = int(hf_config.get("max_position_embeddings", 514)) - conv.roberta_position_offset(hf_config)
        overrides["max_position_embeddings"] = kept
        if report is not None and int(hf_config.get("type_vocab_size", 1)) < 2:
            report.note(
                "RoBERTa has one token type: adding a face or speech stream later needs type_vocab_size 2 "
                "(a new, trained-from-scratch type row)"
            )
    return UniterConfig.from_hf_bert(hf_config, str(path / CONFIG_NAME), **overrides)


def _read_tf(path: Path) -> LoadedCheckpoint:
    prefix, bert_config = find_tf_checkpoint(path)
    state, report = conv.convert_tf_bert(read_tf_checkpoint(prefix))
    folder = Path(prefix).parent
    config = UniterConfig.from_hf_bert(bert_config, str(folder / "bert_config.json"))
    return LoadedCheckpoint(state, config, report, path, "tf-bert", {}, folder)


def _read_research(
    path: Path, flavour: str, model_config: str | os.PathLike | Mapping[str, Any] | None
) -> LoadedCheckpoint:
    file = _latest_step_file(path) if path.is_dir() else path
    state, report = conv.convert_uniter(read_weights(file), flavour=flavour)
    if file != path:
        report.note(f"converted {file.name}, the latest model_step_N.pt in {path}")
    base = (
        read_json_file(Path(model_config)) if isinstance(model_config, (str, os.PathLike)) else model_config
    )
    data = conv.infer_config(state, base, report, flavour=flavour)
    config = UniterConfig.from_dict(data, f"config inferred from {file}")
    return LoadedCheckpoint(state, config, report, file, flavour, conv.head_sizes(state), file.parent)


def _latest_step_file(folder: Path) -> Path:
    steps = sorted(
        (int(m.group(1)), p)
        for p in folder.glob("model_step_*.pt")
        if (m := re.fullmatch(r"model_step_(\d+)\.pt", p.name))
    )
    if not steps:
        raise UserError(f"{folder} holds no model_step_N.pt; give the checkpoint file itself")
    return steps[-1][1]


# ---------------------------------------------------------------------------- config vs weights
def check_config_fits(loaded: LoadedCheckpoint, backbone: Callable[[UniterConfig], nn.Module]) -> None:
    """Every backbone tensor must have a place of its shape in the model the config describes.

    The `backbone` is built on the meta device (no memory, no init cost). Missing weights are
    judged later by `load_into`, which knows what the caller allows to start fresh.
    """
    with torch.device("meta"):
        shapes = {BACKBONE + k: tuple(v.shape) for k, v in backbone(loaded.config).state_dict().items()}
    where = _config_origin(loaded)
    bad = [
        (k, tuple(t.shape), shapes[k])
        for k, t in loaded.state.items()
        if k in shapes and tuple(t.shape) != shapes[k]
    ]
    if bad:
        raise ConfigError(
            f"{where} and the weights of {loaded.source} disagree:\n  "
            + "\n  ".join(_mismatch_line(k, a, b, loaded.report) for k, a, b in bad[:8])
            + (f"\n  ... and {len(bad) - 8} more" if len(bad) > 8 else "")
            + f"\nfix: set {_hints(bad)} in {where} (the weights are what was trained), or re-save the checkpoint"
        )
    extra = sorted(k for k in loaded.state if k.startswith(BACKBONE) and k not in shapes)
    if extra:
        shown = ", ".join(_source_name(k, loaded.report) for k in extra[:5])
        raise ConfigError(
            f"{where} and the weights of {loaded.source} disagree: the weights hold {len(extra)} backbone "
            f"tensor(s) the config has no place for ({shown}{' ...' if len(extra) > 5 else ''}); fix the layout "
            "in the config (num_hidden_layers, frame streams, speech_type, position) to match the weights"
        )


def _config_origin(loaded: LoadedCheckpoint) -> str:
    if loaded.flavour in ("uniter", "memobert"):
        return f"the config inferred from {loaded.source} (and --model-config)"
    if loaded.flavour == "tf-bert":
        return str(Path(loaded.tokenizer_dir or loaded.source) / "bert_config.json")
    return str(loaded.source / CONFIG_NAME)


def _source_name(key: str, report: conv.ConversionReport) -> str:
    source = report.converted.get(key, key)
    return key if source in (key, key.removeprefix(BACKBONE)) else f"{key} (source {source})"


def _mismatch_line(key: str, have: tuple, want: tuple, report: conv.ConversionReport) -> str:
    return f"{_source_name(key, report)}: {have} in the checkpoint, {want} in the model"


def _hints(bad: Iterable[tuple[str, tuple, tuple]]) -> str:
    hints = list(dict.fromkeys(h for k, a, _ in bad if (h := config_hint(k, a))))
    return ", ".join(hints) or "the sizes (hidden_size, intermediate_size, feat_dim, ...) of the weights"


def config_hint(key: str, shape: tuple) -> str | None:
    """The config field (and value) that makes the model's `key` take the checkpoint's `shape`."""
    name = key.removeprefix(BACKBONE)
    stream = frame_stream(key) if key.startswith(BACKBONE) else None
    if name == "embeddings.word_embeddings.weight":
        return f"vocab_size={shape[0]}, hidden_size={shape[1]}"
    if name == "embeddings.position_embeddings.weight":
        return f"max_position_embeddings={shape[0]}"
    if name == "embeddings.token_type_embeddings.weight":
        return f"type_vocab_size={shape[0]}"
    if name == "embeddings.soft_prompt":
        return f"soft_prompt_tokens={shape[0]}"
    if re.fullmatch(r"encoder\.layer\.\d+\.intermediate\.dense\.(weight|bias)", name):
        return f"intermediate_size={shape[0]}"
    if re.fullmatch(r"encoder\.layer\.\d+\.output\.dense\.weight", name):
        return f"intermediate_size={shape[1]}"
    if stream and name.endswith("feat_linear.weight"):
        return f"{stream}.feat_dim={shape[1]}"
    if stream and name.endswith("mask_embedding"):
        return f"{stream}.feat_dim={shape[0]}"
    if stream and name.endswith("position_embeddings.weight"):
        return f"{stream}.max_frames={shape[0]}"
    if m := re.fullmatch(r"(\w+)_classifier\.net\.3\.weight", name):
        return f"{m.group(1)}.soft_label_dim={shape[0]}"
    if name == "emo_classifier.net.1.weight":
        return f"emo_classes={shape[0]}"
    if name.endswith("LayerNorm.weight") or name == "pooler.dense.weight":
        return f"hidden_size={shape[0]}"
    return None


# ------------------------------------------------------------------------------------- loading
def load_into(
    model: nn.Module,
    source: LoadedCheckpoint | str | os.PathLike,
    *,
    strict: bool = False,
    allow_new: Iterable[str] = (),
) -> dict[str, Any]:
    """Copy a checkpoint into `model` (UniterModel names, the full `uniter.` namespace, or any module's).

    `source` is what `read_checkpoint` / `read_saved` returned, or the path of a folder we saved
    (read with `read_saved`). A tensor whose shape differs from the model's is a
    ConfigError naming key, shapes and the config field. Strict: a model weight the checkpoint lacks
    or a checkpoint tensor with no place in the model is a ConfigError (a model saved from another
    config or head). Not strict: backbone weights may start fresh only when they belong to a frame
    stream the checkpoint lacks, to the pooler of a checkpoint with an MLM head, are the learned prompt
    vectors, or match a pattern of `allow_new` (fnmatch, on full names such as `uniter.face_embeddings.position_embeddings.*`);
    heads absent from the checkpoint start fresh, unused tensors are reported.
    Returns `info` (missing_keys, unexpected_keys, mismatched_keys, error_msgs, new_streams) in the
    model's own names, and records the fresh keys (full names) as `loaded.report.new`.
    """
    loaded = source if isinstance(source, LoadedCheckpoint) else read_saved(source)
    own = model.state_dict()
    aliases = tied_aliases(model)
    full = any(k.startswith(BACKBONE) for k in own)

    def model_name(key: str) -> str | None:
        if key in own:
            return key
        return key[len(BACKBONE) :] if not full and key.startswith(BACKBONE) else None

    def full_name(key: str) -> str:
        return key if full else BACKBONE + key

    state: dict[str, Tensor] = {}
    unexpected: set[str] = set(loaded.report.unused())
    for key, tensor in loaded.state.items():
        name = model_name(key)
        if name is None or name not in own:
            unexpected.add(name or key)
        elif name not in aliases:
            state[name] = tensor
    bad = [
        (full_name(k), tuple(t.shape), tuple(own[k].shape))
        for k, t in state.items()
        if own[k].shape != t.shape
    ]
    if bad:
        raise ConfigError(
            f"{loaded.source}: {len(bad)} weight(s) do not fit the model (the checkpoint's config with the "
            "overrides given):\n  "
            + "\n  ".join(_mismatch_line(k, a, b, loaded.report) for k, a, b in bad[:8])
            + f"\nfix: set {_hints(bad)} (drop or change the overrides), or start from a checkpoint of those sizes"
        )

    missing = set(own) - set(state) - aliases
    new_streams: set[str] = set()
    if strict:
        if missing or unexpected:
            raise ConfigError(
                f"{loaded.source} does not fit the model: missing {sorted(missing)[:5]}, unexpected "
                f"{sorted(unexpected)[:5]}; load it into the model it was saved from (the config and head "
                "it was trained with)"
            )
    else:
        has_mlm_head = any(k.startswith(MLM_HEAD) for k in loaded.state)
        # learned prompt vectors start fresh when a prompt task first asks for them
        patterns = (*allow_new, *([POOLER] if has_mlm_head else []), conv.SOFT_PROMPT_KEY)
        have_streams = loaded.streams
        refused: list[str] = []
        for name in sorted(missing):
            key = full_name(name)
            stream = frame_stream(key)
            if not key.startswith(BACKBONE) or any(
                fnmatchcase(key, p) or fnmatchcase(name, p) for p in patterns
            ):
                continue
            if stream and stream not in have_streams:
                new_streams.add(stream)
                continue
            refused.append(key)
        if refused:
            raise UserError(_refusal(loaded, refused))

    model.load_state_dict(state, strict=False)
    loaded.report.new = sorted(full_name(k) for k in missing)
    info = {
        "missing_keys": missing,
        "unexpected_keys": unexpected,
        "mismatched_keys": set(),
        "error_msgs": [],
        "new_streams": sorted(new_streams),
    }
    log_loading(type(model).__name__, loaded.source, info)
    return info


def _refusal(loaded: LoadedCheckpoint, refused: list[str]) -> str:
    text = [k for k in refused if k.startswith(TEXT_PARTS)]
    shown = ", ".join(refused[:6]) + (f" and {len(refused) - 6} more" if len(refused) > 6 else "")
    lines = [
        f"{loaded.source}: {len(refused)} backbone weight(s) found no source key and would start from random "
        f"values: {shown}"
    ]
    if text:
        unused = ", ".join(loaded.report.unused()[:5]) or "none"
        lines.append(
            f"{len(text)} of them are text-encoder weights; source keys left unused include {unused}. Only "
            "BERT/RoBERTa (HF or Google TF), UNITER/MEmoBERT and uniter3m names are read: check the checkpoint "
            "kind and that the checkpoint is complete"
        )
    for key in refused:
        stream = frame_stream(key)
        if stream and key.endswith("position_embeddings.weight"):
            lines.append(
                f"the checkpoint's {stream} stream has no learned position table: if it was trained with "
                f"sinusoidal positions set {stream}.position='sinusoidal' (MEmoBERT: "
                "use_sinusoid_position_embedding: true in --model-config)"
            )
        elif stream and key.endswith("token_type_embeddings.weight"):
            lines.append(
                f"the checkpoint's {stream} stream has no own type row: it used the shared one (speech_type='shared')"
            )
    example = refused[0].rsplit(".", 1)[0] + ".*"
    lines.append(
        f"if starting them fresh is intended, allow them: allow_new=['{example}'] "
        f"(uniter3m convert --allow-new '{example}')"
    )
    return "\n".join(lines)


def log_loading(model_name: str, source: str | os.PathLike, info: Mapping[str, Any]) -> None:
    """One line per kind: fresh weights grouped by module, unused checkpoint keys, new streams."""
    for kind, verb in (
        ("missing_keys", "start fresh (not in the checkpoint)"),
        ("unexpected_keys", "in the checkpoint are unused"),
    ):
        keys = sorted(info[kind])
        if keys:
            groups = sorted({".".join(k.split(".")[:2]) for k in keys})
            log.info("%s from %s: %d weights %s: %s", model_name, source, len(keys), verb, ", ".join(groups))
    if info.get("new_streams"):
        log.info("%s from %s: new frame streams %s", model_name, source, ", ".join(info["new_streams"]))
