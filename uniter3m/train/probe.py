"""Linear probes on frozen features (`uniter3m probe`): the CLIP-style protocol.

Features come from a file written by `uniter3m extract` (`read_embeddings`: h5, npz or safetensors)
or are extracted from a checkpoint in the same command. The protocol, folds, targets and metrics are
those of a fine-tuning config (`plan_protocol`, `score`), so a probe's row compares with a
fine-tuning row one to one. Per fold: the features are standardised with the TRAINING split's mean
and std, a multinomial logistic regression (scikit-learn, lbfgs) is fitted on the training split for
every C of `C_GRID` (a log grid), the C with the best validation value of the protocol's selection
metric is kept (ties: the smaller C, the stronger regularisation), and the test split is scored ONCE
with that model. `class_weighted` weighs classes by inverse training frequency ("balanced").

Output, as `finetune` writes it: `<out>/fold<K>-<name>/metrics.json` (test metrics, the validation
metrics of every C (`c_grid`), the predictions with their class probabilities) and `summary.{csv,md,json}` +
`confusion.png` over the folds, so `uniter3m summary` takes probe runs too.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uniter3m.errors import UserError
from uniter3m.evaluation.metrics import is_better
from uniter3m.evaluation.protocols import ProtocolPlan
from uniter3m.evaluation.report import FOLD_FILE, load_fold_results, write_summary
from uniter3m.fileio import atomic_write_json
from uniter3m.train.config import FOLD_PLACEHOLDER, FinetuneConfig, load_finetune_config
from uniter3m.train.extract import extract, read_embeddings
from uniter3m.train.folds import fold_dir, fold_facts, fold_model_path, plan_protocol
from uniter3m.train.rundir import claim_output_dir, lock_run_dir
from uniter3m.train.scoring import prediction_rows, scalars, score

C_GRID = tuple(float(c) for c in np.logspace(-4, 4, 9))
RUN_KIND = "probe"


def feature_matrix(features: Mapping[str, Any], per_stream: bool) -> np.ndarray:
    """(N, D): the pooled embeddings, or every stream's vector concatenated (`extract --per-stream`)."""
    if not per_stream:
        return np.asarray(features["embeddings"], dtype=np.float64)
    streams = features.get("streams")
    if not streams:
        raise UserError(
            "--per-stream: the features hold no per-stream vectors; extract them with --per-stream"
        )
    return np.concatenate(
        [np.asarray(streams[n], dtype=np.float64) for n in features["stream_names"]], axis=1
    )


