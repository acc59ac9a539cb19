"""A fine-tuning run (`run_finetune`: every fold, or one) and what evaluation shares with it:
protocol plans, prediction over a split, scoring, and model selection on the training engine.
Datasets and the model come from the one assembly (`uniter3m.train.assembly`).

Per fold: datasets of the fold's ids, the model, optimiser, schedule, precision; the training loop
with one task (`SupervisedTask`); validation `evals_per_epoch` times an epoch keeps the best model
on the protocol's VALIDATION metric in `<fold>/best/` and stops after `patience` validations without
improvement (checkpoints, logs and `--resume auto|DIR` as in pretraining); then the test split scored
ONCE with the selected model (`<fold>/metrics.json`); at the end a summary over the folds found in
output_dir (summary.csv / .md / .json, confusion.png).

Honesty rules kept here: targets come from the protocol (never from a batch's inputs); the model
is selected on the VALIDATION split only (`SelectionEvaluator`); with several ranks every rank's
predictions are gathered (each id scored once) before any metric is computed.
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
from uniter3m.data.store import DbReader
from uniter3m.data.tokenization import SpecialTokens
from uniter3m.errors import UserError
from uniter3m.evaluation.metrics import classification_metrics, is_better, regression_metrics
from uniter3m.evaluation.protocols import ProtocolPlan, build_protocol
from uniter3m.evaluation.report import FOLD_FILE, load_fold_results, write_summary
from uniter3m.fileio import atomic_write_json
from uniter3m.model.config import UniterConfig
from uniter3m.model.finetuning import FINETUNE_FILE, FinetuneModel, load_finetuned, save_finetuned
from uniter3m.progress import disabled
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
from uniter3m.train.config import DataConfig, FinetuneConfig, load_finetune_config
from uniter3m.train.distributed import Backend, init_backend
from uniter3m.train.inputs import INPUTS_KEY, input_record
from uniter3m.train.loaders import TaskStream, validation_loader
from uniter3m.train.logs import read_metrics
from uniter3m.train.loop import Evaluator, TrainLoop, TrainTask
from uniter3m.train.precision import Precision
from uniter3m.train.prefetch import to_device
from uniter3m.train.session import (
    check_vocabulary,
    main_rank_print,
    open_run_dir,
    read_tokenizer_record,
    settings_on_resume,
)

log = logging.getLogger(__name__)
RESOLVED_CONFIG = "config.json"


def find_run_config(checkpoint: str | Path, section: str | None = None) -> Path:
    """The resolved config.json of the run a checkpoint (`<run>/fold/best`) belongs to, for
    `evaluate`/`extract` without `--config`; `section`: a key the config must hold (e.g. "protocol")."""
    ckpt = Path(checkpoint)
    if not ckpt.exists():
        raise UserError(f"checkpoint {ckpt} does not exist; check --checkpoint (a `<fold>/best` folder)")
    candidates = [p / RESOLVED_CONFIG for p in (ckpt.parent.parent, ckpt.parent)]
    for file in candidates:
        if file.is_file() and (section is None or section in json.loads(file.read_text())):
            return file
    raise UserError(
        f"{ckpt}: no run config.json beside it ({', '.join(map(str, candidates))}); pass --config"
    )


def fold_checkpoints(path: str | os.PathLike) -> list[Path]:
    """The fine-tuned model folders `path` names: itself (a `<fold>/best`), its `best/` (a fold folder),
    or every `fold*/best` of a run folder; an error naming what to give otherwise."""
    p = Path(path)
    if not p.exists():
        raise UserError(
            f"{p} does not exist; give a fine-tuning run folder (its output_dir) or one of its `<fold>/best` folders"
        )
    for candidate in (p, p / "best"):
        if (candidate / FINETUNE_FILE).is_file():
            return [candidate]
    found = sorted(d.parent for d in p.glob(f"fold*/best/{FINETUNE_FILE}"))
    if not found:
        raise UserError(
            f"{p} holds no fine-tuned model (no {FINETUNE_FILE} in it, in best/ or in fold*/best/); give the "
            "output_dir of `uniter3m finetune` or one of its `<fold>/best` folders"
        )
    return found


def untrained_classes(plan: ProtocolPlan, fold: Any) -> list[str]:
    """Classes of the fold's test split that no training utterance has (scored, but listed)."""
    if plan.regression:
        return []
    trained = {int(plan.targets[i]) for i in fold.train}
    tested = {int(plan.targets[i]) for i in fold.test}
    return [plan.label.classes[c] for c in sorted(tested - trained)]


