"""The classic baselines beside uniter3m: linear classifiers on fixed features, C chosen on validation.

What the speech-emotion literature compares against: every feature dimension z-scored per speaker
(label-free), then a linear SVM or a logistic regression whose C is the best of a fixed log grid on
the fold's validation speakers (ties: the smaller C), fitted on the training speakers and scored once
on the test speakers; `refit` also scores that C refitted on training + validation (the usual nested
protocol). The linear SVM runs on the linear kernel's Gram matrix, computed once for all folds and C
(the same classifier as `SVC(kernel="linear")`), the logistic regression on the span of the training
rows when there are fewer rows than dimensions (the same solution): both cheap on thousands of dimensions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from uniter3m.errors import ConfigError
from uniter3m.evaluation.metrics import classification_metrics
from uniter3m.evaluation.protocols import Fold

C_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
KINDS = ("svm", "logreg")


def speaker_znorm(x: np.ndarray, speakers: Sequence[str]) -> np.ndarray:
    """Every dimension z-scored with the statistics of the utterance's own speaker (label-free)."""
    out = np.empty_like(x)
    spk = np.asarray(speakers)
    for s in np.unique(spk):
        rows = spk == s
        out[rows] = (x[rows] - x[rows].mean(0)) / np.maximum(x[rows].std(0), 1e-8)
    return out


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a metrics dict (confusion matrices and per-class lists left out)."""
    return {k: float(v) for k, v in metrics.items() if not isinstance(v, list)}


class LinearBaseline:
    """A linear classifier (`kind` svm | logreg) over the features `x` (N, D) of every utterance."""

    def __init__(self, x: np.ndarray, y: np.ndarray, kind: str = "svm") -> None:
        if kind not in KINDS:
            raise ConfigError(f"baseline kind {kind!r} is not one of {', '.join(KINDS)}")
        self.x, self.y, self.kind = x, y, kind
        self.gram = x @ x.T if kind == "svm" else None
        self._basis: dict[tuple[int, ...], np.ndarray | None] = {}  # the last training set's

    def fit_predict(self, c: float, train: list[int], parts: Sequence[list[int]]) -> list[np.ndarray]:
        """Fit on the rows `train` with this C; the predictions for each list of rows in `parts`."""
        if self.gram is not None:
            from sklearn.svm import SVC

            model = SVC(kernel="precomputed", C=c).fit(self.gram[np.ix_(train, train)], self.y[train])
            return [model.predict(self.gram[np.ix_(rows, train)]) for rows in parts]
        from sklearn.linear_model import LogisticRegression

        key = tuple(train)
        if key not in self._basis:
            # The L2-penalised solution lies in the span of the training rows: with more dimensions
            # than rows, the same fit runs in that span (thousands of functionals fit in seconds).
            wide = self.x.shape[1] > len(train)
            self._basis = {key: np.linalg.svd(self.x[train], full_matrices=False)[2].T if wide else None}
        basis = self._basis[key]

        def rows_x(rows: list[int]) -> np.ndarray:
            return self.x[rows] if basis is None else self.x[rows] @ basis

        model = LogisticRegression(C=c, max_iter=5000).fit(rows_x(train), self.y[train])
        return [model.predict(rows_x(rows)) for rows in parts]

    def fold(
        self,
        index: Mapping[str, int],
        fold: Fold,
        n_classes: int,
        grid: Sequence[float] = C_GRID,
        refit: bool = False,
    ) -> dict[str, Any]:
        """C chosen on the fold's validation UAR; the test metrics of that C's fit on the training rows
        (and of its refit on training + validation)."""
        tr, va, te = ([index[u] for u in part] for part in (fold.train, fold.valid, fold.test))
        preds = {c: self.fit_predict(c, tr, [va, te]) for c in grid}
        valid_uar = {c: classification_metrics(self.y[va], preds[c][0], n_classes)["uar"] for c in grid}
        best = max(grid, key=lambda c: (valid_uar[c], -c))  # ties: the smaller C
        result = {
            "C": best,
            "valid_uar": float(valid_uar[best]),
            "test": scalar_metrics(classification_metrics(self.y[te], preds[best][1], n_classes)),
        }
        if refit:
            pred = self.fit_predict(best, tr + va, [te])[0]
            result["refit"] = scalar_metrics(classification_metrics(self.y[te], pred, n_classes))
        return result
