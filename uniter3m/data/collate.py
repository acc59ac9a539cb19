"""`Collator`: dataset examples -> the batch dict of DEVELOPERS.md ("Batch").

Text becomes `[CLS] tokens [SEP]` right-padded with [PAD], with `ctx_flags` True on the tokens of
dialogue context (`uniter3m.data.context`; all False for examples without context); each frame stream is right-padded with
zeros and gets a bool mask. A stream is in the batch when the examples carry it (`None` in every
example = not part of this dataset = key absent). An example whose stream has zero frames gets an
all-False mask row, and a batch in which no example has a frame still gets `(B, 0, D)` tensors,
so the model can treat the stream as absent per utterance without a made-up frame.
The frame streams are those of the stream table the collator is given (the run config's; it travels
with the collator to DataLoader workers); per-frame soft labels travel as `<name>_soft`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from uniter3m.data.tokenization import SpecialTokens
from uniter3m.errors import UserError
from uniter3m.streams import StreamTable


def _full(shape: tuple[int, ...], dtype: torch.dtype, fill: float | int | bool = 0) -> torch.Tensor:
    """A filled tensor; inside a DataLoader worker it lives in shared memory from the start.

    A worker must hand every tensor to the main process through shared memory; allocating it
    there (as torch's own default_collate does) saves a copy of each batch, the largest cost of
    a worker after reading the records.
    """
    if get_worker_info() is None:
        return torch.full(shape, fill, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0, dtype=dtype).new(storage).view(shape).fill_(fill)


def _ids_where(examples: Sequence[dict[str, Any]], flags: Sequence[bool]) -> str:
    names = [repr(ex.get("id")) for ex, flag in zip(examples, flags, strict=True) if flag]
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


class Collator:
    """Pad a list of examples into tensors; picklable, so it runs inside DataLoader workers.

    max_txt_len: optional cap on the current utterance's tokens (without [CLS]/[SEP] and context);
        the dataset normally truncates already (and counts it), this only guards examples built
        elsewhere.
    pad_multiple: each stream's padded width is rounded up to a multiple of it (the batch sampler
        counts the same rounding): fewer distinct shapes, though not fewer compiled graphs (see
        `BatchingConfig.pad_multiple`).
    feature_dtype: dtype of the frame tensors ("float16" on GPU: the model casts to its own dtype).
    stream_table: the frame streams to pad (default: face and speech).
    """

    def __init__(
        self,
        special: SpecialTokens,
        max_txt_len: int | None = None,
        pad_multiple: int = 1,
        feature_dtype: str = "float32",
        packing: bool = False,
        stream_table: StreamTable = StreamTable(),
    ):
        self.special = special
        self.packing = packing  # read by the loaders: plan packed rows after the task's prepare
        self.feature_dtype = getattr(torch, feature_dtype)  # float16 halves the host->device copy
        self.max_txt_len = max_txt_len
        self.pad_multiple = int(pad_multiple)  # round each stream's width up
        self.streams = stream_table.names()

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not examples:
            raise UserError("cannot collate an empty batch: the batch sampler produced no items")
        batch: dict[str, Any] = {"ids": [str(ex["id"]) for ex in examples]}
        batch.update(self._text(examples))
        for stream in self.streams:
            batch.update(self._frames(examples, stream))
        batch["labels"] = self._labels(examples)
        soft = self._stack_optional(examples, "soft_labels")
        if soft is not None:
            batch["soft_labels"] = soft
        return batch

    def _text(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sp = self.special
        keeps = [self._keep(ex) for ex in examples]
        tokens = [np.asarray(ex["input_ids"])[keep] for ex, keep in zip(examples, keeps, strict=True)]
        width = self._round(max(len(t) for t in tokens) + 2)
        b = len(examples)
        out = {
            "input_ids": _full((b, width), torch.long, sp.pad_id),
            "txt_mask": _full((b, width), torch.bool, False),
            "word_ids": _full((b, width), torch.long, -1),
            "emo_flags": _full((b, width), torch.bool, False),
            "ctx_flags": _full((b, width), torch.bool, False),
        }
        input_ids, txt_mask, word_ids, emo_flags, ctx_flags = (
            t.numpy() for t in out.values()
        )  # views to fill
        for i, (ex, tok, cut) in enumerate(zip(examples, tokens, keeps, strict=True)):
            n = len(tok)
            input_ids[i, 0] = sp.cls_id
            input_ids[i, 1 : n + 1] = tok
            input_ids[i, n + 1] = sp.sep_id
            txt_mask[i, : n + 2] = True
            word_ids[i, 1 : n + 1] = np.asarray(ex["word_ids"])[cut]
            emo_flags[i, 1 : n + 1] = np.asarray(ex["emo_flags"])[cut]
            if ex.get("ctx_flags") is not None:
                ctx_flags[i, 1 : n + 1] = np.asarray(ex["ctx_flags"])[cut]
        return out

    def _keep(self, example: dict[str, Any]) -> slice | np.ndarray:
        """Which tokens to keep: all context, and the first `max_txt_len` of the current utterance."""
        if self.max_txt_len is None:
            return slice(None)
        ctx = example.get("ctx_flags")
        if ctx is None:
            return slice(None, self.max_txt_len)
        ctx = np.asarray(ctx, dtype=bool)
        return ctx | (np.cumsum(~ctx) <= self.max_txt_len)

    def _frames(self, examples: Sequence[dict[str, Any]], stream: str) -> dict[str, torch.Tensor]:
        feats = [ex.get(stream) for ex in examples]
        present = [f is not None for f in feats]
        if not any(present):
            return {}
        if not all(present):
            raise UserError(
                f"a batch mixes examples with a {stream} stream and without one (no {stream}: "
                f"{_ids_where(examples, [not p for p in present])}); every corpus of one dataset needs a {stream} db, "
                "or leave the stream out with modalities="
            )
        dims = {f.shape[1] if f.ndim == 2 else -1 for f in feats}
        if len(dims) > 1 or -1 in dims:
            raise UserError(
                f"{stream} features of one batch differ in shape ({sorted({tuple(f.shape) for f in feats})}): "
                "every example needs (T, D) frames with one D; rebuild the feature databases with one extractor"
            )
        dim = dims.pop()
        b, t = len(feats), self._round(max(f.shape[0] for f in feats))
        out = {
            f"{stream}_feat": _full((b, t, dim), self.feature_dtype),
            f"{stream}_mask": _full((b, t), torch.bool),
        }
        feat, mask = out[f"{stream}_feat"].numpy(), out[f"{stream}_mask"].numpy()
        for i, f in enumerate(feats):
            feat[i, : len(f)] = f
            mask[i, : len(f)] = True
        soft_key = f"{stream}_soft"
        softs = [ex.get(soft_key) for ex in examples]
        if any(s is not None for s in softs):
            if any(s is None for s in softs):
                raise UserError(
                    f"a batch mixes examples with and without {soft_key} (none for "
                    f"{_ids_where(examples, [s is None for s in softs])}); build every {stream} db with soft labels"
                )
            classes = {s.shape[1] for s in softs}
            if len(classes) > 1:
                raise UserError(f"{soft_key} of one batch have different class counts {sorted(classes)}")
            out[soft_key] = _full((b, t, classes.pop()), torch.float32)
            soft = out[soft_key].numpy()
            for i, s in enumerate(softs):
                soft[i, : len(s)] = s
        return out

    def _round(self, width: int) -> int:
        m = self.pad_multiple
        return (width + m - 1) // m * m

    @staticmethod
    def _labels(examples: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
        """Raw label values per column; a column an example lacks gets None there."""
        columns: dict[str, None] = {}
        for ex in examples:
            columns.update(dict.fromkeys(ex.get("labels") or {}))
        return {col: [(ex.get("labels") or {}).get(col) for ex in examples] for col in columns}

    @staticmethod
    def _stack_optional(examples: Sequence[dict[str, Any]], key: str) -> torch.Tensor | None:
        values = [ex.get(key) for ex in examples]
        if all(v is None for v in values):
            return None
        if any(v is None for v in values):
            raise UserError(
                f"a batch mixes examples with and without {key} (none for "
                f"{_ids_where(examples, [v is None for v in values])}); label every text db of the dataset alike"
            )
        try:
            return torch.from_numpy(np.stack([np.asarray(v, dtype=np.float32) for v in values]))
        except ValueError as err:
            raise UserError(
                f"{key} of one batch differ in shape ({err}); use one label set per dataset"
            ) from err
