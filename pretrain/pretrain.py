"""`uniter3m pretrain --config FILE [--set key=value ...] [--resume auto|DIR]`

The recipe reads top to bottom: config -> backend -> data -> tasks -> model -> optimiser ->
streams -> loop. The same command runs alone, under `torchrun` and under `horovodrun`
(scripts/pretrain_torchrun.sh, scripts/pretrain_horovod.sh).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from uniter3m import streams as stream_table
from uniter3m.config import add_set_argument
from uniter3m.data.collate import Collator
from uniter3m.data.dataset import JoinedDataset
from uniter3m.data.store import DbReader
from uniter3m.data.tokenization import SpecialTokens, load_tokenizer, vocab_hash
from uniter3m.errors import ConfigError, DatabaseError
from uniter3m.fileio import atomic_write_json
from uniter3m.model.config import UniterConfig, deep_merge
from uniter3m.model.loading import read_config
from uniter3m.model.pretraining import UniterForPretraining
from uniter3m.tasks.base import TaskContext, build_task
from uniter3m.train.checkpoint import find_resume
from uniter3m.train.config import DataConfig, PretrainConfig, load_pretrain_config
from uniter3m.train.distributed import init_backend
from uniter3m.train.loaders import TaskStream, validation_loader
from uniter3m.train.loop import LoopSettings, TrainLoop, TrainTask
from uniter3m.train.optim import build_optimizer, warmup_linear_schedule
from uniter3m.train.precision import Precision
from uniter3m.train.session import (
    check_vocabulary,
    database_digests,
    main_rank_print,
    open_run_dir,
    read_tokenizer_record,
    settings_on_resume,
)

log = logging.getLogger("uniter3m.pretrain")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="pretraining config JSON (see configs/pretrain/)")
    add_set_argument(parser, "optim.lr=5e-5 --set steps=1000")
    parser.add_argument(
        "--resume",
        default=None,
        metavar="auto|DIR",
        help="'auto': continue from the last complete checkpoint in output_dir (start fresh if none); "
        "DIR: that checkpoint",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in output_dir (only a uniter3m run folder)",
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_pretrain_config(args.config, args.overrides)
    run_pretrain(cfg, resume=args.resume, overwrite=args.overwrite)
    print(
        f"checkpoints and logs in {cfg.output_dir} (checkpoints/latest, logs/metrics.jsonl, logs/tensorboard)"
    )
    return 0


def run_pretrain(
    config: str | os.PathLike | Mapping[str, Any] | PretrainConfig,
    overrides: Iterable[str] = (),
    resume: str | None = None,
    overwrite: bool = False,
) -> dict[str, float]:
    """Pretrain as the config says; returns the final validation metrics ('task/metric' -> value)."""
    # 1. config, and the run folder: locked for the whole run, claimed (never someone else's folder)
    cfg = config if isinstance(config, PretrainConfig) else load_pretrain_config(config, overrides)
    backend = init_backend(cfg.device, grad_sync=cfg.grad_sync)
    if not backend.is_main:  # one copy of the data reports, not one per rank
        logging.getLogger("uniter3m").setLevel(logging.WARNING)
    loop = optimizer = scheduler = model = None
    run_dir = ExitStack()
    try:
        run_dir.enter_context(
            open_run_dir(cfg.output_dir, "pretrain", backend, resume=bool(resume), overwrite=overwrite)
        )
        checkpoint = find_resume(cfg.output_dir, resume, report=main_rank_print(backend))
        changes = (
            settings_on_resume(Path(cfg.output_dir) / "config.json", cfg.model_dump(mode="json"))
            if checkpoint
            else {}
        )
        if backend.is_main:
            atomic_write_json(Path(cfg.output_dir) / "config.json", cfg.model_dump(mode="json"))

        # 2. data: every text db must share one tokenizer; the special ids come from it
        readers = _DbCache()
        special, tokenizer_meta = _special_tokens(cfg, readers)
        if cfg.model.init:
            check_vocabulary(
                read_tokenizer_record(cfg.model.init), tokenizer_meta, cfg.model.init, "the text dbs"
            )
        tokenizer = _tokenizer(cfg.tokenizer, tokenizer_meta)
        collator = Collator(
            special,
            pad_multiple=cfg.batching.pad_multiple,
            feature_dtype=cfg.batching.feature_dtype_for(backend.device),
            packing=cfg.batching.packing,
        )

        # 3. tasks, each with its training dataset (and validation dataset when it has one)
        context = TaskContext(special=special, tokenizer=tokenizer)
        active = cfg.active_tasks()
        tasks = [build_task(t.name, context, **t.options) for t in active]

        def dataset_of(t: Any, task: Any, validation: bool) -> JoinedDataset:
            return _dataset(cfg.datasets[t.dataset], t.modalities, readers, validation, task, tokenizer)

        pairs = list(zip(active, tasks, strict=True))
        train_sets = [dataset_of(t, task, validation=False) for t, task in pairs]
        val_sets = [
            dataset_of(t, task, validation=True) if cfg.datasets[t.dataset].valid is not None else None
            for t, task in pairs
        ]

        # 4. model: the heads the tasks use, stream dims from the databases
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = _build_model(cfg, tasks, readers).to(backend.device)
        model.tokenizer_record = {k: tokenizer_meta.get(k) for k in ("name", "vocab_hash", "vocab_size")}

        # 5. optimiser, schedule, precision
        optimizer = build_optimizer(
            model,
            cfg.optim.lr,
            cfg.optim.weight_decay,
            tuple(cfg.optim.betas),
            cfg.optim.eps,
            backend.device,
            fused=cfg.optim.fused,
        )
        scheduler = warmup_linear_schedule(
            optimizer, cfg.optim.warmup_for(cfg.steps), cfg.steps, cfg.optim.final_lr_ratio
        )
        precision = Precision(cfg.precision, backend.device)

        # 6. one endless, resumable stream per task; fixed validation batches
        b = cfg.batching
        pin = backend.device.type == "cuda"
        train_tasks = []
        for i, (tc, task, train, val) in enumerate(zip(active, tasks, train_sets, val_sets, strict=True)):
            common = dict(
                task_index=i,
                seed=cfg.seed,
                max_batch_size=b.max_batch_size,
                pool_size=b.pool_size,
                num_workers=b.workers_for(backend.device, backend.local_world_size),
                world_size=backend.world_size,
                rank=backend.rank,
                pin_memory=pin,
            )
            stream = TaskStream(task, train, collator, max_tokens=b.max_tokens, **common)
            val_loader = (
                validation_loader(
                    task,
                    val,
                    collator,
                    max_tokens=b.val_max_tokens or b.max_tokens,
                    max_batches=cfg.val_max_batches,
                    **common,
                )
                if val is not None
                else None
            )
            train_tasks.append(TrainTask(tc.key, task, tc.ratio, stream, val_loader))

        # 7. the loop (resume loads weights, optimiser, RNG and loader positions before DDP wraps)
        settings = LoopSettings(
            output_dir=cfg.output_dir,
            steps=cfg.steps,
            seed=cfg.seed,
            grad_accum=cfg.grad_accum,
            grad_clip=cfg.optim.grad_clip,
            val_every=cfg.val_every,
            ckpt_every=cfg.ckpt_every,
            keep_last=cfg.keep_last,
            log_every=cfg.log_every,
            max_nonfinite_in_a_row=cfg.max_nonfinite_in_a_row,
            progress=cfg.progress,
            stop_after=cfg.stop_after,
            compile=cfg.compile,
            prefetch=b.prefetch_for(backend.device),
            databases=database_digests(readers.paths()),
        )
        if checkpoint is not None and backend.is_main:
            log.info("resuming from %s", checkpoint)
        loop = TrainLoop(settings, model, train_tasks, backend, precision, optimizer, scheduler, checkpoint)
        if "optim.lr" in changes:
            loop.apply_lr_change(*changes["optim.lr"])
        metrics = loop.run()
        if backend.is_main and metrics:
            log.info("final validation: %s", ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics
    finally:
        # gloo: the DDP model and optimiser must be gone before the process group is destroyed
        if loop is not None:
            loop.close()
        del loop, scheduler, optimizer, model
        gc.collect()
        run_dir.close()
        backend.shutdown()


# ------------------------------------------------------------------------------------ data helpers
class _DbCache:
    """One DbReader per path, shared by every dataset that names it."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, str], DbReader] = {}

    def get(self, path: str, kind: str) -> DbReader:
        key = (str(Path(path).resolve()), kind)
        if key not in self._open:
            self._open[key] = DbReader(path, kind=kind)
        return self._open[key]

    def paths(self) -> list[str]:
        return [path for path, _ in self._open]

    def many(self, paths: Sequence[str] | None, kind: str) -> list[DbReader] | None:
        return None if paths is None else [self.get(p, kind) for p in paths]


