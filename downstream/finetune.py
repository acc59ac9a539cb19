"""`uniter3m finetune`: fine-tune on an emotion corpus under one of the field's protocols.

Reads top to bottom:
  1. the config, and the protocol's targets and folds from the text db's label columns;
  2. per fold: datasets of the fold's ids, the fine-tuning model (our checkpoint or any HF BERT dir);
  3. training with validation `train.evals_per_epoch` times an epoch; the best model on the
     VALIDATION metric of the protocol is kept, with early stopping after `train.patience`
     validations without improvement;
  4. the test split scored ONCE, with that selected model: `<output_dir>/<fold>/metrics.json`
     (metrics + every prediction) and `<output_dir>/<fold>/best/` (the checkpoint);
  5. a summary over the folds found under output_dir: summary.csv / .md / .json, confusion.png.

Honesty rules kept here: targets come from the protocol (never from a batch's inputs), the test
split is never looked at before the model is selected, and with several ranks every rank's
predictions are gathered (and de-duplicated by id) before any metric is computed.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset
from uniter3m.recipes.downstream.config import FinetuneConfig, load_finetune_config
from uniter3m.recipes.downstream.report import FOLD_FILE, load_fold_results, write_summary

from uniter3m.config import add_set_argument
from uniter3m.data.collate import Collator
from uniter3m.data.dataset import JoinedDataset
from uniter3m.data.protocols import ProtocolPlan, build_protocol
from uniter3m.data.store import DbReader
from uniter3m.data.tokenization import SpecialTokens
from uniter3m.errors import UserError
from uniter3m.fileio import atomic_write_json
from uniter3m.metrics import classification_metrics, is_better, regression_metrics
from uniter3m.model.finetuning import FinetuneModel, build_finetune_model, save_finetuned
from uniter3m.train.distributed import Backend, init_backend, unwrap
from uniter3m.train.loop import to_device
from uniter3m.train.optim import clip_gradients, parameter_groups, warmup_linear_schedule
from uniter3m.train.precision import Precision

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="configs/downstream/X.json")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--fold", type=int, help="run only fold K (0-based); the fold loop scripts use this")
    which.add_argument("--all-folds", action="store_true", help="run every fold (the default)")
    which.add_argument(
        "--summarize", action="store_true", help="only (re)write the summary from the folds already run"
    )
    add_set_argument(parser, "train.lr=3e-5")


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = load_finetune_config(args.config, args.overrides)
    if args.summarize:
        summary = write_summary(cfg.output_dir, load_fold_results(cfg.output_dir))
        print(Path(cfg.output_dir, "summary.md").read_text())
        return 0 if summary else 1
    result = run_finetune(cfg, fold=args.fold)
    if result.get("summary_md"):
        print(result["summary_md"])
    return 0


# ----------------------------------------------------------------------------- entry point
def run_finetune(
    config: FinetuneConfig | Mapping[str, Any] | str | os.PathLike,
    fold: int | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Fine-tune fold `fold` (or every fold), write per-fold outputs and the summary.

    Returns {"folds": [per-fold result], "test": mean test metrics of the folds run here,
    "summary": over every fold found in output_dir (main rank) | None, "summary_md": str | None}.
    """
    cfg = config if isinstance(config, FinetuneConfig) else load_finetune_config(config, overrides)
    backend = init_backend(cfg.train.device)
    try:
        txt_db = DbReader(cfg.data.txt_db, kind="txt")
        plan = plan_protocol(cfg, txt_db)
        if fold is not None and not 0 <= fold < len(plan.folds):
            raise UserError(f"--fold {fold}: protocol {plan.name} has folds 0..{len(plan.folds) - 1}")
        chosen = range(len(plan.folds)) if fold is None else [fold]
        results = [train_fold(cfg, plan, k, backend) for k in chosen]
        summary = summary_md = None
        if backend.is_main:
            summary = write_summary(cfg.output_dir, load_fold_results(cfg.output_dir))
            summary_md = Path(cfg.output_dir, "summary.md").read_text()
        test = {
            name: float(np.mean([r["test"][name] for r in results]))
            for name, value in results[0]["test"].items()
            if not isinstance(value, list)
        }
        return {"folds": results, "test": test, "summary": summary, "summary_md": summary_md}
    finally:
        backend.shutdown()


