"""`uniter3m finetune`: fine-tune on an emotion corpus under one of the field's protocols.

Reads top to bottom, on the same engine as pretraining (`uniter3m/train/`):
  1. the config (saved, resolved with every `--set`, as `<output_dir>/config.json`), and the
     protocol's targets and folds from the text db's label columns;
  2. per fold: datasets of the fold's ids, the fine-tuning model, optimiser, schedule, precision;
  3. the training loop with one task (`SupervisedTask`); validation `evals_per_epoch` times an
     epoch keeps the best model on the protocol's VALIDATION metric in `<fold>/best/` and stops
     after `patience` validations without improvement; checkpoints, logs (JSONL + TensorBoard)
     and `--resume auto` work as in pretraining;
  4. the test split scored ONCE, with the selected model: `<fold>/metrics.json`;
  5. a summary over the folds found under output_dir: summary.csv / .md / .json, confusion.png.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import time
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uniter3m.config import add_set_argument
from uniter3m.data.collate import Collator
from uniter3m.errors import UserError
from uniter3m.evaluation.protocols import ProtocolPlan
from uniter3m.evaluation.report import FOLD_FILE, load_fold_results, write_summary
from uniter3m.fileio import atomic_write_json
from uniter3m.model.finetuning import load_finetuned
from uniter3m.train.checkpoint import find_resume
from uniter3m.train.config import FinetuneConfig, load_finetune_config
from uniter3m.train.distributed import Backend, init_backend
from uniter3m.train.finetune import (
    RESOLVED_CONFIG,
    SelectionEvaluator,
    build_finetune_model,
    class_weights,
    feature_dims,
    make_dataset,
    plan_protocol,
    predict,
    run_tokenizer,
    scalars,
    score,
    special_tokens,
    supervised_task,
    tokenizer_record,
    untrained_classes,
)
from uniter3m.train.loaders import TaskStream
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

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="configs/downstream/X.json")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--fold", type=int, help="run only fold K (0-based); the fold loop scripts use this")
    which.add_argument("--all-folds", action="store_true", help="run every fold (the default)")
    which.add_argument(
        "--summarize", action="store_true", help="only (re)write the summary from the folds already run"
    )
    add_set_argument(parser, "optim.lr=3e-5")
    parser.add_argument(
        "--resume",
        default=None,
        metavar="auto",
        help="'auto': folds with results are kept, an interrupted fold continues from its last checkpoint",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in output_dir (only a uniter3m run folder)",
    )


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = load_finetune_config(args.config, args.overrides)
    if args.summarize:
        summary = write_summary(cfg.output_dir, load_fold_results(cfg.output_dir))
        print(Path(cfg.output_dir, "summary.md").read_text())
        return 0 if summary else 1
    result = run_finetune(cfg, fold=args.fold, resume=args.resume, overwrite=args.overwrite)
    if result.get("summary_md"):
        print(result["summary_md"])
    print(f"results in {cfg.output_dir} (summary.md, per-fold metrics.json, best/ checkpoints)")
    return 0


def run_finetune(
    config: FinetuneConfig | Mapping[str, Any] | str | os.PathLike,
    fold: int | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    resume: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Fine-tune fold `fold` (or every fold), write per-fold outputs and the summary.

    Returns {"folds": [per-fold result], "test": mean test metrics of the folds run here,
    "summary": over every fold found in output_dir (main rank) | None, "summary_md": str | None}.
    """
    cfg = config if isinstance(config, FinetuneConfig) else load_finetune_config(config, overrides)
    if resume not in (None, "auto"):
        raise UserError(
            f"--resume {resume!r}: fine-tuning resumes with 'auto' (each fold from its own checkpoints)"
        )
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


def fold_dir(cfg: FinetuneConfig, plan: ProtocolPlan, k: int) -> Path:
    return Path(cfg.output_dir) / f"fold{k:02d}-{plan.folds[k].name}"


