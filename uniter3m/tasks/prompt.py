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

Several templates (``template: ["i am [MASK] .", "i feel [MASK] ."]``): one is drawn per batch.
Per-case condition prompts (MEmoBERT's cross-modal prompts, one task instead of seven):
``case_templates: {"L": "the text says [MASK] .", "LA": "...", ...}`` gives each modality set its own
template(s); its keys are the modality sets unless ``modality_sets`` is given (then every set needs
a template). (``cases`` is the old name of ``modality_sets``, so the mapping has its own name.)

Soft prompts (``soft_prompt: N``): N learned vectors (the model's ``embeddings.soft_prompt``, sized by
its config's ``soft_prompt_tokens``, which pretraining sets from this option) stand right before
every template's words: ``[CLS] <v1> ... <vN> i am [MASK] . text [SEP]``. The ids there are
placeholders (padding) that the model never reads: the batch's ``soft_slots`` marks the positions and
the text embeddings put vector k there, so no token id joins the vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from uniter3m.data.prompts import add_prompt, label_word_ids, soft_prompt_slots, tokenize_template
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
    parse_streams,
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
    counts cut utterances), ``template`` may be a list (one drawn per batch), ``case_templates``
    (modality set -> template or list of templates), ``soft_prompt`` (N learned vectors before each
    template, 0 = none). Accuracy is the argmax over the verbaliser words only. Head: MLM.
    """

    heads = ("mlm",)
    streams = ()

    def __init__(
        self,
        context: TaskContext,
        *,
        verbalizer: Mapping[str, str] | None = None,
        label_column: str | None = None,
        template: str | Sequence[str] = "i am [MASK] .",
        case_templates: Mapping[str, str | Sequence[str]] | None = None,
        position: str = "before",
        loss_over: str = "vocab",
        max_len: int = 512,
        soft_prompt: int = 0,
        **common: Any,
    ) -> None:
        if case_templates and common.get("modality_sets") is None:
            common["modality_sets"] = list(case_templates)
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
        if int(soft_prompt) != soft_prompt or soft_prompt < 0:
            raise ConfigError(f"task {self.name}: soft_prompt={soft_prompt!r}; give a whole number >= 0")
        self.soft_prompt = int(soft_prompt)
        self.label_column = label_column
        self.position = position
        self.loss_over = loss_over
        #: the ids of each template; `prompt_ids` is the first (the only one unless a list is given)
        self.prompts = self.templates(template)
        self.prompt_ids = self.prompts[0]
        self.case_prompts: dict[frozenset[str], list[list[int]]] = {}
        for case, templates in (case_templates or {}).items():
            key = parse_streams(case, f"task {self.name}: case_templates", self.stream_table)
            self.case_prompts[key] = self.templates(templates)
        missing = [s for s in self.modality_sets or [] if case_templates and s not in self.case_prompts]
        if missing:
            letters = self.stream_table.letters()
            named = ["".join(sorted(s, key=letters.index)) for s in missing]
            raise ConfigError(
                f"task {self.name}: modality sets {named} have no case_templates entry; add them"
            )
        self.label_ids = label_word_ids(tokenizer, verbalizer, self.special.unk_id, f"task {self.name}")
        self.word_ids = torch.tensor(list(self.label_ids.values()), dtype=torch.long)
        longest = max(len(p) for prompts in [self.prompts, *self.case_prompts.values()] for p in prompts)
        if max_len < longest + 2:
            raise ConfigError(
                f"task {self.name}: max_len={max_len} leaves no room for the prompt and [CLS]/[SEP]"
            )
        self.max_len = int(max_len)

    def templates(self, value: str | Sequence[str]) -> list[list[int]]:
        """Token ids of one template or of each of a list of them."""
        texts = [value] if isinstance(value, str) else list(value)
        if not texts:
            raise ConfigError(f"task {self.name}: an empty template list; give at least one template")
        mask, soft = self.special.mask_id, [self.special.pad_id] * self.soft_prompt
        return [
            [*soft, *tokenize_template(self.context.tokenizer, t, mask, f"task {self.name}")] for t in texts
        ]

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
        kept = keep_streams(batch, case, self.special, self.stream_table)
        kept["prompt_case"] = case
        return kept

    def build(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        words = self.label_targets(
            batch,
            self.label_column,
            self.label_ids,
            "verbalizer word",
            "add the label to the verbalizer or filter the data",
        )
        prompts = self.case_prompts.get(batch.get("prompt_case"), self.prompts)
        pick = int(torch.randint(len(prompts), (), generator=generator)) if len(prompts) > 1 else 0
        input_ids, txt_mask, positions, truncated = add_prompt(
            batch["input_ids"],
            batch["txt_mask"],
            prompts[pick],
            self.special,
            position=self.position,
            max_len=self.max_len,
            ctx_flags=batch.get("ctx_flags"),
        )
        rows = torch.arange(len(positions))
        targets = torch.full(input_ids.shape, -1, dtype=torch.long)
        targets[rows, positions] = words
        inputs = self.model_inputs(batch)
        inputs.update(input_ids=input_ids, attention_mask=txt_mask, prompt_targets=targets)
        if self.soft_prompt:  # the template's first N ids are the learned vectors' places
            offset = prompts[pick].index(self.special.mask_id)
            inputs["soft_slots"] = soft_prompt_slots(input_ids.shape, positions, offset, self.soft_prompt)
        inputs["prompt_index"] = flat_index(targets >= 0)
        inputs["prompt_truncated"] = torch.tensor(truncated)
        # the label words travel with the batch (copied with it, non-blocking): the step never
        # copies a tensor of the task's from the host (a blocking copy waits for the GPU)
        inputs["prompt_words"] = self.word_ids.clone()
        return inputs

    def forward(self, model: torch.nn.Module, inputs: Mapping[str, Any]) -> TaskOutput:
        output = self.encode(model, inputs)
        states = segment_states(output, "text")
        targets, index = inputs["prompt_targets"], inputs["prompt_index"]
        gold = gather_flat(targets, index)
        n = index.numel()
        total = count(states, n)
        logits = head(model, MLM_HEAD, self.name)(gather_flat(states, index)).float()
        word_ids = inputs["prompt_words"]
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
