"""Masked language modelling: MLM, whole-word masking (WWM), emotion-word masking (MELM) and MELM+WWM.

The text is masked while the face and speech streams stay intact, so the model learns to fill
words from the other modalities too (MEmoBERT). Registered names:

* ``mlm``: each token chosen with ``mask_prob`` (15 %);
* ``wwm``: each word chosen with ``mask_prob``; all its word pieces become targets together;
* ``melm``: tokens of emotion words (``emo_flags``) chosen with ``emo_prob`` (0.5), the other tokens
  with max(mask_prob·n − emo_prob·e, 0) / (n − e), n units, e emotion units of the sample, so about
  ``mask_prob`` of all units are chosen (0 when every unit is an emotion unit: no division by zero);
* ``melm_wwm``: MELM over whole words (a word is an emotion word when any of its pieces is flagged).

MEmoBERT's own rules (``rule: "memobert"``; default ``"weighted"`` is the rule above): ``melm`` draws
only emotion tokens (each with ``emo_prob``) and masks a sample with no drawn emotion token as plain
MLM (``masking.memobert_melm_chosen``); ``melm_wwm`` keeps the weighted word probabilities but has no
"at least one target" rule and always uses [MASK] (``replace`` defaults to [1, 0, 0] there).
``lexicon`` ("nrc" = NRC 8 emotions, "nrc6" = MEmoBERT's 6, or a word-list file; default: the text
db's own ``emo_flags``) re-flags the batch's words at run time (``uniter3m.data.lexicon``).
``emotion_head: true`` adds MEmoBERT's multitask head (``emo_word_classifier``): every target token is
also classified into its word's emotion category (class 0 = not an emotion word, k + 1 = the
lexicon's category k); loss = MLM + ``emotion_weight`` × that cross-entropy (mean over targets).

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

from uniter3m.data.lexicon import EmotionLexicon, load_emotion_lexicon, word_classes
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
    choose_units,
    mask_tokens,
    maskable_tokens,
    melm_unit_probs,
    memobert_melm_chosen,
    memobert_wwm_chosen,
    random_token_pool,
    token_units,
    uniform_unit_probs,
    unit_table,
    word_units,
)

MLM_HEAD = "cls.predictions"
EMO_WORD_HEAD = "emo_word_classifier"
RULES = ("weighted", "memobert")


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
    name), ``mask_prob`` (0.15), ``emo_prob`` (0.5, MELM only), ``replace`` ([0.8, 0.1, 0.1];
    MEmoBERT's melm_wwm: [1, 0, 0]), ``rule`` ("weighted" | "memobert", MELM only), ``lexicon``
    (None | "nrc" | "nrc6" | FILE), ``emotion_head`` (False), ``emotion_weight`` (1.0), plus the
    modality options of ``Task``.
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
        rule: str = "weighted",
        lexicon: str | None = None,
        emotion_head: bool = False,
        emotion_weight: float = 1.0,
        **common: Any,
    ) -> None:
        super().__init__(context, **common)
        if unit not in ("token", "word"):
            raise ConfigError(f"task {self.name}: unit={unit!r}; use 'token' or 'word'")
        if rule not in RULES:
            raise ConfigError(f"task {self.name}: rule={rule!r}; use one of {', '.join(RULES)}")
        self.unit = unit
        self.emotion = bool(emotion)
        if not self.emotion and (rule != "weighted" or lexicon is not None or emotion_head):
            raise ConfigError(
                f"task {self.name}: rule, lexicon and emotion_head are emotion-word options; use melm or melm_wwm"
            )
        self.rule = rule
        self.mask_prob = check_rate("mask_prob", mask_prob)
        self.emo_prob = check_rate("emo_prob", emo_prob)
        memobert_wwm = rule == "memobert" and unit == "word"
        self.replace = ReplaceRates.parse(replace if replace is not None or not memobert_wwm else [1, 0, 0])
        self.random_pool = random_token_pool(self.special)
        self.lexicon: EmotionLexicon | None = None
        self.vocab_tokens: list[str] = []
        if emotion_head and lexicon is None:
            raise ConfigError(
                f"task {self.name}: emotion_head needs the words' categories: give lexicon "
                "(nrc, nrc6 or a word-list file)"
            )
        if lexicon is not None:
            if context.tokenizer is None:
                raise ConfigError(f"task {self.name}: lexicon needs the tokenizer in its TaskContext")
            self.lexicon = load_emotion_lexicon(str(lexicon))
            self.vocab_tokens = context.tokenizer.convert_ids_to_tokens(list(range(len(context.tokenizer))))
        self.emotion_head = bool(emotion_head)
        self.emotion_weight = float(emotion_weight)
        if self.emotion_head:
            self.heads = ("mlm", EMO_WORD_HEAD)
            #: the emotion-category head's size (the model is built with it)
            self.emo_word_classes = self.lexicon.num_classes

    def word_classes(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, L) emotion class of every token under `lexicon` (0: not an emotion word)."""
        ids, word_ids = batch["input_ids"], batch["word_ids"]
        out = torch.zeros(ids.shape, dtype=torch.long)
        for b in range(ids.shape[0]):
            tokens = [self.vocab_tokens[i] for i in ids[b].tolist()]
            out[b] = torch.from_numpy(word_classes(tokens, word_ids[b].tolist(), self.lexicon))
        return out

    def build(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        input_ids = batch["input_ids"]
        maskable = maskable_tokens(input_ids, batch["txt_mask"], self.special, batch.get("ctx_flags"))
        if self.unit == "word":
            units = word_units(batch["word_ids"], maskable)
        else:
            units = token_units(maskable)
        classes = self.word_classes(batch) if self.lexicon is not None else None
        flags = batch["emo_flags"] if classes is None else classes > 0
        exists, is_emo = unit_table(units, flags if self.emotion else None)
        if self.rule == "memobert":
            choose = memobert_melm_chosen if self.unit == "token" else memobert_wwm_chosen
            chosen = choose(exists, is_emo, self.mask_prob, self.emo_prob, generator)
        else:
            probs = (
                melm_unit_probs(exists, is_emo, self.mask_prob, self.emo_prob)
                if self.emotion
                else uniform_unit_probs(exists, self.mask_prob)
            )
            chosen = choose_units(exists, probs, generator)
        masked = mask_tokens(
            input_ids, units, chosen, self.special, self.replace, generator, self.random_pool
        )
        inputs = self.model_inputs(batch)
        inputs["input_ids"] = masked.input_ids
        inputs["mlm_targets"] = masked.targets
        inputs["mlm_index"] = flat_index(masked.targets >= 0)
        if self.emotion_head:
            inputs["emo_word_targets"] = classes.flatten().index_select(0, inputs["mlm_index"])
        return inputs

    def forward(self, model: torch.nn.Module, inputs: Mapping[str, Any]) -> TaskOutput:
        output = self.encode(model, inputs)
        states = segment_states(output, "text")
        result = mlm_loss(model, states, inputs["mlm_targets"], self.name, inputs["mlm_index"])
        if not self.emotion_head:
            return result
        index = inputs["mlm_index"]
        gold = inputs["emo_word_targets"].to(states.device)
        logits = head(model, EMO_WORD_HEAD, self.name)(gather_flat(states, index)).float()
        n = index.numel()
        emo_loss = mean_over(F.cross_entropy(logits, gold, reduction="sum"), n)
        result.loss = result.loss + self.emotion_weight * emo_loss
        result.metrics["emo_acc"] = ratio((logits.argmax(-1) == gold).sum(), result.n_targets)
        return result
