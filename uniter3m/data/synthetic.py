"""A SYNTHETIC three-modality emotion corpus for the demo and the tests (no real people, no real data).

Every utterance gets an emotion; its words, face frames and speech frames are all drawn from
distributions that depend on that emotion, so there is something to learn within and across
modalities, and no single stream gives the answer away:

- text: real English words (the real tokenizer applies), a few neutral carrier words plus, for
  most utterances, one or two words of the emotion taken from the NRC emotion lexicon's
  vocabulary (so MELM finds emotion words to mask); some utterances carry no cue, a few a
  misleading one;
- face frames: a class prototype + a per-utterance offset + per-frame noise, with a slow drift
  along a class direction over time (so frame order is learnable), a variable number of frames,
  and a small share of utterances with no face at all (T = 0, as a face detector would give);
  per-frame soft labels (a softmax of noisy class scores) for the frame-classification task;
- speech frames: a class prototype modulated by a class-specific sinusoid over time, more frames
  than face, plus noise;
- a `weak_emotion` column: what a noisy automatic labeller would say (right `weak_label_accuracy`
  of the time), for the objectives that pretrain on weak labels (EmoCls, prompt), as MEmoBERT did.

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
    "anger": ("angry", "furious", "rage", "hate", "annoy", "outrage", "hostile", "resent"),
    "joy": ("happy", "delight", "wonderful", "cheerful", "love", "glad", "smile", "pleasant"),
    "sadness": ("weep", "lonely", "miserable", "grief", "cry", "sorrow", "gloomy", "regret"),
    "neutral": (),
}
CARRIER_WORDS = (
    "the", "we", "went", "to", "shop", "and", "talked", "about", "weather", "today", "my", "colleague",
    "said", "that", "meeting", "was", "at", "noon", "she", "he", "they", "train", "supper", "house",
    "after", "work", "morning", "is", "it", "a", "little", "call", "later", "with", "family", "news",
    "idea", "week", "city", "road", "book", "table", "phone", "office", "car", "window", "back", "again",
)  # fmt: skip
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
    carrier_words: tuple[int, int] = (4, 9)  # neutral words per utterance (before the emotion cues)
    # Realistic lengths: when set, each utterance lasts exp(N(mu, sigma)) seconds and its word and
    # frame counts follow that duration (clipped to the ranges above) instead of being independent.
    duration_lognormal: tuple[float, float] | None = None
    words_per_second: float = 2.5
    face_fps: float = 8.0
    speech_fps: float = 16.0
    split_shares: tuple[float, float, float] = (0.7, 0.15, 0.15)
    # Each stream alone is a weak cue (roughly 50-65 % accuracy); together they are much better.
    text_cue_rate: float = 0.5  # utterances with an emotion word of their own class
    misleading_cue_rate: float = 0.15  # ... with an emotion word of another class instead
    prototype_scale: float = 0.15  # class separation of the frame prototypes (vs unit utterance offsets)
    temporal_scale: float = 0.5  # size of the drift (face) and oscillation (speech) over time
    empty_face_rate: float = 0.03
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


def _sentence(rng: np.random.Generator, words: list[str], n_carrier: int) -> str:
    tokens = list(rng.choice(CARRIER_WORDS, size=n_carrier))
    for w in words:
        tokens.insert(int(rng.integers(0, len(tokens) + 1)), w)
    return " ".join(tokens)


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
    return list(rng.choice(pool, size=int(rng.integers(1, 3)), replace=False))


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
    face_drift = rng.normal(0, spec.temporal_scale, (n_cls, spec.face_dim))
    speech_proto = rng.normal(0, spec.prototype_scale, (n_cls, spec.speech_dim))
    speech_wave = rng.normal(0, spec.temporal_scale, (n_cls, spec.speech_dim))
    speech_freq = np.linspace(0.15, 0.6, n_cls)

    rows = []
    shares = np.cumsum(spec.split_shares) / np.sum(spec.split_shares)
    for i in range(spec.n_utterances):
        uid = f"syn{i:05d}"
        c = int(rng.integers(n_cls))
        emotion = spec.emotions[c]
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
        text = _sentence(rng, _cue_words(rng, emotion, spec), n_words)
        if rng.random() < spec.empty_face_rate:
            t_face = 0
        time_face = np.linspace(0, 1, max(t_face, 1))[:t_face, None]
        offset = rng.normal(0, 1.0, spec.face_dim)  # who is speaking: does not average out over frames
        face = (
            face_proto[c] + offset + time_face * face_drift[c] + rng.normal(0, 1.0, (t_face, spec.face_dim))
        )
        scores = face @ face_proto.T / spec.face_dim**0.5 + rng.normal(0, 0.5, (t_face, n_cls))
        soft = np.exp(scores - scores.max(-1, keepdims=True)) if t_face else np.zeros((0, n_cls))
        soft = soft / np.maximum(soft.sum(-1, keepdims=True), 1e-12)
        np.savez(face_dir / f"{uid}.npz", feat=face.astype(np.float32), soft_labels=soft.astype(np.float32))

        steps = np.arange(t_sp)[:, None]
        speech = (
            speech_proto[c]
            + rng.normal(0, 1.0, spec.speech_dim)
            + np.sin(speech_freq[c] * steps + rng.uniform(0, 2 * np.pi)) * speech_wave[c]
            + rng.normal(0, 1.0, (t_sp, spec.speech_dim))
        )
        np.savez(speech_dir / f"{uid}.npz", feat=speech.astype(np.float32))
        weak = emotion if rng.random() < spec.weak_label_accuracy else str(rng.choice(spec.emotions))
        speaker = f"spk{i % spec.speakers:02d}"
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