def _special_tokens(cfg: PretrainConfig, readers: _DbCache) -> tuple[SpecialTokens, dict[str, Any]]:
    """The special ids shared by every text db (and that tokenizer's meta); mixed tokenizers are an error."""
    seen: dict[str, str] = {}
    first: dict[str, Any] | None = None
    for name, ds in cfg.datasets.items():
        for path in [*ds.txt_dbs, *(ds.valid.txt_dbs if ds.valid else [])]:
            meta = readers.get(path, "txt").meta.get("tokenizer")
            if not meta:
                raise DatabaseError(
                    f"{path}/meta.json has no 'tokenizer' section; rebuild it with build-txt-db"
                )
            seen.setdefault(str(meta.get("vocab_hash")), f"{path} (dataset {name})")
            first = first or meta
    if len(seen) > 1:
        raise ConfigError(
            "the text databases were built with different tokenizers: "
            + "; ".join(f"vocab hash {h} in {where}" for h, where in seen.items())
            + "; rebuild them with one tokenizer"
        )
    assert first is not None
    return SpecialTokens.from_dict(first), first


def _tokenizer(configured: str | None, meta: dict[str, Any]) -> Any | None:
    """The tokenizer (prompt tasks need its words): the configured one, else the folder the text dbs
    were built with when it still exists; its vocabulary must be the dbs' one."""
    path = configured or (meta.get("name") if meta.get("name") and Path(meta["name"]).is_dir() else None)
    if path is None:
        return None
    tokenizer = load_tokenizer(path)
    if meta.get("vocab_hash") and vocab_hash(tokenizer) != meta["vocab_hash"]:
        raise ConfigError(
            f"tokenizer {path} has vocab hash {vocab_hash(tokenizer)} but the text databases were built with "
            f"{meta['vocab_hash']} ({meta.get('name')}); give the tokenizer the databases were built with"
        )
    return tokenizer


