"""One checkpoint reader behind `from_pretrained`, `model.init` and `uniter3m convert`.

`read_checkpoint` turns any supported source (our directories, HF BERT-family directories,
Google TF BERT, UNITER/MEmoBERT state dicts) into ONE form: the state dict in our full
(UniterForPretraining) namespace, the `UniterConfig` it describes and a `ConversionReport`. A
config that does not describe its weights is an error naming the key, both shapes and the
field to fix. `load_into` copies it into a model and refuses to leave a backbone weight at its
random initial value: only the frame streams the checkpoint lacks (`uniter.<name>_embeddings.*`),
the pooler of a checkpoint with an MLM head (HF *ForMaskedLM saves none) and the patterns given
in `allow_new` may start fresh; heads may always start fresh. Everything fresh is reported.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from uniter3m.errors import ConfigError, UserError
from uniter3m.model import conversion as conv
from uniter3m.model.config import CONFIG_NAME, UniterConfig, is_ours

log = logging.getLogger(__name__)

FLAVOURS = ("auto", "uniter3m", "hf-bert", "tf-bert", "memobert", "uniter")
HEADS_FILE = "heads.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# The pooler may start fresh when the checkpoint is an MLM model: BertForMaskedLM and RoBERTa's
# MLM save none, and only a classifier on top of it ever trains one.
POOLER = "uniter.pooler.*"
MLM_HEAD = "cls.predictions."
TEXT_PARTS = ("uniter.embeddings.", "uniter.encoder.")
_STREAM = re.compile(r"^uniter\.(\w+)_embeddings\.")


def frame_stream(key: str) -> str | None:
    """`uniter.<name>_embeddings.*` -> name (any frame stream); None for the text side and heads."""
    match = _STREAM.match(key)
    return match.group(1) if match else None


@dataclass
class LoadedCheckpoint:
    """A checkpoint read into our names: what `load_into` and `uniter3m convert` work from."""

    state: dict[str, Tensor]
    config: UniterConfig
    report: conv.ConversionReport
    source: Path
    flavour: str
    meta: dict[str, Any] = field(default_factory=dict)  # heads.json of our pretraining dirs
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
        if not overrides:
            return self.config
        return UniterConfig.from_dict(self.config.to_dict(), f"config of {self.source}", **overrides)


# ------------------------------------------------------------------------------------- reading
def detect_flavour(path: str | os.PathLike) -> str:
    """Which reader a path needs: ours or HF (config.json), tf-bert (bert_config.json)."""
    path = Path(path)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        data = _read_json(path / CONFIG_NAME)
        return "uniter3m" if is_ours(data) else "hf-bert"
    if path.is_dir() and (path / "bert_config.json").is_file():
        return "tf-bert"
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist{hub_hint(path)}")
    if path.suffix in (".pt", ".pth") or (path.is_dir() and any(path.glob("model_step_*.pt"))):
        raise UserError(
            f"{path} is a research state dict without a config: convert it first with "
            f"`uniter3m convert --from memobert|uniter --src {path} --out DIR`, or pass flavour='memobert'|'uniter'"
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
    model_config: str | os.PathLike | Mapping[str, Any] | None = None,
) -> LoadedCheckpoint:
    """Read a checkpoint of any supported kind into our names, checked against its config.

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
    check_config_fits(loaded)
    return loaded


def read_config(path: str | os.PathLike, **overrides: Any) -> UniterConfig:
    """The config of ours or an HF directory in our terms (RoBERTa positions offset), weights unread."""
    path = Path(path)
    flavour = detect_flavour(path)
    if flavour == "uniter3m":
        return UniterConfig.from_dict(_read_json(path / CONFIG_NAME), str(path / CONFIG_NAME), **overrides)
    if flavour == "tf-bert":
        return UniterConfig.from_hf_bert(_read_json(path / "bert_config.json"), str(path), **overrides)
    hf_config = _read_json(path / CONFIG_NAME)
    return _hf_config(path, hf_config, conv.hf_family({}, hf_config), None, **overrides)


