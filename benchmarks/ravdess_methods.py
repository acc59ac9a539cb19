"""RAVDESS face + speech (VA): fine-tuning methods and fold-safe pretraining, against `cls` full fine-tuning.

    .venv/bin/python benchmarks/ravdess_methods.py --db db --out runs/ravdess_methods --folds 0 1 --seeds 1 2 3

Every contender fine-tunes configs/downstream/ravdess_6fold_va.json (6 folds of 4 actors; `tiny`; the
face action-unit vector + Resemblyzer frames pooled to 10/s, z-scored per actor) on the same folds and
seeds; only the key(s) in `CONTENDERS` differ. `name@F` trains on the fraction F of each fold's training
labels (`protocol.train_fraction`; validation and test are whole).

Pretraining is fold-safe: per fold, one `tiny` model is pretrained (seed 0, `--pretrain-steps` steps) on the
unlabeled clips of that fold's 16 TRAINING actors only (speech MRFR with 2-frame spans, face MRFR — the one
face frame masked, so it is predicted from the speech —, speech FOM, face–speech tuple InfoNCE), validated on
the fold's validation actors; it is written to <out>/pretrain/<fold folder>/ and read back by the
contenders through model.init ".../{fold}/checkpoints/latest/model".

Contenders (`--contenders`; rows in this order; a row's settings are fixed here, before any run):
  cls               from scratch, [CLS] head, every weight trains (the baseline of every row)
  mean, attention, streams     the other heads (`model.head`), from scratch
  distill           students A and V learn the gold label + KL to this run's `cls` model of the same seed
                    and fold (the teacher; T = 2, weight 1); the final model is the fusion of teacher and
                    students (`distill.final: fusion`)
  pretrained        cls full fine-tuning from the fold's pretrained model
  freeze_layers1    from it, MEmoBERT's freezing: everything below encoder layer 1 (embeddings + layer 0)
  freeze_backbone   from it, only the head trains
  lora              from it, LoRA rank 8 / alpha 16 on query and value (lr 5e-4 as for full); head trains
  probe             from it: a logistic regression on the frozen per-stream mean vectors (V, A), C chosen
                    on validation (`uniter3m probe`); deterministic, one row for every seed
  probe_random      the same probe on the untrained model (seed-0 initialisation): what pretraining adds
  cls@0.1, pretrained@0.1      the pretraining study at 10 % of the training labels

The table (`<out>/table.md`, rewritten after each contender so partial runs keep their rows) gives, per
contender, mean ± sample std over seeds of the fold-mean test UAR, WA and validation UAR, the difference
to `cls` (or to `cls@F` for an `@F` row) and the CPU minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from uniter3m.data.store import DbReader
from uniter3m.evaluation.protocols import Fold
from uniter3m.train import benchmark as shared

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/downstream/ravdess_6fold_va.json"
PRETRAINED = "{pre}/{fold}/checkpoints/latest/model"
CONTENDERS: dict[str, list[str]] = {
    "cls": [],
    "mean": ["model.head=mean"],
    "attention": ["model.head=attention"],
    "streams": ["model.head=streams"],
    "distill": [
        'modality_sets=["A","V"]',
        'distill={"teacher":"{cls}/{fold}/best","weight":1.0,"temperature":2.0,"final":"fusion"}',
    ],
    "pretrained": [f"model.init={PRETRAINED}"],
    "freeze_layers1": [f"model.init={PRETRAINED}", "model.freeze=layers:1"],
    "freeze_backbone": [f"model.init={PRETRAINED}", "model.freeze=backbone"],
    "lora": [f"model.init={PRETRAINED}", 'model.lora={"rank":8,"alpha":16}'],
    "probe": [],
    "probe_random": [],
    "cls@0.1": ["protocol.train_fraction=0.1"],
    "pretrained@0.1": [f"model.init={PRETRAINED}", "protocol.train_fraction=0.1"],
}
NEEDS_PRETRAINING = {n for n, sets in CONTENDERS.items() if any("model.init" in s for s in sets)} | {"probe"}


def pretrain_config(
    db: Path, out: Path, train_actors: Sequence[str], valid_actors: Sequence[str], steps: int
) -> dict:
    """The fold's pretraining run: the training actors' clips (per-actor text dbs), no labels used."""

    base = json.loads(CONFIG.read_text())
    frames = {key: str(db / Path(base["data"][key]).name) for key in ("face_db", "speech_db")}

    def section(actors: Sequence[str]) -> dict[str, list[str]]:
        """One text db per actor, each beside the fine-tune config's face and speech dbs (under `db`)."""
        return {
            "txt_db": [str(db / f"ravdess_txt_actor{a}") for a in actors],
            **{key: [path] * len(actors) for key, path in frames.items()},
        }

    return {
        "output_dir": str(out),
        "seed": 0,
        "device": "cpu",
        "precision": "fp32",
        "model": {"config": str(REPO / base["model"]["config"]), "overrides": base["model"]["overrides"]},
        "datasets": {
            "ravdess": {
                **section(train_actors),
                "modalities": "VA",
                "max_txt_len": 16,
                "max_frames": 64,
                "normalize": True,
                "valid": section(valid_actors),
            }
        },
        "tasks": [
            {
                "name": "speech_mrfr",
                "dataset": "ravdess",
                "ratio": 1.0,
                "options": {"mask_prob": 0.15, "span": 2},
            },
            {"name": "face_mrfr", "dataset": "ravdess", "ratio": 1.0},
            {"name": "speech_fom", "dataset": "ravdess", "ratio": 0.5},
            {"name": "tuple_contrastive", "dataset": "ravdess", "ratio": 1.0},
        ],
        "batching": {"max_tokens": 4096, "max_batch_size": 32, "num_workers": 0},
        "optim": {
            "lr": 5e-4,
            "warmup_steps": min(100, steps // 10),
            "weight_decay": 0.01,
            "betas": [0.9, 0.98],
            "eps": 1e-6,
        },
        "steps": steps,
        "val_every": steps // 2,
        "ckpt_every": steps,
        "keep_last": 1,
        "log_every": 100,
        "progress": False,
    }


def pretraining_actors(fold: Fold, actor: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """The actors whose clips fold `fold` pretrains on (its training actors) and validates on: never a
    test actor, so pretraining sees none of the fold's test audio or faces, even unlabeled."""
    return sorted({actor[u] for u in fold.train}), sorted({actor[u] for u in fold.valid})


def pretrain_folds(args: argparse.Namespace, folds: Sequence[int]) -> tuple[Path, float]:
    """Pretrain one model per fold (kept when its run folder is complete); the root and CPU seconds."""
    from uniter3m.train.config import load_finetune_config
    from uniter3m.train.folds import fold_dir, plan_protocol
    from uniter3m.train.pretrain import run_pretrain

    cfg = load_finetune_config(CONFIG, shared.databases_under(CONFIG, args.db))
    plan = plan_protocol(cfg)
    txt = DbReader(args.db / "ravdess_txt", kind="txt")
    actor = {uid: str(txt[uid]["labels"]["actor"]) for uid in txt.ids}
    root = args.out / "pretrain"
    t0 = time.process_time()
    for k in folds:
        fold = plan.folds[k]
        out = root / fold_dir(cfg, plan, k).name
        if (out / "checkpoints/latest/model/config.json").is_file():
            logging.info("pretraining of fold %s kept: %s", fold.name, out)
            continue
        train_actors, valid_actors = pretraining_actors(fold, actor)
        metrics = run_pretrain(pretrain_config(args.db, out, train_actors, valid_actors, args.pretrain_steps))
        logging.info("pretrained fold %s on actors %s: %s", fold.name, ",".join(train_actors), metrics)
    return root, time.process_time() - t0


def run_contender(
    name: str, args: argparse.Namespace, folds: Sequence[int], pre: Path | None
) -> tuple[dict[int, list[dict]], float]:
    """{seed: fold records} of contender `name`, and its CPU seconds."""
    t0 = time.process_time()
    per_seed: dict[int, list[dict]] = {}
    for seed in args.seeds:
        run_dir = args.out / name / f"seed{seed}"
        sets = [
            s.replace("{pre}", str(pre)).replace("{cls}", str(args.out / "cls" / f"seed{seed}"))
            for s in CONTENDERS[name]
        ]
        sets = [
            f"output_dir={run_dir}",
            f"seed={seed}",
            *shared.databases_under(CONFIG, args.db),
            *sets,
            *args.set,
        ]
        per_seed[seed] = [
            shared.finetune_fold(CONFIG, k, sets, run_dir, f"{name} seed {seed}") for k in folds
        ]
    return per_seed, time.process_time() - t0


def untrained_model(out: Path) -> Path:
    """The fine-tune config's model at its seed-0 initialisation, saved once (the probe's floor)."""
    import torch

    from uniter3m.model.config import UniterConfig
    from uniter3m.model.uniter import UniterModel

    path = out / "untrained_model"
    if not (path / "config.json").is_file():
        model = json.loads(CONFIG.read_text())["model"]
        torch.manual_seed(0)
        UniterModel(UniterConfig.from_json(REPO / model["config"], **model["overrides"])).save_pretrained(
            path
        )
    return path


def run_probe_row(
    name: str, args: argparse.Namespace, folds: Sequence[int], checkpoint: str
) -> dict[str, Any]:
    """The linear probe on `checkpoint` (per-stream mean vectors; "{fold}": each fold's): a deterministic row."""
    from uniter3m.evaluation.baselines import scalar_metrics
    from uniter3m.train.probe import run_probe

    t0 = time.process_time()
    records = []
    for k in folds:
        result = run_probe(
            CONFIG, checkpoint=checkpoint, out=args.out / name, per_stream=True, pool="mean", fold=k,
            overrides=shared.databases_under(CONFIG, args.db), device="cpu",
        )["folds"][0]  # fmt: skip
        records.append(
            {"fold": k, **scalar_metrics(result["test"]), "valid_uar": float(result["best_valid"])}
        )
        logging.info("%s fold %d: C=%g valid UAR %.1f, test UAR %.1f", name, k, result["C"], records[-1]["valid_uar"],
                     records[-1]["uar"])  # fmt: skip
    return shared.deterministic_row(records, len(args.seeds), time.process_time() - t0)


def table_text(args: argparse.Namespace, folds: Sequence[int], table: dict[str, Any]) -> str:
    lines = [
        f"RAVDESS 6-fold VA, folds {list(folds)}, seeds {args.seeds} (mean ± sample std over seeds of the fold means); "
        f"pretraining: {args.pretrain_steps} steps per fold on its training actors",
        "",
        *shared.table_lines(table),
        "",
        "| contender | test UAR − its cls baseline (per seed) |",
        "|---|---|",
    ]
    for name, row in table.items():
        base = "cls@" + name.split("@")[1] if "@" in name else "cls"
        if name != base and base in table:
            diffs = [a - b for a, b in zip(row["uar"], table[base]["uar"], strict=True)]
            lines.append(f"| {name} vs {base} | {', '.join(f'{d:+.1f}' for d in diffs)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, default=Path("db"), help="where the ravdess recipe wrote")
    parser.add_argument("--out", type=Path, default=Path("runs/ravdess_methods"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument(
        "--contenders", default=",".join(CONTENDERS), help=f"comma-separated of {', '.join(CONTENDERS)}"
    )
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--set", action="append", default=[], help="extra key=value for every fine-tune")
    args = parser.parse_args(argv)
    shared.start(args.threads)
    contenders = shared.chosen(args.contenders, list(CONTENDERS), "contenders", parser)
    if "distill" in contenders and "cls" not in contenders:
        parser.error("distill's teacher is this run's cls: add cls to --contenders")
    args.out.mkdir(parents=True, exist_ok=True)
    pre, pre_cpu = (None, 0.0)
    if NEEDS_PRETRAINING & set(contenders):
        pre, pre_cpu = pretrain_folds(args, args.folds)
        logging.info("pretraining: %.1f CPU min for %d folds", pre_cpu / 60, len(args.folds))
    table: dict[str, Any] = {}
    for name in contenders:
        if name == "probe":
            table[name] = run_probe_row(name, args, args.folds, PRETRAINED.replace("{pre}", str(pre)))
        elif name == "probe_random":
            table[name] = run_probe_row(name, args, args.folds, str(untrained_model(args.out)))
        else:
            runs, cpu = run_contender(name, args, args.folds, pre)
            table[name] = shared.seed_row(runs, cpu)
        text = table_text(args, args.folds, table)
        (args.out / "table.md").write_text(text + "\n")
    shared.write_results(args.out, table_text(args, args.folds, table), table, {"pretrain_cpu_s": pre_cpu})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
