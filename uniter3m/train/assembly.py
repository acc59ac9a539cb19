"""The one assembly of what a run reads and trains: databases, tokenizer, datasets and the model,
and the engine parts every run sets from its config alike (collator, optimiser and schedule, loop settings).

Pretraining, fine-tuning, evaluation and extraction build them with these functions, so every
check has one rule and one error type wherever it runs:

* every text db of a run was built with one tokenizer, and holds its meta (`DatabaseError`);
* a tokenizer the run loads has the text dbs' vocabulary (`ConfigError`: the config names it);
* the model's vocabulary size equals the text dbs' (`DatabaseError`);
* the databases of one frame stream agree on their dims; a model's stream dim equals the dbs'
  (`DatabaseError`);
* a task or a case reads only modalities its dataset has, a task that learns from frames has
  some (`ConfigError`); truncation limits fit the model's position tables (`ConfigError`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from uniter3m.data.collate import Collator
from uniter3m.data.dataset import JoinedDataset
from uniter3m.data.prompts import label_word_ids, tokenize_template
from uniter3m.data.store import DbReader
from uniter3m.data.tokenization import SpecialTokens, load_tokenizer, vocab_hash
from uniter3m.errors import ConfigError, DatabaseError
from uniter3m.evaluation.corpora import default_verbalizer
from uniter3m.evaluation.protocols import ProtocolPlan
from uniter3m.model.config import UniterConfig, deep_merge
from uniter3m.model.finetuning import (
    FinetuneModel,
    HeadSpec,
    check_feature_dims,
    describe_trainable,
    freeze,
    load_mlm_head,
    trainable_groups,
)
from uniter3m.model.io import read_config
from uniter3m.model.lora import apply_lora
from uniter3m.model.pretraining import UniterForPretraining
from uniter3m.model.uniter import UniterModel
from uniter3m.streams import StreamTable
from uniter3m.train.config import (
    BatchingConfig,
    DataConfig,
    FinetuneConfig,
    FinetuneModelSection,
    OptimConfig,
    PretrainConfig,
    RunConfig,
)
from uniter3m.train.loop import LoopSettings
from uniter3m.train.optim import build_optimizer, warmup_linear_schedule
from uniter3m.train.session import database_digests

log = logging.getLogger(__name__)
TOKENIZER_RECORD_KEYS = ("name", "vocab_hash", "vocab_size")


# ----------------------------------------------------------------------------- databases
class Databases:
    """One DbReader per database folder, shared by every dataset of a run that names it."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, str], DbReader] = {}

    def get(self, path: str | Path, kind: str) -> DbReader:
        key = (str(Path(path).resolve()), kind)
        if key not in self._open:
            self._open[key] = DbReader(path, kind=kind)
        return self._open[key]

    def many(self, paths: Sequence[str] | None, kind: str) -> list[DbReader] | None:
        return None if paths is None else [self.get(p, kind) for p in paths]

    def paths(self) -> list[str]:
        """Every database opened so far (resolved), the ones a run records digests of."""
        return [path for path, _ in self._open]


def data_tokenizer(data: DataConfig, dbs: Databases | None = None) -> dict[str, Any]:
    """The tokenizer meta of a data section's text dbs (`tokenizer_meta` of `data.txt_db`)."""
    return tokenizer_meta(dbs or Databases(), text_db_paths(data, "data.txt_db"))


def text_db_paths(data: DataConfig, where: str) -> list[tuple[str, str]]:
    """(path, where) of every text db a data section names, its validation dbs included."""
    valid = data.valid.txt_dbs if data.valid is not None else []
    return [(p, where) for p in data.txt_dbs] + [(p, f"{where}.valid") for p in valid]