def read_label_rows(txt_db: DbReader) -> dict[str, dict[str, Any]]:
    """{id: labels} of every record (labels only: no input of the model is read here)."""
    return {uid: dict(txt_db[uid].get("labels") or {}) for uid in txt_db.ids}


def plan_protocol(cfg: FinetuneConfig, txt_db: DbReader) -> ProtocolPlan:
    p = cfg.protocol
    plan = build_protocol(
        read_label_rows(txt_db),
        p.name,
        scheme=p.scheme,
        target=p.target,
        label_column=p.label_column,
        classes=p.classes,
        label_map=p.label_map,
        drop_labels=p.drop_labels,
        split_column=p.split_column,
        split_values=p.split_values,
        session_column=p.session_column,
        dialogue_column=p.dialogue_column,
        speaker_column=p.speaker_column,
        valid_fraction=p.valid_fraction,
        selection_metric=p.selection_metric,
        source=str(txt_db.path),
    )
    if plan.dropped:
        log.warning("protocol %s dropped rows by label value: %s", plan.name, plan.dropped)
    return plan


# ----------------------------------------------------------------------------- data
def special_from_db(txt_db_path: str) -> SpecialTokens:
    meta = DbReader(txt_db_path, kind="txt").meta
    if "tokenizer" not in meta:
        raise UserError(f"{txt_db_path}/meta.json has no 'tokenizer' section; rebuild it with build-txt-db")
    return SpecialTokens.from_dict(meta["tokenizer"])


def make_dataset(cfg: FinetuneConfig, ids: list[str], modalities: str | None = None) -> JoinedDataset:
    d = cfg.data
    mods = modalities or d.modalities
    return JoinedDataset(
        d.txt_db,
        d.face_db if d.face_db else None,
        d.speech_db if d.speech_db else None,
        modalities=mods,
        max_txt_len=d.max_txt_len,
        max_frames=d.max_frames,
        normalize=d.normalize,
        ids=ids,
    )


def make_loader(
    dataset: JoinedDataset,
    collate: Collator,
    batch_size: int,
    backend: Backend,
    *,
    train: bool,
    seed: int,
    num_workers: int,
) -> DataLoader:
    """Training: shuffled (DistributedSampler over ranks). Evaluation: rank r reads items r, r+W, ...

    Evaluation shards never pad with repeated items; predictions are gathered by id afterwards.
    """
    if train:
        if backend.distributed:
            sampler = DistributedSampler(dataset, backend.world_size, backend.rank, shuffle=True, seed=seed)
        else:
            sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=num_workers,
            drop_last=False,
        )
    # Sorted by length: little padding, and the order cannot matter (predictions are keyed by id).
    mine = sorted(
        range(backend.rank, len(dataset), backend.world_size), key=lambda i: int(dataset.lengths[i])
    )
    shard = Subset(dataset, mine)
    return DataLoader(
        shard, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=num_workers
    )


def targets_of(plan: ProtocolPlan, ids: list[str], device: torch.device) -> torch.Tensor:
    values = [plan.targets[i] for i in ids]
    dtype = torch.float32 if plan.regression else torch.long
    return torch.tensor(values, dtype=dtype, device=device)


def class_weights(plan: ProtocolPlan, train_ids: list[str]) -> torch.Tensor:
    """Inverse-frequency weights from the TRAINING split only, normalised to mean 1."""
    counts = np.bincount([plan.targets[i] for i in train_ids], minlength=plan.label.num_classes).astype(
        np.float64
    )
    absent = [plan.label.classes[c] for c in np.flatnonzero(counts == 0)]
    if absent:
        raise UserError(f"train.class_weighted: classes {absent} have no training example in this fold")
    w = counts.sum() / (len(counts) * counts)
    return torch.tensor(w / w.mean(), dtype=torch.float32)


