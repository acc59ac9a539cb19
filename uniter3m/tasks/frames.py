"""Masked frame modelling for face (V) and speech (A): frame regression and soft-label KL.

Masking (both objectives) chooses either independent frames (``span=1``) or non-overlapping spans
of ``span`` consecutive frames (Mockingjay), about ``mask_prob`` (15 %) of each clip's frames.
Each chosen unit (frame or whole span) is then, per ``replace`` = [0.8, 0.1, 0.1],
replaced by the stream's learned mask vector (the model's ``*_frame_mask`` input), replaced by
real frames drawn from the batch, or kept. Spans may end on the last frame; a clip shorter than one
span gets one shorter span (``masking.span_starts``); every clip with frames gets at least one
target; empty clips (T = 0) and padding contribute none.

MEmoBERT's span rules are options of ``span``, a length or a mapping (``masking.SpanSpec``):
``{"length": 3, "overlap": true}`` (its overlapping spans, floor(T·ratio / length) starts; about
17.8 % of frames at ratio 0.2), ``{"length": [1, 2, 3, 4, 5], "ratios": [0.1, ..., 0.9], "overlap":
true}`` (its mixed ratios: one rate and one length drawn per clip), ``{"single": true}`` (one span of
floor(T·ratio) frames); MEmoBERT always used the mask vector: ``"replace": [1, 0, 0]`` inside
``span`` (the span's rates; the task-level ``replace`` says the same for any masking, and giving
both is a ConfigError, so no rule decides between two values).
``select: "emotion"`` chooses the frames instead by their per-frame soft labels' distance from
neutral (``masking.emotion_frames``; class ``neutral``, default 0) for any stream with soft labels.

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
    FrameStreamTask,
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
from uniter3m.tasks.masking import (
    ReplaceRates,
    SpanSpec,
    check_rate,
    choose_frames,
    choose_span_units,
    corrupt_frames,
    emotion_frames,
)

SELECTIONS = ("random", "emotion")


class MaskedFrameTask(FrameStreamTask):
    """Shared masking of one frame stream; subclasses define the head and the loss.

    Options: ``stream`` (the stream's letter, fixed by the task name), ``mask_prob`` (0.15), ``span``
    (1 = independent frames; k > 1 = spans of k frames; a mapping: ``masking.SpanSpec``), ``replace``
    ([0.8, 0.1, 0.1]), ``select`` ("random" | "emotion"), ``neutral`` (0: the soft labels' neutral
    class, ``select: "emotion"`` only), plus the modality options of ``Task``.
    """

    def __init__(
        self,
        context: TaskContext,
        *,
        mask_prob: float = 0.15,
        span: Any = 1,
        replace: Any = None,
        select: str = "random",
        neutral: int = 0,
        **common: Any,
    ) -> None:
        super().__init__(context, **common)
        self.mask_prob = check_rate("mask_prob", mask_prob)
        self.span = SpanSpec.parse(span, f"task {self.name}")
        if self.span.replace is not None and replace is not None:
            raise ConfigError(
                f"task {self.name}: replace is given twice (span.replace and replace); keep one"
            )
        self.replace = self.span.replace or ReplaceRates.parse(replace)
        if select not in SELECTIONS:
            raise ConfigError(f"task {self.name}: select={select!r}; use one of {', '.join(SELECTIONS)}")
        if select == "emotion" and not self.span.plain_frames:
            raise ConfigError(f"task {self.name}: select='emotion' picks single frames; leave span out")
        self.select = select
        self.neutral = int(neutral)

    def build(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        feat = batch[f"{self.prefix}_feat"]
        real = batch[f"{self.prefix}_mask"].bool()
        if self.select == "emotion":
            units = emotion_frames(real, self.soft_labels(batch), self.mask_prob, self.neutral, generator)
        elif self.span.plain_frames:
            units = choose_frames(real, self.mask_prob, generator)
        else:
            units = choose_span_units(real, self.mask_prob, self.span, generator)
        masking = corrupt_frames(feat, real, units, self.replace, generator)
        inputs = self.model_inputs(batch)
        inputs[f"{self.prefix}_feat"] = masking.feat
        inputs[f"{self.prefix}_frame_mask"] = masking.frame_mask
        inputs["frame_targets"] = masking.targets
        inputs["frame_index"] = flat_index(masking.targets)
        self.add_targets(inputs, batch, masking.targets)
        return inputs

    def soft_labels(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The stream's per-frame soft labels (B, T, C), or an error saying how to get them."""
        soft = batch.get(f"{self.prefix}_soft")
        if soft is None:
            raise UserError(
                f"task {self.name} needs per-frame soft labels ({self.prefix}_soft) but the batch "
                f"(ids {list(batch.get('ids', []))[:3]}...) has none: build the {self.prefix} db with "
                "soft labels, or use select='random' / the regression task"
            )
        if not 0 <= self.neutral < soft.shape[-1]:
            raise UserError(
                f"task {self.name}: neutral={self.neutral} but the {self.prefix} soft labels have "
                f"{soft.shape[-1]} classes; set neutral to the neutral class's index"
            )
        return soft

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

    head_suffix = "regress"

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

    head_suffix = "classifier"

    def add_targets(self, inputs: dict[str, Any], batch: Mapping[str, Any], targets: torch.Tensor) -> None:
        labels = self.soft_labels(batch)[targets].float()
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
