"""The field's evaluation protocols: which label, which classes, which folds.

A protocol turns the label columns of a text database (`{id: {column: value}}`) into
  * targets: a class index (classification) or a float score (regression) per kept utterance,
  * folds: train / valid / test id lists, every one non-empty,
  * the validation metric used for model selection (UAR for IEMOCAP / MSP-IMPROV, weighted F1
    for MELD, accuracy for MOSI binary and 7-class, MAE for MOSI regression).

The corpora, their label sets and metrics are those of the corpus table (`evaluation/corpora.py`):
iemocap4, iemocap6, msp4, meld (emotion | sentiment), mosi (binary | 7class | regression), emodb,
ravdess, and generic (any label column + class list; default: every distinct value of the column, sorted).
Fold schemes:
  split      a split column (train / valid|dev / test), one fold
  session    leave one session out: test = session k; validation = whole dialogues carved from the
             training sessions (deterministic, `valid_fraction`), so the test session never selects
  speaker    leave one speaker out: test = one speaker; validation = the other speaker of the same
             session; train = every other session (10 folds on IEMOCAP, 12 on MSP-IMPROV)
  loso       leave one speaker out over a flat speaker column (EmoDB: 10 folds): test = one speaker;
             validation = `valid_speakers` speakers drawn from the OTHER speakers (a count: the
             next ones after the test speaker in sorted order, cyclically, so every speaker
             validates equally often; or an explicit map {test speaker: [validation speakers]});
             train = the rest. Deterministic: no seed, the same folds in every run.
             RAVDESS leave-one-actor-out (24 folds) is this scheme over its `actor` column.
  speaker_kfold  `num_folds` folds over a flat speaker column: the sorted speakers cut into that
             many consecutive blocks (sizes differ by at most one); test = one block; validation =
             the `valid_speakers` speakers after the block (sorted order, cyclically: with as many as
             a block holds, the next fold's test speakers, so every speaker validates once); train =
             the rest. RAVDESS 6-fold: actors 01-04, 05-08, ... (2 female + 2 male each).

Sessions come from a `session` column or, failing that, from the dialogue name (IEMOCAP
`Ses01F_impro01` -> `Ses01`); a speaker is (session, `speaker` column), e.g. IEMOCAP's M/F.
A label value outside the label map (and not a documented drop) is an error that names the value
and how many rows carry it: guessing would change the task silently.

Fewer labels (`train_fraction` < 1): every fold's TRAINING split keeps that fraction of its
utterances per class (at least one per class present), chosen by the SHA-256 of
`f"{subset_seed}:{id}"` (the smallest hashes of each class), so the subset depends on the ids and
`subset_seed` only: every init and training seed sees the same labelled utterances, and the
validation and test splits are never touched. Regression targets form one stratum.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from uniter3m.errors import ConfigError, UserError
from uniter3m.evaluation.corpora import corpus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelSpec:
    """How raw label values become targets."""

    column: str
    classes: tuple[str, ...]  # empty for regression
    mapping: Mapping[str, str]  # raw value -> class name
    drop: frozenset[str] = frozenset()  # raw values removed on purpose (counted)
    regression: bool = False
    score_to_class: str | None = None  # "sign" / "round7": classes derived from a float score

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class Fold:
    name: str
    train: list[str]
    valid: list[str]
    test: list[str]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "valid": len(self.valid), "test": len(self.test)}


@dataclass
class ProtocolPlan:
    name: str
    label: LabelSpec
    targets: dict[str, int | float]
    folds: list[Fold]
    selection_metric: str
    dropped: dict[str, int] = field(default_factory=dict)  # raw label value -> rows dropped
    # train_fraction < 1: fold name -> class -> [kept, of] training utterances
    train_kept: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    @property
    def regression(self) -> bool:
        return self.label.regression


SCHEMES = ("split", "session", "speaker", "loso", "speaker_kfold")


def label_spec(
    name: str,
    target: str | None = None,
    label_column: str | None = None,
    classes: list[str] | None = None,
    label_map: Mapping[str, str] | None = None,
    drop_labels: list[str] | None = None,
) -> tuple[LabelSpec, str]:
    """The label spec and the default validation metric of a protocol (from the corpus table)."""
    entry = corpus(name).target(target)
    if name == "generic":
        if not label_column or not classes:
            raise ConfigError("protocol generic needs protocol.label_column and protocol.classes")
        names = tuple(str(c) for c in classes)
        spec = LabelSpec(label_column, names, {c: c for c in names})
    else:
        mapping = dict(entry.mapping) or {c: c for c in entry.classes}
        if entry.regression or entry.score_to_class:
            mapping = {}
        spec = LabelSpec(
            label_column or entry.column,
            entry.classes,
            mapping,
            entry.drop,
            entry.regression,
            entry.score_to_class,
        )
    if label_map or drop_labels:
        if spec.regression or spec.score_to_class:
            raise ConfigError(f"protocol {name}: label_map/drop_labels do not apply to score targets")
        mapping = dict(spec.mapping) | dict(label_map or {})
        unknown = sorted({v for v in mapping.values() if v not in spec.classes})
        if unknown:
            raise ConfigError(
                f"protocol {name}: protocol.label_map maps to {unknown}, which are not classes {list(spec.classes)}"
            )
        spec = LabelSpec(spec.column, spec.classes, mapping, spec.drop | frozenset(drop_labels or ()))
    return spec, entry.metric


def make_targets(
    rows: Mapping[str, Mapping[str, Any]], spec: LabelSpec, source: str = "text db"
) -> tuple[dict[str, int | float], dict[str, int]]:
    """Targets for every row, and the count of rows dropped per raw value.

    Raises naming every unknown value with its row count, and every row lacking the column.
    """
    targets: dict[str, int | float] = {}
    dropped: Counter[str] = Counter()
    unknown: Counter[str] = Counter()
    missing: list[str] = []
    index = {c: i for i, c in enumerate(spec.classes)}
    for uid, labels in rows.items():
        if spec.column not in labels or labels[spec.column] is None:
            missing.append(uid)
            continue
        raw = labels[spec.column]
        if spec.regression or spec.score_to_class:
            score = _score(raw, uid, spec.column, source)
            if spec.regression:
                targets[uid] = score
            elif spec.score_to_class == "sign":
                targets[uid] = int(score >= 0)
            else:
                targets[uid] = int(round(min(3.0, max(-3.0, score)))) + 3
            continue
        value = str(raw)
        if value in spec.mapping:
            targets[uid] = index[spec.mapping[value]]
        elif value in spec.drop:
            dropped[value] += 1
        else:
            unknown[value] += 1
    if missing:
        raise UserError(
            f"{source}: {len(missing)} row(s) have no label column {spec.column!r} (first id {missing[0]!r}); "
            "rebuild the text db with that label column or set protocol.label_column"
        )
    if unknown:
        listed = ", ".join(f"{v!r} ({n} rows)" for v, n in unknown.most_common())
        raise UserError(
            f"{source}: label column {spec.column!r} holds values not in the label map: {listed}; "
            f"known classes {list(spec.classes)}; add them to protocol.label_map or protocol.drop_labels"
        )
    return targets, dict(dropped)


def _score(raw: Any, uid: str, column: str, source: str) -> float:
    try:
        score = float(raw)
    except (TypeError, ValueError):
        raise UserError(f"{source}: id {uid!r} has a non-numeric {column!r} value {raw!r}") from None
    if not math.isfinite(score):
        raise UserError(f"{source}: id {uid!r} has a non-finite {column!r} value {raw!r}")
    return score


_SESSION_RE = re.compile(r"(Ses\d+|session\d+|S\d+)", re.IGNORECASE)


def session_of(labels: Mapping[str, Any], uid: str, session_column: str, dialogue_column: str) -> str:
    """Session from a session column, else from the dialogue name (IEMOCAP `Ses01F_impro01`)."""
    if labels.get(session_column) not in (None, ""):
        return str(labels[session_column])
    dialogue = labels.get(dialogue_column)
    match = _SESSION_RE.match(str(dialogue)) if dialogue is not None else None
    if match is None:
        raise UserError(
            f"id {uid!r}: no {session_column!r} column and no session in its {dialogue_column!r} value "
            f"{dialogue!r}; add a session column to the text db or use protocol.scheme='split'"
        )
    return match.group(1)


def split_folds(
    rows: Mapping[str, Mapping[str, Any]],
    ids: list[str],
    split_column: str,
    split_values: Mapping[str, list[str]],
) -> list[Fold]:
    role_of = {v: role for role, values in split_values.items() for v in values}
    lacking = [uid for uid in ids if rows[uid].get(split_column) is None]
    if lacking:
        raise UserError(
            f"{len(lacking)} of {len(ids)} rows have no split column {split_column!r} (e.g. id {lacking[0]!r}); "
            "build the text db with that label column (--label-col ...,split), or set protocol.split_column / "
            "protocol.scheme"
        )
    parts: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    unknown: Counter[str] = Counter()
    for uid in ids:
        value = rows[uid].get(split_column)
        if str(value) in role_of:
            parts[role_of[str(value)]].append(uid)
        else:
            unknown[str(value)] += 1
    if unknown:
        listed = ", ".join(f"{v!r} ({n} rows)" for v, n in unknown.most_common())
        raise UserError(
            f"split column {split_column!r} holds values outside protocol.split_values {dict(split_values)}: "
            f"{listed}"
        )
    return [Fold("split", parts["train"], parts["valid"], parts["test"])]


def session_folds(
    rows: Mapping[str, Mapping[str, Any]],
    ids: list[str],
    session_column: str,
    dialogue_column: str,
    valid_fraction: float,
) -> list[Fold]:
    """Leave one session out; validation = a fixed hash-chosen share of the other sessions' dialogues."""
    if not 0 < valid_fraction < 1:
        raise ConfigError(f"protocol.valid_fraction must be in (0, 1), got {valid_fraction}")
    session = {uid: session_of(rows[uid], uid, session_column, dialogue_column) for uid in ids}
    folds = []
    for held in sorted(set(session.values())):
        train, valid, test = [], [], []
        for uid in ids:
            if session[uid] == held:
                test.append(uid)
            elif _in_valid(str(rows[uid].get(dialogue_column, uid)), valid_fraction):
                valid.append(uid)
            else:
                train.append(uid)
        folds.append(Fold(f"session-{held}", train, valid, test))
    return folds


