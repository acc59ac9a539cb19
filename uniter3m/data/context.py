"""Conversation context for the text stream: the previous turns of the same dialogue.

Dialogue corpora (MELD, IEMOCAP) are read utterance by utterance, but the strongest published
systems classify an utterance with the turns before it (COSMIC). `DialogueContext` says how many
previous turns to prepend, whether to prefix each turn with its speaker, and the token budget of
everything context adds; `plan_context` decides, from the text db's index alone (plus the speaker
labels when asked), which turns every utterance gets; `assemble` builds the token row.

Layout of the text an utterance then carries (the collator adds [CLS] and the final [SEP]):

    position "before" (default):  [CLS] spk_3 : turn_-3 [SEP] spk_2 : turn_-2 [SEP] spk_1 : turn_-1 [SEP] spk_0 : current [SEP]
    position "after":             [CLS] spk_0 : current [SEP] spk_1 : turn_-1 [SEP] spk_2 : turn_-2 [SEP] ... [SEP]

"before" reads in dialogue order (as COSMIC / EmoBERTa-style inputs do); "after" keeps the current
utterance at the positions it has without context (right after [CLS]), which a small model
fine-tuned briefly may need less training to use. A prompt (`add_prompt`) always sits beside the
current utterance, never inside the context. Every token context adds (the
previous turns, their [SEP], and every speaker prefix, the current one's too) is flagged in
`ctx_flags`: masking objectives never choose them and prompts target only the current
utterance; fine-tuning simply sees the longer input.

Rules (counted in `ContextReport`, printed once per dataset):
- dialogue order comes from the id: `<dialogue>_<turn>` with an integer turn (MELD
  `<split>_<Dialogue_ID>_<Utterance_ID>`, IEMOCAP `<dialogue>_<turn>`); an id without it is an
  error naming the db, the id and the fix;
- only turns present in the same db are context (a dialogue never crosses dbs or splits: the
  MELD ids carry their split);
- the budget `max_context_tokens` counts every context token; when the turns do not fit, the OLDEST
  tokens go first: older turns are dropped whole, and the oldest turn kept may lose its start;
  the current utterance is never cut for context (only by `max_txt_len`, as without context).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import ConfigDict, Field, ValidationError

from uniter3m.config import StrictModel, format_validation_error
from uniter3m.data.store import DbReader
from uniter3m.errors import ConfigError, DatabaseError

log = logging.getLogger(__name__)

SPEAKER_COLUMNS = ("speaker", "Speaker", "SPEAKER")
SPEAKER_SUFFIX = ":"  # "chandler : how are you" once tokenised


class DialogueContext(StrictModel):
    """`data.context`: prepend up to `turns` previous turns of the utterance's dialogue to its text.

    `max_context_tokens`: budget of every token context adds (turns, their [SEP], speaker prefixes), the
    oldest tokens cut first; `speakers`: prefix every turn (the current one too) with "<speaker> :",
    read from the text db's label column `speaker_column` (default: the first of
    speaker/Speaker/SPEAKER it has); `position`: context "before" the current utterance (dialogue
    order) or "after" it (newest turn first). `max_txt_len` keeps limiting the current utterance
    only. The config section and the dataset's argument are this one model.
    """

    model_config = ConfigDict(frozen=True)  # merged with StrictModel's: unknown keys stay errors

    turns: int = Field(ge=1)
    max_context_tokens: int = Field(128, ge=1)
    speakers: bool = False
    speaker_column: str | None = None
    position: Literal["before", "after"] = "before"

    @classmethod
    def parse(cls, value: DialogueContext | Mapping[str, Any] | None) -> DialogueContext | None:
        """None, an instance or a mapping with the keys of the `data.context` config section."""
        if value is None or isinstance(value, DialogueContext):
            return value
        try:
            return cls.model_validate(dict(value))
        except ValidationError as err:
            raise format_validation_error(err, "data.context") from None


@dataclass
class ContextReport:
    """What context planning did, summed over the dbs of one dataset."""

    utterances: int = 0  # utterances of the dataset
    with_context: int = 0  # utterances that got at least one previous turn
    turns_used: int = 0  # previous turns kept (whole or shortened)
    turns_available: int = 0  # previous turns within `turns` that the db holds
    turns_dropped: int = 0  # turns within `turns` left out whole by the budget
    turns_shortened: int = 0  # turns kept without their start by the budget
    tokens: int = 0  # context tokens added over the dataset

    def add(self, other: ContextReport) -> None:
        """Add another db's counts to these (a dataset spans several text dbs)."""
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)

    @property
    def turns_cut(self) -> int:
        """Turns the budget cut: dropped whole or shortened."""
        return self.turns_dropped + self.turns_shortened

    def line(self) -> str:
        mean = self.tokens / max(self.with_context, 1)
        return (
            f"context: {self.with_context} of {self.utterances} utterances got previous turns "
            f"({self.turns_used} turns, {mean:.1f} context tokens per utterance with context); "
            f"the token budget cut {self.turns_cut} of {self.turns_available} turns "
            f"({self.turns_dropped} dropped whole, {self.turns_shortened} lost their start)"
        )


