"""The stream table: the one place that says which frame streams exist and what they are called.

Every layer loops over this table instead of spelling out face and speech: the dataset reads one
feature db per stream, the collator pads `<name>_feat` / `<name>_mask` (and `<name>_soft` when the
db has per-frame soft labels), the model builds `<name>_embeddings`, the heads are
`<name>_regress` / `<name>_fom` / `<name>_classifier`, the objectives are `<name>_mrfr`,
`<name>_fom` and `<name>_mrc`, and a modality string such as "LVA" uses the streams' letters.

The default table holds face (V) and speech (A), as in the MEmoBERT papers; text is always `L`.
A config adds a stream with a name and a letter (`"streams": {"pose": "P"}` in a training config,
or a `streams` section of a model config); `declare` puts it in this process's table. Collators
and tasks keep a copy of the table they were built with, so DataLoader workers need no global.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from uniter3m.errors import ConfigError

TEXT_LETTER = "L"
_NAME = re.compile(r"^[a-z][a-z0-9]*$")


@dataclass(frozen=True)
class Stream:
    """A frame stream: its name (weight and batch key prefix) and its modality letter."""

    name: str
    letter: str

    @property
    def feat_key(self) -> str:
        return f"{self.name}_feat"

    @property
    def mask_key(self) -> str:
        return f"{self.name}_mask"

    @property
    def frame_mask_key(self) -> str:
        return f"{self.name}_frame_mask"

    @property
    def soft_key(self) -> str:
        return f"{self.name}_soft"

    @property
    def db_key(self) -> str:
        return f"{self.name}_db"


DEFAULT_STREAMS = (Stream("face", "V"), Stream("speech", "A"))
_TABLE: dict[str, Stream] = {s.name: s for s in DEFAULT_STREAMS}


def frame_streams() -> tuple[Stream, ...]:
    """Every known frame stream, in sequence order (face, speech, then declared ones)."""
    return tuple(_TABLE.values())


def names() -> tuple[str, ...]:
    return tuple(_TABLE)


def letters() -> str:
    """All modality letters in canonical order: "L" then the frame streams' letters."""
    return TEXT_LETTER + "".join(s.letter for s in _TABLE.values())


def get(key: str) -> Stream:
    """A stream by name ("face") or letter ("V"), case-insensitively for letters."""
    if key in _TABLE:
        return _TABLE[key]
    for s in _TABLE.values():
        if s.letter == str(key).upper():
            return s
    raise ConfigError(f"unknown frame stream {key!r}; known streams: {describe()}")


def describe() -> str:
    return ", ".join(f"{s.name} ({s.letter})" for s in _TABLE.values())


def declare(name: str, letter: str) -> Stream:
    """Add a stream to the table (idempotent); a name or letter clash is an error."""
    letter = str(letter).upper()
    if not _NAME.match(name) or name in ("text", "txt"):
        raise ConfigError(
            f"stream name {name!r}: use lower-case letters and digits (e.g. 'pose'), not 'text'/'txt'"
        )
    if len(letter) != 1 or not letter.isalpha() or letter == TEXT_LETTER:
        raise ConfigError(f"stream {name!r}: letter {letter!r} must be one letter other than L (text)")
    known = _TABLE.get(name)
    if known is not None:
        if known.letter != letter:
            raise ConfigError(f"stream {name!r} already has the letter {known.letter}, not {letter}")
        return known
    for s in _TABLE.values():
        if s.letter == letter:
            raise ConfigError(f"letter {letter} of stream {name!r} is already used by stream {s.name!r}")
    stream = Stream(name, letter)
    _TABLE[name] = stream
    return stream


def declare_many(streams: Mapping[str, str] | None) -> None:
    for name, letter in (streams or {}).items():
        declare(name, letter)


def parse_modalities(value: str | Iterable[str], where: str = "modalities") -> str:
    """ "lva", "AV", ["L","V"] or ["text","face"] -> canonical letters ("LVA" order); errors name `where`."""
    items = list(value.strip()) if isinstance(value, str) else [str(v) for v in value]
    out = set()
    for item in items:
        if item in ("text", "txt") or item.upper() == TEXT_LETTER:
            out.add(TEXT_LETTER)
            continue
        try:
            out.add(get(item).letter)
        except ConfigError:
            raise ConfigError(
                f"{where}: unknown stream {item!r}; use L (text) or a frame stream letter: {describe()}"
            ) from None
    if not out:
        raise ConfigError(f"{where}: empty; give at least one of {letters()}")
    return "".join(c for c in letters() if c in out)


def streams_of(modalities: str) -> tuple[Stream, ...]:
    """The frame streams named by a canonical modality string, in table order."""
    return tuple(s for s in _TABLE.values() if s.letter in modalities)


def snapshot() -> tuple[Stream, ...]:
    """A picklable copy of the table, for objects that run in DataLoader workers."""
    return frame_streams()


class _LiveMap(Mapping):
    """A read-only mapping computed from the table at each access (letters -> names)."""

    def __init__(self, with_text: bool) -> None:
        self.with_text = with_text

    def _items(self) -> dict[str, str]:
        items = {TEXT_LETTER: "text"} if self.with_text else {}
        items.update({s.letter: s.name for s in _TABLE.values()})
        return items

    def __getitem__(self, key: str) -> str:
        return self._items()[key]

    def __iter__(self):
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())

    def __repr__(self) -> str:
        return repr(self._items())


#: letter -> stream name for frame streams ({"V": "face", "A": "speech", ...}), always current
FRAME_LETTERS: Mapping[str, str] = _LiveMap(with_text=False)
#: the same with {"L": "text"} first
MODALITY_NAMES: Mapping[str, str] = _LiveMap(with_text=True)


class CarriesStreamTable:
    """Mixin for objects sent to DataLoader workers: unpickling re-declares the table they saw,
    so a worker started with spawn/forkserver knows the declared streams too."""

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_stream_table"] = [(s.name, s.letter) for s in frame_streams()]
        return state

    def __setstate__(self, state: dict) -> None:
        for name, letter in state.pop("_stream_table", []):
            declare(name, letter)
        self.__dict__.update(state)


def reset() -> None:
    """Back to the default table (face, speech): for tests and processes that run several configs."""
    _TABLE.clear()
    _TABLE.update({s.name: s for s in DEFAULT_STREAMS})
