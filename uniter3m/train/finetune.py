"""A fine-tuning run (`run_finetune`: every fold, or one), on the one assembly of datasets and model
(`uniter3m.train.assembly`), the fold plan of `uniter3m.train.folds` and the prediction, scoring and
selection of `uniter3m.train.scoring`.

Per fold: datasets of the fold's ids, the model, optimiser, schedule, precision; the training loop
with one task (`SupervisedTask`); validation `evals_per_epoch` times an epoch keeps the best model
on the protocol's VALIDATION metric in `<fold>/best/` and stops after `patience` validations without
improvement (checkpoints, logs and `--resume auto|DIR` as in pretraining); then the test split scored
ONCE with the selected model (`<fold>/metrics.json`); at the end a summary over the folds found in
output_dir (summary.csv / .md / .json, confusion.png).

Honesty rules kept here: targets come from the protocol (never from a batch's inputs); the model
is selected on the VALIDATION split only (`SelectionEvaluator`); with several ranks every rank's
predictions are gathered (each id scored once) before any metric is computed (`predict`).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uniter3m.data.dataset import JoinedDataset
from uniter3m.data.tokenization import SpecialTokens
from uniter3m.errors import UserError
from uniter3m.evaluation.protocols import ProtocolPlan
from uniter3m.evaluation.report import FOLD_FILE, load_fold_results, write_summary
from uniter3m.fileio import atomic_write_json
from uniter3m.model.finetuning import FinetuneModel, load_finetuned
from uniter3m.tasks.base import TaskContext
from uniter3m.tasks.distill import DistillTask, check_features, fuse, load_teacher
from uniter3m.tasks.supervised import SupervisedTask
from uniter3m.train.assembly import (
    Databases,
    build_dataset,
    build_finetune_model,
    data_tokenizer,
    feature_dims,
    loop_settings,
    run_collator,
    run_optimizer,
)
from uniter3m.train.checkpoint import find_resume
from uniter3m.train.config import FinetuneConfig, load_finetune_config
from uniter3m.train.distributed import Backend, init_backend
from uniter3m.train.folds import (
    RESOLVED_CONFIG,
    class_weights,
    fold_dir,
    fold_facts,
    fold_init,
    plan_protocol,
    schedule,
    untrained_classes,
)
from uniter3m.train.inputs import INPUTS_KEY, input_record
from uniter3m.train.loaders import TaskStream
from uniter3m.train.logs import read_metrics
from uniter3m.train.loop import TrainLoop, TrainTask
from uniter3m.train.precision import Precision
from uniter3m.train.scoring import SelectionEvaluator, predict, prediction_rows, scalars, score
from uniter3m.train.session import (
    check_vocabulary,
    main_rank_print,
    open_run_dir,
    read_tokenizer_record,
    settings_on_resume,
)

log = logging.getLogger(__name__)
FEW_STEPS = 50  # fewer optimiser steps than this in a whole fold is almost never a real fine-tuning
COLLAPSE_FIX = (
    "train longer (more epochs, or a smaller batching.max_batch_size for more steps), raise optim.lr / "
    "optim.head_lr, or set class_weighted: true when one class dominates"
)


def supervised_task(
    model: FinetuneModel,
    plan: ProtocolPlan,
    special: SpecialTokens,
    class_weights: Sequence[float] | None = None,
    modality_sets: Sequence[str] | None = None,
    **distill: Any,
) -> SupervisedTask:
    """The fine-tuning task; `modality_sets` (training only) = modality dropout over those sets;
    `distill` (teacher outputs, weight, temperature, feature_weight) makes it a `DistillTask`."""
    return (DistillTask if distill else SupervisedTask)(
        TaskContext(special=special, stream_table=model.config.stream_table),
        targets=plan.targets,
        classifier=model.spec.classifier,
        prompt_ids=model.spec.prompt_ids,
        soft_prompt=model.spec.soft_prompt,
        class_weights=class_weights,
        max_len=model.config.max_position_embeddings,
        modality_sets=modality_sets,
        **distill,
    )


def distill_task(
    cfg: FinetuneConfig,
    model: FinetuneModel,
    plan: ProtocolPlan,
    special: SpecialTokens,
    weights: Sequence[float] | None,
    k: int,
    train_set: Callable[[str], JoinedDataset],
    backend: Backend,
) -> tuple[FinetuneModel, SupervisedTask]:
    """Fold `k`'s teacher (`distill.teacher`) and the students' task, which looks up the teacher's
    logits (and pooled vectors) on the training utterances, computed once (`tasks/distill.py`)."""
    d = cfg.distill
    teacher = load_teacher(d.teacher, fold_dir(cfg, plan, k).name, k, plan.label.classes).to(backend.device)
    if d.feature_weight:
        check_features(model, teacher, d.teacher)
    outputs = predict(
        teacher,
        supervised_task(teacher, plan, special),
        train_set(teacher.spec.modalities),
        cfg,
        backend,
        Precision(cfg.precision, backend.device),
        "teacher",
        keep=("logits", "pooled") if d.feature_weight else ("logits",),
    )
    task = supervised_task(
        model,
        plan,
        special,
        weights,
        cfg.modality_sets,
        teacher=outputs,
        weight=d.weight,
        temperature=d.temperature,
        feature_weight=d.feature_weight,
    )
    return teacher, task


def batching_warning(
    n_train: int, batches: int, epochs: int, grad_accum: int, max_batch_size: int | None
) -> str | None:
    """A warning with the fix when a whole fold makes fewer than FEW_STEPS optimiser steps."""
    total = epochs * max(1, batches // grad_accum)
    if total >= FEW_STEPS:
        return None
    size = n_train / max(1, batches)
    return (
        f"only {total} optimiser steps for {epochs} epoch(s): {n_train} training utterances in {batches} batches "
        f"(about {size:.0f} per batch; batching.max_batch_size {max_batch_size}, limited by batching.max_tokens "
        "otherwise); the model will hardly learn: set batching.max_batch_size (16-32) or more epochs"
    )


def run_finetune(
    config: FinetuneConfig | Mapping[str, Any] | str | os.PathLike,
    fold: int | None = None,
    overrides: Sequence[str] = (),
    resume: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Fine-tune fold `fold` (or every fold), write per-fold outputs and the summary.

    `resume`: "auto" (folds with results are kept, an interrupted fold continues from its last
    complete checkpoint) or a checkpoint DIR of the one fold given as `fold`.
    Returns {"folds": [per-fold result], "test": mean test metrics of the folds run here,
    "summary": over every fold found in output_dir (main rank) | None, "summary_md": str | None}.
    """
    cfg = config if isinstance(config, FinetuneConfig) else load_finetune_config(config, overrides)
    if resume not in (None, "auto") and fold is None:
        raise UserError(f"--resume {resume}: a checkpoint continues one fold; give that fold with --fold K")
    backend = init_backend(cfg.device, grad_sync=cfg.grad_sync)
    run_dir = ExitStack()
    try:
        plan = plan_protocol(cfg)
        if fold is not None and not 0 <= fold < len(plan.folds):
            raise UserError(f"--fold {fold}: protocol {plan.name} has folds 0..{len(plan.folds) - 1}")
        # A fold loop runs one fold per invocation into one folder: another fold is not a conflict.
        other_folds = fold is not None and Path(cfg.output_dir, RESOLVED_CONFIG).is_file() and not overwrite
        run_dir.enter_context(
            open_run_dir(
                cfg.output_dir, "finetune", backend, resume=bool(resume) or other_folds, overwrite=overwrite
            )
        )
        recorded = Path(cfg.output_dir) / RESOLVED_CONFIG
        if resume or other_folds:
            settings_on_resume(recorded, cfg.model_dump(mode="json"))
        if backend.is_main:
            atomic_write_json(recorded, cfg.model_dump(mode="json"))
        chosen = range(len(plan.folds)) if fold is None else [fold]
        results = [train_fold(cfg, plan, k, backend, resume) for k in chosen]
        summary = summary_md = None
        if backend.is_main and any(r["test"] for r in results):
            summary = write_summary(cfg.output_dir, load_fold_results(cfg.output_dir))
            summary_md = Path(cfg.output_dir, "summary.md").read_text()
        finished = [r for r in results if r["test"]]
        test = {
            name: float(np.mean([r["test"][name] for r in finished]))
            for name, value in (finished[0]["test"] if finished else {}).items()
            if not isinstance(value, list)
        }
        return {"folds": results, "test": test, "summary": summary, "summary_md": summary_md}
    finally:
        gc.collect()
        run_dir.close()
        backend.shutdown()


