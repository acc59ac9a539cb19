"""Chance levels of the objectives' metrics: what a predictor that ignores the input would score.

Each objective logs ``chance`` beside its metric, computed from the SAME targets in the same
reduction (a ``(numerator, denominator)`` pair with the metric's denominator), so the comparison
is exact on any number of ranks and a metric at its chance level is visible at a glance:

* classification accuracies (MLM family, prompt, EmoCls, MRC, ITM): the majority rate of the
  targets, i.e. the accuracy of always answering the most common target. The numerator is a
  vector of per-class counts; the validation reduction sums it per class over batches and ranks
  and keeps the largest entry (``uniter3m.train.loop``), so the majority is that of the whole
  validation set, not a sum of per-batch majorities;
* frame order: the expected accuracy of a uniform guess over the clip's other slots (tasks/fom.py);
* in-batch retrieval (contrastive): 1 / candidates per row;
* frame regression: the squared error of predicting the per-dimension mean of the target frames.
"""

from __future__ import annotations

import torch

from uniter3m.tasks.base import ratio


def majority(targets: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class target counts over the number of targets: reduced to the majority rate."""
    counts = torch.bincount(targets.detach().reshape(-1).long(), minlength=classes)
    return ratio(counts, targets.numel(), device=targets.device)


def mean_prediction_error(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared error (averaged over dimensions) of predicting each dimension's mean of ``values``
    (N, D), summed over the N frames, over N: the MSE of a predictor that ignores its input.

    The mean is taken over the targets themselves (an oracle for the batch), so this chance is
    slightly below the error of predicting a fixed mean: a model must beat it by learning."""
    values = values.detach().float()
    error = (values - values.mean(0, keepdim=True)).pow(2).mean(-1).sum()
    return ratio(error, values.shape[0], device=values.device)
