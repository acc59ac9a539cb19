"""Tuple InfoNCE over (text, face, speech) (``tuple_contrastive``; Liu et al. 2021, TupleInfoNCE).

The pairwise ``contrastive`` task aligns two streams at a time; here the unit is the whole tuple,
encoded jointly (all its streams in one sequence, mean-pooled, L2-normalised). For utterance i the
anchor is its tuple; the positive is the same tuple encoded again (a second dropout view, SimCSE's
augmentation); the negatives are the batch's other tuples and, for each stream s, i's tuple with
s taken from another utterance (a "disturbed" tuple, which differs from the anchor in s alone, so
the fused embedding must notice every stream, not only the easiest one). Loss: cross-entropy over
(1 + (n − 1) + S) scores (cosine / ``temperature``), mean over the utterances that have every stream.
All copies go through the backbone in ONE call (2 + S copies of the batch).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from uniter3m.errors import ConfigError, UserError
from uniter3m.streams import TEXT_LETTER
from uniter3m.tasks.base import (
    Task,
    TaskContext,
    TaskOutput,
    call_model,
    count,
    parse_streams,
    ratio,
    text_absent,
    zero_loss,
)
from uniter3m.tasks.matching import pooled


class TupleContrastiveTask(Task):
    """Options: ``streams_used`` (the tuple's streams, default every stream the batch has, at least
    two), ``temperature`` (0.07), plus the modality options of ``Task``. No head."""

    heads = ()

    def __init__(
        self,
        context: TaskContext,
        *,
        streams_used: str | list[str] | None = None,
        temperature: float = 0.07,
        **common: Any,
    ) -> None:
        super().__init__(context, **common)
        self.tuple_streams = None
        if streams_used is not None:
            self.tuple_streams = parse_streams(
                streams_used, f"task {self.name}: streams_used", self.stream_table
            )
            if len(self.tuple_streams) < 2:
                raise ConfigError(
                    f"task {self.name}: streams_used={streams_used!r} needs two streams or more"
                )
        if not float(temperature) > 0:
            raise ConfigError(f"task {self.name}: temperature={temperature} must be > 0")
        self.temperature = float(temperature)

    def build(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        present = set(self.batch_streams(batch))
        if text_absent(batch, self.special):
            present.discard(TEXT_LETTER)
        streams = self.tuple_streams or frozenset(present)
        letters = self.stream_table.letters()
        if len(streams) < 2 or not streams <= present:
            raise UserError(
                f"task {self.name} needs the streams {''.join(sorted(streams, key=letters.index))} but the batch "
                f"(ids {list(batch.get('ids', []))[:3]}...) has {''.join(sorted(present, key=letters.index))}"
            )
        order = sorted(streams, key=letters.index)
        bsz = batch["input_ids"].shape[0]
        has = torch.ones(bsz, dtype=torch.bool)
        for s in order:
            if s != TEXT_LETTER:
                has &= batch[self.stream_table.get(s).mask_key].bool().any(1)
        rows = has.nonzero().squeeze(1)
        # per copy and stream, the row each position reads: anchor, view, then one disturbed copy per stream
        own = torch.arange(bsz)
        source = {s: [own, own] for s in order}
        for disturbed in order:
            donors = own.clone()
            if rows.numel() > 1:  # another usable row, uniformly
                shift = torch.randint(1, rows.numel(), (rows.numel(),), generator=generator)
                donors[rows] = rows[(torch.arange(rows.numel()) + shift) % rows.numel()]
            for s in order:
                source[s].append(donors if s == disturbed else own)
        inputs = self.model_inputs(batch)
        index = {s: torch.cat(parts) for s, parts in source.items()}
        text_rows = index[TEXT_LETTER] if TEXT_LETTER in index else own.repeat(2 + len(order))
        inputs["input_ids"] = batch["input_ids"].index_select(0, text_rows)
        inputs["attention_mask"] = batch["txt_mask"].index_select(0, text_rows)
        if TEXT_LETTER not in streams:  # text outside the tuple: only [CLS] rides along
            first = torch.arange(inputs["attention_mask"].shape[1]) == 0
            inputs["attention_mask"] = inputs["attention_mask"].bool() & first
        for s in self.stream_table.frame_streams():
            if inputs.get(s.feat_key) is None:
                continue
            if s.letter in streams:
                inputs[s.feat_key] = batch[s.feat_key].index_select(0, index[s.letter])
                inputs[s.mask_key] = batch[s.mask_key].index_select(0, index[s.letter])
            else:  # a stream outside the tuple is left out
                inputs.pop(s.feat_key)
                inputs.pop(s.mask_key)
        inputs["tuple_rows"] = rows
        inputs["tuple_copies"] = 2 + len(order)
        return inputs

    def forward(self, model: torch.nn.Module, inputs: Mapping[str, Any]) -> TaskOutput:
        kwargs = {k: inputs[k] for k in self.model_keys if inputs.get(k) is not None}
        kwargs["padded"] = True
        embedded = pooled(call_model(model, **kwargs))
        copies = inputs["tuple_copies"]
        bsz = embedded.shape[0] // copies
        rows = inputs["tuple_rows"].to(embedded.device)
        n = rows.numel()  # known on the host: no sync
        views = [embedded[k * bsz : (k + 1) * bsz].index_select(0, rows) for k in range(copies)]
        anchor, positive, disturbed = views[0], views[1], views[2:]
        batch_scores = anchor @ positive.T  # (n, n): the diagonal is the positive
        own_disturbed = torch.stack([(anchor * d).sum(-1) for d in disturbed], 1)  # (n, S)
        logits = torch.cat([batch_scores, own_disturbed], 1) / self.temperature
        gold = torch.arange(n, device=logits.device)
        total = count(embedded, n)
        metrics = {"chance": ratio(count(embedded, n), count(embedded, max(n, 1) * max(logits.shape[1], 1)))}
        if n < 2:
            return TaskOutput(zero_loss(embedded), count(embedded, 0), metrics)
        loss = F.cross_entropy(logits, gold, reduction="sum") / n
        metrics["acc"] = ratio((logits.argmax(1) == gold).sum(), total)
        metrics["disturbed_acc"] = ratio(
            (batch_scores.diagonal()[:, None] > own_disturbed).all(1).sum(), total
        )
        return TaskOutput(loss, total, metrics)