def train_fold(
    cfg: FinetuneConfig, plan: ProtocolPlan, k: int, backend: Backend, resume: str | None = None
) -> dict[str, Any]:
    """One fold: train with selection on its validation split, then score its test split ONCE."""
    fold = plan.folds[k]
    out_dir = fold_dir(cfg, plan, k)
    cfg = fold_init(cfg, out_dir.name)
    done = out_dir / FOLD_FILE
    if resume == "auto" and done.is_file():
        kept = json.loads(done.read_text())
        if kept.get("early_stopped") or kept.get("schedule", schedule(cfg)) == schedule(cfg):
            log.info("fold %s already has %s: kept (--resume auto)", fold.name, done)
            return kept
        log.info(
            "fold %s: extended from %s to %s (--resume auto)", fold.name, kept["schedule"], schedule(cfg)
        )
    t0 = time.time()
    torch.manual_seed(cfg.seed)  # identical initial head weights on every rank
    dbs = Databases()
    meta = data_tokenizer(cfg.data, dbs)
    special = SpecialTokens.from_dict(meta)
    collator = run_collator(cfg.batching, special, backend.device, cfg.stream_table)
    tokenizer = cfg.model.tokenizer or cfg.tokenizer  # for context speaker prefixes

    def dataset(ids: Sequence[str], modalities: str | None = None) -> JoinedDataset:
        return build_dataset(cfg.data, dbs, ids=ids, modalities=modalities, tokenizer=tokenizer)

    train_set, valid_set = dataset(fold.train), dataset(fold.valid)
    lost = sorted(set(fold.test) - set(dataset(fold.test).ids))  # at the start, not after training
    if lost:
        raise UserError(
            f"fold {fold.name}: data.missing='drop' would leave {len(lost)} of its {len(fold.test)} test utterances "
            f"out (no record in a feature database), e.g. {lost[:3]}; scores on another test split are not the "
            "protocol's. Rebuild the feature databases with these ids, or leave the stream out of data.modalities"
        )
    model = build_finetune_model(cfg, plan, feature_dims(train_set), meta).to(backend.device)
    if cfg.model.init:
        check_vocabulary(
            read_tokenizer_record(cfg.model.init), model.tokenizer_record, cfg.model.init, "data.txt_db"
        )
    untrained = untrained_classes(plan, fold)
    if untrained and backend.is_main:
        log.warning(
            "fold %s: classes %s have no training utterance but %d test utterances; they are scored (the model "
            "cannot predict them well) and listed in metrics.json as untrained_classes",
            fold.name,
            untrained,
            sum(plan.label.classes[int(plan.targets[i])] in untrained for i in fold.test),
        )
    weights = class_weights(plan, fold.train) if cfg.class_weighted and not plan.regression else None
    task = supervised_task(model, plan, special, weights)  # scores whole splits (no modality dropout)
    train_task = (
        supervised_task(model, plan, special, weights, cfg.modality_sets) if cfg.modality_sets else task
    )
    if cfg.distill:
        teacher, train_task = distill_task(
            cfg, model, plan, special, weights, k, lambda m: dataset(fold.train, m), backend
        )
    valid_sets = {m: dataset(fold.valid, m) for m in cfg.modality_sets or []}
    if backend.is_main:
        log.info("fold %s: sizes %s; %s", fold.name, fold.sizes(), model.describe())

    b = cfg.batching
    stream = TaskStream(
        train_task,
        train_set,
        collator,
        task_index=0,
        seed=cfg.seed,
        max_tokens=b.max_tokens,
        max_batch_size=b.max_batch_size,
        pool_size=b.pool_size,
        num_workers=b.workers_for(backend.device, backend.local_world_size),
        world_size=backend.world_size,
        rank=backend.rank,
        pin_memory=backend.device.type == "cuda",
    )
    steps_per_epoch = max(1, len(stream.sampler) // cfg.grad_accum)
    total = (
        cfg.epochs * steps_per_epoch if cfg.steps is None else min(cfg.steps, cfg.epochs * steps_per_epoch)
    )
    val_every = max(1, steps_per_epoch // min(cfg.evals_per_epoch, steps_per_epoch))
    few = batching_warning(len(train_set), len(stream.sampler), cfg.epochs, cfg.grad_accum, b.max_batch_size)
    warnings = (
        [few] if few and cfg.steps is None else []
    )  # a `steps` cap is a smoke run: few steps on purpose
    optimizer, scheduler = run_optimizer(
        model, cfg.optim, total, backend.device, head_parameters=model.head_parameters()
    )
    precision = Precision(cfg.precision, backend.device)
    evaluator = SelectionEvaluator(
        model,
        task,
        valid_set,
        plan,
        cfg,
        backend,
        precision,
        out_dir / "best",
        {"fold_index": k, "fold": fold.name, INPUTS_KEY: input_record(cfg, dbs)},
        modality_sets=valid_sets,
    )
    settings = loop_settings(
        cfg,
        backend.device,
        dbs,
        output_dir=str(out_dir),
        steps=total,
        val_every=val_every,
        ckpt_every=cfg.ckpt_every or val_every,
        log_every=min(cfg.log_every, val_every),
        desc=f"fold {fold.name}",
    )
    checkpoint = find_resume(out_dir, resume, report=main_rank_print(backend))
    if checkpoint is not None and backend.is_main:
        log.info("fold %s: resuming from %s", fold.name, checkpoint)
    loop = TrainLoop(
        settings,
        model,
        [TrainTask("finetune", train_task, 1.0, stream)],
        backend,
        precision,
        optimizer,
        scheduler,
        checkpoint,
        evaluator=evaluator,
    )
    try:
        loop.run()
        stopped_early = evaluator.should_stop
        steps = loop.step
    finally:
        loop.close()
        del loop, optimizer, scheduler  # before any shutdown (gloo), see DEVELOPERS.md
        gc.collect()
    if cfg.stop_after is not None and steps < total and not stopped_early:
        return {"fold": fold.name, "fold_index": k, "stopped_at": steps, "test": {}}
    train_seconds = time.time() - t0
    if evaluator.best_single is not None:
        warnings.append(
            f"the selected model predicts {evaluator.best_single!r} for every validation utterance (chance "
            f"level); {COLLAPSE_FIX}"
        )
    if backend.is_main:
        for warning in warnings:
            log.warning("fold %s: %s", fold.name, warning)

    best = load_finetuned(out_dir / "best").to(backend.device)  # the model selected on validation
    test_pred = predict(best, task, dataset(fold.test), cfg, backend, precision, "test")  # scored ONCE
    test_scores = score(plan, test_pred, fold.test)
    test_sets, set_preds = {}, {}
    for modalities in cfg.modality_sets or []:  # the same selected model, scored once per set
        set_preds[modalities] = predict(
            best, task, dataset(fold.test, modalities), cfg, backend, precision, modalities
        )
        test_sets[modalities] = scalars(score(plan, set_preds[modalities], fold.test))
    if cfg.distill:  # the teacher alone, and the final model: the fusion or the all-modality student
        teacher_task = supervised_task(teacher, plan, special)
        teacher_set = dataset(fold.test, teacher.spec.modalities)
        teacher_pred = predict(teacher, teacher_task, teacher_set, cfg, backend, precision, "teacher")
        test_sets["teacher"] = scalars(score(plan, teacher_pred, fold.test))
        if cfg.distill.final == "fusion":
            test_sets["student"] = scalars(test_scores)
            test_pred = fuse([teacher_pred, *set_preds.values()])
            test_scores = score(plan, test_pred, fold.test)
    result = {
        "protocol": f"{plan.name}/{cfg.protocol.scheme}"
        + (f"/{cfg.protocol.target}" if cfg.protocol.target else ""),
        **fold_facts(plan, k),
        "modalities": cfg.data.used_modalities,
        "head": cfg.model.head,
        "per_stream": cfg.model.per_stream,
        "classifier": cfg.model.classifier,
        "freeze": cfg.model.freeze,
        **({"lora": cfg.model.lora.model_dump()} if cfg.model.lora else {}),
        **({"distill": cfg.distill.model_dump()} if cfg.distill else {}),
        "init": cfg.model.init or cfg.model.config,
        "seed": cfg.seed,
        "selection_metric": plan.selection_metric,
        "best_valid": evaluator.best_value,
        "best_step": evaluator.best_step,
        "steps": steps,
        "early_stopped": stopped_early,
        "schedule": schedule(cfg),
        "history": evaluator.history,
        "train_loss": [
            [r["step"], r[k]]
            for r in read_metrics(out_dir, "train")
            for k in sorted(r)
            if k.startswith("loss")
        ],  # the learning curve's (step, training loss) points
        "test": test_scores,
        **({"modality_sets": list(cfg.modality_sets), "test_sets": test_sets} if test_sets else {}),
        "warnings": warnings,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t0, 1),
        "predictions": prediction_rows(plan, test_pred, fold.test),
    }
    if backend.is_main:
        atomic_write_json(done, result)
        log.info("fold %s: test %s", fold.name, scalars(test_scores))
    backend.barrier()
    return result