# ----------------------------------------------------------------------------- training
def compute_loss(
    model: FinetuneModel, out: Any, target: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    if model.head_type == "regression":
        return F.l1_loss(out.scores.float(), target)
    if model.head_type == "prompt":
        # The MLM head predicts the label word over the whole vocabulary (as in pretraining).
        word_ids = model.verbalizer_ids.to(target.device)[target]
        vocab_w = None
        if weights is not None:
            vocab_w = torch.ones(out.vocab_logits.shape[-1], device=target.device)
            vocab_w[model.verbalizer_ids.to(target.device)] = weights.to(target.device)
        return F.cross_entropy(out.vocab_logits.float(), word_ids, weight=vocab_w)
    return F.cross_entropy(
        out.logits.float(), target, weight=None if weights is None else weights.to(target.device)
    )


def train_fold(cfg: FinetuneConfig, plan: ProtocolPlan, k: int, backend: Backend) -> dict[str, Any]:
    fold = plan.folds[k]
    t0 = time.time()
    tc = cfg.train
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    out_dir = Path(cfg.output_dir) / f"fold{k:02d}-{fold.name}"
    special = special_from_db(cfg.data.txt_db)
    collate = Collator(special)
    train_set = make_dataset(cfg, fold.train)
    valid_set = make_dataset(cfg, fold.valid)
    feat_dims = {s: int(train_set.feat_dbs[s][0].meta["dim"]) for s in train_set.streams}
    model = build_finetune_model(
        cfg.model,
        plan,
        feat_dims,
        special,
        modalities=cfg.data.modalities,
        db_paths={"face": cfg.data.face_db, "speech": cfg.data.speech_db},
        txt_meta=train_set.txt_dbs[0].meta,
    ).to(backend.device)
    if backend.is_main:
        log.info("fold %s: sizes %s; %s", fold.name, fold.sizes(), model.describe())

    train_loader = make_loader(
        train_set, collate, tc.batch_size, backend, train=True, seed=tc.seed, num_workers=cfg.data.num_workers
    )
    valid_loader = make_loader(
        valid_set,
        collate,
        tc.eval_batch_size,
        backend,
        train=False,
        seed=tc.seed,
        num_workers=cfg.data.num_workers,
    )
    steps_per_epoch = len(train_loader)
    total = (
        tc.epochs * steps_per_epoch
        if tc.max_steps is None
        else min(tc.max_steps, tc.epochs * steps_per_epoch)
    )
    groups = parameter_groups(model, tc.weight_decay)
    if tc.head_lr is not None:
        groups = _split_head_lr(groups, {id(p) for p in model.head_parameters()}, tc.head_lr)
    optimizer = torch.optim.AdamW(
        groups, lr=tc.lr, betas=(0.9, 0.999), eps=1e-8, fused=backend.device.type == "cuda" or None
    )
    scheduler = warmup_linear_schedule(optimizer, int(tc.warmup_ratio * total), total)
    precision = Precision(tc.precision, backend.device)
    weights = class_weights(plan, fold.train) if tc.class_weighted and not plan.regression else None
    wrapped = backend.wrap_model(model, find_unused_parameters=True)
    eval_points = _eval_points(steps_per_epoch, tc.evals_per_epoch)

    metric = plan.selection_metric
    best_value: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, Any]] = []
    bad_evals = 0
    step = 0
    stop = False
    for epoch in range(tc.epochs):
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        wrapped.train()
        bar = _progress(train_loader, backend, tc.progress, f"fold {fold.name} epoch {epoch + 1}/{tc.epochs}")
        for i, batch in enumerate(bar):
            batch = to_device(batch, backend.device)
            target = targets_of(plan, batch["ids"], backend.device)
            with precision.autocast():
                out = wrapped(batch)
            loss = compute_loss(model, out, target, weights)
            if not torch.isfinite(loss):
                raise UserError(
                    f"fold {fold.name}: the loss became {loss.item()} at step {step}; lower train.lr"
                )
            optimizer.zero_grad(set_to_none=True)
            precision.backward(loss)
            backend.sync_gradients(wrapped)
            precision.unscale_(optimizer)
            clip_gradients(model.parameters(), tc.grad_clip)
            precision.step(optimizer)
            scheduler.step()
            step += 1
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if i + 1 in eval_points or step == total:
                scores = score(plan, predict(model, valid_loader, backend, precision), fold.valid)
                value = float(scores[metric])
                history.append({"step": step, "epoch": epoch + 1, "valid": _scalars(scores)})
                if backend.is_main:
                    log.info("fold %s step %d: valid %s = %.3f", fold.name, step, metric, value)
                if is_better(metric, value, best_value):
                    best_value, bad_evals = value, 0
                    best_state = {n: t.detach().to("cpu", copy=True) for n, t in model.state_dict().items()}
                else:
                    bad_evals += 1
                wrapped.train()
                if bad_evals >= tc.patience:
                    stop = True
                if stop or step >= total:
                    break
        if stop or step >= total:
            break
    train_seconds = time.time() - t0
    del wrapped, optimizer  # before any shutdown (gloo), see DEVELOPERS.md

    assert best_state is not None  # at least one validation ran (step == total triggers one)
    model.load_state_dict(best_state)
    test_set = make_dataset(cfg, fold.test)
    test_loader = make_loader(
        test_set,
        collate,
        tc.eval_batch_size,
        backend,
        train=False,
        seed=tc.seed,
        num_workers=cfg.data.num_workers,
    )
    test_pred = predict(model, test_loader, backend, precision)  # scored ONCE, selected model
    test_scores = score(plan, test_pred, fold.test)
    result = {
        "protocol": f"{plan.name}/{cfg.protocol.scheme}"
        + (f"/{cfg.protocol.target}" if cfg.protocol.target else ""),
        "fold": fold.name,
        "fold_index": k,
        "sizes": fold.sizes(),
        "dropped_by_label": plan.dropped,
        "classes": list(plan.label.classes),
        "modalities": cfg.data.modalities,
        "head": cfg.model.head,
        "init": cfg.model.init,
        "selection_metric": metric,
        "best_valid": best_value,
        "steps": step,
        "early_stopped": stop,
        "history": history,
        "test": test_scores,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t0, 1),
        "predictions": _prediction_rows(plan, test_pred, fold.test),
    }
    if backend.is_main:
        save_finetuned(model, out_dir / "best", {"fold_index": k, "fold": fold.name})
        atomic_write_json(out_dir / FOLD_FILE, result)
        log.info("fold %s: test %s", fold.name, _scalars(test_scores))
    backend.barrier()
    return result