def run_probe(
    config: FinetuneConfig | Mapping[str, Any] | str | os.PathLike,
    *,
    features: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    per_stream: bool = False,
    pool: str = "cls",
    class_weighted: bool | None = None,
    fold: int | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    device: str = "auto",
    batch_size: int = 64,
) -> dict[str, Any]:
    """Probe every fold (or `fold`) of the config's protocol on `features` (a file) or on the features
    of `checkpoint` (extracted here from the config's data; FOLD_PLACEHOLDER in it stands for the fold
    folder's name, so each fold reads its own checkpoint, e.g. one pretrained on its training speakers).
    `out` defaults to the config's output_dir; `class_weighted` to its `class_weighted`. Returns {"folds", "summary", "summary_md"}."""
    cfg = config if isinstance(config, FinetuneConfig) else load_finetune_config(config, overrides)
    if (features is None) == (checkpoint is None):
        raise UserError(
            "give the features (--features FILE from `uniter3m extract`) or a --checkpoint, not both"
        )
    plan = plan_protocol(cfg)
    if plan.regression:
        raise UserError(
            f"protocol {plan.name} has a regression target: the probe fits a classifier; pick a class target"
        )
    if fold is not None and not 0 <= fold < len(plan.folds):
        raise UserError(f"--fold {fold}: protocol {plan.name} has folds 0..{len(plan.folds) - 1}")
    cache: dict[str, tuple[dict[str, Any], str]] = {}

    def features_of(k: int) -> tuple[dict[str, Any], str]:
        """Fold k's features and their source: the file's, or the checkpoint's (with FOLD_PLACEHOLDER,
        the fold's own); the last one read is kept."""
        if features is not None:
            key = str(features)
        elif FOLD_PLACEHOLDER in str(checkpoint):
            key = fold_model_path(str(checkpoint), fold_dir(cfg, plan, k).name, "--checkpoint")
        else:
            key = str(checkpoint)
        if key not in cache:
            cache.clear()
            if features is not None:
                cache[key] = read_embeddings(features), key
            else:
                data = extract(
                    key, cfg.data, pool=pool, per_stream=per_stream, device=device, batch_size=batch_size
                )
                cache[key] = data, f"{key} ({pool} pooling)"
        return cache[key]

    cfg = cfg.model_copy(update={"output_dir": str(out or cfg.output_dir)})
    weighted = cfg.class_weighted if class_weighted is None else class_weighted
    chosen = range(len(plan.folds)) if fold is None else [fold]
    with lock_run_dir(Path(cfg.output_dir)):
        claim_output_dir(Path(cfg.output_dir), overwrite, RUN_KIND, resume=fold is not None)
        results = []
        for k in chosen:
            data, source = features_of(k)
            matrix = feature_matrix(data, per_stream)
            row = {uid: i for i, uid in enumerate(data["ids"])}
            result = probe_fold(plan, k, matrix, row, weighted)
            result.update(
                features=source, per_stream=per_stream, modalities=str(data["modalities"]), seed=cfg.seed
            )
            atomic_write_json(fold_dir(cfg, plan, k) / FOLD_FILE, result)
            results.append(result)
        summary = write_summary(cfg.output_dir, load_fold_results(cfg.output_dir))
    return {
        "folds": results,
        "summary": summary,
        "summary_md": Path(cfg.output_dir, "summary.md").read_text(),
    }


def probe_fold(
    plan: ProtocolPlan, k: int, matrix: np.ndarray, row: Mapping[str, int], class_weighted: bool
) -> dict[str, Any]:
    """Fit on the training split for each C, select on validation, score the test split once."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    t0 = time.time()
    fold = plan.folds[k]
    missing = [i for i in (*fold.train, *fold.valid, *fold.test) if i not in row]
    if missing:
        raise UserError(
            f"{len(missing)} utterances of fold {fold.name} have no features (e.g. {missing[:3]}); extract them "
            "from the same databases the config names"
        )

    def rows(ids: Sequence[str]) -> np.ndarray:
        return matrix[[row[i] for i in ids]]

    scaler = StandardScaler().fit(rows(fold.train))
    x_train, x_valid, x_test = (scaler.transform(rows(ids)) for ids in (fold.train, fold.valid, fold.test))
    y_train = np.array([plan.targets[i] for i in fold.train])
    n_classes = plan.label.num_classes

    def predictions(model: Any, x: np.ndarray, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        probs = np.zeros((len(ids), n_classes))
        probs[:, model.classes_] = model.predict_proba(x)  # classes absent from training keep 0
        return {i: {"pred": int(np.argmax(p)), "probs": p.tolist()} for i, p in zip(ids, probs, strict=True)}

    metric = plan.selection_metric
    best, best_value, grid = None, None, []
    for c in C_GRID:
        model = LogisticRegression(C=c, max_iter=2000, class_weight="balanced" if class_weighted else None)
        model.fit(x_train, y_train)
        valid = scalars(score(plan, predictions(model, x_valid, fold.valid), fold.valid))
        grid.append({"C": c, "valid": valid})
        if is_better(metric, valid[metric], best_value):
            best, best_value = (c, model), valid[metric]
    assert best is not None
    test_pred = predictions(best[1], x_test, fold.test)
    return {
        "protocol": plan.name,
        **fold_facts(plan, k),
        "classifier": "probe",
        "C": best[0],
        "class_weighted": class_weighted,
        "selection_metric": metric,
        "best_valid": best_value,
        "c_grid": grid,  # the validation metrics of every C (no steps: no learning curve)
        "test": score(plan, test_pred, fold.test),
        "total_seconds": round(time.time() - t0, 1),
        "predictions": prediction_rows(plan, test_pred, fold.test),
    }