@dataclass
class ContextPlan:
    """Per utterance of the dataset: its context turns `[(uid, first token kept)]`, oldest first,
    the speaker prefix ids of those turns and of the utterance, and the context length."""

    turns: list[list[tuple[str, int]]]
    prefixes: list[list[list[int]]]  # per utterance: one prefix per context turn, then the current one's
    lengths: np.ndarray  # context tokens per utterance (int64)
    report: ContextReport = field(default_factory=ContextReport)


def dialogue_position(db_path: object, uid: str) -> tuple[str, int]:
    """`<dialogue>_<turn>` -> (dialogue, turn); anything else is an error naming db, id and fix."""
    dialogue, sep, turn = uid.rpartition("_")
    try:
        if not sep or not dialogue:
            raise ValueError
        return dialogue, int(turn)
    except ValueError:
        raise DatabaseError(
            f"{db_path}: id {uid!r} carries no dialogue order; data.context needs ids "
            "`<dialogue>_<turn>` with an integer turn (MELD `<split>_<Dialogue_ID>_<Utterance_ID>`, IEMOCAP "
            "`<dialogue>_<turn>`): rebuild the text db with such ids (`uniter3m build-txt-db --id-col DIALOGUE_COLUMN,TURN_COLUMN`), "
            "or remove data.context"
        ) from None


def previous_turns(db: DbReader, turns: int) -> dict[str, list[str]]:
    """{uid: up to `turns` previous uids of its dialogue in this db, oldest first}."""
    dialogues: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for uid in db.ids:
        dialogue, turn = dialogue_position(db.path, uid)
        dialogues[dialogue].append((turn, uid))
    out: dict[str, list[str]] = {}
    for members in dialogues.values():
        members.sort()
        order = [uid for _, uid in members]
        for i, uid in enumerate(order):
            out[uid] = order[max(0, i - turns) : i]
    return out


def speaker_column(db: DbReader, options: DialogueContext) -> str:
    """The label column holding speaker names (checked against the db's meta)."""
    columns = list(db.meta.get("label_columns") or [])
    if options.speaker_column is not None:
        if options.speaker_column not in columns:
            raise DatabaseError(
                f"{db.path}: context speaker_column {options.speaker_column!r} is not a label column "
                f"(columns: {columns}); set data.context.speaker_column to one of them"
            )
        return options.speaker_column
    for name in SPEAKER_COLUMNS:
        if name in columns:
            return name
    raise DatabaseError(
        f"{db.path}: data.context.speakers needs a speaker label column ({'/'.join(SPEAKER_COLUMNS)}) and the db "
        f"has {columns}: rebuild it with the speaker as a label column, set data.context.speaker_column, or set "
        "data.context.speakers to false"
    )


