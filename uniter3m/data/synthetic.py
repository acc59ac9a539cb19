"""A SYNTHETIC three-modality emotion corpus for the demo and the tests (no real people, no real data).

Every utterance has an emotion, a speaker and a duration; its words, face frames and speech frames
are drawn from distributions that depend on them, so each pretraining objective has a signal to
find. As in features taken from expression and paralinguistic models, the emotion and the moment's
arousal move the frames more than the speaker does (an earlier version let the speaker's style
dominate: self-supervised pretraining then learnt mostly who speaks, and fine-tuned worse than no
pretraining). How much each stream says about the emotion, measured as the balanced accuracy of a
logistic regression on a stream's per-utterance mean and std of frames (text: which cue words and
intensifiers occur), test split of the demo's 1000-utterance corpus (seed 0), trained on 40 / all
688 train utterances: face 0.78 / 0.89, speech 0.98 / 0.99, text 0.38 / 0.58, all three 0.99 /
1.00 (chance 0.25). The moment's arousal is the emotion's usual arousal (anger and joy high,
sadness low) plus a per-utterance draw.

- text: real English words (the real tokenizer applies). The speaker's habit word opens the
  sentence ("well", "honestly", ...); then carrier words of one topic (6 topics of 8 words) follow
  a fixed word order (each has one usual successor in its topic, taken `word_order` of the time); most utterances carry one or two
  words of their emotion from the NRC emotion lexicon's vocabulary (the first word of each class
  list is the most common), some none, a few a misleading one; an intensifier ("really", "very",
  ...) when the moment's arousal is high;
- face frames: class prototype + the speaker's face style + a small per-utterance offset + the
  moment's arousal (one number per utterance, along one direction) + a course over time shared by
  every clip (an "expression clock": a few sinusoids of the absolute frame index) + per-frame
  noise; a variable number of frames, a few clips with none (T = 0, as a face detector would
  give); per-frame soft labels (a softmax of class scores, as an expression classifier gives: the
  emotion's evidence plus a linear readout of what else the face shows, i.e. style, offset,
  arousal and the clock, plus per-frame noise: real classifiers are biased by identity too);
- speech frames: class prototype + the speaker's voice style + a per-utterance offset + the same
  arousal along the voice's direction + a class-specific oscillation and the clock over time +
  noise, more frames than face.

What each objective can learn here (and what it cannot, i.e. its chance level):

- MLM / WWM: a masked carrier word from the sentence's topic and its neighbours; the habit word from the
  speaker's face and voice style. Chance: always answering the most common target word.
- MELM / MELM+WWM: a masked emotion word from the other cue word, the face and the speech (the
  class), then the class's most common word. Chance: the most common target word.
- MRFR / MSRFR: a masked frame from the clip's other frames (prototype + styles are constant over
  the clip) and the clock at its slot; only the per-frame noise is unpredictable. Chance: the error
  of predicting the per-dimension mean.
- MRC: a masked frame's top soft label: the classifier's readout of the visible expression, which
  the clip's other frames and the clock at the slot reveal, and the emotion, which the other cues
  hint at. Chance: the majority class.
- VFOM / SFOM: a shuffled frame's origin from the clock it carries (and the class oscillation).
  Chance: a blind guess among the clip's other slots.
- ITM / contrastive: matched streams share the speaker (habit word, face style, voice style), the
  moment's arousal (intensifier word, face and voice directions) and the emotion; a stream taken
  from another utterance usually does not. Hard ITM's mined negatives often share the speaker, so
  arousal and emotion are what tells them apart. Chance: the majority target (ITM), one over the
  candidates (contrastive).
- prompt / EmoCls: the emotion from the cue words, face and speech, against the WEAK labels (the
  `weak_emotion` column: a noisy labeller's guess, right `weak_label_accuracy` of the time, as
  MEmoBERT pretrained on). Chance: the majority class.

Written as files the REAL build commands read: `transcripts_{all,train,valid,test}.csv` for
`uniter3m build-txt-db` and one `.npz` per utterance in `face/` and `speech/` (frames under
`feat`, soft labels under `soft_labels`) for `uniter3m build-feat-db --format npz`.
"""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from uniter3m.fileio import atomic_write_json

