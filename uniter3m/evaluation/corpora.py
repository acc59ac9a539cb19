"""The corpus table: what the library knows about each emotion corpus, in one place.

For every corpus (and each of its targets): the label column, the classes in head order, how
raw label values map to them and which are dropped on purpose, whether the target is a score
(regression) or derived from one, the validation metric used for model selection, and the
default verbaliser words of the prompt head. The protocols (`evaluation/protocols.py`), the heads and
the recipes all read it; nothing about a corpus is spelled out anywhere else.

Verbaliser words are single WordPieces of the bert-base-uncased vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from uniter3m.errors import ConfigError

IEMOCAP_OTHER = ("fru", "sur", "fea", "dis", "oth", "xxx")


@dataclass(frozen=True)
class Target:
    """One prediction target of a corpus."""

    column: str
    classes: tuple[str, ...] = ()  # empty for regression
    mapping: Mapping[str, str] = field(default_factory=dict)  # raw value -> class (default: identity)
    drop: frozenset[str] = frozenset()  # raw values removed on purpose (counted)
    regression: bool = False
    score_to_class: str | None = None  # "sign" / "round7": classes derived from a float score
    metric: str = "weighted_f1"  # validation metric for model selection
    verbalizer: Mapping[str, str] = field(default_factory=dict)  # class -> label word


@dataclass(frozen=True)
class Corpus:
    name: str
    targets: Mapping[str, Target]  # target name -> Target; the first is the default
    description: str = ""

    def target(self, name: str | None) -> Target:
        key = name or next(iter(self.targets))
        if key not in self.targets:
            raise ConfigError(
                f"protocol {self.name}: target {name!r} is not one of {', '.join(self.targets)}"
            )
        return self.targets[key]


_IEMOCAP_WORDS = {
    "ang": "angry",
    "hap": "happy",
    "neu": "neutral",
    "sad": "sad",
    "exc": "excited",
    "fru": "frustrated",
}
_FOUR = ("ang", "hap", "neu", "sad")
_IEMOCAP6 = ("hap", "sad", "neu", "ang", "exc", "fru")
_MELD7 = ("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger")
_MELD_WORDS = {
    "neutral": "neutral",
    "surprise": "surprised",
    "fear": "afraid",
    "sadness": "sad",
    "joy": "happy",
    "disgust": "disgusted",
    "anger": "angry",
    "negative": "negative",
    "positive": "positive",
}
_EMODB = ("anger", "boredom", "disgust", "fear", "happiness", "neutral", "sadness")
_EMODB_WORDS = {
    "anger": "angry",
    "boredom": "bored",
    "disgust": "disgusted",
    "fear": "afraid",
    "happiness": "happy",
    "neutral": "neutral",
    "sadness": "sad",
}
_RAVDESS = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")
_RAVDESS_WORDS = {c: c for c in _RAVDESS} | {"disgust": "disgusted"}

CORPORA: dict[str, Corpus] = {
    c.name: c
    for c in (
        Corpus(
            "iemocap4",
            {
                "emotion": Target(
                    "label",
                    _FOUR,
                    {c: c for c in _FOUR} | {"exc": "hap"},
                    frozenset(IEMOCAP_OTHER),
                    metric="uar",
                    verbalizer={c: _IEMOCAP_WORDS[c] for c in _FOUR},
                )
            },
            "IEMOCAP ang, hap (+ exc merged), neu, sad; every other label dropped and counted",
        ),
        Corpus(
            "iemocap6",
            {
                "emotion": Target(
                    "label",
                    _IEMOCAP6,
                    {c: c for c in _IEMOCAP6},
                    frozenset(IEMOCAP_OTHER[1:]),
                    metric="uar",
                    verbalizer=dict(_IEMOCAP_WORDS),
                )
            },
            "IEMOCAP hap, sad, neu, ang, exc, fru",
        ),
        Corpus(
            "msp4",
            {
                "emotion": Target(
                    "label",
                    _FOUR,
                    {c: c for c in _FOUR} | {c[0].upper(): c for c in _FOUR},
                    frozenset({"X", "O", "oth", "xxx"}),
                    metric="uar",
                    verbalizer={c: _IEMOCAP_WORDS[c] for c in _FOUR},
                )
            },
            "MSP-IMPROV ang, hap, neu, sad (letters A/H/N/S accepted)",
        ),
        Corpus(
            "meld",
            {
                "emotion": Target("Emotion", _MELD7, verbalizer={c: _MELD_WORDS[c] for c in _MELD7}),
                "sentiment": Target(
                    "Sentiment",
                    ("negative", "neutral", "positive"),
                    verbalizer={c: _MELD_WORDS[c] for c in ("negative", "neutral", "positive")},
                ),
            },
            "MELD, official train/dev/test; 7 emotions or 3 sentiments",
        ),
        Corpus(
            "mosi",
            {
                "binary": Target(
                    "score",
                    ("negative", "positive"),
                    score_to_class="sign",
                    metric="wa",
                    verbalizer={"negative": "negative", "positive": "positive"},
                ),
                "7class": Target(
                    "score", tuple(str(v) for v in range(-3, 4)), score_to_class="round7", metric="wa"
                ),
                "regression": Target("score", regression=True, metric="mae"),
            },
            "CMU-MOSI sentiment: binary (score >= 0), 7 classes (rounded score) or the score",
        ),
        Corpus(
            "emodb",
            {"emotion": Target("emotion", _EMODB, metric="uar", verbalizer=dict(_EMODB_WORDS))},
            "Berlin EmoDB, 7 acted emotions, 10 speakers",
        ),
        Corpus(
            "ravdess",
            {"emotion": Target("emotion", _RAVDESS, metric="uar", verbalizer=dict(_RAVDESS_WORDS))},
            "RAVDESS speech, 8 acted emotions, 24 actors (column actor); face action units + speech",
        ),
        Corpus("generic", {"label": Target("label")}, "any label column + class list"),
    )
}


def corpus_names() -> list[str]:
    return list(CORPORA)


def corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise ConfigError(f"protocol.name {name!r} is not one of {', '.join(CORPORA)}")
    return CORPORA[name]


def is_regression(name: str, target: str | None = None) -> bool:
    """Whether the corpus target is a score; an unknown name or target counts as not."""
    try:
        return corpus(name).target(target).regression
    except ConfigError:
        return False


def default_verbalizer(name: str, target: str | None = None) -> dict[str, str]:
    return dict(corpus(name).target(target).verbalizer)