def _dataset(
    ds: DataConfig,
    modalities: str | None,
    readers: _DbCache,
    validation: bool,
    task: Any = None,
    tokenizer: Any = None,
) -> JoinedDataset:
    dbs = ds.valid if validation else ds
    assert dbs is not None
    available = ds.available
    wanted = modalities or ds.used_modalities
    lacking = sorted(set(wanted) - set(available))
    if lacking:
        names = ", ".join(stream_table.get(m).db_key for m in lacking)
        raise ConfigError(
            f"a task asks for modalities {wanted} but its dataset has no {names}; add them or drop those letters"
        )
    dataset = JoinedDataset(
        readers.many(dbs.txt_dbs, "txt"),
        feat_dbs={name: readers.many(paths, "feat") for name, paths in dbs.feat_dbs.items()},
        modalities=wanted,
        max_txt_len=ds.max_txt_len,
        max_frames=ds.max_frames,
        normalize=ds.normalize,
        missing=ds.missing,
        context=ds.context,
        tokenizer=tokenizer,
    )
    for letter in getattr(task, "streams", ()):
        if letter == "L":
            continue
        name = stream_table.get(letter).name
        if name in dataset.frame_lengths and int(dataset.frame_lengths[name].sum()) == 0:
            raise ConfigError(
                f"task {task.name} learns from {name} frames but no utterance of its "
                f"{'validation ' if validation else ''}dataset has any ({', '.join(dbs.feat_dbs[name])}: every "
                f"{name} stream is empty); give it a {name} database with frames, or drop the task"
            )
    return dataset


