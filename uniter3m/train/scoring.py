"""Prediction and scoring on the training engine: `predict` over a whole split (every rank's
predictions gathered, each id scored once, before any metric), the protocol's metrics (`score`),
model selection on the VALIDATION split only (`SelectionEvaluator`, per modality set when asked),
and the rows a fold result or an evaluation writes per utterance (`prediction_rows`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uniter3m.data.dataset import JoinedDataset
from uniter3m.errors import UserError
from uniter3m.evaluation.metrics import classification_metrics, is_better, regression_metrics
from uniter3m.evaluation.protocols import ProtocolPlan
from uniter3m.model.config import UniterConfig
from uniter3m.model.finetuning import FinetuneModel, save_finetuned
from uniter3m.progress import disabled
from uniter3m.tasks.supervised import SupervisedTask
from uniter3m.train.assembly import run_collator
from uniter3m.train.config import FinetuneConfig
from uniter3m.train.distributed import Backend
from uniter3m.train.loaders import validation_loader
from uniter3m.train.loop import Evaluator, TrainLoop
from uniter3m.train.precision import Precision
from uniter3m.train.prefetch import to_device

log = logging.getLogger(__name__)


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


def single_class(plan: ProtocolPlan, predictions: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The class of every prediction when they are all one (a collapsed classifier), else None."""
    values = {int(p["pred"]) for p in predictions.values()}
    if plan.regression or len(predictions) < 2 or len(values) != 1:
        return None
    return plan.label.classes[values.pop()]


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
