"""ITM as ranking (``itm_rank``): the positive against K negatives, MEmoBERT's hard-negative study
(one positive, 150 negatives).

The text and the frames of each utterance are encoded apart (one backbone call,
``matching.encode_streams_alone``), mean-pooled and L2-normalised; the text must pick its own frames
among the batch's other utterances' frames and a memory queue of frame embeddings from past steps
(MoCo's queue: detached, first in first out), K = ``negatives`` candidates besides the positive.
Loss: cross-entropy over the K + 1 scores (cosine / ``temperature``), mean over the utterances with
text and frames. The queue lives in the task (per process, as in-batch negatives are per rank);
checkpoints save each rank's queue (``state_dict``), so a resumed run ranks against the same one.

Emotion-aware ranking (``label_column``): candidates of the text's own emotion are not negatives.
``same_emotion: "exclude"`` (default) leaves them out of the softmax, ``"positive"`` counts them as
further positives (the loss is −log of the probability mass on all positives); see
``matching`` (emotion_itm) for why "exclude" is the default.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from uniter3m.errors import ConfigError, UserError
from uniter3m.model.uniter import unwrap
from uniter3m.tasks.base import Task, TaskContext, TaskOutput, count, ratio, text_absent, zero_loss
from uniter3m.tasks.matching import SAME_EMOTION, encode_streams_alone


def label_codes(labels: Sequence[Any]) -> torch.Tensor:
    """Stable integer codes of label strings (the same in every worker process and step)."""
    return torch.tensor([zlib.crc32(str(v).encode("utf-8")) for v in labels], dtype=torch.long)


class RankingTask(Task):
    """``itm_rank``. Options: ``negatives`` (K, 150), ``queue`` (past frame embeddings kept, default
    K), ``temperature`` (0.07), ``frames`` (the frame streams matched with the text together, e.g.
    "VA"; default every frame stream the batch has), ``label_column`` and ``same_emotion``
    (emotion-aware ranking), plus the modality options of ``Task``. No head: the backbone's pooled
    states are compared directly."""

    heads = ()
    streams = ("L",)

    def __init__(
        self,
        context: TaskContext,
        *,
        negatives: int = 150,
        queue: int | None = None,
        temperature: float = 0.07,
        frames: str | None = None,
        label_column: str | None = None,
        same_emotion: str = "exclude",
        **common: Any,
    ) -> None:
        super().__init__(context, **common)
        if int(negatives) != negatives or negatives < 1:
            raise ConfigError(f"task {self.name}: negatives={negatives} must be a whole number >= 1")
        self.negatives = int(negatives)
        self.queue_size = self.negatives if queue is None else int(queue)
        if self.queue_size < 0:
            raise ConfigError(f"task {self.name}: queue={queue} must be >= 0")
        if not float(temperature) > 0:
            raise ConfigError(f"task {self.name}: temperature={temperature} must be > 0")
        self.temperature = float(temperature)
        letters = self.stream_table.letters()
        self.frames = None
        if frames is not None:
            parsed = self.stream_table.parse_modalities(frames, f"task {self.name}: frames")
            if "L" in parsed:
                raise ConfigError(f"task {self.name}: frames={frames!r} must name frame streams only")
            self.frames = "".join(sorted(parsed, key=letters.index))
        if same_emotion not in SAME_EMOTION:
            raise ConfigError(f"task {self.name}: same_emotion={same_emotion!r}; use one of {SAME_EMOTION}")
        self.label_column = label_column
        self.same_emotion = same_emotion
        self.bank: torch.Tensor | None = None  # (M, H) past frame embeddings, newest first
        self.bank_codes: torch.Tensor | None = None  # (M,) their emotion codes

    def build(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        present = self.batch_streams(batch)
        group = self.frames or "".join(s for s in self.stream_table.frame_letters() if s in present)
        if not group or not set(group) <= present or text_absent(batch, self.special):
            raise UserError(
                f"task {self.name} ranks frames ({group or 'none'}) for the text but the batch (ids "
                f"{list(batch.get('ids', []))[:3]}...) lacks them: give it text and feature dbs"
            )
        inputs = self.model_inputs(batch)
        bsz = batch["input_ids"].shape[0]
        inputs["has_text"] = torch.ones(bsz, dtype=torch.bool)
        has_frames = torch.stack([batch[self.stream_table.get(s).mask_key].bool().any(1) for s in group]).any(
            0
        )
        inputs["rank_group"] = group
        inputs["rank_rows"] = has_frames.nonzero().squeeze(1)
        if self.label_column is not None:
            column = self.label_values(batch, self.label_column)
            inputs["rank_codes"] = label_codes(column).index_select(0, inputs["rank_rows"])
        return inputs

    def forward(self, model: torch.nn.Module, inputs: Mapping[str, Any]) -> TaskOutput:
        group = inputs["rank_group"]
        embedded = encode_streams_alone(model, inputs, ["L", group], self.stream_table)
        rows = inputs["rank_rows"]
        n = rows.numel()  # known on the host: no sync
        text = embedded["L"][0].index_select(0, rows.to(embedded["L"][0].device))
        frames = embedded[group][0].index_select(0, rows.to(text.device))
        codes = inputs.get("rank_codes")
        room = max(self.negatives - (n - 1), 0)
        bank = self.bank[:room] if self.bank is not None else frames[:0]
        candidates = torch.cat([frames, bank.to(frames.device, frames.dtype)])
        logits = text @ candidates.T / self.temperature
        gold = torch.arange(n, device=logits.device)
        positive = gold[:, None] == torch.arange(candidates.shape[0], device=logits.device)[None, :]
        if codes is not None:
            bank_codes = self.bank_codes[:room] if self.bank_codes is not None else codes[:0]
            all_codes = torch.cat([codes.to(logits.device), bank_codes.to(logits.device)])
            same = codes.to(logits.device)[:, None] == all_codes[None, :]
            if self.same_emotion == "exclude":
                logits = logits.masked_fill(same & ~positive, float("-inf"))
            else:
                positive = positive | same
        if unwrap(model).training:  # validation batches never enter the queue
            self.remember(frames.detach(), codes)
        metrics = {"candidates": ratio(count(logits, candidates.shape[0] * n), count(logits, max(n, 1)))}
        if n == 0:
            return TaskOutput(zero_loss(embedded["L"][0]), count(logits, 0), metrics)
        per_row = torch.logsumexp(logits, 1) - torch.logsumexp(
            logits.masked_fill(~positive, float("-inf")), 1
        )
        total = count(logits, n)
        metrics["acc"] = ratio(positive.gather(1, logits.argmax(1, keepdim=True)).sum(), total)
        metrics["chance"] = ratio((positive.sum(1) / torch.isfinite(logits).sum(1)).sum(), total)
        return TaskOutput(per_row.sum() / n, total, metrics)

    def state_dict(self) -> dict[str, Any]:
        """The queue (on the CPU), saved with every checkpoint."""
        return {
            k: None if v is None else v.cpu() for k, v in (("bank", self.bank), ("codes", self.bank_codes))
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.bank, self.bank_codes = state.get("bank"), state.get("codes")

    def remember(self, frames: torch.Tensor, codes: torch.Tensor | None) -> None:
        """Put this step's frame embeddings at the front of the queue (newest first), drop the oldest."""
        if not self.queue_size:
            return
        old = self.bank if self.bank is not None else frames[:0]
        self.bank = torch.cat([frames, old.to(frames.device)])[: self.queue_size]
        if codes is not None:
            old_codes = self.bank_codes if self.bank_codes is not None else codes[:0]
            self.bank_codes = torch.cat([codes, old_codes.to(codes.device)])[: self.queue_size]
