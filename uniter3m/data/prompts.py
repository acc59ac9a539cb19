"""The one prompt builder: templates, label words and `[CLS] text prompt [SEP]` batches.

Used by the pretraining prompt objectives and by the fine-tuning prompt head alike, so a prompt
means the same thing in both. A template holds the tokenizer's mask token exactly once
(`"i am [MASK] ."`); label words must be single word pieces of the vocabulary (a multi-piece
or unknown word is an error naming it, never a silent [UNK] target). Runs on CPU in the data
workers: the model only receives the finished ids and the mask positions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from uniter3m.data.tokenization import SpecialTokens
from uniter3m.errors import ConfigError


def tokenize_template(tokenizer: Any, template: str, mask_id: int, where: str) -> list[int]:
    """Token ids of `template` with its single mask token as `mask_id`."""
    mask_token = tokenizer.mask_token
    parts = template.split(mask_token)
    if len(parts) != 2:
        raise ConfigError(
            f"{where}: template {template!r} must contain the mask token {mask_token!r} exactly once, "
            f"e.g. 'i am {mask_token} .'"
        )
    left, right = (
        tokenizer(p.strip(), add_special_tokens=False)["input_ids"] if p.strip() else [] for p in parts
    )
    return [*left, mask_id, *right]


def label_word_ids(
    tokenizer: Any,
    verbalizer: Mapping[str, str],
    unk_id: int,
    where: str,
    classes: Sequence[str] | None = None,
) -> dict[str, int]:
    """Label -> id of its single-piece word (in `classes` order when given); every problem in one error."""
    problems = []
    if classes is not None:
        missing = [c for c in classes if c not in verbalizer]
        if missing:
            problems.append(f"no word for classes {missing}; give one word per class")
    labels = list(classes) if classes is not None else list(verbalizer)
    ids: dict[str, int] = {}
    for label in labels:
        if label not in verbalizer:
            continue
        word = verbalizer[label]
        pieces = tokenizer(str(word), add_special_tokens=False)["input_ids"]
        if len(pieces) != 1 or pieces[0] == unk_id:
            shown = tokenizer.convert_ids_to_tokens(pieces)
            problems.append(f"{label!r} -> {word!r} is {shown} (needs exactly one known word piece)")
        else:
            ids[str(label)] = int(pieces[0])
    seen: dict[int, str] = {}
    for label, tid in ids.items():
        if tid in seen:
            problems.append(f"{seen[tid]!r} and {label!r} map to the same word {verbalizer[label]!r}")
        seen[tid] = label
    if problems:
        raise ConfigError(f"{where}: bad verbalizer: " + "; ".join(problems) + "; choose single-piece words")
    return ids


def add_prompt(
    input_ids: torch.Tensor,
    txt_mask: torch.Tensor,
    prompt_ids: Sequence[int],
    special: SpecialTokens,
    *,
    position: str = "after",
    max_len: int = 512,
    ctx_flags: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """`[CLS] text [SEP]` rows -> `[CLS] prompt text [SEP]` ("before") or `[CLS] text prompt [SEP]`.

    With dialogue context (`ctx_flags`: `uniter3m.data.context`) the prompt goes beside the current
    utterance, never into the context: `[CLS] context prompt text [SEP]` / `[CLS] prompt text [SEP
    context] [SEP]`, or with the prompt "after", `[CLS] context text prompt [SEP]` / `[CLS] text prompt
    [SEP context] [SEP]`, so it asks about the current utterance only. The text is cut (never the
    prompt) so that each row fits `max_len`: the farthest context tokens first (the end of context
    after the utterance, the start of context before it), then the end of the current utterance. Returns the new ids, their mask, the position of
    the prompt's mask token in each row (B,), and how many rows were cut.
    """
    prompt = list(prompt_ids)
    if prompt.count(special.mask_id) != 1:
        raise ConfigError(f"a prompt must hold exactly one mask token; its ids are {prompt}")
    room = max_len - 2 - len(prompt)
    if room < 0:
        raise ConfigError(f"max_len={max_len} leaves no room for the prompt and [CLS]/[SEP]")
    offset = prompt.index(special.mask_id)
    flags = torch.zeros_like(txt_mask, dtype=torch.bool) if ctx_flags is None else ctx_flags.bool()
    rows: list[list[int]] = []
    positions: list[int] = []
    truncated = 0
    for ids, real, ctx_row in zip(input_ids, txt_mask.bool(), flags, strict=True):
        body, is_ctx = ids[real].tolist(), ctx_row[real].tolist()
        keep = [c or t not in (special.cls_id, special.sep_id) for t, c in zip(body, is_ctx, strict=True)]
        body, is_ctx = [t for t, k in zip(body, keep) if k], [c for c, k in zip(is_ctx, keep) if k]
        cur = [i for i, c in enumerate(is_ctx) if not c]
        first, last = (cur[0], cur[-1] + 1) if cur else (len(body), len(body))
        before, text, after = body[:first], body[first:last], body[last:]
        over = len(before) + len(text) + len(after) - room
        if over > 0:  # the farthest context first (the end of what follows, the start of what precedes)
            truncated += 1
            cut = min(over, len(after))
            after, over = after[: len(after) - cut], over - cut
            cut = min(over, len(before))
            before, over = before[cut:], over - cut
            text = text[: len(text) - over] if over > 0 else text
        middle = prompt + text if position == "before" else text + prompt
        start = 1 + len(before) + (0 if position == "before" else len(text))
        rows.append([special.cls_id, *before, *middle, *after, special.sep_id])
        positions.append(start + offset)
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), special.pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = True
    return out, mask, torch.tensor(positions, dtype=torch.long), truncated


def soft_prompt_slots(
    shape: Sequence[int], positions: torch.Tensor, mask_offset: int, count: int
) -> torch.Tensor:
    """(B, L) soft-prompt slots of rows built by `add_prompt` from a template whose first `count` ids are
    placeholders for the learned prompt vectors: slot k at the template's k-th position, -1 elsewhere
    (the model's `soft_slots`). `mask_offset` = the mask token's index in the template."""
    slots = torch.full(tuple(shape), -1, dtype=torch.long)
    rows = torch.arange(len(positions))
    k = torch.arange(count)
    start = positions - mask_offset
    slots[rows[:, None], start[:, None] + k[None, :]] = k.expand(len(rows), -1)
    return slots
