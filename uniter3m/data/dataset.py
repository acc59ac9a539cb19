"""`JoinedDataset`: one utterance = a text record joined with its frame streams by id.

The frame streams are those of the stream table it is given (`uniter3m.streams`; the run
config's): face and speech by default, plus any declared stream; `feat_dbs={"pose": ...}` reads
one, and `face_dbs` / `speech_dbs` are shorthands for the two defaults. Several corpora can be read as one dataset:
give lists of text dbs and matching lists of feature dbs (entry k of every list belongs to
corpus k). Lists of unequal length are an error, never silently zipped short.

Rules, each reported (`report()` and one log line at construction) rather than applied silently:
- an over-long text or frame stream is truncated to `max_txt_len` / `max_frames`, never dropped;
- an id of a text db absent from a feature db is an error by default (`missing="error"`), or the
  utterance is dropped and counted (`missing="drop"`);
- an utterance with zero frames for a stream stays as an empty `(0, D)` stream (no made-up frame);
- with `context` (a `DialogueContext`), the previous turns of the utterance's dialogue in the same
  text db are prepended within a token budget (`uniter3m.data.context`: layout, truncation of the
  oldest tokens first, `ctx_flags`); how many utterances got context and how many turns the budget
  cut is logged (`context_report()`).

Items follow the "Dataset example" contract of DEVELOPERS.md. `lengths[i]` (text tokens + 2 for
[CLS]/[SEP] + frames of each present stream, after truncation) feeds `TokenBucketBatchSampler`
without reading any record.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from uniter3m.data.context import ContextPlan, ContextReport, DialogueContext, assemble, plan_context
from uniter3m.data.context import speaker_tokenizer as _speaker_tokenizer
from uniter3m.data.store import DbReader
from uniter3m.data.tokenization import SpecialTokens
from uniter3m.errors import ConfigError, DatabaseError
from uniter3m.streams import StreamTable

log = logging.getLogger(__name__)

DbLike = DbReader | str | os.PathLike
MISSING_POLICIES = ("error", "drop")
N_EXAMPLES = 5


@dataclass
class JoinReport:
    """What the join did: counts of kept, dropped and truncated utterances."""

    kept: int = 0
    dropped: int = 0  # utterances left out for a missing feature record (any stream)
    dropped_missing: dict[str, int] = field(default_factory=dict)  # stream -> utterances dropped
    dropped_examples: dict[str, list[str]] = field(default_factory=dict)
    truncated: dict[str, int] = field(default_factory=dict)  # "text"/"face"/"speech" -> utterances truncated
    empty: dict[str, int] = field(default_factory=dict)  # stream -> utterances with zero frames
    unused: dict[str, int] = field(default_factory=dict)  # stream -> feature records with no text record

    def line(self) -> str:
        parts = [f"{self.kept} utterances", f"{self.dropped} dropped"]
        for name, what in (
            (self.dropped_missing, "dropped (no {k} record)"),
            (self.truncated, "truncated ({k})"),
            (self.empty, "with zero {k} frames"),
            (self.unused, "{k} records without text"),
        ):
            parts += [f"{n} {what.format(k=k)}" for k, n in name.items() if n]
        return "joined dataset: " + ", ".join(parts)


def _as_list(value: DbLike | Sequence[DbLike] | None) -> list[DbLike] | None:
    if value is None:
        return None
    if isinstance(value, (DbReader, str, os.PathLike)):
        return [value]
    return list(value)


def _open(db: DbLike, kind: str) -> DbReader:
    if isinstance(db, DbReader):
        if db.kind != kind:
            raise DatabaseError(f"{db.path} is a {db.kind!r} database where a {kind!r} one was expected")
        return db
    return DbReader(db, kind=kind)


def _examples(ids: Iterable[str]) -> str:
    ids = list(ids)
    shown = ", ".join(repr(i) for i in ids[:N_EXAMPLES])
    return shown + (", ..." if len(ids) > N_EXAMPLES else "")


def _float32_copy(arr: np.ndarray) -> np.ndarray:
    """A writable float32 copy (records are read-only views of LMDB bytes).

    float16 goes through torch, whose vectorised half->float conversion is about 5x faster than
    numpy's; this conversion is the largest cost of reading a float16 feature db.
    """
    if arr.dtype == np.float16:
        return torch.from_numpy(arr.copy()).float().numpy()
    return np.array(arr, dtype=np.float32)


class JoinedDataset(Dataset):
    """Text db(s) joined with zero or more frame-stream feature dbs by utterance id.

    Args:
        txt_dbs: a text db (DbReader or path) or a list of them, one per corpus.
        face_dbs, speech_dbs: None, or a feature db / list matching `txt_dbs` one to one.
        feat_dbs: {stream name: db or list} for any stream of the table (face and speech too).
        modalities: letters to read (e.g. "LVA"); default: L plus every stream given. With "L"
            off, the text is empty (the collator then emits `[CLS] [SEP]`); labels are kept.
        max_txt_len: keep at most this many text tokens (without [CLS]/[SEP]).
        max_frames: keep at most this many frames per stream: an int for every stream or a
            mapping {"face": n, "speech": m}.
        normalize: subtract the feature db's meta `mean` and divide by max(`std`, `std_floor`).
        missing: "error" (default) or "drop" when a text id has no record in a feature db.
        ids: keep only these utterance ids (folds, splits); an id found in no text db is an error.
        context: previous turns of the same dialogue to prepend (`DialogueContext` or the mapping of
            the `data.context` config section); `max_txt_len` still limits the current utterance only.
        tokenizer: a tokenizer or its folder, for the speaker prefixes of `context` (default: the
            folder the text db's meta names).
        stream_table: the frame streams there are (default: face and speech); `streams` lists
            those this dataset reads.
    """

    def __init__(
        self,
        txt_dbs: DbLike | Sequence[DbLike],
        face_dbs: DbLike | Sequence[DbLike] | None = None,
        speech_dbs: DbLike | Sequence[DbLike] | None = None,
        *,
        feat_dbs: Mapping[str, DbLike | Sequence[DbLike] | None] | None = None,
        modalities: str | None = None,
        max_txt_len: int | None = None,
        max_frames: int | Mapping[str, int] | None = None,
        normalize: bool = False,
        std_floor: float = 1e-6,
        missing: str = "error",
        ids: Iterable[str] | None = None,
        context: DialogueContext | Mapping[str, Any] | None = None,
        tokenizer: Any = None,
        stream_table: StreamTable = StreamTable(),
    ):
        self.stream_table = stream_table
        txt_list = _as_list(txt_dbs)
        if not txt_list:
            raise ConfigError("JoinedDataset needs at least one text database (txt_dbs is empty)")
        given = {"face": face_dbs, "speech": speech_dbs, **dict(feat_dbs or {})}
        for name in given:
            self.stream_table.get(name)  # an unknown stream is an error naming the known ones
        stream_lists = {s: _as_list(given.get(s)) for s in self.stream_table.names()}
        self._check_list_lengths(txt_list, stream_lists)
        if missing not in MISSING_POLICIES:
            raise ConfigError(
                f"missing={missing!r} is not a policy; use one of {', '.join(MISSING_POLICIES)}"
            )
        self.modalities = self._check_modalities(modalities, stream_lists)
        self.max_txt_len = self._check_max("max_txt_len", max_txt_len)
        self.max_frames = self._frame_limits(max_frames)
        self.normalize = normalize
        self.missing = missing
        self.context = DialogueContext.parse(context)
        self._tokenizer = tokenizer

        self.txt_dbs = [_open(db, "txt") for db in txt_list]
        self._check_same_tokenizer()
        # Streams outside `modalities` are not opened at all: a text-only run needs no feature db.
        self.feat_dbs: dict[str, list[DbReader]] = {
            s: [_open(db, "feat") for db in dbs]
            for s, dbs in stream_lists.items()
            if dbs is not None and self.stream_table.get(s).letter in self.modalities
        }
        self.streams = tuple(s for s in self.stream_table.names() if s in self.feat_dbs)
        self._norm = {
            s: [self._norm_stats(db, std_floor) if normalize else None for db in dbs]
            for s, dbs in self.feat_dbs.items()
        }
        self._dims = {s: [self._dim(db) for db in dbs] for s, dbs in self.feat_dbs.items()}
        self._soft_dims = {
            s: [int(db.meta.get("soft_label_dim") or 0) for db in dbs] for s, dbs in self.feat_dbs.items()
        }
        for s, dims in self._dims.items():
            if len(set(dims)) > 1:
                listing = ", ".join(
                    f"{db.path} (dim {d})" for db, d in zip(self.feat_dbs[s], dims, strict=True)
                )
                raise DatabaseError(
                    f"the {s} databases have different feature dims: {listing}; one dataset needs one dim per "
                    "stream: rebuild them with the same extractor"
                )

        if not normalize:
            self._warn_large_values()
        self._report = JoinReport()
        self._join(ids)
        log.info(self._report.line())
        if self._context_plans:
            log.info(self._context_report.line())

    # ----------------------------------------------------------------- checks
    @staticmethod
    def _check_list_lengths(txt_list: list[DbLike], stream_lists: dict[str, list[DbLike] | None]) -> None:
        for s, dbs in stream_lists.items():
            if dbs is not None and len(dbs) != len(txt_list):
                raise ConfigError(
                    f"txt_dbs has {len(txt_list)} databases but {s}_dbs has {len(dbs)}: give one {s} db per "
                    f"text db, in the same order (txt_dbs={[str(getattr(d, 'path', d)) for d in txt_list]}, "
                    f"{s}_dbs={[str(getattr(d, 'path', d)) for d in dbs]})"
                )

    def _check_same_tokenizer(self) -> None:
        """Corpora tokenised with different vocabularies cannot share one embedding table."""
        hashes = {str(db.path): (db.meta.get("tokenizer") or {}).get("vocab_hash") for db in self.txt_dbs}
        if len({h for h in hashes.values() if h is not None}) > 1:
            raise DatabaseError(
                f"the text databases were built with different tokenizers (vocab_hash per db: {hashes}); "
                "rebuild them with one --tokenizer"
            )

    def special_tokens(self) -> SpecialTokens:
        """The special ids recorded by build-txt-db (what the Collator needs)."""
        db = self.txt_dbs[0]
        try:
            return SpecialTokens.from_dict(db.meta["tokenizer"])
        except (KeyError, TypeError, ValueError) as err:
            raise DatabaseError(
                f"{db.path}/meta.json has no complete 'tokenizer' entry ({err!r}); rebuild it with build-txt-db"
            ) from None

    def _check_modalities(self, modalities: str | None, stream_lists: dict[str, list[DbLike] | None]) -> str:
        given = "L" + "".join(
            self.stream_table.get(s).letter for s, dbs in stream_lists.items() if dbs is not None
        )
        if modalities is None:
            return self.stream_table.parse_modalities(given)
        if not modalities:
            raise ConfigError(
                f"modalities={modalities!r}: use a non-empty subset of {self.stream_table.letters()!r}"
            )
        wanted = self.stream_table.parse_modalities(modalities, f"modalities={modalities!r}")
        for stream in self.stream_table.streams_of(wanted):
            if stream_lists[stream.name] is None:
                raise ConfigError(
                    f"modalities={modalities!r} asks for {stream.name} ({stream.letter}) but no {stream.name} "
                    f"database was given: pass one or drop {stream.letter!r} from modalities"
                )
        return wanted

    @staticmethod
    def _check_max(name: str, value: int | None) -> int | None:
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 0):
            raise ConfigError(f"{name}={value!r} must be a non-negative integer or None")
        return None if value is None else int(value)

    def _frame_limits(self, max_frames: int | Mapping[str, int] | None) -> dict[str, int | None]:
        names = self.stream_table.names()
        if max_frames is None or isinstance(max_frames, (int, np.integer)):
            return {s: self._check_max("max_frames", max_frames) for s in names}
        unknown = set(max_frames) - set(names)
        if unknown:
            raise ConfigError(
                f"max_frames has unknown streams {sorted(unknown)}; the streams are {list(names)}"
            )
        return {s: self._check_max(f"max_frames[{s!r}]", max_frames.get(s)) for s in names}

    @staticmethod
    def _dim(db: DbReader) -> int:
        dim = db.meta.get("dim")
        if not isinstance(dim, int) or dim <= 0:
            raise DatabaseError(
                f"{db.path}/meta.json has no valid 'dim' ({dim!r}); rebuild it with build-feat-db"
            )
        return dim

    @staticmethod
    def _norm_stats(db: DbReader, std_floor: float) -> tuple[np.ndarray, np.ndarray]:
        mean, std = db.meta.get("mean"), db.meta.get("std")
        dim = db.meta.get("dim")
        if mean is None or std is None or len(mean) != dim or len(std) != dim:
            raise DatabaseError(
                f"{db.path}/meta.json lacks per-dimension 'mean'/'std' of length dim={dim}, needed for "
                "normalize=True: rebuild it with build-feat-db or pass normalize=False"
            )
        mean = np.asarray(mean, dtype=np.float32)
        inv_std = 1.0 / np.maximum(np.asarray(std, dtype=np.float32), np.float32(std_floor))
        return mean, inv_std

    LARGE_VALUE = 1e3

    def _warn_large_values(self) -> None:
        """Raw frames far from unit scale (openSMILE energies, pixel sums) make training diverge
        (loss 1e12 with no other sign); say so when normalisation is off."""
        for s, dbs in self.feat_dbs.items():
            for db in dbs:
                mean, std = db.meta.get("mean") or [0.0], db.meta.get("std") or [0.0]
                scale = (
                    float(np.max(np.abs(np.asarray(mean)) + np.asarray(std)))
                    if len(mean) == len(std)
                    else 0.0
                )
                if scale > self.LARGE_VALUE:
                    log.warning(
                        "%s frames of %s reach about %.3g with normalize off; training on them is likely to "
                        "diverge: set the data's normalize to true (z-score with the db's mean/std)",
                        s,
                        db.path,
                        scale,
                    )

    # ------------------------------------------------------------------- join
    def _join(self, ids: Iterable[str] | None) -> None:
        """Build the item table (corpus index, id, lengths) from the dbs' indexes only."""
        wanted = None if ids is None else set(ids)
        seen: dict[str, int] = {}
        rows_db: list[int] = []
        rows_id: list[str] = []
        missing: dict[str, list[str]] = {s: [] for s in self.streams}
        for k, txt in enumerate(self.txt_dbs):
            for uid in txt.ids:
                if wanted is not None and uid not in wanted:
                    continue
                if uid in seen:
                    raise DatabaseError(
                        f"utterance id {uid!r} is in both {self.txt_dbs[seen[uid]].path} and {txt.path}; ids must be "
                        "unique across the databases of one dataset: rebuild them with `uniter3m build-txt-db --id-prefix NAME_` "
                        "(and their feature dbs with the same ids, e.g. a build-media-db --manifest id column)"
                    )
                seen[uid] = k
                absent = [s for s in self.streams if uid not in self.feat_dbs[s][k]]
                for s in absent:
                    missing[s].append(uid)
                if not absent:
                    rows_db.append(k)
                    rows_id.append(uid)
        if wanted is not None and len(seen) != len(wanted):
            unknown = sorted(wanted - set(seen))
            raise DatabaseError(
                f"{len(unknown)} requested ids are in none of the text databases "
                f"({', '.join(str(d.path) for d in self.txt_dbs)}), e.g. {_examples(unknown)}: "
                "check the split/fold list against the databases"
            )
        for s, lost in missing.items():
            if not lost:
                continue
            if self.missing == "error":
                paths = ", ".join(str(d.path) for d in self.feat_dbs[s])
                raise DatabaseError(
                    f"{len(lost)} utterances of the text database have no record in the {s} database ({paths}), "
                    f"e.g. {_examples(lost)}: rebuild the {s} database with these ids, or set the data's `missing` to 'drop' "
                    "(missing='drop' in Python) to leave them out (the count is logged)"
                )
            self._report.dropped_missing[s] = len(lost)
            self._report.dropped_examples[s] = lost[:N_EXAMPLES]
            log.warning("dropping %d utterances with no %s record, e.g. %s", len(lost), s, _examples(lost))

        self._db_index = np.asarray(rows_db, dtype=np.int64)
        self.ids: list[str] = rows_id
        self._report.kept = len(rows_id)
        self._report.dropped = len(seen) - len(rows_id)
        self._lengths_of_rows()

    def _lengths_of_rows(self) -> None:
        n = len(self.ids)
        if "L" in self.modalities:
            raw = np.fromiter(
                (self.txt_dbs[k].length_of(u) for k, u in zip(self._db_index, self.ids, strict=True)),
                np.int64,
                n,
            )
            txt = raw if self.max_txt_len is None else np.minimum(raw, self.max_txt_len)
            self._report.truncated["text"] = int((raw > txt).sum())
        else:
            txt = np.zeros(n, dtype=np.int64)
        self._plan_context()
        total = txt + self.ctx_lengths + 2
        self.txt_lengths = txt
        self.frame_lengths: dict[str, np.ndarray] = {}
        for s in self.streams:
            dbs = self.feat_dbs[s]
            raw = np.fromiter(
                (dbs[k].length_of(u) for k, u in zip(self._db_index, self.ids, strict=True)), np.int64, n
            )
            cap = self.max_frames[s]
            frames = raw if cap is None else np.minimum(raw, cap)
            self._report.truncated[s] = int((raw > frames).sum())
            self._report.empty[s] = int((raw == 0).sum())
            used_per_db = np.bincount(self._db_index, minlength=len(dbs))
            self._report.unused[s] = int(sum(len(db) for db in dbs) - used_per_db.sum())
            self.frame_lengths[s] = frames
            total = total + frames
        self.lengths: np.ndarray = total

    def _plan_context(self) -> None:
        """Choose every utterance's context turns (per text db: a dialogue never spans two dbs)."""
        n = len(self.ids)
        self.ctx_lengths = np.zeros(n, dtype=np.int64)
        self._context_plans: dict[int, ContextPlan] = {}
        self._context_row = np.full(n, -1, dtype=np.int64)
        self._context_report = ContextReport()
        if self.context is None or "L" not in self.modalities:
            return
        self._sep_id = self.special_tokens().sep_id
        speaker_ids = _speaker_tokenizer(self._load_tokenizer()) if self.context.speakers else None
        for k, db in enumerate(self.txt_dbs):
            rows = np.flatnonzero(self._db_index == k)
            plan = plan_context(db, [self.ids[r] for r in rows], self.context, speaker_ids)
            self._context_plans[k] = plan
            self._context_row[rows] = np.arange(len(rows))
            self.ctx_lengths[rows] = plan.lengths
            self._context_report.add(plan.report)

    def _load_tokenizer(self) -> Any:
        """The tokenizer for speaker prefixes: the one given, else the text db's (checked by vocab hash)."""
        from uniter3m.data.tokenization import load_tokenizer, vocab_hash

        db = self.txt_dbs[0]
        meta = db.meta.get("tokenizer") or {}
        given = self._tokenizer if self._tokenizer is not None else meta.get("name")
        if given is None:
            raise ConfigError(
                f"data.context.speakers needs the tokenizer of {db.path} and its meta names none: set the "
                "run's `tokenizer` to its folder"
            )
        tokenizer = load_tokenizer(given) if isinstance(given, (str, os.PathLike)) else given
        if meta.get("vocab_hash") and vocab_hash(tokenizer) != meta["vocab_hash"]:
            raise DatabaseError(
                f"tokenizer {given} differs from the one {db.path} was built with (vocab hash {meta['vocab_hash']}); "
                "set the run's `tokenizer` to that one"
            )
        return tokenizer

    # ------------------------------------------------------------------ access
    @property
    def stream_lengths(self) -> np.ndarray:
        """(N, 1 + streams) lengths as the collator pads them: text (+ context) + 2, then each stream's frames."""
        parts = [self.txt_lengths + self.ctx_lengths + 2, *(self.frame_lengths[s] for s in self.streams)]
        return np.stack(parts, axis=1)

    def report(self) -> JoinReport:
        """Counts of kept, dropped, truncated and empty utterances (also logged at construction)."""
        return self._report

    def context_report(self) -> ContextReport:
        """Utterances that got context and turns the budget cut (also logged at construction)."""
        return self._context_report

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        k = int(self._db_index[index])
        uid = self.ids[index]
        txt_db = self.txt_dbs[k]
        rec = txt_db[uid]
        try:
            input_ids, word_ids, emo_flags = rec["input_ids"], rec["word_ids"], rec["emo_flags"]
        except KeyError as err:
            raise DatabaseError(
                f"{txt_db.path}: record {uid!r} lacks {err.args[0]!r}; rebuild the text db with build-txt-db"
            ) from None
        n = int(self.txt_lengths[index])
        example: dict[str, Any] = {
            "id": uid,
            "input_ids": np.asarray(input_ids[:n], dtype=np.int64),
            "word_ids": np.asarray(word_ids[:n], dtype=np.int64),
            "emo_flags": np.asarray(emo_flags[:n], dtype=bool),
            "labels": dict(rec.get("labels") or {}),
        }
        if self._context_plans:
            example.update(self._with_context(k, int(self._context_row[index]), example))
        for name in self.stream_table.names():
            example[name] = example[f"{name}_soft"] = None
        if rec.get("soft_labels") is not None:
            example["soft_labels"] = np.array(rec["soft_labels"], dtype=np.float32)
        for s in self.streams:
            example[s], example[f"{s}_soft"] = self._frames(s, k, uid, int(self.frame_lengths[s][index]))
        return example

    def _with_context(self, k: int, row: int, example: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The example's text with its planned context turns before it (`ctx_flags` marks them)."""
        plan = self._context_plans[k]
        db = self.txt_dbs[k]
        turns = [
            (prefix, np.asarray(db[uid]["input_ids"][start:], dtype=np.int64))
            for (uid, start), prefix in zip(plan.turns[row], plan.prefixes[row][:-1], strict=True)
        ]
        return assemble(example, turns, plan.prefixes[row][-1], self._sep_id, self.context.position)

    def _frames(self, stream: str, k: int, uid: str, keep: int) -> tuple[np.ndarray, np.ndarray | None]:
        db = self.feat_dbs[stream][k]
        rec = db[uid]
        feat = rec.get("feat")
        dim = self._dims[stream][k]
        if feat is None or feat.ndim != 2 or feat.shape[1] != dim:
            shape = None if feat is None else feat.shape
            raise DatabaseError(
                f"{db.path}: record {uid!r} has feat of shape {shape}, expected (T, {dim}); rebuild the database"
            )
        out = _float32_copy(feat[:keep])
        norm = self._norm[stream][k]
        if norm is not None:
            out -= norm[0]
            out *= norm[1]
        soft = None
        c = self._soft_dims[stream][k]
        if c:
            raw = rec.get("soft_labels")
            if raw is None or raw.ndim != 2 or raw.shape[1] != c or raw.shape[0] != feat.shape[0]:
                shape = None if raw is None else raw.shape
                raise DatabaseError(
                    f"{db.path}: record {uid!r} has soft_labels of shape {shape}, expected ({feat.shape[0]}, {c}) "
                    "as meta soft_label_dim says; rebuild the database"
                )
            soft = _float32_copy(raw[:keep])
        return out, soft