# Emotion words from the NRC Emotion Lexicon vocabulary (each appears there with this emotion).
EMOTION_WORDS: dict[str, tuple[str, ...]] = {
    "anger": ("angry", "furious", "rage", "hate", "annoy", "outrage", "hostile", "resent", "mad", "fury",
              "yell", "insult", "cruel", "violent", "frustrated", "revenge", "hatred", "offended"),
    "joy": ("happy", "delight", "wonderful", "cheerful", "love", "glad", "smile", "pleasant", "joy", "laugh",
            "fun", "excited", "cheer", "bliss", "lovely", "gift", "sunshine", "hug"),
    "sadness": ("weep", "lonely", "miserable", "grief", "cry", "sorrow", "gloomy", "regret", "mourn", "despair",
                "loss", "funeral", "depressed", "unhappy", "lost", "gloom", "misery", "hopeless"),
    "neutral": (),
}  # fmt: skip
CARRIER_WORDS = (
    "the", "we", "went", "to", "shop", "and", "talked", "about", "weather", "today", "my", "colleague",
    "said", "that", "meeting", "was", "at", "noon", "she", "he", "they", "train", "supper", "house",
    "after", "work", "morning", "is", "it", "a", "little", "call", "later", "with", "family", "news",
    "idea", "week", "city", "road", "book", "table", "phone", "office", "car", "window", "back", "again",
)  # fmt: skip
# The word each speaker opens with (speaker k uses HABIT_WORDS[k % len]): text's link to the speaker.
HABIT_WORDS = ("well", "so", "okay", "look", "honestly", "right", "listen", "anyway", "yeah", "oh")
# Words a speaker adds when the moment is intense (high arousal): text's link to the frames' arousal.
INTENSIFIERS = ("really", "very", "totally", "absolutely")
SPLITS = ("train", "valid", "test")
FIELDS = ["id", "text", "emotion", "weak_emotion", "split", "speaker"]


@dataclass
class SyntheticSpec:
    """Size and difficulty of the corpus; the defaults make a 2-core demo take seconds to build."""

    n_utterances: int = 600
    emotions: tuple[str, ...] = ("anger", "joy", "sadness", "neutral")
    face_dim: int = 24
    speech_dim: int = 32
    face_frames: tuple[int, int] = (4, 24)
    speech_frames: tuple[int, int] = (8, 40)
    carrier_words: tuple[int, int] = (4, 9)  # carrier words per utterance (besides habit and cue words)
    # Realistic lengths: when set, each utterance lasts exp(N(mu, sigma)) seconds and its word and
    # frame counts follow that duration (clipped to the ranges above) instead of being independent.
    duration_lognormal: tuple[float, float] | None = None
    words_per_second: float = 2.5
    face_fps: float = 8.0
    speech_fps: float = 16.0
    split_shares: tuple[float, float, float] = (0.7, 0.15, 0.15)
    text_cue_rate: float = 0.5  # utterances with an emotion word of their own class
    misleading_cue_rate: float = 0.15  # ... with an emotion word of another class instead
    prototype_scale: float = 0.4  # class separation of the frame prototypes (vs the styles and offsets)
    temporal_scale: float = 0.5  # size of the class oscillation (speech) over time
    clock_scale: float = 1.5  # size of the course over time every clip shares (frame order's signal)
    style_scale: float = 0.5  # size of a speaker's face / voice style (matching's signal)
    offset_scale: float = 0.5  # per-utterance offset of each stream, independent across streams
    # The moment's arousal: one number per utterance that moves face and voice alike (along a
    # direction each) and, above `intensifier_threshold`, puts an intensifier word in the text.
    arousal_scale: float = 2.0
    intensifier_threshold: float = 0.0
    # the emotion's usual arousal (the circumplex's activation axis: anger and joy high, sadness
    # low), added to the moment's N(0, 1) draw; emotions not listed get 0
    arousal_by_emotion: dict[str, float] = field(
        default_factory=lambda: {"anger": 1.0, "joy": 0.5, "neutral": -0.5, "sadness": -1.0}
    )
    # the expression classifier behind the face soft labels reads the visible expression this much
    soft_label_readout: float = 1.5
    word_order: float = 0.8  # how often a carrier word is followed by its usual successor
    habit_rate: float = 0.9  # utterances that open with the speaker's habit word
    empty_face_rate: float = 0.03
    # the face soft labels' class evidence (against their per-clip and per-frame noise)
    soft_label_gain: float = 2.5
    weak_label_accuracy: float = 0.7  # the `weak_emotion` column: a noisy labeller's guess
    seed: int = 0
    speakers: int = 10
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class SyntheticCorpus:
    """Where the generator wrote what (all paths absolute)."""

    root: Path
    transcripts: dict[str, Path]  # "all", "train", "valid", "test" -> CSV
    face_dir: Path
    speech_dir: Path
    counts: dict[str, int]
    emotions: tuple[str, ...]


TOPICS = 6  # carrier words fall into topics of len(CARRIER_WORDS) // TOPICS words each


