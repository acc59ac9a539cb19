"""Masking helpers shared by the objectives: pure tensor functions driven by a ``torch.Generator``.

Everything here runs on CPU in DataLoader workers, so every random draw takes the caller's
generator: the same generator state gives the same masks, which makes runs and tests repeatable.

Vocabulary used throughout:

* a *unit* is what is masked as a whole: a token (MLM), a word (WWM) or a span of frames;
* *chosen* units become targets; each chosen unit then gets one *action*: replaced by the mask
  (token ``[MASK]`` or the stream's learned mask vector), replaced by a random token / frame, or kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from uniter3m.data.tokenization import SpecialTokens
from uniter3m.errors import ConfigError

ACTION_MASK = 0
ACTION_RANDOM = 1
ACTION_KEEP = 2


@dataclass(frozen=True)
class ReplaceRates:
    """How chosen units are corrupted (BERT's 80/10/10 by default)."""

    mask: float = 0.8
    random: float = 0.1
    keep: float = 0.1

    def __post_init__(self) -> None:
        parts = (self.mask, self.random, self.keep)
        if any(p < 0 for p in parts) or abs(sum(parts) - 1.0) > 1e-6:
            raise ConfigError(
                f"replace rates mask={self.mask}, random={self.random}, keep={self.keep} must be "
                "non-negative and sum to 1 (e.g. [0.8, 0.1, 0.1])"
            )

    @classmethod
    def parse(cls, value: ReplaceRates | tuple | list | dict | None) -> ReplaceRates:
        """Accept ``[mask, random, keep]``, ``{"mask":..,"random":..,"keep":..}`` or an instance."""
        if value is None:
            return cls()
        if isinstance(value, ReplaceRates):
            return value
        if isinstance(value, dict):
            return cls(**value)
        if isinstance(value, (list, tuple)) and len(value) == 3:
            return cls(*(float(v) for v in value))
        raise ConfigError(f"replace rates {value!r}: give [mask, random, keep], e.g. [0.8, 0.1, 0.1]")


def check_rate(name: str, value: float, *, upper: float = 1.0) -> float:
    value = float(value)
    if not 0.0 < value <= upper:
        raise ConfigError(f"option {name}={value} must be in (0, {upper}]")
    return value


# --------------------------------------------------------------------------------------------- tokens


def maskable_tokens(
    input_ids: torch.Tensor,
    txt_mask: torch.Tensor,
    special: SpecialTokens,
    ctx_flags: torch.Tensor | None = None,
) -> torch.Tensor:
    """Real tokens that may become targets: never [CLS], [SEP], [MASK], padding or dialogue context
    (`ctx_flags`: only the current utterance is the target of a masking objective)."""
    ok = txt_mask.bool().clone()
    if ctx_flags is not None:
        ok &= ~ctx_flags.bool()
    for sid in special.ids:
        ok &= input_ids != sid
    return ok


def token_units(maskable: torch.Tensor) -> torch.Tensor:
    """Unit id per token for token-level masking: the token's own position, -1 where not maskable."""
    pos = torch.arange(maskable.shape[1]).expand_as(maskable)
    return torch.where(maskable, pos, torch.full_like(pos, -1))


def word_units(word_ids: torch.Tensor, maskable: torch.Tensor) -> torch.Tensor:
    """Unit id per token for whole-word masking: the word index, -1 where not maskable."""
    return torch.where(maskable & (word_ids >= 0), word_ids.long(), torch.full_like(word_ids.long(), -1))


def unit_table(
    unit_ids: torch.Tensor, emo_flags: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and unit: does the unit exist, and is it an emotion unit (any of its tokens flagged)?

    Returns ``(exists, is_emo)``, both (B, U) bool with U = largest unit id + 1.
    """
    batch = unit_ids.shape[0]
    n_units = max(int(unit_ids.max().item()) + 1 if unit_ids.numel() else 0, 1)
    valid = unit_ids >= 0
    index = unit_ids.clamp(min=0)
    # scatter_add (not scatter_): several tokens of one word write the same slot.
    exists = torch.zeros(batch, n_units, dtype=torch.long).scatter_add_(1, index, valid.long()) > 0
    if emo_flags is None:
        return exists, torch.zeros_like(exists)
    flagged = (valid & emo_flags.bool()).long()
    is_emo = torch.zeros(batch, n_units, dtype=torch.long).scatter_add_(1, index, flagged) > 0
    return exists, is_emo


def uniform_unit_probs(exists: torch.Tensor, rate: float) -> torch.Tensor:
    """Every existing unit is chosen with the same probability ``rate``."""
    return exists.float() * rate


def melm_unit_probs(exists: torch.Tensor, is_emo: torch.Tensor, rate: float, emo_prob: float) -> torch.Tensor:
    """MELM: emotion units with ``emo_prob``; the others with max(rate·n − emo_prob·e, 0) / (n − e).

    n = units in the sample, e = emotion units in it, so about ``rate`` of all units are chosen
    overall. When every unit is an emotion unit (n = e) the other-unit probability is 0 (there are
    no other units), never a division by zero.
    """
    n = exists.sum(1).float()
    e = (exists & is_emo).sum(1).float()
    others = n - e
    p_other = torch.where(
        others > 0, (rate * n - emo_prob * e).clamp(min=0) / others.clamp(min=1), torch.zeros_like(n)
    ).clamp(max=1.0)
    probs = torch.where(is_emo, torch.full_like(exists, emo_prob, dtype=torch.float), p_other[:, None])
    return probs * exists.float()


def choose_units(exists: torch.Tensor, probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw each unit with its probability; a sample with units but no draw gets one uniform unit.

    The "at least one target" rule keeps every sample with a real unit in the loss (short
    utterances would otherwise often contribute nothing); it raises the rate only by about
    (1 − rate)^n, negligible beyond a few units.
    """
    chosen = (torch.rand(probs.shape, generator=generator) < probs) & exists
    empty = exists.any(1) & ~chosen.any(1)
    if empty.any():
        scores = torch.rand(probs.shape, generator=generator).masked_fill(~exists, -1.0)
        pick = scores.argmax(1)
        chosen[empty, pick[empty]] = True
    return chosen


def draw_actions(shape: tuple[int, ...], rates: ReplaceRates, generator: torch.Generator) -> torch.Tensor:
    """One action per unit: ACTION_MASK, ACTION_RANDOM or ACTION_KEEP with the configured rates."""
    u = torch.rand(shape, generator=generator)
    actions = torch.full(shape, ACTION_KEEP, dtype=torch.long)
    actions[u < rates.mask + rates.random] = ACTION_RANDOM
    actions[u < rates.mask] = ACTION_MASK
    return actions


def random_token_pool(special: SpecialTokens) -> torch.Tensor:
    """Ids a "random token" replacement may use: the whole vocabulary except the special ids."""
    ids = torch.arange(special.vocab_size)
    keep = torch.ones(special.vocab_size, dtype=torch.bool)
    for sid in (*special.ids, special.unk_id):
        if 0 <= sid < special.vocab_size:
            keep[sid] = False
    return ids[keep]


@dataclass
class TokenMasking:
    """Masked input ids and targets (-1 where a token is not a target)."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    actions: torch.Tensor  # (B, L) action per token, -1 where not a target


def mask_tokens(
    input_ids: torch.Tensor,
    unit_ids: torch.Tensor,
    chosen_units: torch.Tensor,
    special: SpecialTokens,
    rates: ReplaceRates,
    generator: torch.Generator,
    random_pool: torch.Tensor,
) -> TokenMasking:
    """Corrupt every token of a chosen unit ((B, U) bool, e.g. from `choose_units`) with the unit's action."""
    unit_actions = draw_actions(tuple(chosen_units.shape), rates, generator)
    index = unit_ids.clamp(min=0)
    is_target = (unit_ids >= 0) & chosen_units.gather(1, index)
    actions = torch.where(is_target, unit_actions.gather(1, index), torch.full_like(index, -1))
    random_ids = random_pool[torch.randint(len(random_pool), input_ids.shape, generator=generator)]
    masked = input_ids.clone()
    masked[actions == ACTION_MASK] = special.mask_id
    masked = torch.where(actions == ACTION_RANDOM, random_ids, masked)
    targets = torch.where(is_target, input_ids, torch.full_like(input_ids, -1))
    return TokenMasking(masked, targets, actions)


# --------------------------------------------------------------------------------------------- frames


def frame_lengths(frame_mask: torch.Tensor) -> torch.Tensor:
    """Frames per clip; real frames are left-aligned (the collate pads on the right)."""
    return frame_mask.long().sum(1)


def choose_frames(frame_mask: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Independent frames: each real frame is chosen with ``rate``; unit id per frame, -1 elsewhere.

    A non-empty clip with no draw gets one uniform frame, so every clip with frames has a target.
    """
    frame_mask = frame_mask.bool()
    chosen = choose_units(frame_mask, frame_mask.float() * rate, generator)
    pos = torch.arange(frame_mask.shape[1]).expand_as(frame_mask)
    return torch.where(chosen, pos, torch.full_like(pos, -1))


def span_starts(length: int, span: int, rate: float, generator: torch.Generator) -> tuple[list[int], int]:
    """Starts of non-overlapping spans covering about ``rate`` of a clip of ``length`` frames.

    The number of spans is rate·length/span rounded stochastically (so its mean is exact), at
    least one and at most length // span. Placement is uniform over all non-overlapping layouts
    (spans may touch): pick n of the ``length − n·span + n`` "gap or span" slots, so a span can end
    on the last frame. A clip shorter than one span gets a single span of max(1, round(rate·length))
    frames. Returns ``(starts, span_length)``.
    """
    if length <= 0:
        return [], 0
    if length < span:
        span = max(1, round(rate * length))
    expected = rate * length / span
    n = int(expected + torch.rand((), generator=generator).item())
    n = min(max(n, 1), length // span)
    free = length - n * span
    slots = torch.randperm(free + n, generator=generator)[:n].sort().values
    starts = (slots + torch.arange(n) * (span - 1)).tolist()
    return starts, span


@dataclass
class FrameMasking:
    """Corrupted frames, the model's frame mask, and the targets' positions."""

    feat: torch.Tensor  # (B, T, D) input with "random" units replaced by other real frames
    frame_mask: torch.Tensor  # (B, T) bool: frames the model replaces with its learned mask vector
    targets: torch.Tensor  # (B, T) bool: frames whose ORIGINAL value is predicted
    actions: torch.Tensor  # (B, T) long: action per frame, -1 where not a target


def corrupt_frames(
    feat: torch.Tensor,
    real: torch.Tensor,
    units: torch.Tensor,
    rates: ReplaceRates,
    generator: torch.Generator,
) -> FrameMasking:
    """Apply one action per unit (frame or span) to every frame of that unit.

    "Random" frames are drawn uniformly from all real frames of the batch for this stream, so
    they are plausible inputs of the right scale (never padding).
    """
    batch, length = units.shape
    n_units = max(int(units.max().item()) + 1, 1) if units.numel() else 1
    unit_actions = draw_actions((batch, n_units), rates, generator)
    is_target = units >= 0
    actions = torch.where(is_target, unit_actions.gather(1, units.clamp(min=0)), torch.full_like(units, -1))
    out = feat.clone()
    replace = actions == ACTION_RANDOM
    pool = feat[real.bool()]
    if replace.any() and len(pool):
        picks = torch.randint(len(pool), (int(replace.sum()),), generator=generator)
        out[replace] = pool[picks]
    return FrameMasking(out, actions == ACTION_MASK, is_target, actions)


# ------------------------------------------------------------------------------- MEmoBERT's rules


def memobert_melm_chosen(
    exists: torch.Tensor, is_emo: torch.Tensor, mask_prob: float, emo_prob: float, generator: torch.Generator
) -> torch.Tensor:
    """MEmoBERT's token MELM: only emotion units are drawn (each with ``emo_prob``); a sample whose
    draw chose none is masked as plain MLM instead (each unit with ``mask_prob``, at least one).

    The emotion-word-free sentences thus fall back to MLM, and a sentence with emotion words but no
    draw too, so non-emotion tokens are targets only in those sentences (their rate depends on the
    share of such sentences, e.g. 0.039 against 0.075 under our weighted rule on MELD).
    """
    first = (torch.rand(exists.shape, generator=generator) < emo_prob) & exists & is_emo
    fallback = choose_units(exists, exists.float() * mask_prob, generator)
    empty = ~first.any(1, keepdim=True)
    return torch.where(empty, fallback, first)


def memobert_wwm_chosen(
    exists: torch.Tensor, is_emo: torch.Tensor, mask_prob: float, emo_prob: float, generator: torch.Generator
) -> torch.Tensor:
    """MEmoBERT's MELM-WWM: our weighted probabilities (`melm_unit_probs`) but no "at least one
    target" rule (its fallback compared lists with -1 and never fired), so some samples have none."""
    probs = melm_unit_probs(exists, is_emo, mask_prob, emo_prob)
    return (torch.rand(probs.shape, generator=generator) < probs) & exists


@dataclass(frozen=True)
class SpanSpec:
    """How frame spans are laid out (the ``span`` option of the frame objectives).

    ``length``: frames per span (a list: one drawn per clip); ``ratios``: the masked share drawn per
    clip from this list (None: the task's ``mask_prob``); ``overlap``: MEmoBERT's rule, where
    floor(T·ratio / length) starts are drawn without replacement from [0, T − length − 2] and spans
    may overlap (so fewer than ratio·T frames are masked, e.g. 17.8 % at 0.2 with 3-frame spans on
    50-frame clips; see `overlap_coverage`); ``single``: one span of floor(T·ratio) frames at a
    uniform start in [0, T − len − 1] (MEmoBERT's one-span variant). A clip where the rule gives no
    span gets one uniform frame. Default (``overlap`` and ``single`` false): `span_starts`.
    ``replace``: [mask, random, keep] rates of each span (MEmoBERT: [1, 0, 0]); None leaves them to
    the task's ``replace`` (giving both is an error).
    """

    length: tuple[int, ...] = (1,)
    ratios: tuple[float, ...] | None = None
    overlap: bool = False
    single: bool = False
    replace: ReplaceRates | None = None

    @classmethod
    def parse(cls, value: Any, where: str) -> SpanSpec:
        """An int (span length) or ``{"length": k | [k, ...], "ratios": [...], "overlap": b, "single": b,
        "replace": [mask, random, keep]}``."""
        if isinstance(value, SpanSpec):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = {"length": value}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: span={value!r}; give a length (e.g. 3) or a mapping with length")
        unknown = sorted(set(value) - {"length", "ratios", "overlap", "single", "replace"})
        if unknown:
            raise ConfigError(
                f"{where}: span keys {unknown} unknown; use length, ratios, overlap, single, replace"
            )
        raw = value.get("length", 1)
        lengths = tuple(raw) if isinstance(raw, (list, tuple)) else (raw,)
        if not lengths or any(int(k) != k or k < 1 for k in lengths):
            raise ConfigError(f"{where}: span length {raw!r} must be whole numbers >= 1")
        ratios = value.get("ratios")
        if ratios is not None:
            ratios = tuple(check_rate("span.ratios", r) for r in ratios)
            if not ratios:
                raise ConfigError(f"{where}: span.ratios is empty; leave it out or list rates")
        replace = value.get("replace")
        spec = cls(
            tuple(int(k) for k in lengths),
            ratios,
            bool(value.get("overlap")),
            bool(value.get("single")),
            None if replace is None else ReplaceRates.parse(replace),
        )
        if spec.single and spec.overlap:
            raise ConfigError(f"{where}: span.single and span.overlap exclude each other; choose one")
        return spec

    @property
    def plain_frames(self) -> bool:
        """Independent frames (no spans at all)."""
        return self.length == (1,) and self.ratios is None and not self.overlap and not self.single


def _pick(values: tuple, generator: torch.Generator) -> Any:
    return values[int(torch.randint(len(values), (), generator=generator))] if len(values) > 1 else values[0]


def overlap_starts(length: int, span: int, rate: float, generator: torch.Generator) -> list[int]:
    """MEmoBERT's overlapping spans: floor(T·rate / span) distinct starts in [0, T − span − 2]."""
    valid = length - span - 1
    n = min(int(length * rate // span), max(valid, 0))
    return torch.randperm(valid, generator=generator)[:n].tolist() if n > 0 else []


def overlap_coverage(length: int, span: int, rate: float) -> float:
    """Expected share of a clip's frames covered under `overlap_starts` (before the one-frame
    fallback): frame f is missed when none of the m_f starts that cover it is among the n drawn
    from R = T − span − 1, probability C(R − m_f, n) / C(R, n)."""
    valid = length - span - 1
    n = min(int(length * rate // span), max(valid, 0))
    if n <= 0:
        return 0.0
    covered = 0.0
    for f in range(length):
        m = len(range(max(0, f - span + 1), min(f, valid - 1) + 1))
        covered += 1.0 - math.comb(valid - m, n) / math.comb(valid, n)
    return covered / length


def choose_span_units(
    frame_mask: torch.Tensor, rate: float, spec: SpanSpec, generator: torch.Generator
) -> torch.Tensor:
    """Unit id per frame (-1 outside every span) under `spec`; overlapping spans merge into the
    later span's unit. Every clip with frames gets at least one target."""
    units = torch.full(frame_mask.shape, -1, dtype=torch.long)
    for b, length in enumerate(frame_lengths(frame_mask).tolist()):
        if length <= 0:
            continue
        clip_rate = _pick(spec.ratios, generator) if spec.ratios is not None else rate
        span = _pick(spec.length, generator)
        if spec.single:
            span = int(length * clip_rate)
            starts = [int(torch.randint(max(length - span, 1), (), generator=generator))] if span else []
        elif spec.overlap:
            starts = overlap_starts(length, span, clip_rate, generator)
        else:
            starts, span = span_starts(length, span, clip_rate, generator)
        for k, start in enumerate(starts):
            units[b, start : start + span] = k
        if not starts:
            units[b, int(torch.randint(length, (), generator=generator))] = 0
    return units


def emotion_frames(
    frame_mask: torch.Tensor, soft: torch.Tensor, rate: float, neutral: int, generator: torch.Generator
) -> torch.Tensor:
    """Emotion-salient frames: about ``rate`` of each clip's frames (stochastic rounding, at least
    one), drawn without replacement with probability proportional to the frame's distance from
    neutral, 1 − p(neutral) of its normalised soft label (a tiny floor lets all-neutral clips draw
    uniformly). Unit id per frame (its position), -1 elsewhere."""
    real = frame_mask.bool()
    probs = soft.float() / soft.float().sum(-1, keepdim=True).clamp(min=1e-12)
    distance = (1.0 - probs[..., neutral]).clamp(min=0.0) + 1e-6
    units = torch.full(real.shape, -1, dtype=torch.long)
    for b, length in enumerate(frame_lengths(real).tolist()):
        if length <= 0:
            continue
        k = min(max(int(rate * length + torch.rand((), generator=generator).item()), 1), length)
        picks = torch.multinomial(distance[b, :length], k, replacement=False, generator=generator)
        units[b, picks] = picks
    return units
