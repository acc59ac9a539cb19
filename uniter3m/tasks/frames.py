"""Masked frame modelling for face (V) and speech (A): frame regression and soft-label KL.

Masking (both objectives) chooses either independent frames (``span=1``) or non-overlapping spans
of ``span`` consecutive frames (Mockingjay), about ``mask_prob`` (15 %) of each clip's frames.
Each chosen unit (frame or whole span) is then, per ``replace`` = [0.8, 0.1, 0.1],
replaced by the stream's learned mask vector (the model's ``*_frame_mask`` input), replaced by
real frames drawn from the batch, or kept. Spans may end on the last frame; a clip shorter than one
span gets one shorter span (``masking.span_starts``); every clip with frames gets at least one
target; empty clips (T = 0) and padding contribute none.

Registered names: ``face_mrfr``, ``speech_mrfr`` (MRFR / MSRFR, regression) and ``face_mrc``
(MRC-KL, where the batch carries per-frame soft labels ``face_soft``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from uniter3m.errors import ConfigError, UserError
from uniter3m.tasks.base import (
    Task,
    TaskContext,
    TaskOutput,
    count,
    flat_index,
    gather_flat,
    head,
    mean_over,
    ratio,
    segment_states,
    wants_chance,
)
from uniter3m.tasks.chance import majority, mean_prediction_error
from uniter3m.tasks.masking import ReplaceRates, check_rate, choose_frames, choose_spans, corrupt_frames


class MaskedFrameTask(Task):
    """Shared masking of one frame stream; subclasses define the head and the loss.

    Options: ``stream`` (the stream's letter, fixed by the task name), ``mask_prob`` (0.15), ``span``
    (1 = independent frames; k > 1 = spans of k frames), ``replace`` ([0.8, 0.1, 0.1]), plus the
    modality options of ``Task``.
    """

    def __init__(
        self,
        context: TaskContext,
        *,
        stream: str = "V",
        mask_prob: float = 0.15,
        span: int = 1,
        replace: Any = None,
        **common: Any,
    ) -> None:
        frame_letters = context.stream_table.frame_letters()
        if stream not in frame_letters:
            raise ConfigError(
                f"task option stream={stream!r}; use a frame stream's letter: {', '.join(frame_letters)}"
            )
        self.stream = stream
        self.prefix = frame_letters[stream]
        self.streams = (stream,)
        super().__init__(context, **common)
        self.mask_prob = check_rate("mask_prob", mask_prob)
        if int(span) != span or span < 1:
            raise ConfigError(f"task {self.name}: span={span} must be a whole number >= 1")
        self.span = int(span)
        self.replace = ReplaceRates.parse(replace)

    def build(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        feat = batch[f"{self.prefix}_feat"]
        real = batch[f"{self.prefix}_mask"].bool()
        if self.span == 1:
            units = choose_frames(real, self.mask_prob, generator)
        else:
            units = choose_spans(real, self.mask_prob, self.span, generator)
        masking = corrupt_frames(feat, real, units, self.replace, generator)
        inputs = self.model_inputs(batch)
        inputs[f"{self.prefix}_feat"] = masking.feat
        inputs[f"{self.prefix}_frame_mask"] = masking.frame_mask
        inputs["frame_targets"] = masking.targets
        inputs["frame_index"] = flat_index(masking.targets)
        self.add_targets(inputs, batch, masking.targets)
        return inputs

    def add_targets(self, inputs: dict[str, Any], batch: Mapping[str, Any], targets: torch.Tensor) -> None:
        raise NotImplementedError

    def target_states(
        self, model: torch.nn.Module, inputs: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stream's states (B, T, H) and those at the target frames (N, H)."""
        output = self.encode(model, inputs)
        states = segment_states(output, self.prefix)
        return states, gather_flat(states, inputs["frame_index"])


class FrameRegressionTask(MaskedFrameTask):
    """MRFR / MSRFR: regress the ORIGINAL input frame (as normalised in the batch) at every target.

    Loss: squared error averaged over feature dimensions, then mean over target frames.
    ``chance``: the same error for predicting the per-dimension mean of the target frames.
    Head: ``face_regress`` / ``speech_regress``.
    """

    def __init__(self, context: TaskContext, **options: Any) -> None:
        super().__init__(context, **options)
        self.head_name = f"{self.prefix}_regress"
        self.heads = (self.head_name,)

    def add_targets(self, inputs: dict[str, Any], batch: Mapping[str, Any], targets: torch.Tensor) -> None:
        inputs["frame_values"] = batch[f"{self.prefix}_feat"][targets].float()

    def forward(self, model: torch.nn.Module, inputs: Mapping[str, Any]) -> TaskOutput:
        states, selected = self.target_states(model, inputs)
        n = inputs["frame_index"].numel()
        total = count(states, n)
        prediction = head(model, self.head_name, self.name)(selected).float()
        per_frame = F.mse_loss(prediction, inputs["frame_values"], reduction="none").mean(-1)
        metrics = {"mse": ratio(per_frame.sum(), total)}
        if wants_chance(model) and n:
            metrics["chance"] = mean_prediction_error(inputs["frame_values"])
        elif wants_chance(model):
            metrics["chance"] = ratio(0.0, total)
        return TaskOutput(mean_over(per_frame.sum(), n), total, metrics)


class FrameSoftLabelTask(MaskedFrameTask):
    """MRC-KL: KL(per-frame soft label ‖ predicted distribution) at every target frame.

    Loss: KL summed over classes, mean over target frames. Frames whose soft label sums to 0 (no
    label) are not targets; they are counted in the ``unlabelled`` metric. Head: ``face_classifier``.
    ``acc``: the predicted top class is the soft label's top class; ``chance``: the majority top class.
    """

    def __init__(self, context: TaskContext, **options: Any) -> None:
        super().__init__(context, **options)
        self.head_name = f"{self.prefix}_classifier"
        self.heads = (self.head_name,)

    def add_targets(self, inputs: dict[str, Any], batch: Mapping[str, Any], targets: torch.Tensor) -> None:
        soft = batch.get(f"{self.prefix}_soft")
        if soft is None:
            raise UserError(
                f"task {self.name} needs per-frame soft labels ({self.prefix}_soft) but the batch "
                f"(ids {list(batch.get('ids', []))[:3]}...) has none: build the {self.prefix} db with "
                "soft labels or use the regression task instead"
            )
        labels = soft[targets].float()
        total = labels.sum(-1, keepdim=True)
        labelled = total.squeeze(-1) > 0
        inputs["frame_soft"] = (labels / total.clamp(min=1e-12))[labelled]
        inputs["frame_labelled"] = labelled
        # the labelled targets' positions among all targets: gathered without a host sync
        inputs["frame_labelled_index"] = labelled.nonzero().squeeze(1)

    def forward(self, model: torch.nn.Module, inputs: Mapping[str, Any]) -> TaskOutput:
        states, selected = self.target_states(model, inputs)
        labelled = inputs["frame_labelled"]
        index = inputs["frame_labelled_index"]
        n = index.numel()
        total = count(states, n)
        unlabelled = ratio((~labelled).sum(), count(states, labelled.numel()))
        logits = head(model, self.head_name, self.name)(
            selected.index_select(0, index.to(selected.device))
        ).float()
        target = inputs["frame_soft"]
        log_q = F.log_softmax(logits, -1)
        kl = F.kl_div(log_q, target, reduction="none").sum(-1)
        correct = (logits.argmax(-1) == target.argmax(-1)).sum()
        metrics = {"acc": ratio(correct, total), "unlabelled": unlabelled}
        if wants_chance(model):
            metrics["chance"] = majority(target.argmax(-1), target.shape[-1])
        return TaskOutput(mean_over(kl.sum(), n), total, metrics)