def plan_context(
    db: DbReader,
    ids: Sequence[str],
    options: DialogueContext,
    speaker_ids: Callable[[str], list[int]] | None = None,
) -> ContextPlan:
    """Choose each utterance's context turns within the budget, newest first (oldest cut first).

    `speaker_ids(name)` gives the token ids of a speaker prefix (needed when `options.speakers`).
    Reads only the index, plus the labels of the records involved when speakers are asked for.
    """
    if options.speakers and speaker_ids is None:
        raise ConfigError("context speakers=true needs a tokenizer for the speaker names")
    history = previous_turns(db, options.turns)
    column = speaker_column(db, options) if options.speakers else None
    speakers: dict[str, str] = {}

    def prefix(uid: str) -> list[int]:
        if column is None or speaker_ids is None:
            return []
        if uid not in speakers:
            value = (db[uid].get("labels") or {}).get(column)
            speakers[uid] = "" if value is None else str(value).strip()
        return speaker_ids(speakers[uid]) if speakers[uid] else []

    report = ContextReport(utterances=len(ids))
    plan = ContextPlan([], [], np.zeros(len(ids), dtype=np.int64), report)
    for row, uid in enumerate(ids):
        own = prefix(uid)
        room = options.max_context_tokens - len(own)
        chosen: list[tuple[str, int]] = []
        pre: list[list[int]] = []
        previous = history.get(uid, [])
        report.turns_available += len(previous)
        for k, prev in enumerate(reversed(previous)):  # newest first: the oldest are cut first
            p = prefix(prev)
            n = db.length_of(prev)
            need = len(p) + n + 1  # prefix, tokens, [SEP]
            if need <= room:
                chosen.append((prev, 0))
                pre.append(p)
                room -= need
                continue
            if room >= len(p) + 2:  # at least one token of the turn: keep its end
                chosen.append((prev, n - (room - len(p) - 1)))
                pre.append(p)
                report.turns_shortened += 1
                room = 0
                report.turns_dropped += len(previous) - k - 1
            else:
                report.turns_dropped += len(previous) - k
            break
        chosen.reverse()
        pre.reverse()
        plan.turns.append(chosen)
        plan.prefixes.append([*pre, own])
        length = options.max_context_tokens - room  # = own prefix + kept turns
        plan.lengths[row] = length
        if chosen:
            report.with_context += 1
            report.turns_used += len(chosen)
            report.tokens += length
    return plan


def assemble(
    current: Mapping[str, np.ndarray],
    context: Sequence[tuple[Sequence[int], np.ndarray]],
    current_prefix: Sequence[int],
    sep_id: int,
    position: str = "before",
) -> dict[str, np.ndarray]:
    """The token row with its word ids, emotion flags and context flags.

    "before": `prefix turn [SEP] ... prefix current`; "after": `prefix current [SEP] prefix newest
    turn [SEP] ... prefix oldest turn` (the collator adds [CLS] and the final [SEP] in both).
    `current`: input_ids / word_ids / emo_flags of the (already truncated) current utterance;
    `context`: (speaker prefix ids, kept token ids) per context turn, oldest first.
    Context tokens get word id -1 (never a whole-word unit), no emotion flag and ctx flag True.
    """
    own = np.asarray(current_prefix, dtype=np.int64)
    if position == "before":
        parts = [np.asarray([*p, *tokens, sep_id], dtype=np.int64) for p, tokens in context]
        head, tail = np.concatenate([*parts, own]), np.zeros(0, dtype=np.int64)
    else:
        parts = [np.asarray([sep_id, *p, *tokens], dtype=np.int64) for p, tokens in reversed(context)]
        head, tail = own, np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    n_head, n_cur, n_tail = len(head), len(current["input_ids"]), len(tail)

    def around(middle: np.ndarray, fill: int | bool, dtype: Any) -> np.ndarray:
        return np.concatenate(
            [np.full(n_head, fill, dtype=dtype), middle, np.full(n_tail, fill, dtype=dtype)]
        )

    return {
        "input_ids": np.concatenate([head, np.asarray(current["input_ids"], dtype=np.int64), tail]),
        "word_ids": around(np.asarray(current["word_ids"], dtype=np.int64), -1, np.int64),
        "emo_flags": around(np.asarray(current["emo_flags"], dtype=bool), False, bool),
        "ctx_flags": around(np.zeros(n_cur, dtype=bool), True, bool),
    }


def speaker_tokenizer(tokenizer: Any) -> Callable[[str], list[int]]:
    """name -> ids of "name :" (cached: a corpus has few speakers)."""
    cache: dict[str, list[int]] = {}

    def ids(name: str) -> list[int]:
        if name not in cache:
            cache[name] = list(tokenizer(f"{name} {SPEAKER_SUFFIX}", add_special_tokens=False)["input_ids"])
        return cache[name]

    return ids