def read_weights(directory: str | os.PathLike) -> dict[str, Tensor]:
    """The raw tensors of a directory: model.safetensors, pytorch_model.bin or their sharded index.

    A damaged or foreign file is a UserError naming it (never a SafetensorError or pickle dump).
    """
    directory = Path(directory)
    if directory.is_file():
        raise UserError(f"{directory} is a file; give the checkpoint directory that holds it")
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return conv.load_weights_file(directory / name)
        index = directory / f"{name}.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserError(f"{index} has no weight_map: the index is damaged; re-download it")
            state: dict[str, Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                state.update(conv.load_weights_file(directory / shard))
            return state
    raise UserError(
        f"{directory}: no {' or '.join(WEIGHT_FILES)} (nor a sharded index of them); give a directory "
        "written by save_pretrained or an HF BERT model folder with its weights"
    )


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(
            f"{file} is not valid JSON ({err}); the file is damaged: restore or rewrite it"
        ) from err
    if not isinstance(data, dict):
        raise ConfigError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def _read_ours(path: Path) -> LoadedCheckpoint:
    config = UniterConfig.from_dict(_read_json(path / CONFIG_NAME), str(path / CONFIG_NAME))
    report = conv.ConversionReport(source_kind="uniter3m")
    state: dict[str, Tensor] = {}
    for key, tensor in read_weights(path).items():
        name = conv.rename_layer_norm(key)
        if name.startswith(conv.HF_BACKBONE):  # saved in HF BertFor* form: `bert.` = our `uniter.`
            name = conv.BACKBONE + name[len(conv.HF_BACKBONE) :]
        if name.endswith("position_ids"):
            report.ignore(key, "index buffer, not a weight (positions are computed)", harmless=True)
            continue
        if not name.startswith(conv.BACKBONE) and (
            name.startswith(conv.TEXT_BACKBONE_PREFIXES) or frame_stream(conv.BACKBONE + name)
        ):
            name = conv.BACKBONE + name  # a UniterModel directory: backbone names without `uniter.`
        state[name] = tensor
        report.convert(name, key)
    meta = _read_json(path / HEADS_FILE) if (path / HEADS_FILE).is_file() else {}
    return LoadedCheckpoint(state, config, report, path, "uniter3m", meta, path)


def _read_hf(path: Path) -> LoadedCheckpoint:
    if not (path / CONFIG_NAME).is_file():
        raise UserError(f"{path} has no {CONFIG_NAME}; give the directory of an HF BERT-family model")
    hf_config = _read_json(path / CONFIG_NAME)
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
    prefix, bert_config = conv.find_tf_checkpoint(path)
    state, report = conv.convert_tf_bert(conv.read_tf_checkpoint(prefix))
    folder = Path(prefix).parent
    config = UniterConfig.from_hf_bert(bert_config, str(folder / "bert_config.json"))
    return LoadedCheckpoint(state, config, report, path, "tf-bert", {}, folder)


def _read_research(
    path: Path, flavour: str, model_config: str | os.PathLike | Mapping[str, Any] | None
) -> LoadedCheckpoint:
    file = _latest_step_file(path) if path.is_dir() else path
    state, report = conv.convert_uniter(conv.load_weights_file(file), flavour=flavour)
    if file != path:
        report.note(f"converted {file.name}, the latest model_step_N.pt in {path}")
    base = _read_json(Path(model_config)) if isinstance(model_config, (str, os.PathLike)) else model_config
    data = conv.infer_config(state, base, report, flavour=flavour)
    config = UniterConfig.from_dict(data, f"config inferred from {file}")
    return LoadedCheckpoint(state, config, report, file, flavour, {}, file.parent)


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
def check_config_fits(loaded: LoadedCheckpoint) -> None:
    """Every backbone tensor must have a place of its shape in the model the config describes.

    The model is built on the meta device (no memory, no init cost). Missing weights are judged
    later by `load_into`, which knows what the caller allows to start fresh.
    """
    from uniter3m.model.uniter import UniterModel

    with torch.device("meta"):
        shapes = {
            conv.BACKBONE + k: tuple(v.shape) for k, v in UniterModel(loaded.config).state_dict().items()
        }
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
    extra = sorted(k for k in loaded.state if k.startswith(conv.BACKBONE) and k not in shapes)
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
    return key if source in (key, key.removeprefix(conv.BACKBONE)) else f"{key} (source {source})"


def _mismatch_line(key: str, have: tuple, want: tuple, report: conv.ConversionReport) -> str:
    return f"{_source_name(key, report)}: {have} in the checkpoint, {want} in the model"


def _hints(bad: Iterable[tuple[str, tuple, tuple]]) -> str:
    hints = list(dict.fromkeys(h for k, a, _ in bad if (h := config_hint(k, a))))
    return ", ".join(hints) or "the sizes (hidden_size, intermediate_size, feat_dim, ...) of the weights"


def config_hint(key: str, shape: tuple) -> str | None:
    """The config field (and value) that makes the model's `key` take the checkpoint's `shape`."""
    name = key.removeprefix(conv.BACKBONE)
    stream = frame_stream(key) if key.startswith(conv.BACKBONE) else None
    if name == "embeddings.word_embeddings.weight":
        return f"vocab_size={shape[0]}, hidden_size={shape[1]}"
    if name == "embeddings.position_embeddings.weight":
        return f"max_position_embeddings={shape[0]}"
    if name == "embeddings.token_type_embeddings.weight":
        return f"type_vocab_size={shape[0]}"
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
    loaded: LoadedCheckpoint,
    allow_new: Iterable[str] = (),
) -> dict[str, Any]:
    """Copy `loaded` into `model` (UniterModel names or the full `uniter.` namespace).

    Raises when a tensor's shape differs from the model's (naming key, shapes and the config field)
    or when backbone weights would start fresh, unless they belong to a frame stream the checkpoint
    lacks, the pooler of a checkpoint with an MLM head, or match a pattern of `allow_new` (fnmatch, on our full names such as
    `uniter.face_embeddings.position_embeddings.*`). Heads absent from the checkpoint start fresh.
    Returns `info` (missing_keys, unexpected_keys, mismatched_keys, error_msgs, new_streams) in the
    model's own names, and records the fresh keys (full names) as `loaded.report.new`.
    """
    from uniter3m.model.uniter import tied_aliases

    own = model.state_dict()
    aliases = tied_aliases(model)
    full = any(k.startswith(conv.BACKBONE) for k in own)

    def model_name(key: str) -> str | None:
        if full:
            return key
        return key[len(conv.BACKBONE) :] if key.startswith(conv.BACKBONE) else None

    def full_name(key: str) -> str:
        return key if full else conv.BACKBONE + key

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
    has_mlm_head = any(k.startswith(MLM_HEAD) for k in loaded.state)
    patterns = (*allow_new, *([POOLER] if has_mlm_head else []))
    have_streams = loaded.streams
    new_streams: set[str] = set()
    refused: list[str] = []
    for name in sorted(missing):
        key = full_name(name)
        stream = frame_stream(key)
        if not key.startswith(conv.BACKBONE) or any(
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