def _carriers(rng: np.random.Generator, successor: np.ndarray, n: int, word_order: float) -> list[str]:
    """`n` carrier words of one topic, following the corpus's word order (else another word of the
    topic): a masked word is predictable from the sentence's other words, and better from its
    neighbour."""
    size = len(CARRIER_WORDS) // TOPICS
    topic = int(rng.integers(TOPICS))
    index = topic * size + int(rng.integers(size))
    words = []
    for _ in range(n):
        words.append(CARRIER_WORDS[index])
        follow = rng.random() < word_order
        index = int(successor[index]) if follow else topic * size + int(rng.integers(size))
    return words


def _sentence(rng: np.random.Generator, carriers: list[str], cues: list[str], habit: str | None) -> str:
    """Habit word first, then the carriers with the cue (and intensifier) words at random places."""
    tokens = list(carriers)
    for w in cues:
        tokens.insert(int(rng.integers(0, len(tokens) + 1)), w)
    return " ".join(([habit] if habit else []) + tokens)


def _cue_words(rng: np.random.Generator, emotion: str, spec: SyntheticSpec) -> list[str]:
    draw = rng.random()
    if draw < spec.text_cue_rate:
        source = emotion
    elif draw < spec.text_cue_rate + spec.misleading_cue_rate:
        source = str(rng.choice([e for e in spec.emotions if e != emotion]))
    else:
        return []
    pool = EMOTION_WORDS.get(source, ())
    if not pool:
        return []
    # Zipf-like: the first word of the list is the most common, so a known class predicts its word.
    weights = 1.0 / np.arange(1, len(pool) + 1)
    size = min(int(rng.integers(1, 3)), len(pool))
    return list(rng.choice(pool, size=size, replace=False, p=weights / weights.sum()))


def _clock(t: int, projection: np.ndarray) -> np.ndarray:
    """The course over time every clip shares: sinusoids of the absolute frame index, projected."""
    steps = np.arange(t)[:, None]
    periods = np.array([6.0, 13.0, 29.0, 61.0])
    waves = np.concatenate([np.sin(2 * np.pi * steps / periods), np.cos(2 * np.pi * steps / periods)], 1)
    return waves @ projection


