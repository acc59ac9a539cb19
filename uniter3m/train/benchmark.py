"""What the corpus benchmarks (`benchmarks/emodb.py`, `benchmarks/ravdess.py`) share.

A contender is scored per fold (a record: test metrics, the selected checkpoint's validation UAR,
predictions, per-modality-set test scores) and per seed; its table row holds, per seed, the mean
over folds, and the table prints the mean ± sample std over seeds (`evaluation.report`).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uniter3m.console import setup_logging
from uniter3m.data.store import DbReader
from uniter3m.evaluation.baselines import scalar_metrics
from uniter3m.evaluation.report import format_mean_std

ROW_KEYS = ("uar", "wa", "valid_uar")


def clip_vectors(db: Path, ids: Sequence[str]) -> np.ndarray:
    """One vector per utterance of feature db `db`: its one frame in a one-frame db, else the mean and
    std of its frames (2 x dim; the pooled form of frame features for a linear baseline)."""
    reader = DbReader(db, kind="feat")
    feats = [np.asarray(reader[uid]["feat"], np.float64) for uid in ids]
    if all(len(f) == 1 for f in feats):
        return np.stack([f[0] for f in feats])
    return np.stack([np.concatenate([f.mean(0), f.std(0)]) for f in feats])


def databases_under(config: str | Path, db: Path) -> list[str]:
    """`data.<x>_db=...` overrides that move the config's databases (`db/ravdess_txt`, ...) under `db`, the
    folder a benchmark's --db names."""
    data = json.loads(Path(config).read_text())["data"]
    return [f"data.{key}={db / Path(path).name}" for key, path in data.items() if key.endswith("_db")]


def finetune_fold(
    config: str | Path, fold: int, overrides: Sequence[str], run_dir: Path, label: str
) -> dict[str, Any]:
    """Fine-tune fold `fold` of `config` (resuming a run folder that has it), log its scores as `label`
    ("VA seed 1") and return its record."""
    from uniter3m.train.finetune import run_finetune

    result = run_finetune(config, fold=fold, overrides=list(overrides), resume="auto")["folds"][0]
    record = {
        "fold": fold,
        **scalar_metrics(result["test"]),
        "test_cases": result.get("test_sets"),
        "valid_uar": valid_score(result),
        "classes": result["classes"],
        "predictions": {p["id"]: (p["gold"], p["pred"]) for p in result["predictions"]},
        "best_dir": str(Path(result.get("best_dir") or next(run_dir.glob(f"fold{fold:02d}-*")) / "best")),
    }
    logging.info("%s fold %d: valid UAR %.1f, test UAR %.1f", label, fold, record["valid_uar"], record["uar"])
    return record


def valid_score(fold_result: Mapping[str, Any]) -> float:
    """The selected checkpoint's validation score (the fine-tune's `best_valid`): UAR on the validation
    speakers; with modality sets, the mean UAR over the sets (what the fine-tune selected on)."""
    metric = fold_result.get("selection_metric")
    if metric not in (None, "uar"):
        raise ValueError(f"the fine-tune selected on {metric!r}, not UAR")
    return float(fold_result["best_valid"])


def seed_row(folds_by_seed: Mapping[int, Sequence[Mapping[str, Any]]], cpu_s: float) -> dict[str, Any]:
    """A table row: per seed, the mean over folds of test UAR / WA and validation UAR."""
    return {
        **{
            key: [float(np.mean([f[key] for f in folds])) for folds in folds_by_seed.values()]
            for key in ROW_KEYS
        },
        "cpu_s": cpu_s,
        "runs": folds_by_seed,
        "seeds": len(folds_by_seed),
    }


def deterministic_row(folds: Sequence[Mapping[str, Any]], seeds: int, cpu_s: float) -> dict[str, Any]:
    """A row for a contender with no seed (a classic baseline): its fold means, repeated per seed."""
    return {
        **{key: [float(np.mean([f[key] for f in folds]))] * seeds for key in ROW_KEYS},
        "cpu_s": cpu_s,
        "folds": list(folds),
        "seeds": "deterministic",
    }


def table_lines(table: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The markdown table of rows: validation UAR, test UAR (mean ± std, and per seed), test WA, seeds,
    CPU minutes."""
    lines = [
        "| contender | validation UAR | test UAR | test UAR per seed | test WA | seeds | CPU min |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        fixed = row["seeds"] == "deterministic"  # the same value for every seed: no spread to print
        valid, test, wa = (
            f"{row[key][0]:.1f}" if fixed else format_mean_std(row[key], 1)
            for key in ("valid_uar", "uar", "wa")
        )
        per_seed = "-" if fixed else ", ".join(f"{v:.1f}" for v in row["uar"])
        lines.append(
            f"| {name} | {valid} | {test} | {per_seed} | {wa} | {row['seeds']} | {row['cpu_s'] / 60:.1f} |"
        )
    return lines


def case_table(
    runs: Mapping[int, Sequence[Mapping[str, Any]]], cases: Sequence[str]
) -> dict[str, list[float]]:
    """{case: [fold-mean test UAR per seed]}: from the run's own per-set scores, else by `evaluate`."""
    from uniter3m.train.config import load_finetune_config
    from uniter3m.train.evaluate import evaluate_modalities

    per_case: dict[str, list[float]] = {c: [] for c in cases}
    for folds in runs.values():
        scores: dict[str, list[float]] = {c: [] for c in cases}
        for f in folds:
            if f.get("test_cases"):
                for c in cases:
                    scores[c].append(f["test_cases"][c]["uar"])
                continue
            cfg = load_finetune_config(Path(f["best_dir"]).parents[1] / "config.json")
            rows = evaluate_modalities(cfg, f["best_dir"], list(cases), fold=f["fold"])["rows"]
            for row in rows:
                scores[row["modalities"]].append(float(row["metrics"]["uar"]))
        for c in cases:
            per_case[c].append(float(np.mean(scores[c])))
    return per_case


def case_lines(cases: Mapping[str, Mapping[str, list[float]]], names: Sequence[str]) -> list[str]:
    """The markdown table of per-case test UAR, one row per model of `cases` ({model: {case: per seed}})."""
    lines = [
        "| model (UAR on test speakers) | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for model, per_case in cases.items():
        lines.append(f"| {model} | " + " | ".join(format_mean_std(per_case[c], 1) for c in names) + " |")
    return lines


def write_results(out: Path, text: str, table: Mapping[str, Any], cases: Mapping[str, Any]) -> None:
    """Print the benchmark's table and keep it as `table.md` + `results.json` in `out`."""
    print(text)
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"table": table, "cases": cases}, indent=1, default=str))


def start(threads: int) -> None:
    """A benchmark's start: the library's one log format (its own loggers quiet below warnings), and
    `threads` torch CPU threads."""
    import torch

    setup_logging()
    for noisy in ("uniter3m", "downstream", "pretrain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(threads)


def chosen(spec: str, known: Sequence[str], what: str, parser: argparse.ArgumentParser) -> list[str]:
    """The comma-separated names of `spec`; an unknown one is a usage error listing the known ones."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"unknown {what} {unknown}; choose from {', '.join(known)}")
    return names
