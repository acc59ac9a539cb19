"""The stream table: which frame streams exist and what they are called, as a value.

Every layer loops over a table instead of spelling out face and speech: the dataset reads one
feature db per stream, the collator pads `<name>_feat` / `<name>_mask` (and `<name>_soft` when the
db has per-frame soft labels), the model builds `<name>_embeddings`, the heads are
`<name>_regress` / `<name>_fom` / `<name>_classifier`, the objectives are `<name>_mrfr`,
`<name>_fom` and `<name>_mrc`, and a modality string such as "LVA" uses the streams' letters.

The default table holds face (V) and speech (A), as in the MEmoBERT papers; text is always `L`.
A config adds a stream with a name and a letter (`"streams": {"pose": "P"}` in a training config,
or a `streams` section of a model config), and the table is built from that config: the model's
config carries its own (`UniterConfig.stream_table`), a training config its own
(`RunConfig.stream_table`, also on each data section), and the dataset, collator and tasks are
given the table they serve. A table is immutable and picklable, so DataLoader workers receive it
with the object that holds it; there is no process-wide table to keep in step.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from uniter3m.errors import ConfigError

TEXT_LETTER = "L"
TEXT_NAME = "text"
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


@dataclass(frozen=True)
class StreamTable:
    """The frame streams in sequence order: face, speech, then declared ones in declaration order."""

    streams: tuple[Stream, ...] = DEFAULT_STREAMS

    @classmethod
    def default(cls) -> StreamTable:
        """Face (V) and speech (A) only."""
        return cls()

    @classmethod
    def declaring(cls, declared: Mapping[str, str] | None) -> StreamTable:
        """The default table plus a config's `streams` section, e.g. {"pose": "P"}."""
        table = cls()
        for name, letter in (declared or {}).items():
            table = table.with_stream(str(name), str(letter))
        return table

    def with_stream(self, name: str, letter: str) -> StreamTable:
        """This table plus stream `name` (the same table if it is already there with that letter);
        a bad name, or a name or letter already used otherwise, is a ConfigError."""
        letter = str(letter).upper()
        if not _NAME.match(name) or name in (TEXT_NAME, "txt"):
            raise ConfigError(
                f"stream name {name!r}: use lower-case letters and digits (e.g. 'pose'), not 'text'/'txt'"
            )
        if len(letter) != 1 or not letter.isalpha() or letter == TEXT_LETTER:
            raise ConfigError(f"stream {name!r}: letter {letter!r} must be one letter other than L (text)")
        for s in self.streams:
            if s.name == name:
                if s.letter != letter:
                    raise ConfigError(f"stream {name!r} already has the letter {s.letter}, not {letter}")
                return self
            if s.letter == letter:
                raise ConfigError(f"letter {letter} of stream {name!r} is already used by stream {s.name!r}")
        return StreamTable((*self.streams, Stream(name, letter)))

    def frame_streams(self) -> tuple[Stream, ...]:
        return self.streams

    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.streams)

    def letters(self) -> str:
        """All modality letters in canonical order: "L" then the frame streams' letters."""
        return TEXT_LETTER + "".join(s.letter for s in self.streams)

    def frame_letters(self) -> dict[str, str]:
        """Frame letter -> stream name ({"V": "face", "A": "speech", ...})."""
        return {s.letter: s.name for s in self.streams}

    def modality_names(self) -> dict[str, str]:
        """The same with {"L": "text"} first."""
        return {TEXT_LETTER: TEXT_NAME, **self.frame_letters()}

    def get(self, key: str) -> Stream:
        """A stream by name ("face") or letter ("V"), case-insensitively for letters."""
        for s in self.streams:
            if s.name == key:
                return s
        for s in self.streams:
            if s.letter == str(key).upper():
                return s
        raise ConfigError(f"unknown frame stream {key!r}; known streams: {self.describe()}")

    def describe(self) -> str:
        return ", ".join(f"{s.name} ({s.letter})" for s in self.streams)

    def parse_modalities(self, value: str | Iterable[str], where: str = "modalities") -> str:
        """ "lva", "AV", ["L","V"] or ["text","face"] -> canonical letters ("LVA" order); errors name `where`."""
        items = list(value.strip()) if isinstance(value, str) else [str(v) for v in value]
        out = set()
        for item in items:
            if item in (TEXT_NAME, "txt") or item.upper() == TEXT_LETTER:
                out.add(TEXT_LETTER)
                continue
            try:
                out.add(self.get(item).letter)
            except ConfigError:
                raise ConfigError(
                    f"{where}: unknown stream {item!r}; use L (text) or a frame stream letter: {self.describe()}"
                ) from None
        if not out:
            raise ConfigError(f"{where}: empty; give at least one of {self.letters()}")
        return "".join(c for c in self.letters() if c in out)

    def streams_of(self, modalities: str) -> tuple[Stream, ...]:
        """The frame streams named by a canonical modality string, in table order."""
        return tuple(s for s in self.streams if s.letter in modalities)
