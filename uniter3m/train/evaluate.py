"""Scoring a fine-tuned checkpoint once per modality set (the missing-modality protocol).

The run's resolved config (`<output_dir>/config.json`, written by `finetune`) is read by default
(`run_config`), so nothing given at fine-tuning time has to be repeated. The checkpoint's fold (saved
in its finetune.json) picks the test ids, so the split is the one the model was never selected on. A
modality set drops streams at inference only: with L off the text is `[CLS] [SEP]`, with a frame
stream off it is absent. One table, a row per set: `modalities.csv/.md/.json` in the output folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from uniter3m.config import read_json
from uniter3m.data.tokenization import SpecialTokens
from uniter3m.errors import ConfigError, DatabaseError, UserError
from uniter3m.evaluation.report import modality_table
from uniter3m.fileio import atomic_write_json
from uniter3m.model.finetuning import FINETUNE_FILE, check_feature_dims, load_finetuned, saved_head_layout
from uniter3m.train.assembly import Databases, build_dataset, data_tokenizer, feature_dims, tokenizer_record
from uniter3m.train.config import FinetuneConfig, load_finetune_config
from uniter3m.train.distributed import init_backend
from uniter3m.train.finetune import supervised_task
from uniter3m.train.folds import find_run_config, fold_checkpoints, plan_protocol
from uniter3m.train.precision import Precision
from uniter3m.train.scoring import evaluation_sets, predict, prediction_rows, score
from uniter3m.train.session import check_vocabulary, read_tokenizer_record

TABLE_STEM = "modalities"  # <out>/modalities.csv, .md, .json


def run_config(
    checkpoint: str | os.PathLike, config: str | os.PathLike | None, overrides: Sequence[str] = ()
) -> FinetuneConfig:
    """The given config, else the resolved config.json of the run the checkpoint belongs to (a run
    saved before `model.classifier` existed is read in today's names: `saved_head_layout`)."""
    if config is not None:
        return load_finetune_config(config, overrides)
    path = find_run_config(checkpoint, section="protocol")
    saved = read_json(path)
    saved["model"] = saved_head_layout(saved.get("model") or {})
    try:
        return load_finetune_config(saved, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def evaluate_run(
    checkpoint: str | os.PathLike,
    config: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    modality_sets: Sequence[str] = (),
    *,
    split: str = "test",
    fold: int | None = None,
    out: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """`uniter3m evaluate`: a `<fold>/best` folder, or a run folder whose every fold (or fold `fold`) is
    scored (`evaluate_modalities` each; with `out` and several folds, one subfolder per fold)."""
    found = fold_checkpoints(checkpoint)
    if len(found) > 1 and fold is not None:
        found = [d for d in found if json.loads((d / FINETUNE_FILE).read_text()).get("fold_index") == fold]
        if not found:
            raise UserError(f"{checkpoint} has no fold {fold} with a best/ folder")
    results = []
    for ckpt in found:
        folder = None if out is None else Path(out) / (ckpt.parent.name if len(found) > 1 else "")
        cfg = run_config(ckpt, config, overrides)
        own_fold = fold if len(found) == 1 else None
        results.append(evaluate_modalities(cfg, ckpt, modality_sets, split=split, fold=own_fold, out=folder))
    return results


def evaluate_modalities(
    cfg: FinetuneConfig,
    checkpoint: str | os.PathLike,
    modality_sets: Sequence[str] = (),
    *,
    split: str = "test",
    fold: int | None = None,
    out: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Score a `<fold>/best` checkpoint once per modality set (default: every set the config's
    modalities allow) on its fold's `split`; writes `modalities.csv/.md/.json` into `out` (default:
    the fold folder) and returns {"rows", "table", "fold", "out"}."""
    ckpt = Path(checkpoint)
    spec_file = ckpt / FINETUNE_FILE
    if not spec_file.is_file():
        raise UserError(
            f"{ckpt} has no {FINETUNE_FILE}; give a `<fold>/best` dir written by `uniter3m finetune`"
        )
    saved = json.loads(spec_file.read_text())
    backend = init_backend(cfg.device)
    try:
        dbs = Databases()
        meta = data_tokenizer(cfg.data, dbs)
        special = SpecialTokens.from_dict(meta)
        check_vocabulary(read_tokenizer_record(ckpt), tokenizer_record(meta), str(ckpt), "data.txt_db")
        model = load_finetuned(ckpt)
        modality_sets = evaluation_sets(cfg, model.config, modality_sets)
        plan = plan_protocol(cfg)
        k = saved.get("fold_index") if fold is None else fold
        if k is None or not 0 <= k < len(plan.folds):
            raise UserError(
                f"fold {k} is not a fold of protocol {plan.name} (0..{len(plan.folds) - 1}); pass --fold"
            )
        if list(plan.label.classes) != list(model.spec.classes):
            raise DatabaseError(
                f"{ckpt} predicts classes {model.spec.classes} but the config's protocol has {list(plan.label.classes)}"
            )
        ids = getattr(plan.folds[k], split)
        model.to(backend.device)
        precision = Precision(cfg.precision, backend.device)
        task = supervised_task(model, plan, special)
        rows = []
        per_case: dict[str, list[dict[str, Any]]] = {}  # every prediction, with its class probabilities
        for case in modality_sets:
            dataset = build_dataset(
                cfg.data, dbs, ids=ids, modalities=case, tokenizer=cfg.model.tokenizer or cfg.tokenizer
            )
            dims = {s: d for s, d in feature_dims(dataset).items() if model.config.stream(s).present}
            check_feature_dims(
                model.config, dims, str(ckpt), dict(cfg.data.model_extra or {}), cfg.stream_table
            )
            predictions = predict(model, task, dataset, cfg, backend, precision, f"case {case}")
            rows.append({"modalities": case, "n": len(ids), "metrics": score(plan, predictions, ids)})
            per_case[case] = prediction_rows(plan, predictions, ids)
        folder = Path(out) if out else ckpt.parent
        table = ""
        if backend.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            table = modality_table(rows, folder / TABLE_STEM)
            atomic_write_json(
                folder / f"{TABLE_STEM}.json",
                {"checkpoint": str(ckpt), "split": split, "fold": k, "rows": rows, "predictions": per_case},
            )
        return {"rows": rows, "table": table, "fold": k, "out": str(folder)}
    finally:
        backend.shutdown()
