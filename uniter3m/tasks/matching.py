"""Matching objectives: ITM with random negatives, ITM with in-batch hard negatives, and InfoNCE.

* ``itm``: with probability ``neg_prob`` an utterance becomes a negative: the streams of one
  subset drawn from ``negative_streams`` (e.g. ``{"V": 0.25, "A": 0.25, "VA": 0.5}``; ``"L"``
  replaces the text) are taken from another utterance of the batch. A binary head on the pooled
  output says whether the streams belong together.
* ``itm_hard``: every utterance is scored with its own frames (positive) and with the frames of
  a similar other utterance of the batch (negative), where similarity is the cosine of pooled
  single-modality embeddings (text alone vs frames alone) computed by the current model without
  gradient. By default the negative is DRAWN with probability softmax(similarity / 0.2) (ALBEF
  draws its hard negatives by similarity too), not taken as the most similar: the most similar is
  often a false negative (an utterance of the same speaker, emotion and arousal carries no
  evidence of the mismatch), and a head trained on those stays at chance. Measured on the
  synthetic corpus (tests/tasks/test_objectives_learn.py's matching group, 360 steps, validation
  accuracy against a chance of 0.50): ``mining: "hardest"`` 0.49; temperature 0.07 0.55 (600
  steps); 0.2 0.65; 0.5 0.74 (easier negatives, closer to plain itm).
* ``emotion_itm``: ``itm`` whose negatives know the utterances' emotion (``label_column``), as
  MEmoBERT's EITM: with ``same_emotion: "exclude"`` (default) a negative's streams come only from an
  utterance of ANOTHER emotion (a row with none stays a positive, counted in ``fallback``); with
  ``"positive"`` the donor is drawn from any utterance and a same-emotion pair is labelled matched.
  "exclude" is the default because a face or voice of the same emotion is no evidence of a mismatch
  at the level this objective is for (a same-emotion negative is a false negative), while calling it
  a match ("positive", MEmoBERT's unfinished `use_total_eitm`) turns matching into classifying the
  pair's emotion and contradicts plain ITM's label for the same inputs.
* ``itm_rank``: the positive against K negatives (``tasks/ranking.py``).
* ``contrastive``: InfoNCE across modalities: each stream is encoded alone, mean-pooled and
  L2-normalised; for each pair of streams (L–V, L–A, V–A by default) the matching utterance must
  win against the other utterances of the batch, in both directions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from uniter3m.errors import ConfigError, UserError
from uniter3m.streams import TEXT_LETTER, StreamTable
from uniter3m.tasks.base import (
    Task,
    TaskContext,
    TaskOutput,
    call_model,
    count,
    head,
    parse_streams,
    ratio,
    text_absent,
    wants_chance,
    zero_loss,
)

ITM_HEAD = "itm"
SAME_EMOTION = ("exclude", "positive")
TEXT_KEYS = ("input_ids", "txt_mask", "word_ids", "emo_flags", "ctx_flags")


def stream_keys(stream: str, table: StreamTable) -> tuple[str, ...]:
    if stream == TEXT_LETTER:
        return TEXT_KEYS
    s = table.get(stream)
    return (s.feat_key, s.mask_key, s.soft_key)


def same_content(batch: Mapping[str, Any], stream: str, i: int, j: int, table: StreamTable) -> bool:
    """Do utterances i and j carry identical data in ``stream`` (e.g. both empty)?"""
    if stream == TEXT_LETTER:
        a, b = batch["input_ids"][i][batch["txt_mask"][i]], batch["input_ids"][j][batch["txt_mask"][j]]
        return a.shape == b.shape and bool(torch.equal(a, b))
    s = table.get(stream)
    real_i, real_j = batch[s.mask_key][i].bool(), batch[s.mask_key][j].bool()
    a, b = batch[s.feat_key][i][real_i], batch[s.feat_key][j][real_j]
    return a.shape == b.shape and bool(torch.equal(a, b))


def frame_fingerprint(batch: Mapping[str, Any], table: StreamTable) -> torch.Tensor:
    """(B, 4·streams) summary of each utterance's frames (count, sum, sum of squares, time-weighted
    sum, in float64): equal rows mean the same clip, so a duplicated clip is never mined as a
    negative of itself, whatever dropout does to its embedding."""
    parts = []
    for s in table.frame_streams():
        if batch.get(s.feat_key) is None:
            continue
        feat = batch[s.feat_key].double() * batch[s.mask_key][..., None]
        time = torch.arange(1, feat.shape[1] + 1, dtype=torch.float64)[None, :, None]
        parts.append(batch[s.mask_key].sum(1, keepdim=True).double())
        parts += [
            feat.sum((1, 2))[:, None],
            (feat**2).sum((1, 2))[:, None],
            (feat * time).sum((1, 2))[:, None],
        ]
    return torch.cat(parts, 1)


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real positions of each row; a row with none gives zeros."""
    weights = mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def frame_kwargs(inputs: Mapping[str, Any], table: StreamTable) -> dict[str, Any]:
    out = {}
    for s in table.frame_streams():
        if inputs.get(s.feat_key) is not None:
            out[s.feat_key] = inputs[s.feat_key]
            out[s.mask_key] = inputs[s.mask_key].bool()
    return out