def train_fold(
    cfg: FinetuneConfig, plan: ProtocolPlan, k: int, backend: Backend, resume: str | None = None
) -> dict[str, Any]:
    fold = plan.folds[k]
    out_dir = fold_dir(cfg, plan, k)
    done = out_dir / FOLD_FILE
    if resume == "auto" and done.is_file():
        import json

        log.info("fold %s already has %s: kept (--resume auto)", fold.name, done)
        return json.loads(done.read_text())
    t0 = time.time()
    torch.manual_seed(cfg.seed)  # identical initial head weights on every rank
    special = special_tokens(cfg.data)
    collator = Collator(
        special,
        pad_multiple=cfg.batching.pad_multiple,
        feature_dtype=cfg.batching.feature_dtype_for(backend.device),
        packing=cfg.batching.packing,
    )
    tokenizer = run_tokenizer(cfg)  # for context speaker prefixes
    train_set = make_dataset(cfg.data, fold.train, tokenizer=tokenizer)
    valid_set = make_dataset(cfg.data, fold.valid, tokenizer=tokenizer)
    model = build_finetune_model(cfg, plan, feature_dims(train_set), special).to(backend.device)
    model.tokenizer_record = tokenizer_record(cfg.data)
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
        supervised_task(model, plan, special, weights, cfg.modality_cases) if cfg.modality_cases else task
    )
    case_sets = {
        c: make_dataset(cfg.data, fold.valid, modalities=c, tokenizer=tokenizer)
        for c in cfg.modality_cases or []
    }
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
    o = cfg.optim
    optimizer = build_optimizer(
        model,
        o.lr,
        o.weight_decay,
        tuple(o.betas),
        o.eps,
        backend.device,
        head_parameters=model.head_parameters(),
        head_lr=o.head_lr,
        fused=o.fused,
    )
    scheduler = warmup_linear_schedule(optimizer, o.warmup_for(total), total, o.final_lr_ratio)
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
        {"fold_index": k, "fold": fold.name},
        cases=case_sets,
    )
    settings = LoopSettings(
        output_dir=str(out_dir),
        steps=total,
        seed=cfg.seed,
        grad_accum=cfg.grad_accum,
        grad_clip=o.grad_clip,
        val_every=val_every,
        ckpt_every=cfg.ckpt_every or val_every,
        keep_last=cfg.keep_last,
        log_every=min(cfg.log_every, val_every),
        max_nonfinite_in_a_row=cfg.max_nonfinite_in_a_row,
        progress=cfg.progress,
        stop_after=cfg.stop_after,
        compile=cfg.compile,
        prefetch=b.prefetch_for(backend.device),
        desc=f"fold {fold.name}",
        databases=database_digests(
            [*cfg.data.txt_dbs, *(p for ps in cfg.data.feat_dbs.values() for p in ps)]
        ),
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

    best = load_finetuned(out_dir / "best").to(backend.device)  # the model selected on validation
    test_set = make_dataset(cfg.data, fold.test, tokenizer=tokenizer)
    test_pred = predict(best, task, test_set, cfg, backend, precision, "test")  # scored ONCE
    test_scores = score(plan, test_pred, fold.test)
    test_cases = {}
    for case in cfg.modality_cases or []:  # the same selected model, scored once per case
        case_set = make_dataset(cfg.data, fold.test, modalities=case, tokenizer=tokenizer)
        case_pred = predict(best, task, case_set, cfg, backend, precision, case)
        test_cases[case] = scalars(score(plan, case_pred, fold.test))
    result = {
        "protocol": f"{plan.name}/{cfg.protocol.scheme}"
        + (f"/{cfg.protocol.target}" if cfg.protocol.target else ""),
        "fold": fold.name,
        "fold_index": k,
        "sizes": fold.sizes(),
        "dropped_by_label": plan.dropped,
        "classes": list(plan.label.classes),
        "untrained_classes": untrained,
        "modalities": cfg.data.used_modalities,
        "head": cfg.model.head,
        "init": cfg.model.init or cfg.model.config,
        "seed": cfg.seed,
        "selection_metric": plan.selection_metric,
        "best_valid": evaluator.best_value,
        "best_step": evaluator.best_step,
        "steps": steps,
        "early_stopped": stopped_early,
        "history": evaluator.history,
        "test": test_scores,
        **({"modality_cases": list(cfg.modality_cases), "test_cases": test_cases} if test_cases else {}),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t0, 1),
        "predictions": _prediction_rows(plan, test_pred, fold.test),
    }
    if backend.is_main:
        atomic_write_json(done, result)
        log.info("fold %s: test %s", fold.name, scalars(test_scores))
    backend.barrier()
    return result


def _prediction_rows(
    plan: ProtocolPlan, predictions: Mapping[str, Any], ids: list[str]
) -> list[dict[str, Any]]:
    if plan.regression:
        return [{"id": i, "gold": plan.targets[i], "pred": round(float(predictions[i]), 5)} for i in ids]
    names = plan.label.classes
    return [{"id": i, "gold": names[int(plan.targets[i])], "pred": names[int(predictions[i])]} for i in ids]
