"""What a fine-tune knows about its protocol and folds: the plan (`plan_protocol`, from the label
rows of the text dbs), each fold's folder, starting checkpoint, schedule and class weights, the facts
every fold result records, and where a run's config and fine-tuned checkpoints lie for the commands
that read a finished run (`evaluate`, `extract`, `predict`, `probe`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uniter3m.data.store import DbReader
from uniter3m.errors import UserError
from uniter3m.evaluation.protocols import ProtocolPlan, build_protocol
from uniter3m.model.finetuning import FINETUNE_FILE
from uniter3m.train.config import FOLD_PLACEHOLDER, DataConfig, FinetuneConfig

log = logging.getLogger(__name__)
RESOLVED_CONFIG = "config.json"


def find_run_config(checkpoint: str | Path, section: str | None = None) -> Path:
    """The resolved config.json of the run a checkpoint (`<run>/fold/best`) belongs to, for
    `evaluate`/`extract` without `--config`; `section`: a key the config must hold (e.g. "protocol")."""
    ckpt = Path(checkpoint)
    if not ckpt.exists():
        raise UserError(f"checkpoint {ckpt} does not exist; check --checkpoint (a `<fold>/best` folder)")
    candidates = [p / RESOLVED_CONFIG for p in (ckpt.parent.parent, ckpt.parent)]
    for file in candidates:
        if file.is_file() and (section is None or section in json.loads(file.read_text())):
            return file
    raise UserError(
        f"{ckpt}: no run config.json beside it ({', '.join(map(str, candidates))}); pass --config"
    )


def fold_checkpoints(path: str | os.PathLike) -> list[Path]:
    """The fine-tuned model folders `path` names: itself (a `<fold>/best`), its `best/` (a fold folder),
    or every `fold*/best` of a run folder; an error naming what to give otherwise."""
    p = Path(path)
    if not p.exists():
        raise UserError(
            f"{p} does not exist; give a fine-tuning run folder (its output_dir) or one of its `<fold>/best` folders"
        )
    for candidate in (p, p / "best"):
        if (candidate / FINETUNE_FILE).is_file():
            return [candidate]
    found = sorted(d.parent for d in p.glob(f"fold*/best/{FINETUNE_FILE}"))
    if not found:
        raise UserError(
            f"{p} holds no fine-tuned model (no {FINETUNE_FILE} in it, in best/ or in fold*/best/); give the "
            "output_dir of `uniter3m finetune` or one of its `<fold>/best` folders"
        )
    return found


def untrained_classes(plan: ProtocolPlan, fold: Any) -> list[str]:
    """Classes of the fold's test split that no training utterance has (scored, but listed)."""
    if plan.regression:
        return []
    trained = {int(plan.targets[i]) for i in fold.train}
    tested = {int(plan.targets[i]) for i in fold.test}
    return [plan.label.classes[c] for c in sorted(tested - trained)]


def fold_facts(plan: ProtocolPlan, k: int) -> dict[str, Any]:
    """What every fold result (fine-tuned or probed) records about fold `k` itself (`evaluation.report` reads it)."""
    fold = plan.folds[k]
    return {
        "fold": fold.name,
        "fold_index": k,
        "sizes": fold.sizes(),
        "dropped_by_label": plan.dropped,
        "classes": list(plan.label.classes),
        "untrained_classes": untrained_classes(plan, fold),
    }


def read_label_rows(data: DataConfig, split_column: str = "split") -> dict[str, dict[str, Any]]:
    """{id: labels} of every record (labels only: no input of the model is read here). With text dbs
    given per split, each record's split comes from its db (`split_column`); a record that says
    otherwise is an error naming it."""
    rows: dict[str, dict[str, Any]] = {}
    source: dict[str, str] = {}
    split_of = data.split_of
    for path in data.txt_dbs:
        db = DbReader(path, kind="txt")
        for uid in db.ids:
            if uid in rows:
                raise UserError(
                    f"utterance id {uid!r} is in both {source[uid]} and {path}: their ids repeat (split files "
                    "often number utterances alike); rebuild them with `uniter3m build-txt-db --id-prefix NAME_` "
                    "(e.g. train_, dev_, test_) and their feature dbs with the same ids"
                )
            source[uid] = path
            labels = dict(db[uid].get("labels") or {})
            if split_of:
                own = labels.get(split_column)
                if own is not None and str(own) not in (split_of[path], {"valid": "dev"}.get(split_of[path])):
                    raise UserError(
                        f"{path}: id {uid!r} has {split_column}={own!r} but the db is given as the "
                        f"{split_of[path]!r} split in data.txt_db; fix the config or the db"
                    )
                labels[split_column] = split_of[path]
            rows[uid] = labels
    return rows