def pooled(output: Any) -> torch.Tensor:
    """L2-normalised mean of each row's real positions."""
    return F.normalize(masked_mean(output.last_hidden_state, output.attention_mask).float(), dim=-1)


def encode_streams_alone(
    model: torch.nn.Module, inputs: Mapping[str, Any], streams: Sequence[str], table: StreamTable
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each stream (or group of streams, e.g. "VA") encoded on its own, in ONE model call: per
    group a copy of the batch in which the other streams are masked out (attention never crosses
    to masked positions), so the backbone runs once (what DDP expects) yet no group sees another.

    Returns group -> (normalised pooled embedding (B, H), rows that have data (B,)).
    """
    bsz = inputs["input_ids"].shape[0]
    copies = len(streams)
    text_mask = inputs["attention_mask"].bool()
    frames = frame_kwargs(inputs, table)
    frame_letters, names = table.frame_letters(), table.modality_names()
    kwargs: dict[str, Any] = {"input_ids": inputs["input_ids"].repeat(copies, 1)}
    # text always rides along ([CLS] keeps the model's contract); frame streams only when needed
    masks: dict[str, list[torch.Tensor]] = {"text": []}
    masks.update({frame_letters[s]: [] for group in streams for s in group if s in frame_letters})
    has: dict[str, torch.Tensor] = {}
    for group in streams:
        own = {names[s] for s in group}
        for name in masks:
            mask = text_mask if name == "text" else frames[f"{name}_mask"]
            masks[name].append(mask if name in own else torch.zeros_like(mask))
        rows = [
            inputs["has_text"].to(text_mask.device) if s == TEXT_LETTER else frames[f"{names[s]}_mask"].any(1)
            for s in group
        ]
        has[group] = torch.stack(rows).any(0)
    kwargs["attention_mask"] = torch.cat(masks.pop("text"))
    kwargs["padded"] = True  # the other streams are masked out: always padded, no need to ask the device
    for name, parts in masks.items():
        kwargs[f"{name}_feat"] = frames[f"{name}_feat"].repeat(copies, 1, 1)
        kwargs[f"{name}_mask"] = torch.cat(parts)
    embedded = pooled(call_model(model, **kwargs))
    return {s: (embedded[k * bsz : (k + 1) * bsz], has[s]) for k, s in enumerate(streams)}


def itm_loss(
    model: torch.nn.Module,
    inputs: Mapping[str, Any],
    targets: torch.Tensor,
    task: str,
    table: StreamTable,
    weights: torch.Tensor | None = None,
) -> TaskOutput:
    """Binary cross-entropy (2-way softmax) on the pooled output; mean over the scored pairs
    (`weights`: 1 for a pair that counts, 0 for one that does not, so no pair has to be removed
    on the host)."""
    kwargs = {
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"],
        "padded": inputs.get("padded"),
        **frame_kwargs(inputs, table),
    }
    output = call_model(model, **kwargs)
    logits = head(model, ITM_HEAD, task)(output.pooler_output).float()
    if weights is None:
        weights = torch.ones(targets.shape, device=logits.device)
    n = weights.sum()
    loss = (F.cross_entropy(logits, targets, reduction="none") * weights).sum() / n.clamp(min=1)
    correct = ((logits.argmax(-1) == targets).float() * weights).sum()
    negatives = ((targets == 0).float() * weights).sum()
    metrics = {"acc": ratio(correct, n), "neg_rate": ratio(negatives, n)}
    if wants_chance(model):
        counts = torch.bincount(targets, weights=weights, minlength=2)
        metrics["chance"] = ratio(counts, n)
    return TaskOutput(loss, n, metrics)


class MatchingTask(Task):
    """ITM (``hard=False``) and hard-negative ITM (``hard=True``).

    Loss: cross-entropy of the 2-way ITM head on the pooled output, mean over scored utterances
    (B for ``itm``; up to 2B for ``itm_hard``: each positive and its mined negative).
    Options: ``mining`` (``"sample"``: draw the negative by softmax(similarity /
    ``mining_temperature`` = 0.2); ``"hardest"``: the most similar; itm_hard only),
    ``neg_prob`` (0.5, itm only), ``negative_streams`` (subset -> probability, default
    each frame stream alone and all together, e.g. ``{"V": 1/3, "A": 1/3, "VA": 1/3}``, restricted to the streams the batch has; itm only), ``emotion`` (fixed by the name
    emotion_itm), ``label_column`` and ``same_emotion`` ("exclude" | "positive"; emotion_itm only), plus the
    modality options of ``Task``. A drawn negative whose replaced streams are identical to the
    original (e.g. both utterances have no face) stays a positive; ``fallback`` counts those.
    """

    heads = (ITM_HEAD,)
    streams = ("L",)

    def __init__(
        self,
        context: TaskContext,
        *,
        hard: bool = False,
        neg_prob: float = 0.5,
        negative_streams: Mapping[str, float] | None = None,
        mining: str = "sample",
        mining_temperature: float = 0.2,
        emotion: bool = False,
        label_column: str | None = None,
        same_emotion: str = "exclude",
        **common: Any,
    ) -> None:
        super().__init__(context, **common)
        if same_emotion not in SAME_EMOTION:
            raise ConfigError(f"task {self.name}: same_emotion={same_emotion!r}; use one of {SAME_EMOTION}")
        if bool(emotion) != (label_column is not None):
            raise ConfigError(
                f"task {self.name}: label_column (the utterances' emotion) goes with emotion_itm, and only with it"
            )
        self.label_column = label_column
        self.same_emotion = same_emotion
        if mining not in ("sample", "hardest"):
            raise ConfigError(f"task {self.name}: mining={mining!r} must be 'sample' or 'hardest'")
        if not float(mining_temperature) > 0:
            raise ConfigError(f"task {self.name}: mining_temperature={mining_temperature} must be > 0")
        self.mining = mining
        self.mining_temperature = float(mining_temperature)
        frame_letters = "".join(self.stream_table.frame_letters())
        for subset in self.modality_sets or []:
            if not subset & set(frame_letters):
                raise ConfigError(
                    f"task {self.name}: modality subset {''.join(sorted(subset))} has no frame stream to "
                    f"match the text with; add one of {frame_letters} to it"
                )
        self.hard = bool(hard)
        if not 0.0 <= float(neg_prob) <= 1.0:
            raise ConfigError(f"task {self.name}: neg_prob={neg_prob} must be in [0, 1]")
        self.neg_prob = float(neg_prob)
        spec = negative_streams or {**dict.fromkeys(frame_letters, 1.0), frame_letters: 1.0}
        self.negative_streams: list[tuple[frozenset[str], float]] = []
        for key, prob in spec.items():
            if float(prob) < 0:
                raise ConfigError(f"task {self.name}: negative_streams[{key!r}] = {prob} must be >= 0")
            subset = parse_streams(key, f"task {self.name}: negative_streams", self.stream_table)
            if subset == frozenset(self.stream_table.letters()):
                raise ConfigError(
                    f"task {self.name}: negative_streams {key!r} replaces every stream; drop one"
                )
            self.negative_streams.append((subset, float(prob)))
        if sum(p for _, p in self.negative_streams) <= 0:
            raise ConfigError(f"task {self.name}: negative_streams {dict(spec)} has no positive probability")

    def build(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        present = set(self.batch_streams(batch))
        if text_absent(batch, self.special):
            present.discard("L")
        if not present & set(self.stream_table.frame_letters()):
            raise UserError(
                f"task {self.name} matches text with frames but the batch (ids "
                f"{list(batch.get('ids', []))[:3]}...) has no frame stream; give it a feature db"
            )
        inputs = self.model_inputs(batch)
        inputs["has_text"] = torch.full((batch["input_ids"].shape[0],), "L" in present)
        if self.hard:
            inputs["frame_fingerprint"] = frame_fingerprint(batch, self.stream_table)
            return inputs
        targets, fallback = self.make_negatives(batch, inputs, present, generator)
        inputs["itm_targets"] = targets
        inputs["itm_fallback"] = torch.tensor(fallback)
        return inputs

    def make_negatives(
        self, batch: Mapping[str, Any], inputs: dict[str, Any], present: set[str], generator: torch.Generator
    ) -> tuple[torch.Tensor, int]:
        options = [(s, p) for s, p in self.negative_streams if s <= present and p > 0]
        if not options:
            wanted = ", ".join("".join(sorted(s)) for s, _ in self.negative_streams)
            raise UserError(
                f"task {self.name}: none of negative_streams ({wanted}) is present in the batch "
                f"(streams {''.join(sorted(present))}); add a subset of the batch's streams"
            )
        bsz = batch["input_ids"].shape[0]
        targets = torch.ones(bsz, dtype=torch.long)
        if bsz < 2:
            return targets, 0
        weights = torch.tensor([p for _, p in options])
        is_negative = torch.rand(bsz, generator=generator) < self.neg_prob
        choice = torch.multinomial(weights, bsz, replacement=True, generator=generator)
        donors = (torch.arange(bsz) + torch.randint(1, bsz, (bsz,), generator=generator)) % bsz
        emotions = self.emotions(batch)
        if emotions is not None and self.same_emotion == "exclude":
            donors = other_emotion_donors(emotions, generator)
        # Read donors from the untouched tensors and write into copies: the batch's own tensors
        # are shared with the caller, and a donor's row may itself be replaced.
        source = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        for key in source:
            inputs[key] = source[key].clone()
        fallback = 0
        for i in torch.nonzero(is_negative).flatten().tolist():
            j = int(donors[i])
            subset = options[int(choice[i])][0]
            if j < 0 or all(same_content(batch, s, i, j, self.stream_table) for s in subset):
                fallback += 1
                continue
            for stream in subset:
                for key in stream_keys(stream, self.stream_table):
                    key = "attention_mask" if key == "txt_mask" else key
                    if key in inputs:
                        inputs[key][i] = source[key][j]
            targets[i] = int(emotions is not None and emotions[i] == emotions[j])
        return targets, fallback

    def emotions(self, batch: Mapping[str, Any]) -> list[str] | None:
        """The batch's emotion labels (emotion_itm), or None."""
        if self.label_column is None:
            return None
        return [str(v) for v in self.label_values(batch, self.label_column)]

    def forward(self, model: torch.nn.Module, inputs: Mapping[str, Any]) -> TaskOutput:
        if not self.hard:
            result = itm_loss(model, inputs, inputs["itm_targets"], self.name, self.stream_table)
            n = count(result.loss, inputs["itm_targets"].numel())
            result.metrics["fallback"] = ratio(inputs["itm_fallback"], n)
            return result
        return self.hard_forward(model, inputs)

    def hard_forward(self, model: torch.nn.Module, inputs: Mapping[str, Any]) -> TaskOutput:
        bsz = inputs["input_ids"].shape[0]
        padded = inputs.get("padded")
        with torch.no_grad():
            text = pooled(
                call_model(
                    model,
                    input_ids=inputs["input_ids"],
                    attention_mask=inputs["attention_mask"],
                    padded=padded,
                )
            )
            frames_out = call_model(model, padded=padded, **frame_kwargs(inputs, self.stream_table))
            frames = pooled(frames_out)
            has_frames = frames_out.attention_mask.any(1)
            sim = text @ frames.T
            # never "mine" the utterance itself, one without frames, or a duplicate of its frames
            fingerprint = inputs["frame_fingerprint"]
            same = (fingerprint[:, None, :] == fingerprint[None, :, :]).all(-1)
            sim = sim.masked_fill(same | ~has_frames[None, :], float("-inf"))
            valid = torch.isfinite(sim.max(1).values) & has_frames
            if self.mining == "hardest":
                donors = sim.argmax(1)
            else:  # a row with no candidate draws uniformly; its pair is weighted 0 below
                logits = torch.where(valid[:, None], sim / self.mining_temperature, torch.zeros_like(sim))
                donors = torch.multinomial(logits.softmax(1), 1).squeeze(1)
        # every utterance is scored with its own frames and with its mined donor's; a row with no
        # valid donor keeps its negative pair at weight 0 (no data-dependent shapes: no host sync)
        rows = torch.arange(bsz, device=donors.device)
        pair_text = torch.cat([rows, rows])
        pair_frames = torch.cat([rows, donors])
        paired: dict[str, Any] = {
            "input_ids": inputs["input_ids"].index_select(0, pair_text),
            "attention_mask": inputs["attention_mask"].index_select(0, pair_text),
            "padded": padded,
        }
        for s in self.stream_table.frame_streams():
            if inputs.get(s.feat_key) is not None:
                paired[s.feat_key] = inputs[s.feat_key].index_select(0, pair_frames)
                paired[s.mask_key] = inputs[s.mask_key].index_select(0, pair_frames)
        targets = torch.cat([torch.ones_like(rows), torch.zeros_like(rows)])
        weights = torch.cat([torch.ones(bsz, device=rows.device), valid.float()])
        result = itm_loss(model, paired, targets, self.name, self.stream_table, weights)
        result.metrics["mined"] = ratio(valid.sum(), count(weights, bsz))
        return result


def other_emotion_donors(emotions: Sequence[str], generator: torch.Generator) -> torch.Tensor:
    """Per row, a uniformly drawn row of another emotion (-1 when the batch has none)."""
    labels = {e: k for k, e in enumerate(dict.fromkeys(emotions))}
    codes = torch.tensor([labels[e] for e in emotions])
    other = codes[:, None] != codes[None, :]
    scores = torch.rand(other.shape, generator=generator).masked_fill(~other, -1.0)
    return torch.where(other.any(1), scores.argmax(1), torch.full_like(codes, -1))


class ContrastiveTask(Task):
    """InfoNCE across modalities. Loss: symmetric cross-entropy over the batch, mean over the
    utterances counted once per pair of streams and direction-averaged.

    Options: ``pairs`` (default: every pair of the streams the batch has, e.g. ``[["L","V"],
    ["L","A"],["V","A"]]``), ``temperature`` (0.07), plus the modality options of ``Task``.
    Utterances with an empty stream are left out of that stream's pairs; a pair with fewer than
    two usable utterances contributes nothing (``skipped_pairs`` counts them). No head: the
    backbone's mean-pooled states are compared directly.
    """

    heads = ()

    def __init__(
        self,
        context: TaskContext,
        *,
        pairs: Sequence[Sequence[str] | str] | None = None,
        temperature: float = 0.07,
        **common: Any,
    ) -> None:
        super().__init__(context, **common)
        for subset in self.modality_sets or []:
            if len(subset) < 2:
                raise ConfigError(
                    f"task {self.name}: modality subset {''.join(subset)} has one stream; contrast needs two"
                )
        letters = self.stream_table.letters()
        raw = (
            pairs if pairs is not None else [[a, b] for i, a in enumerate(letters) for b in letters[i + 1 :]]
        )
        self.pairs: list[tuple[str, str]] = []
        for pair in raw:
            subset = parse_streams(pair, f"task {self.name}: pairs", self.stream_table)
            if len(subset) != 2:
                raise ConfigError(f"task {self.name}: pair {pair!r} must name exactly two streams")
            a, b = sorted(subset, key=letters.index)
            self.pairs.append((a, b))
        if not 0 < float(temperature):
            raise ConfigError(f"task {self.name}: temperature={temperature} must be > 0")
        self.temperature = float(temperature)
        self.explicit_pairs = pairs is not None

    def build(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        present = set(self.batch_streams(batch))
        if text_absent(batch, self.special):
            present.discard("L")
        usable = [p for p in self.pairs if set(p) <= present]
        if self.explicit_pairs and len(usable) < len(self.pairs):
            missing = [f"{a}{b}" for a, b in self.pairs if (a, b) not in usable]
            raise UserError(
                f"task {self.name}: pairs {', '.join(missing)} need streams the batch (ids "
                f"{list(batch.get('ids', []))[:3]}...) lacks ({''.join(sorted(present))} present)"
            )
        if not usable:
            raise UserError(
                f"task {self.name} needs two streams but the batch has only {''.join(sorted(present))}; "
                "give it datasets with text and face and/or speech"
            )
        inputs = self.model_inputs(batch)
        inputs["has_text"] = torch.full((batch["input_ids"].shape[0],), "L" in present)
        inputs["contrastive_pairs"] = ["".join(p) for p in usable]
        has = {"L": inputs["has_text"]}
        has.update(
            {
                s.letter: batch[s.mask_key].bool().any(1)
                for s in self.stream_table.frame_streams()
                if s.mask_key in batch
            }
        )
        # the utterances of each pair with data in both streams, found here on the CPU
        inputs["contrastive_rows"] = {f"{a}{b}": (has[a] & has[b]).nonzero().squeeze(1) for a, b in usable}
        return inputs

    def forward(self, model: torch.nn.Module, inputs: Mapping[str, Any]) -> TaskOutput:
        pairs = [tuple(p) for p in inputs["contrastive_pairs"]]
        needed = sorted({s for p in pairs for s in p}, key=self.stream_table.letters().index)
        embedded = encode_streams_alone(model, inputs, needed, self.stream_table)
        total = None
        n = 0
        correct = 0
        skipped = 0
        guessed = 0  # chance: a blind guess among `count` candidates is right 1 / count of the time
        for a, b in pairs:
            (za, _), (zb, _) = embedded[a], embedded[b]
            rows = inputs["contrastive_rows"][f"{a}{b}"]
            size = rows.numel()  # known on the host: no sync
            if size < 2:
                skipped += 1
                continue
            logits = za.index_select(0, rows) @ zb.index_select(0, rows).T / self.temperature
            gold = torch.arange(size, device=logits.device)
            per_row = (
                F.cross_entropy(logits, gold, reduction="none")
                + F.cross_entropy(logits.T, gold, reduction="none")
            ) / 2
            total = per_row.sum() if total is None else total + per_row.sum()
            n += size
            correct = correct + (logits.argmax(1) == gold).sum()
            guessed += 1
        reference = next(iter(embedded.values()))[0]
        device = reference.device
        metrics = {
            "acc": ratio(correct, n, device=device),
            "chance": ratio(guessed, n, device=device),
            "skipped_pairs": ratio(skipped, len(pairs), device=device),
        }
        if total is None:
            return TaskOutput(zero_loss(reference), count(reference, 0), metrics)
        return TaskOutput(total / n, count(reference, n), metrics)
