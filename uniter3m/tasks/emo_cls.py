"""Utterance emotion classification (EmoCls) as a pretraining objective.

Two sources of targets:

* hard labels: a column of the batch ``labels`` mapped to class indices (``classes`` gives the
  class names in head order; ``label_map`` may map further raw values, e.g. ``{"exc": "happy"}``);
* soft labels (``soft=True``): the weak labeller's class probabilities stored in the text db
  (``soft_labels``, (B, C), in ``classes`` order), learned with KL.

Weak labels are only as good as the labeller, so a quality filter keeps an utterance only when the
probability of its top class reaches that class's threshold: ``min_confidence={"neutral": 0.8,
"*": 0.4}`` keeps neutral only above p >= 0.8 and the other classes above p >= 0.4. Filtered
utterances are counted (the ``filtered`` metric), never dropped silently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from uniter3m.errors import ConfigError, UserError
from uniter3m.tasks.base import (
    Task,
    TaskContext,
    TaskOutput,
    count,
    head,
    mean_over,
    ratio,
    wants_chance,
)
from uniter3m.tasks.chance import majority

EMO_HEAD = "emo_classifier"


class EmoClsTask(Task):
    """EmoCls on the pooled output. Loss: cross-entropy (hard) or KL(soft label ‖ prediction)
    summed over classes (soft), mean over the utterances kept by the filter.

    Options: ``classes`` (class names in head order, required), ``label_column`` (hard labels),
    ``label_map`` (extra raw value -> class name), ``soft`` (False), ``min_confidence`` (soft only:
    class name or "*" -> threshold on the top class probability), plus the modality options of
    ``Task``. Head: ``emo_classifier`` with ``len(classes)`` outputs.
    """

    heads = (EMO_HEAD,)
    streams = ()

    def __init__(
        self,
        context: TaskContext,
        *,
        classes: Sequence[str] | None = None,
        label_column: str | None = None,
        label_map: Mapping[str, str] | None = None,
        soft: bool = False,
        min_confidence: Mapping[str, float] | None = None,
        **common: Any,
    ) -> None:
        super().__init__(context, **common)
        if not classes:
            raise ConfigError(f"task {self.name}: give classes, the class names in the head's order")
        self.classes = [str(c) for c in classes]
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"task {self.name}: classes {self.classes} repeat a name")
        self.soft = bool(soft)
        index = {c: i for i, c in enumerate(self.classes)}
        self.label_index = dict(index)
        for raw, name in (label_map or {}).items():
            if str(name) not in index:
                raise ConfigError(
                    f"task {self.name}: label_map maps {raw!r} to {name!r}, which is not one of classes {self.classes}"
                )
            self.label_index[str(raw)] = index[str(name)]
        if not self.soft and not label_column:
            raise ConfigError(f"task {self.name}: give label_column (hard labels) or set soft=true")
        self.label_column = label_column
        if min_confidence and not self.soft:
            raise ConfigError(f"task {self.name}: min_confidence filters soft labels only; set soft=true")
        thresholds = torch.zeros(len(self.classes))
        conf = dict(min_confidence or {})
        unknown = sorted(k for k in conf if k != "*" and k not in index)
        if unknown:
            raise ConfigError(
                f"task {self.name}: min_confidence names unknown classes {unknown}; classes are {self.classes}"
            )
        thresholds[:] = float(conf.get("*", 0.0))
        for name, value in conf.items():
            if name != "*":
                thresholds[index[name]] = float(value)
        if (thresholds < 0).any() or (thresholds > 1).any():
            raise ConfigError(f"task {self.name}: min_confidence values {conf} must be in [0, 1]")
        self.thresholds = thresholds

    def soft_targets(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        soft = batch.get("soft_labels")
        if soft is None:
            raise UserError(
                f"task {self.name}: soft=true but the batch (ids {list(batch.get('ids', []))[:3]}...) has no "
                "soft_labels; build the text db with a weak labeller or use hard labels"
            )
        soft = soft.float()
        if soft.shape[-1] != len(self.classes):
            raise UserError(
                f"task {self.name}: soft_labels have {soft.shape[-1]} classes but classes lists {len(self.classes)}"
            )
        soft = soft / soft.sum(-1, keepdim=True).clamp(min=1e-12)
        top_p, top = soft.max(-1)
        keep = (top_p >= self.thresholds[top]) & (top_p > 0)
        return soft, keep

    def build(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        inputs = self.model_inputs(batch)
        if self.soft:
            soft, keep = self.soft_targets(batch)
            inputs["emo_soft"] = soft
            inputs["emo_keep"] = keep
        else:
            inputs["emo_targets"] = self.label_targets(
                batch,
                self.label_column,
                self.label_index,
                "class",
                "add the label to classes or label_map, or filter the data",
            )
            inputs["emo_keep"] = torch.ones(len(inputs["emo_targets"]), dtype=torch.bool)
        inputs["emo_index"] = inputs["emo_keep"].nonzero().squeeze(1)  # on the CPU, in the workers
        return inputs

    def forward(self, model: torch.nn.Module, inputs: Mapping[str, Any]) -> TaskOutput:
        output = self.encode(model, inputs)
        keep, index = inputs["emo_keep"], inputs["emo_index"]
        n = index.numel()
        total = count(output.pooler_output, n)
        filtered = ratio((~keep).sum(), count(output.pooler_output, keep.numel()))
        logits = head(model, EMO_HEAD, self.name)(output.pooler_output.index_select(0, index)).float()
        if logits.shape[-1] != len(self.classes):
            raise UserError(
                f"task {self.name}: the emo_classifier head has {logits.shape[-1]} outputs but classes lists "
                f"{len(self.classes)}; build the model with emo_classes={len(self.classes)}"
            )
        if self.soft:
            target = inputs["emo_soft"].index_select(0, index)
            loss = mean_over(F.kl_div(F.log_softmax(logits, -1), target, reduction="none").sum(), n)
            gold = target.argmax(-1)
        else:
            gold = inputs["emo_targets"].index_select(0, index)
            loss = mean_over(F.cross_entropy(logits, gold, reduction="sum"), n)
        correct = (logits.argmax(-1) == gold).sum()
        metrics = {"acc": ratio(correct, total), "filtered": filtered}
        if wants_chance(model):
            metrics["chance"] = majority(gold, len(self.classes))
        return TaskOutput(loss, total, metrics)