def generate_corpus(out_dir: str | os.PathLike, spec: SyntheticSpec | None = None) -> SyntheticCorpus:
    """Write the synthetic corpus under `out_dir` (deterministic for `spec.seed`)."""
    spec = spec or SyntheticSpec()
    unknown = [e for e in spec.emotions if e not in EMOTION_WORDS]
    if unknown:
        raise ValueError(f"no word list for emotions {unknown}; choose from {sorted(EMOTION_WORDS)}")
    root = Path(out_dir).resolve()
    face_dir, speech_dir = root / "face", root / "speech"
    face_dir.mkdir(parents=True, exist_ok=True)
    speech_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    n_cls = len(spec.emotions)
    face_proto = rng.normal(0, spec.prototype_scale, (n_cls, spec.face_dim))
    speech_proto = rng.normal(0, spec.prototype_scale, (n_cls, spec.speech_dim))
    speech_wave = rng.normal(0, spec.temporal_scale, (n_cls, spec.speech_dim))
    speech_freq = np.linspace(0.15, 0.6, n_cls)
    # unit-norm directions per wave, so clock_scale is the clock's size whatever the feature dim
    clock_face = rng.normal(0, 1, (8, spec.face_dim))
    clock_face *= spec.clock_scale / np.linalg.norm(clock_face, axis=1, keepdims=True)
    clock_speech = rng.normal(0, 1, (8, spec.speech_dim))
    clock_speech *= spec.clock_scale / np.linalg.norm(clock_speech, axis=1, keepdims=True)
    # a speaker's face and voice styles are two views of one latent (e.g. age, build), so a model
    # can tell from the frames alone whether a face and a voice belong to the same speaker
    latent = rng.normal(0, 1, (spec.speakers, 2))
    face_style = latent @ rng.normal(0, spec.style_scale, (2, spec.face_dim))
    voice_style = latent @ rng.normal(0, spec.style_scale, (2, spec.speech_dim))
    arousal_face = rng.normal(0, 1, spec.face_dim)
    arousal_face *= spec.arousal_scale / np.linalg.norm(arousal_face)
    arousal_voice = rng.normal(0, 1, spec.speech_dim)
    arousal_voice *= spec.arousal_scale / np.linalg.norm(arousal_voice)
    # the expression classifier's readout of a face frame (unit rows: one score per class)
    readout = rng.normal(0, 1, (n_cls, spec.face_dim))
    readout *= spec.soft_label_readout / np.linalg.norm(readout, axis=1, keepdims=True)
    size = len(CARRIER_WORDS) // TOPICS
    successor = np.arange(len(CARRIER_WORDS))
    for topic in range(TOPICS):  # one cycle through each topic's words
        order = topic * size + rng.permutation(size)
        successor[order] = np.roll(order, -1)

    rows = []
    shares = np.cumsum(spec.split_shares) / np.sum(spec.split_shares)
    for i in range(spec.n_utterances):
        uid = f"syn{i:05d}"
        c = int(rng.integers(n_cls))
        emotion = spec.emotions[c]
        spk = i % spec.speakers
        split = SPLITS[int(np.searchsorted(shares, rng.random(), side="right"))]
        if spec.duration_lognormal is None:
            n_words = int(rng.integers(*spec.carrier_words, endpoint=True))
            t_face = int(rng.integers(*spec.face_frames, endpoint=True))
            t_sp = int(rng.integers(*spec.speech_frames, endpoint=True))
        else:
            seconds = rng.lognormal(*spec.duration_lognormal)
            n_words = int(np.clip(round(spec.words_per_second * seconds), *spec.carrier_words))
            t_face = int(np.clip(round(spec.face_fps * seconds), *spec.face_frames))
            t_sp = int(np.clip(round(spec.speech_fps * seconds), *spec.speech_frames))
        habit = HABIT_WORDS[spk % len(HABIT_WORDS)] if rng.random() < spec.habit_rate else None
        carriers = _carriers(rng, successor, n_words, spec.word_order)
        arousal = float(rng.normal()) + spec.arousal_by_emotion.get(emotion, 0.0)
        cues = _cue_words(rng, emotion, spec)
        if arousal > spec.intensifier_threshold:
            cues.append(str(rng.choice(INTENSIFIERS)))
        text = _sentence(rng, carriers, cues, habit)
        if rng.random() < spec.empty_face_rate:
            t_face = 0
        offset = rng.normal(0, spec.offset_scale, spec.face_dim) + arousal * arousal_face
        visible = face_style[spk] + offset + _clock(t_face, clock_face)  # what is not the emotion
        face = face_proto[c] + visible + rng.normal(0, 1.0, (t_face, spec.face_dim))
        # an expression classifier's scores (as MEmoBERT's FER teacher gave): they follow the
        # emotion, and, as real classifiers do, what else the face shows (identity, the moment's
        # arousal, the clip's course: a readout of the visible expression, which the clip's other
        # frames reveal), with a little per-frame noise
        scores = (
            spec.soft_label_gain * np.eye(n_cls)[c]
            + visible @ readout.T
            + rng.normal(0, 0.5, (t_face, n_cls))
        )
        soft = np.exp(scores - scores.max(-1, keepdims=True)) if t_face else np.zeros((0, n_cls))
        soft = soft / np.maximum(soft.sum(-1, keepdims=True), 1e-12)
        np.savez(face_dir / f"{uid}.npz", feat=face.astype(np.float32), soft_labels=soft.astype(np.float32))

        steps = np.arange(t_sp)[:, None]
        speech = (
            speech_proto[c]
            + voice_style[spk]
            + rng.normal(0, spec.offset_scale, spec.speech_dim)
            + arousal * arousal_voice
            + np.sin(speech_freq[c] * steps) * speech_wave[c]
            + _clock(t_sp, clock_speech)
            + rng.normal(0, 1.0, (t_sp, spec.speech_dim))
        )
        np.savez(speech_dir / f"{uid}.npz", feat=speech.astype(np.float32))
        weak = emotion if rng.random() < spec.weak_label_accuracy else str(rng.choice(spec.emotions))
        speaker = f"spk{spk:02d}"
        rows.append(
            {
                "id": uid,
                "text": text,
                "emotion": emotion,
                "weak_emotion": weak,
                "split": split,
                "speaker": speaker,
            }
        )

    transcripts = {"all": root / "transcripts_all.csv"}
    _write_csv(transcripts["all"], rows)
    for split in SPLITS:
        transcripts[split] = root / f"transcripts_{split}.csv"
        _write_csv(transcripts[split], [r for r in rows if r["split"] == split])
    counts = {split: sum(r["split"] == split for r in rows) for split in SPLITS}
    atomic_write_json(
        root / "SYNTHETIC.json",
        {
            "note": "synthetic corpus generated by uniter3m.data.synthetic; not real recordings",
            "spec": asdict(spec),
            "counts": counts,
        },
    )
    return SyntheticCorpus(root, transcripts, face_dir, speech_dir, counts, tuple(spec.emotions))


def write_transcripts(path: str | os.PathLike, rows: list[dict[str, str]]) -> None:
    """Write rows (dicts with FIELDS) as a transcript CSV, e.g. a labelled subset of the corpus."""
    _write_csv(Path(path), rows)


def read_transcripts(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