def fold_facts(plan: ProtocolPlan, k: int) -> dict[str, Any]:
    """What every fold result (fine-tuned or probed) records about fold `k` itself (`evaluation.report` reads it)."""
    fold = plan.folds[k]
    return {
        "fold": fold.name,
        "fold_index": k,
        "sizes": fold.sizes(),
        "dropped_by_label": plan.dropped,
        "classes": list(plan.label.classes),
        "untrained_classes": untrained_classes(plan, fold),
    }


def read_label_rows(data: DataConfig, split_column: str = "split") -> dict[str, dict[str, Any]]:
    """{id: labels} of every record (labels only: no input of the model is read here). With text dbs
    given per split, each record's split comes from its db (`split_column`); a record that says
    otherwise is an error naming it."""
    rows: dict[str, dict[str, Any]] = {}
    source: dict[str, str] = {}
    split_of = data.split_of
    for path in data.txt_dbs:
        db = DbReader(path, kind="txt")
        for uid in db.ids:
            if uid in rows:
                raise UserError(
                    f"utterance id {uid!r} is in both {source[uid]} and {path}: their ids repeat (split files "
                    "often number utterances alike); rebuild them with `uniter3m build-txt-db --id-prefix NAME_` "
                    "(e.g. train_, dev_, test_) and their feature dbs with the same ids"
                )
            source[uid] = path
            labels = dict(db[uid].get("labels") or {})
            if split_of:
                own = labels.get(split_column)
                if own is not None and str(own) not in (split_of[path], {"valid": "dev"}.get(split_of[path])):
                    raise UserError(
                        f"{path}: id {uid!r} has {split_column}={own!r} but the db is given as the "
                        f"{split_of[path]!r} split in data.txt_db; fix the config or the db"
                    )
                labels[split_column] = split_of[path]
            rows[uid] = labels
    return rows


def plan_protocol(cfg: FinetuneConfig) -> ProtocolPlan:
    p = cfg.protocol
    if cfg.data.split_of and p.scheme != "split":
        raise UserError(
            f"data.txt_db is given per split, which fixes the folds; use protocol.scheme 'split' (not {p.scheme!r})"
        )
    plan = build_protocol(
        read_label_rows(cfg.data, p.split_column),
        p.name,
        scheme=p.scheme,
        target=p.target,
        label_column=p.label_column,
        classes=p.classes,
        label_map=p.label_map,
        drop_labels=p.drop_labels,
        split_column=p.split_column,
        split_values=None if cfg.data.split_of else p.split_values,
        session_column=p.session_column,
        dialogue_column=p.dialogue_column,
        speaker_column=p.speaker_column,
        valid_fraction=p.valid_fraction,
        selection_metric=p.selection_metric,
        source=", ".join(cfg.data.txt_dbs),
        valid_speakers=p.valid_speakers,
        num_folds=p.num_folds,
        train_fraction=p.train_fraction,
        subset_seed=p.subset_seed,
    )
    if plan.dropped:
        log.warning("protocol %s dropped rows by label value: %s", plan.name, plan.dropped)
    return plan


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


def class_weights(plan: ProtocolPlan, train_ids: Sequence[str]) -> list[float]:
    """Inverse-frequency weights from the TRAINING split only, normalised to mean 1."""
    counts = np.bincount([plan.targets[i] for i in train_ids], minlength=plan.label.num_classes).astype(
        np.float64
    )
    absent = [plan.label.classes[c] for c in np.flatnonzero(counts == 0)]
    if absent:
        raise UserError(f"class_weighted: classes {absent} have no training example in this fold")
    w = counts.sum() / (len(counts) * counts)
    return (w / w.mean()).tolist()


# ----------------------------------------------------------------------------- prediction
@torch.no_grad()
def predict(
    model: FinetuneModel,
    task: SupervisedTask,
    dataset: JoinedDataset,
    cfg: FinetuneConfig,
    backend: Backend,
    precision: Precision,
    desc: str = "score",
    keep: Sequence[str] = (),
) -> dict[str, dict[str, Any]]:
    """{id: {"pred": class index | score, "probs": class probabilities (classification only)}} over the
    WHOLE dataset: ranks score disjoint batches, then all are gathered. `keep`: FinetuneOutput fields
    also kept per id as lists (a distillation teacher's `logits` and `pooled`)."""
    from tqdm.auto import tqdm

    b = cfg.batching
    loader = validation_loader(
        task,
        dataset,
        run_collator(b, task.special, backend.device, task.stream_table),
        task_index=0,
        seed=cfg.seed,
        max_tokens=b.val_max_tokens or b.max_tokens,
        max_batch_size=b.val_max_batch_size or b.max_batch_size,
        pool_size=b.pool_size,
        num_workers=b.workers_for(backend.device, backend.local_world_size),
        world_size=backend.world_size,
        rank=backend.rank,
    )
    was_training = model.training
    model.eval()
    local: dict[str, dict[str, Any]] = {}
    bar = tqdm(
        loader, desc=desc, leave=False, disable=disabled(cfg.progress and backend.is_main), dynamic_ncols=True
    )
    for inputs in bar:
        inputs = to_device(inputs, backend.device)
        kwargs = {k: v for k, v in inputs.items() if k not in task.not_inputs and v is not None}
        with precision.autocast():
            out = model(**kwargs)
        preds = model.predictions(out).tolist()
        probs = model.probabilities(out).tolist() if out.logits is not None else [None] * len(preds)
        for uid, pred, prob in zip(inputs["ids"], preds, probs, strict=True):
            local[uid] = {"pred": pred} if prob is None else {"pred": pred, "probs": prob}
        for name in keep:
            for uid, value in zip(inputs["ids"], getattr(out, name).float().tolist(), strict=True):
                local[uid][name] = value
    model.train(was_training)
    merged: dict[str, dict[str, Any]] = {}
    for part in backend.all_gather_object(local):
        merged.update(part)
    return merged