def _in_valid(group: str, fraction: float) -> bool:
    """Stable across runs and Python versions (unlike hash()): the same dialogues validate every time."""
    h = int.from_bytes(hashlib.sha256(group.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def speaker_folds(
    rows: Mapping[str, Mapping[str, Any]],
    ids: list[str],
    session_column: str,
    dialogue_column: str,
    speaker_column: str,
) -> list[Fold]:
    """Leave one speaker out: test one speaker, validate on the other speaker of that session."""
    speaker_of = _speaker_of(rows, ids, speaker_column, "speaker")
    speaker = {
        uid: (session_of(rows[uid], uid, session_column, dialogue_column), speaker_of[uid]) for uid in ids
    }
    by_session: dict[str, set[str]] = {}
    for sess, spk in speaker.values():
        by_session.setdefault(sess, set()).add(spk)
    folds = []
    for sess in sorted(by_session):
        spks = sorted(by_session[sess])
        if len(spks) != 2:
            raise UserError(
                f"session {sess!r} has speakers {spks}; leave-one-speaker-out needs exactly two per session "
                f"(column {speaker_column!r})"
            )
        for spk in spks:
            other = spks[1] if spk == spks[0] else spks[0]
            train = [u for u in ids if speaker[u][0] != sess]
            valid = [u for u in ids if speaker[u] == (sess, other)]
            test = [u for u in ids if speaker[u] == (sess, spk)]
            folds.append(Fold(f"{sess}-{spk}", train, valid, test))
    return folds


def _speaker_of(
    rows: Mapping[str, Mapping[str, Any]], ids: list[str], column: str, scheme: str
) -> dict[str, str]:
    speaker: dict[str, str] = {}
    for uid in ids:
        value = rows[uid].get(column)
        if value in (None, ""):
            raise UserError(f"id {uid!r} has no {column!r} value; the {scheme} scheme needs one per row")
        speaker[uid] = str(value)
    return speaker


def _speaker_block_folds(
    speaker: Mapping[str, str], ids: list[str], blocks: list[list[str]], valid: list[list[str]]
) -> list[Fold]:
    """One fold per block of speakers: test = the block, validation = its `valid` speakers, train = the rest."""
    folds = []
    for block, chosen in zip(blocks, valid, strict=True):
        test_set, valid_set = set(block), set(chosen)
        train = [u for u in ids if speaker[u] not in test_set | valid_set]
        valid_ids = [u for u in ids if speaker[u] in valid_set]
        test = [u for u in ids if speaker[u] in test_set]
        folds.append(Fold(f"{'+'.join(block)}-valid{'+'.join(sorted(valid_set))}", train, valid_ids, test))
    return folds


def _next_speakers(spks: list[str], blocks: list[list[str]], count: int, scheme: str) -> list[list[str]]:
    """Per block, the `count` speakers after its last one in sorted order (cyclically), never its own."""
    largest = max(len(b) for b in blocks)
    if not 1 <= count <= len(spks) - largest - 1:
        raise ConfigError(
            f"protocol.valid_speakers {count}: with {len(spks)} speakers and {largest} tested per fold "
            f"({scheme}) give 1..{len(spks) - largest - 1} (at least one speaker must remain for training)"
        )
    after = [spks.index(b[-1]) + 1 for b in blocks]
    return [[spks[(a + j) % len(spks)] for j in range(count)] for a in after]


def loso_folds(
    rows: Mapping[str, Mapping[str, Any]],
    ids: list[str],
    speaker_column: str,
    valid_speakers: int | Mapping[str, list[str]] = 1,
) -> list[Fold]:
    """Leave one speaker out; validation speakers come from the training speakers, never the test one."""
    speaker = _speaker_of(rows, ids, speaker_column, "loso")
    spks = sorted(set(speaker.values()))
    blocks = [[s] for s in spks]
    if isinstance(valid_speakers, int):
        return _speaker_block_folds(
            speaker, ids, blocks, _next_speakers(spks, blocks, valid_speakers, "loso")
        )
    chosen = {str(k): [str(v) for v in vs] for k, vs in valid_speakers.items()}
    problems = [f"no entry for test speaker {s!r}" for s in spks if s not in chosen]
    for test, vs in chosen.items():
        if test not in spks:
            problems.append(f"{test!r} is not a speaker ({', '.join(spks)})")
        problems += [f"{test!r}: validation speaker {v!r} is not a speaker" for v in vs if v not in spks]
        if test in vs:
            problems.append(f"{test!r} validates on itself (its test speaker)")
        if not vs or len(set(vs) | {test}) >= len(spks):
            problems.append(f"{test!r}: give 1..{len(spks) - 2} validation speakers, got {vs}")
    if problems:
        raise ConfigError("protocol.valid_speakers: " + "; ".join(problems))
    return _speaker_block_folds(speaker, ids, blocks, [chosen[s] for s in spks])


def speaker_kfold_folds(
    rows: Mapping[str, Mapping[str, Any]],
    ids: list[str],
    speaker_column: str,
    num_folds: int,
    valid_speakers: int,
) -> list[Fold]:
    """`num_folds` folds of consecutive speakers (sorted); validation = the next `valid_speakers`."""
    speaker = _speaker_of(rows, ids, speaker_column, "speaker_kfold")
    spks = sorted(set(speaker.values()))
    if not 2 <= num_folds <= len(spks):
        raise ConfigError(f"protocol.num_folds {num_folds}: with {len(spks)} speakers give 2..{len(spks)}")
    if not isinstance(valid_speakers, int):
        raise ConfigError("protocol.valid_speakers: the speaker_kfold scheme takes a count, not a map")
    sizes = [len(spks) // num_folds + (i < len(spks) % num_folds) for i in range(num_folds)]
    starts = [sum(sizes[:i]) for i in range(num_folds)]
    blocks = [spks[a : a + n] for a, n in zip(starts, sizes, strict=True)]
    return _speaker_block_folds(
        speaker, ids, blocks, _next_speakers(spks, blocks, valid_speakers, "speaker_kfold")
    )


def _subset_rank(uid: str, subset_seed: int) -> str:
    return hashlib.sha256(f"{subset_seed}:{uid}".encode()).hexdigest()


def subsample_train(
    fold: Fold, targets: Mapping[str, int | float], spec: LabelSpec, fraction: float, subset_seed: int
) -> tuple[Fold, dict[str, list[int]]]:
    """`fold` with `fraction` of its training utterances per class (>= 1 per class present), chosen by
    hash of (subset_seed, id); validation and test unchanged. Also {class: [kept, of]}."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"protocol.train_fraction must be in (0, 1], got {fraction}")
    by_class: dict[str, list[str]] = {}
    for uid in fold.train:
        name = "all" if spec.regression else spec.classes[int(targets[uid])]
        by_class.setdefault(name, []).append(uid)
    keep: set[str] = set()
    counts: dict[str, list[int]] = {}
    for name in sorted(by_class):
        ids = by_class[name]
        k = min(len(ids), max(1, round(fraction * len(ids))))
        keep.update(sorted(ids, key=lambda u: _subset_rank(u, subset_seed))[:k])
        counts[name] = [k, len(ids)]
    train = [uid for uid in fold.train if uid in keep]  # the fold's own order
    return Fold(fold.name, train, fold.valid, fold.test), counts


def build_protocol(
    rows: Mapping[str, Mapping[str, Any]],
    name: str,
    *,
    scheme: str = "split",
    target: str | None = None,
    label_column: str | None = None,
    classes: list[str] | None = None,
    label_map: Mapping[str, str] | None = None,
    drop_labels: list[str] | None = None,
    split_column: str = "split",
    split_values: Mapping[str, list[str]] | None = None,
    session_column: str = "session",
    dialogue_column: str = "dialogue",
    speaker_column: str = "speaker",
    valid_fraction: float = 0.1,
    selection_metric: str | None = None,
    source: str = "text db",
    valid_speakers: int | Mapping[str, list[str]] = 1,
    num_folds: int = 6,
    train_fraction: float = 1.0,
    subset_seed: int = 0,
) -> ProtocolPlan:
    """Targets + folds for `rows` ({id: labels}); every split of every fold must be non-empty.
    `train_fraction` < 1 keeps that share of each fold's training labels (see the module doc)."""
    if name == "generic" and not classes and label_column:
        # No class list given: every distinct value of the column is a class (sorted, so the
        # class indices are the same in every run); nothing can then be "unknown".
        classes = sorted(
            {str(labels[label_column]) for labels in rows.values() if labels.get(label_column) is not None}
        )
    spec, default_metric = label_spec(name, target, label_column, classes, label_map, drop_labels)
    targets, dropped = make_targets(rows, spec, source)
    ids = [uid for uid in rows if uid in targets]
    if scheme == "split":
        values = dict(split_values or {"train": ["train"], "valid": ["valid", "dev"], "test": ["test"]})
        if set(values) != {"train", "valid", "test"}:
            raise ConfigError(
                f"protocol.split_values needs exactly the keys train, valid, test; got {sorted(values)}"
            )
        folds = split_folds(rows, ids, split_column, values)
    elif scheme == "session":
        folds = session_folds(rows, ids, session_column, dialogue_column, valid_fraction)
    elif scheme == "speaker":
        folds = speaker_folds(rows, ids, session_column, dialogue_column, speaker_column)
    elif scheme == "loso":
        folds = loso_folds(rows, ids, speaker_column, valid_speakers)
    elif scheme == "speaker_kfold":
        folds = speaker_kfold_folds(rows, ids, speaker_column, num_folds, valid_speakers)
    else:
        raise ConfigError(f"protocol.scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
    for fold in folds:
        empty = [part for part, n in fold.sizes().items() if n == 0]
        if empty:
            raise UserError(
                f"{source}: protocol {name}/{scheme} fold {fold.name!r} has an empty {' and '.join(empty)} split "
                f"(sizes {fold.sizes()}); check the split/session/speaker columns or the protocol"
            )
    if spec.regression and selection_metric not in (None, "mae", "pearson", "acc2"):
        raise ConfigError(f"selection metric {selection_metric!r} does not apply to regression")
    kept: dict[str, dict[str, list[int]]] = {}
    if train_fraction != 1.0:
        for i, fold in enumerate(folds):
            folds[i], kept[fold.name] = subsample_train(fold, targets, spec, train_fraction, subset_seed)
            listed = ", ".join(f"{c} {k}/{n}" for c, (k, n) in kept[fold.name].items())
            log.info(
                "protocol %s fold %s: train_fraction %g (subset_seed %d) keeps %d of %d training "
                "utterances: %s",
                name,
                fold.name,
                train_fraction,
                subset_seed,
                len(folds[i].train),
                len(fold.train),
                listed,
            )
    return ProtocolPlan(name, spec, targets, folds, selection_metric or default_metric, dropped, kept)
