"""`uniter3m evaluate`: score a fine-tuned checkpoint once per modality case (missing-modality protocol).

    uniter3m evaluate --checkpoint runs/mosi_lva/fold00-split/best --modalities L,A,LA

The run's resolved config (`<output_dir>/config.json`, written by `finetune`) is read by default,
so nothing given at fine-tuning time has to be repeated; `--config` and `--set` override it. The
checkpoint's fold (saved in its finetune.json) picks the test ids, so the split is the one the
model was never selected on. A case drops streams at inference only: with L off the text is
`[CLS] [SEP]`, with a frame stream off it is absent. One table, a row per case, is printed and
written next to the checkpoint (`modalities.csv/.md/.json`, or `--out STEM`). Without
`--modalities`, every case the config's modalities allow is scored.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from uniter3m.config import add_set_argument
from uniter3m.errors import DatabaseError, UserError
from uniter3m.evaluation.report import modality_table
from uniter3m.fileio import atomic_write_json
from uniter3m.model.finetuning import FINETUNE_FILE, check_feature_dims, load_finetuned
from uniter3m.train.config import FinetuneConfig, load_finetune_config
from uniter3m.train.distributed import init_backend
from uniter3m.train.finetune import (
    evaluation_cases,
    feature_dims,
    find_run_config,
    make_dataset,
    plan_protocol,
    predict,
    run_tokenizer,
    score,
    special_tokens,
    supervised_task,
    tokenizer_record,
)
from uniter3m.train.precision import Precision
from uniter3m.train.session import check_vocabulary, read_tokenizer_record


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="a `<fold>/best` dir written by uniter3m finetune"
    )
    parser.add_argument(
        "--config",
        default=None,
        help="a downstream config (default: the run's resolved config.json beside the fold folders)",
    )
    parser.add_argument(
        "--modalities", default=None, help="comma-separated cases, e.g. L,A,LA (default: every case allowed)"
    )
    parser.add_argument("--split", choices=("test", "valid"), default="test")
    parser.add_argument("--fold", type=int, default=None, help="fold index (default: the checkpoint's own)")
    parser.add_argument("--out", default=None, help="output stem (default: <checkpoint>/../modalities)")
    add_set_argument(parser, "data.txt_db=db/other")


def run_config(
    checkpoint: str | Path, config: str | None, overrides: list[str] | tuple[str, ...] = ()
) -> FinetuneConfig:
    """The given config, else the resolved config.json of the run the checkpoint belongs to."""
    if config is None:
        config = str(find_run_config(checkpoint, section="protocol"))
    return load_finetune_config(config, overrides)


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = run_config(args.checkpoint, args.config, args.overrides)
    cases = [c for c in (args.modalities or "").split(",") if c.strip()]
    result = evaluate_modalities(cfg, args.checkpoint, cases, split=args.split, fold=args.fold, out=args.out)
    print(result["table"])
    print(f"wrote {result['stem']}.csv/.md/.json")
    return 0


def evaluate_modalities(
    cfg: FinetuneConfig,
    checkpoint: str,
    cases: list[str],
    *,
    split: str = "test",
    fold: int | None = None,
    out: str | None = None,
) -> dict[str, Any]:
    ckpt = Path(checkpoint)
    spec_file = ckpt / FINETUNE_FILE
    if not spec_file.is_file():
        raise UserError(
            f"{ckpt} has no {FINETUNE_FILE}; give a `<fold>/best` dir written by `uniter3m finetune`"
        )
    saved = json.loads(spec_file.read_text())
    backend = init_backend(cfg.device)
    try:
        special = special_tokens(cfg.data)
        check_vocabulary(read_tokenizer_record(ckpt), tokenizer_record(cfg.data), str(ckpt), "data.txt_db")
        model = load_finetuned(ckpt)
        cases = evaluation_cases(cfg, model.config, cases)
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
        for case in cases:
            dataset = make_dataset(cfg.data, ids, modalities=case, tokenizer=run_tokenizer(cfg))
            dims = {s: d for s, d in feature_dims(dataset).items() if model.config.stream(s).present}
            check_feature_dims(model.config, dims, str(ckpt), dict(cfg.data.model_extra or {}))
            metrics = score(plan, predict(model, task, dataset, cfg, backend, precision, f"case {case}"), ids)
            rows.append({"modalities": case, "n": len(ids), "metrics": metrics})
        stem = Path(out) if out else ckpt.parent / "modalities"
        table = ""
        if backend.is_main:
            table = modality_table(rows, stem)
            atomic_write_json(
                stem.with_suffix(".json"), {"checkpoint": str(ckpt), "split": split, "fold": k, "rows": rows}
            )
        return {"rows": rows, "table": table, "fold": k, "stem": str(stem)}
    finally:
        backend.shutdown()
