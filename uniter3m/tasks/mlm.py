"""Masked language modelling: MLM, whole-word masking (WWM), emotion-word masking (MELM) and MELM+WWM.

The text is masked while the face and speech streams stay intact, so the model learns to fill
words from the other modalities too (MEmoBERT). Registered names:

* ``mlm``: each token chosen with ``mask_prob`` (15 %);
* ``wwm``: each word chosen with ``mask_prob``; all its word pieces become targets together;
* ``melm``: tokens of emotion words (``emo_flags``) chosen with ``emo_prob`` (0.5), the other tokens
  with max(mask_prob·n − emo_prob·e, 0) / (n − e), n units, e emotion units of the sample, so about
  ``mask_prob`` of all units are chosen (0 when every unit is an emotion unit: no division by zero);
* ``melm_wwm``: MELM over whole words (a word is an emotion word when any of its pieces is flagged).

Chosen units are corrupted with ``replace`` = [mask, random, keep] = [0.8, 0.1, 0.1], one action per
unit (all pieces of a word get the same action). [CLS], [SEP], [MASK], padding and dialogue context
(``ctx_flags``, see ``uniter3m.data.context``) are never chosen.
Every sample with at least one real token gets at least one target: when the draw chose nothing,
one unit is picked uniformly (see ``masking.choose_units``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from uniter3m.errors import ConfigError
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
from uniter3m.tasks.chance import majority
from uniter3m.tasks.masking import (
    ReplaceRates,
    check_rate,
    mask_tokens,
    maskable_tokens,
    melm_unit_probs,
    random_token_pool,
    token_units,
    uniform_unit_probs,
    unit_table,
    word_units,
)

MLM_HEAD = "cls.predictions"


def mlm_loss(
    model: torch.nn.Module,
    text_states: torch.Tensor,
    targets: torch.Tensor,
    task: str,
    index: torch.Tensor | None = None,
) -> TaskOutput:
    """Cross-entropy over the vocabulary at target tokens only; mean over target tokens.

    ``chance`` is the rate of the most common target token (always answering it).
    `index`: the targets' flat positions, prepared by the data workers (see `flat_index`).

    The head runs on the gathered target states, not on the whole sequence (the vocabulary
    projection is the most expensive matmul of the step).
    """
    if index is None:
        index = flat_index(targets.detach().cpu() >= 0)
    n = index.numel()
    gold = gather_flat(targets, index)
    logits = head(model, MLM_HEAD, task)(gather_flat(text_states, index)).float()
    loss = mean_over(F.cross_entropy(logits, gold, reduction="sum"), n)
    total = count(text_states, n)
    metrics = {"acc": ratio((logits.argmax(-1) == gold).sum(), total)}
    if wants_chance(model):
        metrics["chance"] = majority(gold, logits.shape[-1])
    return TaskOutput(loss, total, metrics)


class MlmTask(Task):
    """MLM family. Loss: cross-entropy over the vocabulary, mean over target tokens.

    Options: ``unit`` ("token" | "word", fixed by the task name), ``emotion`` (MELM, fixed by the
    name), ``mask_prob`` (0.15), ``emo_prob`` (0.5, MELM only), ``replace`` ([0.8, 0.1, 0.1]),
    plus the modality options of ``Task``.
    """

    heads = ("mlm",)
    streams = ("L",)

    def __init__(
        self,
        context: TaskContext,
        *,
        unit: str = "token",
        emotion: bool = False,
        mask_prob: float = 0.15,
        emo_prob: float = 0.5,
        replace: Any = None,
        **common: Any,
    ) -> None:
        super().__init__(context, **common)
        if unit not in ("token", "word"):
            raise ConfigError(f"task {self.name}: unit={unit!r}; use 'token' or 'word'")
        self.unit = unit
        self.emotion = bool(emotion)
        self.mask_prob = check_rate("mask_prob", mask_prob)
        self.emo_prob = check_rate("emo_prob", emo_prob)
        self.replace = ReplaceRates.parse(replace)
        self.random_pool = random_token_pool(self.special)

    def build(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        input_ids = batch["input_ids"]
        maskable = maskable_tokens(input_ids, batch["txt_mask"], self.special, batch.get("ctx_flags"))
        if self.unit == "word":
            units = word_units(batch["word_ids"], maskable)
        else:
            units = token_units(maskable)
        exists, is_emo = unit_table(units, batch["emo_flags"] if self.emotion else None)
        if self.emotion:
            probs = melm_unit_probs(exists, is_emo, self.mask_prob, self.emo_prob)
        else:
            probs = uniform_unit_probs(exists, self.mask_prob)
        masked = mask_tokens(
            input_ids, units, probs, exists, self.special, self.replace, generator, self.random_pool
        )
        inputs = self.model_inputs(batch)
        inputs["input_ids"] = masked.input_ids
        inputs["mlm_targets"] = masked.targets
        inputs["mlm_index"] = flat_index(masked.targets >= 0)
        return inputs

    def forward(self, model: torch.nn.Module, inputs: Mapping[str, Any]) -> TaskOutput:
        output = self.encode(model, inputs)
        return mlm_loss(
            model, segment_states(output, "text"), inputs["mlm_targets"], self.name, inputs["mlm_index"]
        )