def tokenizer_meta(dbs: Databases, txt_dbs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """The tokenizer section of the text dbs' meta ((path, where) pairs), which they must all share."""
    seen: dict[str, str] = {}
    first: dict[str, Any] | None = None
    for path, where in txt_dbs:
        meta = dbs.get(path, "txt").meta.get("tokenizer")
        if not meta:
            raise DatabaseError(f"{path}/meta.json has no 'tokenizer' section; rebuild it with build-txt-db")
        seen.setdefault(str(meta.get("vocab_hash")), f"{path} ({where})")
        first = first or meta
    if first is None:
        raise ConfigError("no text database given; set txt_db")
    if len(seen) > 1:
        raise DatabaseError(
            "the text databases were built with different tokenizers: "
            + "; ".join(f"vocab hash {h} in {where}" for h, where in seen.items())
            + "; rebuild them with one tokenizer"
        )
    return first


def tokenizer_record(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The tokenizer of the text dbs as a model records it (`model.tokenizer_record`)."""
    return {k: meta.get(k) for k in TOKENIZER_RECORD_KEYS}


def run_tokenizer(
    candidates: Sequence[str | None], meta: Mapping[str, Any], needed_for: str | None = None
) -> Any:
    """The first candidate folder that exists, loaded; its vocabulary must be the text dbs' one.

    None when no candidate exists, unless `needed_for` says what cannot do without it (a ConfigError)."""
    path = next((str(c) for c in candidates if c and Path(c).is_dir()), None)
    if path is None:
        if needed_for:
            raise ConfigError(
                f"{needed_for} needs the tokenizer: set `tokenizer` to its folder (tried {list(candidates)!r})"
            )
        return None
    tokenizer = load_tokenizer(path)
    if meta.get("vocab_hash") and vocab_hash(tokenizer) != meta["vocab_hash"]:
        raise ConfigError(
            f"tokenizer {path} has vocab hash {vocab_hash(tokenizer)} but the text databases were built with "
            f"{meta['vocab_hash']} ({meta.get('name')}); give the tokenizer the databases were built with"
        )
    return tokenizer


def check_vocab_size(model: UniterConfig, special: SpecialTokens, source: str) -> None:
    """The model's word table must be the text dbs' vocabulary, row for row."""
    if model.vocab_size != special.vocab_size:
        raise DatabaseError(
            f"model {source} has a {model.vocab_size}-word vocabulary but the text databases were tokenised "
            f"with {special.vocab_size} words; rebuild them with the model's tokenizer (or, for a new model, "
            f"set model.overrides.vocab_size={special.vocab_size})"
        )


# ----------------------------------------------------------------------------- datasets
def build_dataset(
    data: DataConfig,
    dbs: Databases | None = None,
    *,
    modalities: str | None = None,
    ids: Sequence[str] | None = None,
    validation: bool = False,
    tokenizer: Any = None,
    task: Any = None,
) -> JoinedDataset:
    """The joined dataset of `data` (its `valid` dbs with `validation`) reading `modalities`
    (default: the config's), restricted to `ids` (None: every utterance). `tokenizer` (an object or
    a folder) serves `data.context` speaker prefixes; `task`: a task whose frame streams need frames."""
    dbs = dbs or Databases()
    source = data.valid if validation else data
    assert source is not None
    stream_table = data.stream_table
    wanted = modalities or data.used_modalities
    lacking = sorted(set(wanted) - set(data.available))
    if lacking:
        names = ", ".join(stream_table.get(m).db_key for m in lacking)
        raise ConfigError(
            f"modalities {wanted} are asked for but the data has no {names}; add them or drop those letters"
        )
    dataset = JoinedDataset(
        dbs.many(source.txt_dbs, "txt"),
        feat_dbs={name: dbs.many(paths, "feat") for name, paths in source.feat_dbs.items()},
        modalities=wanted,
        max_txt_len=data.max_txt_len,
        max_frames=data.max_frames,
        normalize=data.normalize,
        missing=data.missing,
        ids=ids,
        context=data.context,
        tokenizer=tokenizer,
        stream_table=stream_table,
    )
    for letter in getattr(task, "streams", ()):
        name = stream_table.get(letter).name if letter != "L" else None
        if name in dataset.frame_lengths and int(dataset.frame_lengths[name].sum()) == 0:
            raise ConfigError(
                f"task {task.name} learns from {name} frames but no utterance of its "
                f"{'validation ' if validation else ''}dataset has any ({', '.join(source.feat_dbs[name])}: every "
                f"{name} stream is empty); give it a {name} database with frames, or drop the task"
            )
    return dataset


def feature_dims(dataset: JoinedDataset) -> dict[str, int]:
    """{stream: feature dim} of the frame streams a dataset reads."""
    return {s: int(dataset.feat_dbs[s][0].meta["dim"]) for s in dataset.streams}


def stream_dims(dbs: Databases, data: Iterable[DataConfig], stream: str) -> tuple[int, int] | None:
    """(feature dim, soft-label dim) shared by every db of `stream`, or None when no data has it."""
    found: dict[tuple[int, int], str] = {}
    for ds in data:
        paths = [*ds.feat_dbs.get(stream, []), *(ds.valid.feat_dbs.get(stream, []) if ds.valid else [])]
        for path in paths:
            meta = dbs.get(path, "feat").meta
            found.setdefault((int(meta["dim"]), int(meta.get("soft_label_dim") or 0)), path)
    if len(found) > 1:
        raise DatabaseError(
            f"the {stream} databases disagree on (feature dim, soft-label dim): "
            + "; ".join(f"{k} in {p}" for k, p in found.items())
            + "; use one feature extractor for every corpus"
        )
    return next(iter(found)) if found else None


def check_lengths(datasets: Mapping[str, DataConfig], model: UniterConfig) -> None:
    """Dataset truncation limits must fit the model's position tables."""
    problems = []
    for name, ds in datasets.items():
        if ds.max_text_tokens > model.max_position_embeddings:
            problems.append(
                f"{name}.max_txt_len {ds.max_txt_len} + [CLS]/[SEP]"
                + (f" + context.max_context_tokens {ds.context.max_context_tokens}" if ds.context else "")
                + f" exceeds the model's max_position_embeddings {model.max_position_embeddings}"
            )
        for stream in ds.feat_dbs:
            sc = model.stream(stream)
            if sc.present and sc.position == "learned" and ds.max_frames > sc.max_frames:
                problems.append(
                    f"{name}.max_frames {ds.max_frames} exceeds the model's {stream}.max_frames {sc.max_frames}"
                )
    if problems:
        raise ConfigError("; ".join(problems) + "; lower the dataset limits or enlarge the model's tables")


# ----------------------------------------------------------------------------- models
def build_pretraining_model(
    cfg: PretrainConfig, tasks: Sequence[Any], dbs: Databases, special: SpecialTokens
) -> UniterForPretraining:
    """A model with every head the tasks need; frame streams sized by the databases."""
    heads = list(dict.fromkeys(h for t in tasks for h in t.heads))
    emo = sorted({len(t.classes) for t in tasks if "emo_classifier" in t.heads})
    if len(emo) > 1:
        raise ConfigError(f"emo_cls tasks disagree on the number of classes {emo}; use one class list")
    emo_classes = emo[0] if emo else 0
    words = sorted({t.emo_word_classes for t in tasks if "emo_word_classifier" in t.heads})
    if len(words) > 1:
        raise ConfigError(f"melm emotion heads disagree on the number of classes {words}; use one lexicon")
    emo_word_classes = words[0] if words else 0
    init = cfg.model.init
    base = (
        read_config(init, **cfg.model.overrides)
        if init
        else UniterConfig.from_json(cfg.model.config, **cfg.model.overrides)
    )
    overrides: dict[str, Any] = deep_merge({}, cfg.model.overrides)
    soft = sorted({t.soft_prompt for t in tasks if getattr(t, "soft_prompt", 0)})
    if len(soft) > 1:
        raise ConfigError(
            f"prompt tasks disagree on soft_prompt {soft}; the model has one set of prompt vectors"
        )
    if soft and init and base.soft_prompt_tokens not in (0, soft[0]):
        raise ConfigError(
            f"the prompt task's soft_prompt {soft[0]} differs from the {base.soft_prompt_tokens} learned prompt "
            f"vectors of model.init {init}; set soft_prompt: {base.soft_prompt_tokens}"
        )
    if soft:
        overrides["soft_prompt_tokens"] = soft[0]
    stream_table = cfg.stream_table
    for frame_stream in stream_table.frame_streams():
        stream = frame_stream.name
        dims = stream_dims(dbs, cfg.datasets.values(), stream)
        if dims is None:
            needing = [t.name for t in tasks if frame_stream.letter in getattr(t, "streams", ())]
            if needing:
                raise ConfigError(
                    f"task(s) {', '.join(needing)} learn from the {stream} stream but no dataset gives a "
                    f"{frame_stream.db_key}: add `{frame_stream.db_key}` to the task's dataset (the stream's "
                    "feat_dim comes from its database), or drop the task"
                )
            continue
        dim, soft = dims
        have = base.stream(stream)
        if init and have.present:
            paths = {stream: next(p for ds in cfg.datasets.values() for p in ds.feat_dbs.get(stream, []))}
            check_feature_dims(base, {stream: dim}, init, paths, stream_table)
            continue
        if have.feat_dim not in (0, dim):
            log.info("model %s.feat_dim %d -> %d (from the databases)", stream, have.feat_dim, dim)
        overrides = deep_merge(overrides, base.with_stream(frame_stream, feat_dim=dim, soft_label_dim=soft))
    sized = UniterConfig.from_dict(base.to_dict(), **overrides)
    for name in heads:
        stream, _, kind = name.rpartition("_")
        if (
            kind == "classifier"
            and stream in stream_table.names()
            and not sized.stream(stream).soft_label_dim
        ):
            raise ConfigError(
                f"task {stream}_mrc needs per-frame soft labels in the {stream} databases (their meta "
                "soft_label_dim is 0): build them with soft labels, or drop the task"
            )
    check_vocab_size(base, special, str(init or cfg.model.config))
    check_lengths({f"datasets.{name}": ds for name, ds in cfg.datasets.items()}, base)
    if init:
        return UniterForPretraining.from_pretrained(
            init, heads=heads, emo_classes=emo_classes, emo_word_classes=emo_word_classes, **overrides
        )
    return UniterForPretraining(
        UniterConfig.from_json(cfg.model.config, **overrides), heads, emo_classes, emo_word_classes
    )


def build_finetune_model(
    cfg: FinetuneConfig,
    plan: ProtocolPlan,
    feat_dims: Mapping[str, int],
    meta: Mapping[str, Any],
) -> FinetuneModel:
    """Backbone from `model.init` (or a fresh one from `model.config`) + the configured head, for
    text dbs of tokenizer `meta` (`data_tokenizer`) and frame streams of `feat_dims`."""
    m = cfg.model
    special = SpecialTokens.from_dict(meta)
    source = m.init or m.config
    base = (
        UniterConfig.from_pretrained(m.init, **m.overrides)
        if m.init
        else UniterConfig.from_json(m.config, **m.overrides)
    )
    overrides = deep_merge(
        m.overrides,
        check_feature_dims(base, feat_dims, str(source), dict(cfg.data.model_extra or {}), cfg.stream_table),
    )
    check_vocab_size(base, special, str(source))
    check_lengths({"data": cfg.data}, base)  # at the start, not when the test split is scored
    soft_prompt = soft_prompt_count(m, base.soft_prompt_tokens, str(source))
    if soft_prompt != base.soft_prompt_tokens and soft_prompt:
        overrides = deep_merge(overrides, {"soft_prompt_tokens": soft_prompt})
    if m.init:
        uniter, info = UniterModel.from_pretrained(m.init, output_loading_info=True, **overrides)
        new_weights = set(info["missing_keys"])
    else:
        uniter = UniterModel(UniterConfig.from_json(m.config, **overrides))
        new_weights = {n for n, _ in uniter.named_parameters()}
    spec = HeadSpec(
        classifier=m.classifier,
        classes=list(plan.label.classes),
        dropout=m.dropout,
        protocol=plan.name,
        modalities=cfg.data.used_modalities,
        head=m.head,
        per_stream=m.per_stream,
    )
    if spec.classifier == "prompt":
        spec.prompt_ids, spec.verbalizer_ids, spec.verbalizer = prompt_spec(
            cfg, plan, special, meta, soft_prompt
        )
        spec.soft_prompt = soft_prompt
    model = FinetuneModel(uniter, spec)
    model.new_backbone_weights = new_weights
    model.tokenizer_record = tokenizer_record(meta)
    if spec.classifier == "prompt" and m.init:
        load_mlm_head(model, Path(m.init))
    if m.lora is not None:
        settings = m.lora.model_dump(exclude={"merge_on_save"})
        apply_lora(model, **settings)
        spec.lora = None if m.lora.merge_on_save else settings
    freeze(model, m.freeze)
    log.info("%s", describe_trainable(trainable_groups(model)))
    return model


def soft_prompt_count(model: FinetuneModelSection, held: int, source: str) -> int:
    """How many learned prompt vectors the prompt classifier puts before its words: `model.soft_prompt`,
    by default the `held` ones of the checkpoint (pretrained by a prompt task). A checkpoint without
    vectors gets fresh ones; one with another count is refused (its vectors were learned as a set)."""
    if model.classifier != "prompt":
        return 0
    if model.soft_prompt is None or model.soft_prompt == held:
        return held
    if held and model.soft_prompt:
        raise ConfigError(
            f"model.soft_prompt is {model.soft_prompt} but {source} holds {held} learned prompt vectors "
            f"(soft_prompt_tokens): give model.soft_prompt {held}, or leave it out"
        )
    return model.soft_prompt


def prompt_spec(
    cfg: FinetuneConfig,
    plan: ProtocolPlan,
    special: SpecialTokens,
    meta: Mapping[str, Any],
    soft_prompt: int,
) -> tuple[list[int], list[int], dict[str, str]]:
    """Prompt ids (after `soft_prompt` placeholders for the learned vectors, as the prompt task's
    templates), label word ids (class order) and the verbaliser, from the one prompt builder."""
    candidates = [cfg.model.tokenizer, cfg.tokenizer, meta.get("name"), cfg.model.init]
    tokenizer = run_tokenizer(candidates, meta, needed_for="the prompt classifier (model.tokenizer)")
    verbalizer = cfg.model.verbalizer or default_verbalizer(plan.name, cfg.protocol.target)
    if not verbalizer:
        raise ConfigError(f"protocol {plan.name} has no default verbaliser: set model.verbalizer")
    prompt_ids = [special.pad_id] * soft_prompt
    prompt_ids += tokenize_template(tokenizer, cfg.model.prompt, special.mask_id, "model.prompt")
    words = label_word_ids(
        tokenizer, verbalizer, special.unk_id, "model.verbalizer", classes=plan.label.classes
    )
    return prompt_ids, [words[c] for c in plan.label.classes], {c: verbalizer[c] for c in plan.label.classes}


# ----------------------------------------------------------------------------- engine parts
def run_collator(
    batching: BatchingConfig, special: SpecialTokens, device: torch.device, stream_table: StreamTable
) -> Collator:
    """The collator of a run's `batching` section for batches bound to `device`."""
    return Collator(
        special,
        pad_multiple=batching.pad_multiple,
        feature_dtype=batching.feature_dtype_for(device),
        packing=batching.packing,
        stream_table=stream_table,
    )


def run_optimizer(
    model: torch.nn.Module,
    optim: OptimConfig,
    total_steps: int,
    device: torch.device,
    head_parameters: Iterable[torch.nn.Parameter] | None = None,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its warm-up + linear decay over `total_steps`, as the `optim` section says;
    `head_parameters` (fine-tuning: the untrained heads) get `optim.head_lr`."""
    optimizer = build_optimizer(
        model,
        optim.lr,
        optim.weight_decay,
        tuple(optim.betas),
        optim.eps,
        device,
        head_parameters=head_parameters or (),
        head_lr=None if head_parameters is None else optim.head_lr,
        fused=optim.fused,
    )
    schedule = warmup_linear_schedule(
        optimizer, optim.warmup_for(total_steps), total_steps, optim.final_lr_ratio
    )
    return optimizer, schedule


def loop_settings(cfg: RunConfig, device: torch.device, dbs: Databases, **run: Any) -> LoopSettings:
    """The training loop's settings that every run takes from its config alike; `run`: the ones
    each run sets its own way (output_dir, steps, val_every, ckpt_every, log_every, desc)."""
    return LoopSettings(
        seed=cfg.seed,
        grad_accum=cfg.grad_accum,
        grad_clip=cfg.optim.grad_clip,
        keep_last=cfg.keep_last,
        max_nonfinite_in_a_row=cfg.max_nonfinite_in_a_row,
        progress=cfg.progress,
        stop_after=cfg.stop_after,
        compile=cfg.compile,
        compile_backend=cfg.compile_backend,
        prefetch=cfg.batching.prefetch_for(device),
        databases=database_digests(dbs.paths()),
        **run,
    )
