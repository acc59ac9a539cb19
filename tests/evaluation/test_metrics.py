"""Metrics: known values, the field's MOSI conventions, and errors instead of silent zeros."""

from __future__ import annotations

import numpy as np
import pytest

from uniter3m.evaluation.metrics import MetricError, classification_metrics, is_better, regression_metrics
from uniter3m.evaluation.report import format_mean_std, mean_std


def test_classification_known_values():
    gold = [0, 0, 0, 0, 1, 1, 2, 2]
    pred = [0, 0, 0, 1, 1, 0, 2, 1]
    m = classification_metrics(gold, pred, num_classes=4)
    assert m["wa"] == pytest.approx(100 * 5 / 8)
    # recalls: class0 3/4, class1 1/2, class2 1/2 -> UAR over the gold classes only
    assert m["uar"] == pytest.approx(100 * (0.75 + 0.5 + 0.5) / 3)
    # F1 per class: c0 p=3/4 r=3/4 -> .75; c1 p=1/3 r=1/2 -> .4; c2 p=1 r=1/2 -> 2/3
    f1 = np.array([0.75, 0.4, 2 / 3])
    assert m["weighted_f1"] == pytest.approx(100 * float(f1 @ np.array([4, 2, 2]) / 8))
    assert m["macro_f1"] == pytest.approx(100 * f1.mean())
    # the confusion matrix keeps every class of the label map (class 3 absent from this fold)
    assert m["confusion"] == [[3, 1, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]]


def test_never_predicted_class_counts_as_zero_f1_not_error():
    m = classification_metrics([0, 1, 1], [1, 1, 1], num_classes=2)
    assert m["uar"] == pytest.approx(50.0)
    assert m["macro_f1"] == pytest.approx(100 * (0 + 0.8) / 2)


@pytest.mark.parametrize(
    "gold,pred,match",
    [([], [], "no samples"), ([0, 1], [0], "2 gold labels but 1"), ([0, 5], [0, 1], "outside 0..2")],
)
def test_classification_errors(gold, pred, match):
    with pytest.raises(MetricError, match=match):
        classification_metrics(gold, pred, num_classes=3)


def test_regression_mosi_conventions():
    gold = [2.4, -1.0, 0.0, -0.2, 1.4, 0.0]
    pred = [1.0, -0.5, 0.3, 0.1, -0.4, -0.1]
    m = regression_metrics(gold, pred)
    assert m["mae"] == pytest.approx(np.mean(np.abs(np.subtract(gold, pred))))
    assert m["pearson"] == pytest.approx(np.corrcoef(gold, pred)[0, 1])
    # Acc-2 (non-negative vs negative): zero gold is positive -> 2.4 ok, -1 ok, 0/0.3 ok, -0.2/0.1 no,
    # 1.4/-0.4 no, 0/-0.1 no -> 3/6
    assert m["acc2"] == pytest.approx(50.0)
    # without gold zeros: 2.4 ok, -1 ok, -0.2/0.1 no, 1.4/-0.4 no -> 2/4
    assert m["acc2_nonzero"] == pytest.approx(50.0)
    # Acc-7 (rounded, half to even): 2/1 no, -1/0 no, 0/0 ok, 0/0 ok, 1/0 no, 0/0 ok -> 3/6
    assert m["acc7"] == pytest.approx(100 * 3 / 6)


def test_regression_errors():
    with pytest.raises(MetricError, match="constant"):
        regression_metrics([1.0, -1.0, 2.0], [0.5, 0.5, 0.5])
    with pytest.raises(MetricError, match="NaN"):
        regression_metrics([1.0, -1.0], [float("nan"), 0.0])
    with pytest.raises(MetricError):
        regression_metrics([0.0], [0.1])


def test_is_better_direction():
    assert is_better("uar", 60.0, None)
    assert is_better("uar", 61.0, 60.0) and not is_better("uar", 60.0, 60.0)
    assert is_better("mae", 0.8, 0.9) and not is_better("mae", 0.95, 0.9)


def test_mean_std_is_the_sample_std():
    # the README's IEMOCAP-4 seeds: population std 0.21, sample std 0.25 (what every report prints)
    mean, std = mean_std([66.50, 66.53, 66.95])
    assert mean == pytest.approx(66.66) and std == pytest.approx(0.2516, abs=1e-4)
    assert format_mean_std([66.50, 66.53, 66.95]) == "66.66 ± 0.25"
    assert format_mean_std([75.8, 71.8, 76.0], digits=1) == "74.5 ± 2.4"


def test_mean_std_of_one_value_has_no_spread():
    assert mean_std([59.04]) == (59.04, 0.0)
    assert format_mean_std([59.04]) == "59.04"  # never "± 0.00": one run measures no spread
    with pytest.raises(ValueError):
        mean_std([])
