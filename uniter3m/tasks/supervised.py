"""Fine-tuning as a task of the training engine: one utterance-level target per id.

Targets come from the protocol (`ProtocolPlan.targets`, looked up by utterance id), never from
the batch's inputs. `prepare` runs in the data workers like every objective's: it keeps the
modalities of the run, inserts the prompt for the prompt classifier (`data/prompts.py`) and attaches
the targets; `forward` runs the `FinetuneModel` and returns the loss:

* linear and mlp classifiers: cross-entropy over the classes (optionally class-weighted);
* prompt classifier: the MLM loss over the whole vocabulary at the prompt's mask token (as in
  pretraining), class weights applied to the label words;
* regression classifier: L1 (MAE), the MOSI convention.

The loss is a mean over the batch's utterances; `acc` (classification) or `mae` is the metric.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from uniter3m.data.labels import lookup_targets
from uniter3m.data.prompts import add_prompt, soft_prompt_slots
from uniter3m.tasks.base import Task, TaskContext, TaskOutput, count, ratio

_NOT_MODEL_KEYS = ("targets", "ids", "class_weights")


class SupervisedTask(Task):
    """Utterance classification or regression against protocol targets. Loss: mean over utterances."""

    name = "finetune"

    def __init__(
        self,
        context: TaskContext,
        *,
        targets: Mapping[str, int | float],
        classifier: str = "linear",
        prompt_ids: Sequence[int] | None = None,
        soft_prompt: int = 0,
        class_weights: Sequence[float] | None = None,
        max_len: int = 512,
        **common: Any,
    ) -> None:
        super().__init__(context, **common)
        self.targets = dict(targets)
        self.classifier = classifier
        self.regression = classifier == "regression"
        self.prompt_ids = list(prompt_ids) if prompt_ids is not None else None
        self.soft_prompt = int(soft_prompt)  # the template's first ids: learned vectors' places
        self.class_weights = (
            None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        )
        self.max_len = int(max_len)

    def build(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        inputs = self.backbone_inputs(batch)
        values = lookup_targets(batch["ids"], self.targets, what="protocol target", where="the fold's ids")
        inputs["targets"] = torch.tensor(values, dtype=torch.float32 if self.regression else torch.long)
        if self.class_weights is not None:  # copied with the batch: the step copies nothing from the host
            inputs["class_weights"] = self.class_weights.clone()
        return inputs

    def backbone_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The model's keyword arguments (the prompt inserted for the prompt classifier), without targets:
        what training builds on and what `uniter3m predict` feeds."""
        inputs = self.model_inputs(batch)
        if self.classifier == "prompt":
            ids, mask, positions, _ = add_prompt(
                batch["input_ids"],
                batch["txt_mask"],
                self.prompt_ids or [],
                self.special,
                max_len=self.max_len,
                ctx_flags=batch.get("ctx_flags"),
            )
            inputs.update(input_ids=ids, attention_mask=mask, prompt_positions=positions)
            if self.soft_prompt:
                offset = self.prompt_ids.index(self.special.mask_id)
                inputs["soft_slots"] = soft_prompt_slots(ids.shape, positions, offset, self.soft_prompt)
        return inputs

    #: entries of `prepare`'s dict that are not model inputs
    not_inputs: tuple[str, ...] = _NOT_MODEL_KEYS

    def forward(self, model: torch.nn.Module, inputs: Mapping[str, Any]) -> TaskOutput:
        kwargs = {k: v for k, v in inputs.items() if k not in self.not_inputs and v is not None}
        return self.loss(model, model(**kwargs), inputs)

    def loss(self, model: torch.nn.Module, out: Any, inputs: Mapping[str, Any]) -> TaskOutput:
        """The supervised loss and metric of the model's output `out` against the batch's targets."""
        target = inputs["targets"]
        n = count(target, target.shape[0])
        if self.regression:
            scores = out.scores.float()
            loss = F.l1_loss(scores, target)
            return TaskOutput(loss, n, {"mae": ratio((scores - target).abs().sum(), n)})
        weights = inputs.get("class_weights")
        if self.classifier == "prompt":
            verbalizer = model.verbalizer_ids  # a buffer: already on the device
            vocab_weights = None
            if weights is not None:
                vocab_weights = torch.ones(out.vocab_logits.shape[-1], device=target.device)
                vocab_weights[verbalizer] = weights
            loss = F.cross_entropy(out.vocab_logits.float(), verbalizer[target], weight=vocab_weights)
        else:
            loss = F.cross_entropy(out.logits.float(), target, weight=weights)
        correct = (out.logits.argmax(-1) == target).sum()
        return TaskOutput(loss, n, {"acc": ratio(correct, n)})