def _stream_meta(cfg: PretrainConfig, readers: _DbCache, stream: str) -> tuple[int, int] | None:
    """(feature dim, soft-label dim) shared by every db of `stream`, or None when no dataset has it."""
    found: dict[tuple[int, int], str] = {}
    for ds in cfg.datasets.values():
        paths = [*ds.feat_dbs.get(stream, []), *(ds.valid.feat_dbs.get(stream, []) if ds.valid else [])]
        for path in paths:
            meta = readers.get(path, "feat").meta
            found.setdefault((int(meta["dim"]), int(meta.get("soft_label_dim") or 0)), path)
    if len(found) > 1:
        raise ConfigError(
            f"the {stream} databases disagree on (feature dim, soft-label dim): "
            + "; ".join(f"{k} in {p}" for k, p in found.items())
            + "; use one feature extractor for every corpus"
        )
    return next(iter(found)) if found else None


def _build_model(cfg: PretrainConfig, tasks: Sequence[Any], readers: _DbCache) -> UniterForPretraining:
    """A model with every head the tasks need; frame streams sized by the databases."""
    heads = list(dict.fromkeys(h for t in tasks for h in t.heads))
    emo = sorted({len(t.classes) for t in tasks if "emo_classifier" in t.heads})
    if len(emo) > 1:
        raise ConfigError(f"emo_cls tasks disagree on the number of classes {emo}; use one class list")
    emo_classes = emo[0] if emo else 0
    base = (
        read_config(cfg.model.init, **cfg.model.overrides)
        if cfg.model.init
        else UniterConfig.from_json(cfg.model.config, **cfg.model.overrides)
    )
    overrides: dict[str, Any] = deep_merge({}, cfg.model.overrides)
    for stream in stream_table.names():
        meta = _stream_meta(cfg, readers, stream)
        have = base.stream(stream)
        if meta is None:
            continue
        dim, soft = meta
        if cfg.model.init and have.present and have.feat_dim != dim:
            raise ConfigError(
                f"model.init {cfg.model.init} has {stream}.feat_dim={have.feat_dim} but the {stream} databases hold "
                f"{dim}-d frames; use databases from the same feature extractor"
            )
        if not cfg.model.init or not have.present:
            if have.feat_dim not in (0, dim):
                log.info("model %s.feat_dim %d -> %d (from the databases)", stream, have.feat_dim, dim)
            overrides = deep_merge(overrides, base.with_stream(stream, feat_dim=dim, soft_label_dim=soft))
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
    vocab = max(
        readers.get(p, "txt").meta["tokenizer"]["vocab_size"]
        for ds in cfg.datasets.values()
        for p in ds.txt_dbs
    )
    if base.vocab_size < vocab:
        raise ConfigError(
            f"the model's vocab_size {base.vocab_size} is smaller than the tokenizer's {vocab}; "
            "set model.overrides.vocab_size"
        )
    _check_lengths(cfg, base)
    if cfg.model.init:
        return UniterForPretraining.from_pretrained(
            cfg.model.init, heads=heads, emo_classes=emo_classes, **overrides
        )
    config = UniterConfig.from_json(cfg.model.config, **overrides)
    return UniterForPretraining(config, heads, emo_classes)


def _check_lengths(cfg: PretrainConfig, model: UniterConfig) -> None:
    """Dataset truncation limits must fit the model's position tables."""
    problems = []
    for name, ds in cfg.datasets.items():
        if ds.max_text_tokens > model.max_position_embeddings:
            problems.append(
                f"datasets.{name}.max_txt_len {ds.max_txt_len} + [CLS]/[SEP]"
                + (f" + context.max_tokens {ds.context.max_tokens}" if ds.context else "")
                + f" exceeds the model's max_position_embeddings {model.max_position_embeddings}"
            )
        for stream in ds.feat_dbs:
            sc = model.stream(stream)
            if sc.present and sc.position == "learned" and ds.max_frames > sc.max_frames:
                problems.append(
                    f"datasets.{name}.max_frames {ds.max_frames} exceeds the model's {stream}.max_frames {sc.max_frames}"
                )
    if problems:
        raise ConfigError("; ".join(problems) + "; lower the dataset limits or enlarge the model's tables")
