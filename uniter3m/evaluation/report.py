"""Results as tables and a picture: per-fold CSV, Markdown mean ± std (sample std), confusion-matrix PNG."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uniter3m.errors import UserError
from uniter3m.fileio import atomic_write_bytes, atomic_write_json

FOLD_FILE = "metrics.json"
CLASSIFICATION_COLUMNS = ("wa", "uar", "weighted_f1", "macro_f1")
REGRESSION_COLUMNS = ("mae", "pearson", "acc2", "acc2_nonzero", "f1", "acc7")


def scalar_columns(metrics: Mapping[str, Any]) -> list[str]:
    known = REGRESSION_COLUMNS if "mae" in metrics else CLASSIFICATION_COLUMNS
    return [c for c in known if c in metrics]


def load_fold_results(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every `<output_dir>/<fold>/metrics.json`, in fold order."""
    files = sorted(Path(output_dir).glob(f"*/{FOLD_FILE}"))
    results = []
    for f in files:
        try:
            results.append(json.loads(f.read_text()))
        except json.JSONDecodeError as err:
            raise UserError(f"{f} is not valid JSON ({err}); rerun that fold") from err
    return sorted(results, key=lambda r: r.get("fold_index", 0))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and SAMPLE standard deviation (ddof 1, the n - 1 estimate): the one spread every report,
    `uniter3m summary`, the fold scripts and the benchmarks print.

    One value has no spread to estimate: its std is 0.0 rather than NaN, so summary.json stays valid
    JSON for single-split protocols (MELD's official split); `format_mean_std` then prints the mean alone.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("mean_std of no values")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def format_mean_std(values: Sequence[float], digits: int = 2) -> str:
    """`mean ± std` (sample std, see `mean_std`) to `digits` decimals; one value prints as its mean alone,
    so a single run is never read as a spread of zero."""
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_summary(output_dir: str | os.PathLike, results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """summary.csv (a row per fold + mean + std), summary.md, confusion.png (summed over folds)."""
    if not results:
        raise UserError(f"no fold results ({FOLD_FILE}) under {output_dir}; run `uniter3m finetune` first")
    out = Path(output_dir)
    cols = scalar_columns(results[0]["test"])
    rows = [[r["fold"]] + [r["test"][c] for c in cols] for r in results]
    values = {c: [r["test"][c] for r in results] for c in cols}
    stats = {c: mean_std(v) for c, v in values.items()}

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["fold", *cols])
    writer.writerows([[f, *(f"{v:.4f}" for v in vals)] for f, *vals in rows])
    writer.writerow(["mean", *(f"{stats[c][0]:.4f}" for c in cols)])
    writer.writerow(["std", *(f"{stats[c][1]:.4f}" for c in cols)])
    atomic_write_bytes(out / "summary.csv", buf.getvalue().encode())

    name = results[0].get("protocol", "")
    md = [
        f"**{name}** — test split, {len(results)} fold(s), model selected on validation "
        f"({results[0].get('selection_metric')})",
        "",
        "| fold | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    md += ["| " + " | ".join([f] + [f"{v:.2f}" for v in vals]) + " |" for f, *vals in rows]
    md.append("| **mean ± std** | " + " | ".join(format_mean_std(values[c]) for c in cols) + " |")
    atomic_write_bytes(out / "summary.md", ("\n".join(md) + "\n").encode())

    summary: dict[str, Any] = {
        "folds": len(results),
        "mean": {c: m for c, (m, _) in stats.items()},
        "std": {c: s for c, (_, s) in stats.items()},
    }
    if "confusion" in results[0]["test"]:
        total = np.sum([np.asarray(r["test"]["confusion"]) for r in results], axis=0)
        plot_confusion(total, results[0]["classes"], out / "confusion.png", title=f"{name}: test, all folds")
        summary["confusion"] = total.tolist()
        summary["per_class"] = per_class(total, results[0]["classes"])
        md += [
            "",
            "Per class, over the test utterances of all folds:",
            "",
            *per_class_table(summary["per_class"]),
        ]
        atomic_write_bytes(out / "summary.md", ("\n".join(md) + "\n").encode())
    if any(r.get("history") for r in results):
        plot_learning_curves(results, out / "learning_curve.png", title=f"{name}: every fold")
    atomic_write_json(out / "summary.json", summary)
    return summary


def plot_learning_curves(
    results: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = ""
) -> None:
    """Training loss (left) and the validation selection metric (right) against the step, a line per
    fold, the selected step marked: is it still learning, over-fitting, stuck at chance?"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, valid_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    metric = results[0].get("selection_metric") or "metric"
    for r in results:
        label = str(r.get("fold"))
        points = r.get("train_loss") or []
        if points:
            loss_ax.plot([p[0] for p in points], [p[1] for p in points], label=label, linewidth=1)
        history = [h for h in r.get("history") or [] if metric in h.get("valid", {})]
        if history:
            line = valid_ax.plot([h["step"] for h in history], [h["valid"][metric] for h in history], marker=".",
                                 label=label)  # fmt: skip
            if r.get("best_step") is not None and r.get("best_valid") is not None:
                valid_ax.plot(
                    [r["best_step"]], [r["best_valid"]], marker="*", markersize=12, color=line[0].get_color()
                )
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("training loss")
    valid_ax.set_xlabel("step")
    valid_ax.set_ylabel(f"validation {metric} (star: selected)")
    if len(results) <= 12:
        valid_ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def per_class(confusion: np.ndarray, classes: Sequence[str]) -> dict[str, dict[str, float]]:
    """Precision, recall and F1 (percent) and support of each class, from a confusion matrix (rows = gold)."""
    m = np.asarray(confusion, dtype=np.float64)
    out = {}
    for i, name in enumerate(classes):
        tp, predicted, gold = m[i, i], m[:, i].sum(), m[i].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / gold if gold else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[str(name)] = {
            "precision": 100 * precision,
            "recall": 100 * recall,
            "f1": 100 * f1,
            "support": int(gold),
        }
    return out


def per_class_table(rows: Mapping[str, Mapping[str, float]]) -> list[str]:
    lines = ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    lines += [
        f"| {c} | {v['precision']:.2f} | {v['recall']:.2f} | {v['f1']:.2f} | {v['support']} |"
        for c, v in rows.items()
    ]
    return lines


def run_identity(run: str | os.PathLike) -> dict[str, Any]:
    """What must agree for two fine-tuning runs to be averaged: the protocol, the classes, the folds
    (names) and the databases (the run's config.json `data` section)."""
    results = load_fold_results(run)
    config_file = Path(run) / "config.json"
    data = json.loads(config_file.read_text()).get("data", {}) if config_file.is_file() else {}
    return {
        "protocol": sorted({str(r.get("protocol")) for r in results}),
        "classes": results[0].get("classes") if results else None,
        "folds": [r.get("fold") for r in results],
        "databases": {k: v for k, v in sorted(data.items()) if k.endswith("_db")},
    }


def comparability_problems(run_dirs: Sequence[str | os.PathLike]) -> list[str]:
    """Why these runs cannot be averaged (empty: they can): a run given twice, or a run whose protocol,
    classes, folds or databases differ from the first run's."""
    problems = []
    seen: dict[Path, str] = {}
    for run in run_dirs:
        key = Path(run).resolve()
        if key in seen:
            problems.append(f"{run} is given twice (also as {seen[key]}): each run would count twice")
        seen.setdefault(key, str(run))
    first, *others = [Path(r) for r in dict.fromkeys(Path(r).resolve() for r in run_dirs)]
    reference = run_identity(first)
    for run in others:
        mine = run_identity(run)
        for what, value in mine.items():
            if value != reference[what]:
                problems.append(f"{what} differ: {reference[what]} in {first} but {value} in {run}")
    return problems


def summarize_runs(
    run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None, force: bool = False
) -> str:
    """Mean ± std over runs (seeds) of each run's fold mean: the Markdown table (also `out`.md/.json).

    The runs must be comparable (`comparability_problems`: same protocol, classes, folds and databases,
    no run twice) unless `force`; a run without `summary.json` is an error naming it."""
    summaries = []
    for run in run_dirs:
        file = Path(run) / "summary.json"
        if not file.is_file():
            raise UserError(
                f"{run} has no summary.json: run `uniter3m finetune` (or `--summarize`) there first"
            )
        summaries.append((Path(run), json.loads(file.read_text())))
    problems = comparability_problems(run_dirs)
    if problems and not force:
        raise UserError(
            "these runs cannot be averaged: " + "; ".join(problems) + " (--force averages them anyway)"
        )
    cols = [c for c in summaries[0][1]["mean"] if all(c in s["mean"] for _, s in summaries)]
    values = {c: [s["mean"][c] for _, s in summaries] for c in cols}
    stats = {c: mean_std(v) for c, v in values.items()}
    md = [
        f"{len(summaries)} run(s) ({', '.join(str(p) for p, _ in summaries)}); each run's mean over its folds, "
        "then mean ± sample std over the runs",
        *([f"NOT COMPARABLE (--force): {'; '.join(problems)}"] if problems else []),
        "",
        "| run | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    md += [f"| {p.name} | " + " | ".join(f"{s['mean'][c]:.2f}" for c in cols) + " |" for p, s in summaries]
    md.append("| **mean ± std** | " + " | ".join(format_mean_std(values[c]) for c in cols) + " |")
    text = "\n".join(md) + "\n"
    if out is not None:
        stem = Path(out)
        atomic_write_bytes(stem.with_suffix(".md"), text.encode())
        atomic_write_json(
            stem.with_suffix(".json"),
            {
                "runs": [str(p) for p, _ in summaries],
                "mean": {c: m for c, (m, _) in stats.items()},
                "std": {c: sd for c, (_, sd) in stats.items()},
            },
        )
    return text


def plot_confusion(
    matrix: np.ndarray, classes: Sequence[str], path: str | os.PathLike, title: str = ""
) -> None:
    """Row-normalised confusion matrix (recall per gold class), raw counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix)
    totals = matrix.sum(axis=1, keepdims=True)
    recall = np.divide(matrix, totals, out=np.zeros(matrix.shape, dtype=float), where=totals > 0)
    size = max(4.0, 0.7 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(recall, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(
                j,
                i,
                str(int(matrix[i, j])),
                ha="center",
                va="center",
                color="white" if recall[i, j] > 0.5 else "black",
                fontsize=8,
            )
    fig.colorbar(im, ax=ax, fraction=0.046, label="recall")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def modality_table(rows: Sequence[Mapping[str, Any]], path_stem: str | os.PathLike) -> str:
    """The missing-modality table: CSV + Markdown, a row per modality case; returns the Markdown."""
    cols = scalar_columns(rows[0]["metrics"])
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["modalities", "n", *cols])
    for r in rows:
        writer.writerow([r["modalities"], r["n"], *(f"{r['metrics'][c]:.4f}" for c in cols)])
    stem = Path(path_stem)
    atomic_write_bytes(stem.with_suffix(".csv"), buf.getvalue().encode())
    md = ["| modalities | n | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    md += [
        f"| {r['modalities']} | {r['n']} | " + " | ".join(f"{r['metrics'][c]:.2f}" for c in cols) + " |"
        for r in rows
    ]
    text = "\n".join(md) + "\n"
    atomic_write_bytes(stem.with_suffix(".md"), text.encode())
    return text
