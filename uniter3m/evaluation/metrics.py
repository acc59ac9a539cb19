"""Emotion-recognition metrics, computed with scikit-learn and scipy (no hand-written formulas).

Classification: WA (weighted accuracy = plain accuracy, the field's name), UAR (unweighted average
recall = balanced accuracy over the classes present in the gold labels), weighted and macro F1,
the confusion matrix. Regression (CMU-MOSI sentiment scores in [-3, 3]): MAE, Pearson r, Acc-2
(non-negative vs negative, and the variant that excludes gold zeros), F1 of Acc-2, Acc-7.

A metric that cannot be computed (no samples, mismatched lengths, NaN, Pearson r of a constant
series) raises `MetricError` instead of quietly becoming 0: a silent zero once hid broken
evaluations in the reference code.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    mean_absolute_error,
)

from uniter3m.errors import UserError

# Metrics where a smaller value is better (early stopping needs the direction).
LOWER_IS_BETTER = frozenset({"mae"})


class MetricError(UserError):
    """A metric that cannot be computed from the given predictions."""


def _as_arrays(y_true: Sequence, y_pred: Sequence, what: str) -> tuple[np.ndarray, np.ndarray]:
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.ndim != 1 or p.ndim != 1:
        raise MetricError(f"{what}: expected 1-d gold and predictions, got shapes {t.shape} and {p.shape}")
    if len(t) != len(p):
        raise MetricError(f"{what}: {len(t)} gold labels but {len(p)} predictions")
    if len(t) == 0:
        raise MetricError(f"{what}: no samples to score (is the split empty?)")
    return t, p


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], num_classes: int
) -> dict[str, float | list[list[int]]]:
    """WA, UAR, weighted F1, macro F1 (percent) and the confusion matrix (rows = gold).

    `num_classes` fixes the confusion matrix to every class of the label map, so matrices of
    different folds add up even when a fold lacks a class.
    """
    t, p = _as_arrays(y_true, y_pred, "classification metrics")
    t, p = t.astype(np.int64), p.astype(np.int64)
    for name, arr in (("gold", t), ("predicted", p)):
        bad = arr[(arr < 0) | (arr >= num_classes)]
        if len(bad):
            raise MetricError(f"{name} class index {int(bad[0])} is outside 0..{num_classes - 1}")
    labels = list(range(num_classes))
    with warnings.catch_warnings():
        # balanced_accuracy_score warns when a predicted class never occurs in the gold labels;
        # UAR is defined over the gold classes, which is exactly what it computes.
        warnings.simplefilter("ignore", UserWarning)
        uar = balanced_accuracy_score(t, p)
    present = sorted(set(t.tolist()) | set(p.tolist()))
    return {
        "wa": 100.0 * accuracy_score(t, p),
        "uar": 100.0 * uar,
        # A class never predicted has precision 0/0: its F1 is 0 by definition (zero_division=0).
        "weighted_f1": 100.0 * f1_score(t, p, average="weighted", labels=present, zero_division=0.0),
        "macro_f1": 100.0 * f1_score(t, p, average="macro", labels=present, zero_division=0.0),
        "confusion": confusion_matrix(t, p, labels=labels).tolist(),
    }


def regression_metrics(y_true: Sequence[float], y_pred: Sequence[float]) -> dict[str, float]:
    """MOSI-style sentiment regression metrics; accuracies and F1 in percent.

    acc2: sign as the field defines it (score >= 0 is positive, < 0 negative), over all samples.
    acc2_nonzero / f1_nonzero: the variant that drops samples whose gold score is exactly 0 and
    compares > 0 vs < 0. acc7: scores clipped to [-3, 3] and rounded to the nearest integer.
    """
    t, p = _as_arrays(y_true, y_pred, "regression metrics")
    t, p = t.astype(np.float64), p.astype(np.float64)
    if not (np.isfinite(t).all() and np.isfinite(p).all()):
        raise MetricError("regression metrics: gold or predicted scores contain NaN/Inf")
    if len(t) < 2 or np.ptp(t) == 0 or np.ptp(p) == 0:
        raise MetricError(
            "Pearson r is undefined: gold or predicted scores are constant "
            f"({len(t)} samples; the model may have collapsed to one value)"
        )
    r = float(stats.pearsonr(t, p).statistic)
    if math.isnan(r):
        raise MetricError("Pearson r is NaN")
    nonzero = t != 0
    if not nonzero.any():
        raise MetricError("Acc-2 (non-zero): every gold score is 0")
    t2, p2 = t >= 0, p >= 0
    tn, pn = t[nonzero] > 0, p[nonzero] > 0
    return {
        "mae": float(mean_absolute_error(t, p)),
        "pearson": r,
        "acc2": 100.0 * accuracy_score(t2, p2),
        "f1": 100.0 * f1_score(t2, p2, average="weighted", zero_division=0.0),
        "acc2_nonzero": 100.0 * accuracy_score(tn, pn),
        "f1_nonzero": 100.0 * f1_score(tn, pn, average="weighted", zero_division=0.0),
        "acc7": 100.0 * accuracy_score(_seven_class(t), _seven_class(p)),
    }


def _seven_class(scores: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(scores, -3.0, 3.0)).astype(np.int64)


def is_better(metric: str, new: float, best: float | None) -> bool:
    """True when `new` improves on `best` for `metric` (strictly; the first value always wins)."""
    if best is None:
        return True
    return new < best if metric in LOWER_IS_BETTER else new > best