def score(
    plan: ProtocolPlan, predictions: Mapping[str, Mapping[str, Any]], ids: Sequence[str]
) -> dict[str, Any]:
    missing = [i for i in ids if i not in predictions]
    if missing:
        raise UserError(
            f"{len(missing)} utterances got no prediction (e.g. {missing[:3]}); a data shard was lost"
        )
    gold = [plan.targets[i] for i in ids]
    pred = [predictions[i]["pred"] for i in ids]
    if plan.regression:
        return regression_metrics(gold, pred)
    return classification_metrics(gold, pred, plan.label.num_classes)


def scalars(scores: Mapping[str, Any]) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in scores.items() if not isinstance(v, list)}


FEW_STEPS = 50  # fewer optimiser steps than this in a whole fold is almost never a real fine-tuning
COLLAPSE_FIX = (
    "train longer (more epochs, or a smaller batching.max_batch_size for more steps), raise optim.lr / "
    "optim.head_lr, or set class_weighted: true when one class dominates"
)


def single_class(plan: ProtocolPlan, predictions: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The class of every prediction when they are all one (a collapsed classifier), else None."""
    values = {int(p["pred"]) for p in predictions.values()}
    if plan.regression or len(predictions) < 2 or len(values) != 1:
        return None
    return plan.label.classes[values.pop()]


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


def set_scores(
    per_set: Mapping[str, Mapping[str, float]], select_on: Sequence[str] | None = None
) -> dict[str, float]:
    """One validation's scores over modality sets: each metric's mean over the `select_on` sets
    (None: every set; MEmoBERT selects on its 6 sets without LVA) is what selection compares;
    every set's own figures come along as `<set>_<metric>`."""
    chosen = [per_set[s] for s in (select_on or per_set)]
    scores = {k: round(float(np.mean([c[k] for c in chosen])), 4) for k in chosen[0]}
    for name, values in per_set.items():
        scores.update({f"{name}_{k}": v for k, v in values.items()})
    return scores


class SelectionEvaluator(Evaluator):
    """Validation of fine-tuning: the protocol's metric on the validation split; the best model
    is written to `best_dir` (main rank), `patience` validations without improvement stop the run.
    With `modality_sets` ({modalities: validation dataset reading them}) the metric is scored per set
    and the model is selected on the MEAN over the sets (missing-modality training), or over
    `cfg.select_on` only (MEmoBERT: the 6 sets without LVA)."""

    def __init__(
        self,
        model: FinetuneModel,
        task: SupervisedTask,
        valid_set: JoinedDataset,
        plan: ProtocolPlan,
        cfg: FinetuneConfig,
        backend: Backend,
        precision: Precision,
        best_dir: Path,
        extra: Mapping[str, Any],
        modality_sets: Mapping[str, JoinedDataset] | None = None,
    ):
        self.model, self.task, self.valid_set, self.plan = model, task, valid_set, plan
        self.modality_sets = dict(modality_sets or {})
        self.cfg, self.backend, self.precision = cfg, backend, precision
        self.best_dir, self.extra = best_dir, dict(extra)
        self.metric = plan.selection_metric
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.history: list[dict[str, Any]] = []
        self.should_stop = False
        self._single: str | None = None  # the one class the last validation predicted, if it was one
        self.best_single: str | None = None  # ... at the selected step: the selected model is collapsed

    def _scores(self) -> dict[str, float]:
        if not self.modality_sets:
            preds = predict(
                self.model, self.task, self.valid_set, self.cfg, self.backend, self.precision, "validate"
            )
            self._single = single_class(self.plan, preds)
            return scalars(score(self.plan, preds, self.valid_set.ids))
        per_case = {}
        for case, dataset in self.modality_sets.items():
            preds = predict(
                self.model, self.task, dataset, self.cfg, self.backend, self.precision, f"validate {case}"
            )
            per_case[case] = scalars(score(self.plan, preds, dataset.ids))
            if case == next(iter(self.modality_sets)):  # the first set speaks for the collapse check
                self._single = single_class(self.plan, preds)
        return set_scores(per_case, self.cfg.select_on)

    def evaluate(self, loop: TrainLoop) -> dict[str, float]:
        scores = self._scores()
        value = float(scores[self.metric])
        self.history.append({"step": loop.step, "valid": scores})
        if is_better(self.metric, value, self.best_value):
            self.best_value, self.best_step, self.bad_evals = value, loop.step, 0
            self.best_single = self._single
            if self.backend.is_main:
                save_finetuned(self.model, self.best_dir, {**self.extra, "step": loop.step, "valid": scores})
            self.backend.barrier()
        else:
            self.bad_evals += 1
        self.should_stop = self.bad_evals >= self.cfg.patience
        if self.backend.is_main:
            log.info(
                "step %d: valid %s = %.4f (best %.4f at step %s)",
                loop.step,
                self.metric,
                value,
                self.best_value,
                self.best_step,
            )
        return {**scores, f"best_{self.metric}": float(self.best_value)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_value": self.best_value,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "history": self.history,
            "should_stop": self.should_stop,
            "best_single": self.best_single,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_value = state["best_value"]
        self.best_step = state["best_step"]
        self.bad_evals = int(state["bad_evals"])
        self.history = list(state["history"])
        self.should_stop = bool(state["should_stop"])
        self.best_single = state.get("best_single")


def evaluation_sets(
    cfg: FinetuneConfig, model_config: UniterConfig, modality_sets: Sequence[str] | None
) -> list[str]:
    """Modality sets to score: given ones (checked), or every non-empty subset the config's modalities allow."""
    allowed = cfg.data.used_modalities
    if not modality_sets:
        from itertools import combinations

        return ["".join(c) for r in range(1, len(allowed) + 1) for c in combinations(allowed, r)]
    out = []
    stream_table = cfg.stream_table
    for raw in modality_sets:
        case = stream_table.parse_modalities(raw, f"--modality-sets {raw}")
        for letter in case.replace("L", ""):
            stream = stream_table.get(letter)
            if stream.name not in cfg.data.feat_dbs:
                raise UserError(
                    f"--modality-sets {raw}: {stream.name} ({letter}) was asked for but the config sets no "
                    f"data.{stream.db_key}; add it (--set data.{stream.db_key}=DIR) or drop {letter} from the sets"
                )
            if not model_config.stream(stream.name).present:
                raise UserError(
                    f"--modality-sets {raw}: the checkpoint has no {stream.name} stream (it was fine-tuned without "
                    f"{letter}); drop {letter} from the sets"
                )
        out.append(case)
    return out


# ----------------------------------------------------------------------------- the run
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


def schedule(cfg: FinetuneConfig) -> dict[str, int | None]:
    """What a fold's length was planned with: a finished fold whose `epochs` / `steps` are raised on
    `--resume auto` goes on from its last checkpoint (the schedule recomputed for the new length, no new
    warm-up) and is scored again; an early-stopped fold is kept."""
    return {"epochs": cfg.epochs, "steps": cfg.steps}


def fold_dir(cfg: FinetuneConfig, plan: ProtocolPlan, k: int) -> Path:
    return Path(cfg.output_dir) / f"fold{k:02d}-{plan.folds[k].name}"


def train_fold(
    cfg: FinetuneConfig, plan: ProtocolPlan, k: int, backend: Backend, resume: str | None = None
) -> dict[str, Any]:
    """One fold: train with selection on its validation split, then score its test split ONCE."""
    fold = plan.folds[k]
    out_dir = fold_dir(cfg, plan, k)
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


def prediction_rows(
    plan: ProtocolPlan, predictions: Mapping[str, Any], ids: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per id: gold and predicted class (or score) and, for classes, every class probability."""
    if plan.regression:
        return [
            {"id": i, "gold": plan.targets[i], "pred": round(float(predictions[i]["pred"]), 5)} for i in ids
        ]
    names = plan.label.classes
    return [
        {
            "id": i,
            "gold": names[int(plan.targets[i])],
            "pred": names[int(predictions[i]["pred"])],
            "probs": {c: round(float(p), 5) for c, p in zip(names, predictions[i]["probs"], strict=True)},
        }
        for i in ids
    ]
