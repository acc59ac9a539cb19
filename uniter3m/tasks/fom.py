"""Frame order modelling for face (VFOM) and speech (SFOM), HERO's formulation.

A fraction of each clip's frames is shuffled among themselves and the model predicts, for every
shuffled slot, the original position of the frame now sitting there (a classification over the
clip's positions). The FRAMES are permuted here, in ``prepare``, before the model sees them: the
model adds position embeddings in slot order, so a frame carries no trace of where it came from.
(The reference code shuffled finished embeddings that still held their original positions, so the
answer leaked.)

The shuffle is a random cycle over the chosen slots, so every shuffled frame really moves. On
frames without content (noise) the model can do no better than guessing. It knows a scored slot
was shuffled (only those are scored), so its own position is never the answer, but it cannot see
which of the clip's other T − 1 slots were shuffled: every one of them is equally likely to be the
origin, and a blind guess is right 1 / (T − 1) of the time. The ``chance`` metric reports that,
averaged over targets. (An earlier formula, 1 / (k − 1) over the k shuffled slots, assumed the
model knows which slots were shuffled; it lay above what a blind model can reach.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from uniter3m.tasks.base import (
    FrameStreamTask,
    TaskContext,
    TaskOutput,
    backbone,
    count,
    flat_index,
    gather_flat,
    head,
    mean_over,
    ratio,
    segment_states,
    zero_loss,
)
from uniter3m.tasks.masking import check_rate, frame_lengths


def shuffle_frames(
    feat: torch.Tensor, real: torch.Tensor, shuffle_prob: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Permute about ``shuffle_prob`` of each clip's frames (at least 2 when the clip has 2).

    Returns the shuffled frames and, per slot, the original position of the frame now in it
    (-1 for slots that were not shuffled, padding and clips shorter than 2 frames).
    """
    out = feat.clone()
    targets = torch.full(real.shape, -1, dtype=torch.long)
    for b, length in enumerate(frame_lengths(real).tolist()):
        if length < 2:
            continue
        k = int(shuffle_prob * length + torch.rand((), generator=generator).item())
        k = min(max(k, 2), length)
        slots = torch.randperm(length, generator=generator)[:k]
        destination = slots.roll(1)
        out[b, destination] = feat[b, slots]
        targets[b, destination] = slots
    return out, targets


class FrameOrderTask(FrameStreamTask):
    """VFOM / SFOM. Loss: cross-entropy over the clip's positions, mean over shuffled frames.

    Head: ``face_fom`` / ``speech_fom``, which scores a frame state against the stream's own
    position table (``FrameEmbeddings.position_table``); slots beyond the clip's length are excluded. Options: ``stream`` (the stream's letter, fixed by the task name),
    ``shuffle_prob`` (0.15), plus the modality options of ``Task``.
    """

    head_suffix = "fom"

    def __init__(self, context: TaskContext, *, shuffle_prob: float = 0.15, **common: Any):
        super().__init__(context, **common)
        self.shuffle_prob = check_rate("shuffle_prob", shuffle_prob)

    def build(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        real = batch[f"{self.prefix}_mask"].bool()
        shuffled, targets = shuffle_frames(batch[f"{self.prefix}_feat"], real, self.shuffle_prob, generator)
        inputs = self.model_inputs(batch)
        inputs[f"{self.prefix}_feat"] = shuffled
        inputs["order_targets"] = targets
        inputs["order_index"] = flat_index(targets >= 0)
        return inputs

    def forward(self, model: torch.nn.Module, inputs: Mapping[str, Any]) -> TaskOutput:
        output = self.encode(model, inputs)
        states = segment_states(output, self.prefix)
        targets = inputs["order_targets"]
        index = inputs["order_index"]
        n = index.numel()
        total = count(states, n)
        if n == 0:  # known on the host from the index's size: no sync
            return TaskOutput(
                zero_loss(states), total, {"acc": ratio(0.0, total), "chance": ratio(0.0, total)}
            )
        lengths = gather_flat(
            inputs[f"{self.prefix}_mask"].long().sum(1, keepdim=True).expand_as(targets), index
        )
        table = getattr(backbone(model), f"{self.prefix}_embeddings").position_table(states.shape[1])
        logits = head(model, self.head_name, self.name)(gather_flat(states, index), table).float()
        positions = torch.arange(logits.shape[-1], device=logits.device)
        logits = logits.masked_fill(positions[None, :] >= lengths[:, None], float("-inf"))
        gold = gather_flat(targets, index)
        loss = mean_over(F.cross_entropy(logits, gold, reduction="sum"), n)
        correct = (logits.argmax(-1) == gold).sum()
        chance = (1.0 / (lengths.float() - 1).clamp(min=1)).sum()
        return TaskOutput(loss, total, {"acc": ratio(correct, total), "chance": ratio(chance, total)})