def _split_head_lr(groups: list[dict], head_ids: set[int], head_lr: float) -> list[dict]:
    out = []
    for g in groups:
        body = [p for p in g["params"] if id(p) not in head_ids]
        head = [p for p in g["params"] if id(p) in head_ids]
        out += [dict(g, params=body)] if body else []
        out += [dict(g, params=head, lr=head_lr)] if head else []
    return out


def _eval_points(steps_per_epoch: int, evals_per_epoch: int) -> set[int]:
    n = min(evals_per_epoch, steps_per_epoch)
    return {math.ceil(steps_per_epoch * (j + 1) / n) for j in range(n)}


def _progress(loader: DataLoader, backend: Backend, enabled: bool, desc: str) -> Any:
    if not (enabled and backend.is_main):
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(
    model: FinetuneModel, loader: DataLoader, backend: Backend, precision: Precision | None = None
) -> dict[str, float | int]:
    """{id: prediction} over the WHOLE split: each rank predicts its shard, then all are gathered."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    local: dict[str, float | int] = {}
    for batch in loader:
        batch = to_device(batch, backend.device)
        ctx = precision.autocast() if precision is not None else torch.autocast("cpu", enabled=False)
        with ctx:
            out = model(batch)
        local.update(zip(batch["ids"], model.predictions(out).tolist()))
    model.train(was_training)
    merged: dict[str, float | int] = {}
    for part in backend.all_gather_object(local):
        merged.update(part)
    return merged


def score(plan: ProtocolPlan, predictions: Mapping[str, float | int], ids: list[str]) -> dict[str, Any]:
    missing = [i for i in ids if i not in predictions]
    if missing:
        raise UserError(
            f"{len(missing)} utterances got no prediction (e.g. {missing[:3]}); a data shard was lost"
        )
    gold = [plan.targets[i] for i in ids]
    pred = [predictions[i] for i in ids]
    if plan.regression:
        return regression_metrics(gold, pred)
    return classification_metrics(gold, pred, plan.label.num_classes)


def _scalars(scores: Mapping[str, Any]) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in scores.items() if not isinstance(v, list)}


def _prediction_rows(
    plan: ProtocolPlan, predictions: Mapping[str, Any], ids: list[str]
) -> list[dict[str, Any]]:
    if plan.regression:
        return [{"id": i, "gold": plan.targets[i], "pred": round(float(predictions[i]), 5)} for i in ids]
    names = plan.label.classes
    return [{"id": i, "gold": names[int(plan.targets[i])], "pred": names[int(predictions[i])]} for i in ids]