def plan_protocol(cfg: FinetuneConfig) -> ProtocolPlan:
    p = cfg.protocol
    if cfg.data.split_of and p.scheme != "split":
        raise UserError(
            f"data.txt_db is given per split, which fixes the folds; use protocol.scheme 'split' (not {p.scheme!r})"
        )
    plan = build_protocol(
        read_label_rows(cfg.data, p.split_column),
        p.name,
        scheme=p.scheme,
        target=p.target,
        label_column=p.label_column,
        classes=p.classes,
        label_map=p.label_map,
        drop_labels=p.drop_labels,
        split_column=p.split_column,
        split_values=None if cfg.data.split_of else p.split_values,
        session_column=p.session_column,
        dialogue_column=p.dialogue_column,
        speaker_column=p.speaker_column,
        valid_fraction=p.valid_fraction,
        selection_metric=p.selection_metric,
        source=", ".join(cfg.data.txt_dbs),
        valid_speakers=p.valid_speakers,
        num_folds=p.num_folds,
        train_fraction=p.train_fraction,
        subset_seed=p.subset_seed,
    )
    if plan.dropped:
        log.warning("protocol %s dropped rows by label value: %s", plan.name, plan.dropped)
    return plan


def class_weights(plan: ProtocolPlan, train_ids: Sequence[str]) -> list[float]:
    """Inverse-frequency weights from the TRAINING split only, normalised to mean 1."""
    counts = np.bincount([plan.targets[i] for i in train_ids], minlength=plan.label.num_classes).astype(
        np.float64
    )
    absent = [plan.label.classes[c] for c in np.flatnonzero(counts == 0)]
    if absent:
        raise UserError(f"class_weighted: classes {absent} have no training example in this fold")
    w = counts.sum() / (len(counts) * counts)
    return (w / w.mean()).tolist()


def schedule(cfg: FinetuneConfig) -> dict[str, int | None]:
    """What a fold's length was planned with: a finished fold whose `epochs` / `steps` are raised on
    `--resume auto` goes on from its last checkpoint (the schedule recomputed for the new length, no new
    warm-up) and is scored again; an early-stopped fold is kept."""
    return {"epochs": cfg.epochs, "steps": cfg.steps}


def fold_dir(cfg: FinetuneConfig, plan: ProtocolPlan, k: int) -> Path:
    return Path(cfg.output_dir) / f"fold{k:02d}-{plan.folds[k].name}"


def fold_model_path(template: str, fold_name: str, what: str) -> str:
    """`template` with FOLD_PLACEHOLDER replaced by the fold folder's name; it must be a model folder."""
    path = template.replace(FOLD_PLACEHOLDER, fold_name)
    if not (Path(path) / "config.json").is_file():
        raise UserError(
            f"{what} {template}: fold {fold_name} has no model folder {path} (no config.json); "
            f"{FOLD_PLACEHOLDER} stands for the fold folder's name: write each fold's checkpoint there"
        )
    return path


def fold_init(cfg: FinetuneConfig, fold_name: str) -> FinetuneConfig:
    """`cfg` with FOLD_PLACEHOLDER in model.init replaced by the fold folder's name: each fold starts from
    its own checkpoint, e.g. one pretrained on that fold's training speakers only."""
    init = cfg.model.init
    if not init or FOLD_PLACEHOLDER not in init:
        return cfg
    path = fold_model_path(init, fold_name, "model.init")
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"init": path})})
