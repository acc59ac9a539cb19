"""Prompt-based masked emotion prediction (MEmoBERT's prompt objective) and its cross-modal form.

A template with one mask token, e.g. ``"i am [MASK] ."``, is joined to the text (``position``
"before" or "after" it) and the model must put the verbaliser word of the utterance's emotion at
the mask: ``verbalizer = {"anger": "angry", "joy": "happy", ...}``. Verbaliser words must be
single word pieces of the tokenizer (else a ConfigError names the word and its pieces); the
template and words are tokenised with the context's tokenizer, never hard-coded ids.

Cross-modal form (``prompt_cross``): each batch draws one modality set among ``modality_sets``
(default the 7 sets L, V, A, LV, LA, VA, LVA); without L the utterance's text is removed and only
``[CLS] prompt [SEP]`` plus the face and/or speech frames remain. ``prompt`` keeps every stream
the batch has unless ``modality_sets`` is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from uniter3m.data.labels import lookup_targets
from uniter3m.data.prompts import add_prompt, label_word_ids, tokenize_template
from uniter3m.errors import ConfigError, UserError
from uniter3m.tasks.base import (
    Task,
    TaskContext,
    TaskOutput,
    count,
    flat_index,
    gather_flat,
    head,
    keep_streams,
    mean_over,
    ratio,
    segment_states,
    wants_chance,
)
from uniter3m.tasks.chance import majority
from uniter3m.tasks.mlm import MLM_HEAD


class PromptTask(Task):
    """Prompt mask. Loss: cross-entropy at the one mask position per utterance, mean over utterances.

    Options: ``verbalizer`` (label -> word, required), ``label_column`` (the batch ``labels`` column,
    required), ``template`` ("i am [MASK] ."), ``position`` ("before" | "after" the text),
    ``modality_sets`` (one drawn per batch, e.g. ["V", "LV"]; each set's face/speech streams must
    be in the batch), ``modality_weights`` (sampling weights), ``loss_over`` ("vocab": softmax over the
    whole vocabulary as in MLM, or "verbalizer": over the verbaliser words only), ``max_len`` (512:
    the text is cut, never the prompt, so that [CLS] + prompt + text + [SEP] fits; ``truncated``
    counts cut utterances). Accuracy is the argmax over the verbaliser words only. Head: MLM.
    """

    heads = ("mlm",)
    streams = ()

    def __init__(
        self,
        context: TaskContext,
        *,
        verbalizer: Mapping[str, str] | None = None,
        label_column: str | None = None,
        template: str = "i am [MASK] .",
        position: str = "before",
        loss_over: str = "vocab",
        max_len: int = 512,
        **common: Any,
    ) -> None:
        super().__init__(context, **common)
        tokenizer = context.tokenizer
        if tokenizer is None:
            raise ConfigError(
                f"task {self.name} needs the tokenizer in its TaskContext (template, verbalizer)"
            )
        if not verbalizer:
            raise ConfigError(f'task {self.name}: give verbalizer, e.g. {{"anger": "angry", "joy": "happy"}}')
        if not label_column:
            raise ConfigError(f"task {self.name}: give label_column, the label column of the text db")
        if position not in ("before", "after"):
            raise ConfigError(f"task {self.name}: position={position!r}; use 'before' or 'after'")
        if loss_over not in ("vocab", "verbalizer"):
            raise ConfigError(f"task {self.name}: loss_over={loss_over!r}; use 'vocab' or 'verbalizer'")
        self.label_column = label_column
        self.position = position
        self.loss_over = loss_over
        self.prompt_ids = tokenize_template(tokenizer, template, self.special.mask_id, f"task {self.name}")
        self.label_ids = label_word_ids(tokenizer, verbalizer, self.special.unk_id, f"task {self.name}")
        self.word_ids = torch.tensor(list(self.label_ids.values()), dtype=torch.long)
        if max_len < len(self.prompt_ids) + 2:
            raise ConfigError(
                f"task {self.name}: max_len={max_len} leaves no room for the prompt and [CLS]/[SEP]"
            )
        self.max_len = int(max_len)

    def drop_modalities(self, batch: Mapping[str, Any], generator: torch.Generator) -> dict[str, Any]:
        case = self.sample_subset(generator)
        if case is None:
            return dict(batch)
        missing = sorted(case - self.batch_streams(batch))
        if missing:
            letters, names = self.stream_table.letters(), self.stream_table.modality_names()
            raise UserError(
                f"task {self.name}: case {''.join(sorted(case, key=letters.index))} needs "
                f"{', '.join(names[m] for m in missing)} but the batch (ids {list(batch.get('ids', []))[:3]}...) "
                "has none: remove the case or give the task a dataset with that stream"
            )
        return keep_streams(batch, case, self.special, self.stream_table)

    def label_targets(self, batch: Mapping[str, Any]) -> torch.Tensor:
        column = batch.get("labels", {}).get(self.label_column)
        ids = list(batch.get("ids", []))
        if column is None:
            raise UserError(
                f"task {self.name}: the batch has no label column {self.label_column!r} "
                f"(columns: {sorted(batch.get('labels', {}))}); set label_column to one of them"
            )
        out = lookup_targets(
            column,
            self.label_ids,
            what="verbalizer word",
            where=f"task {self.name}",
            ids=ids,
            fix="add the label to the verbalizer or filter the data",
        )
        return torch.tensor(out, dtype=torch.long)

    def build(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        words = self.label_targets(batch)
        input_ids, txt_mask, positions, truncated = add_prompt(
            batch["input_ids"],
            batch["txt_mask"],
            self.prompt_ids,
            self.special,
            position=self.position,
            max_len=self.max_len,
            ctx_flags=batch.get("ctx_flags"),
        )
        targets = torch.full(input_ids.shape, -1, dtype=torch.long)
        targets[torch.arange(len(positions)), positions] = words
        inputs = self.model_inputs(batch)
        inputs.update(input_ids=input_ids, attention_mask=txt_mask, prompt_targets=targets)
        inputs["prompt_index"] = flat_index(targets >= 0)
        inputs["prompt_truncated"] = torch.tensor(truncated)
        return inputs

    def forward(self, model: torch.nn.Module, inputs: Mapping[str, Any]) -> TaskOutput:
        output = self.encode(model, inputs)
        states = segment_states(output, "text")
        targets, index = inputs["prompt_targets"], inputs["prompt_index"]
        gold = gather_flat(targets, index)
        n = index.numel()
        total = count(states, n)
        logits = head(model, MLM_HEAD, self.name)(gather_flat(states, index)).float()
        word_ids = self.word_ids.to(logits.device)
        word_logits = logits[:, word_ids]
        gold_word = (gold[:, None] == word_ids[None, :]).float().argmax(1)
        if self.loss_over == "vocab":
            loss = mean_over(F.cross_entropy(logits, gold, reduction="sum"), n)
        else:
            loss = mean_over(F.cross_entropy(word_logits, gold_word, reduction="sum"), n)
        correct = (word_logits.argmax(1) == gold_word).sum()
        metrics = {"acc": ratio(correct, total), "truncated": ratio(inputs["prompt_truncated"], total)}
        if wants_chance(model):
            metrics["chance"] = majority(gold_word, len(word_ids))
        return TaskOutput(loss, total, metrics)
