"""`uniter3m evaluate`: score a fine-tuned checkpoint once per modality case (missing-modality protocol).

    uniter3m evaluate --checkpoint runs/mosi_lva/fold00-split/best --config configs/downstream/mosi_lva.json \\
        --modalities L,V,A,LV,LA,VA,LVA

The checkpoint's fold (saved in its finetune.json) picks the test ids, so the split is the one the
model was never selected on. A case drops streams at inference only: with L off the text is
`[CLS] [SEP]`, with V or A off the stream is absent. One table, a row per case, is printed and
written next to the checkpoint (`modalities.csv/.md/.json`, or `--out STEM`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from uniter3m.recipes.downstream.config import (
    MODALITY_LETTERS,
    FinetuneConfig,
    load_finetune_config,
    parse_modalities,
)
from uniter3m.recipes.downstream.finetune import (
    make_dataset,
    make_loader,
    plan_protocol,
    predict,
    score,
    special_from_db,
)
from uniter3m.recipes.downstream.report import modality_table

from uniter3m.config import add_set_argument
from uniter3m.data.collate import Collator
from uniter3m.data.store import DbReader
from uniter3m.errors import DatabaseError, UserError
from uniter3m.fileio import atomic_write_json
from uniter3m.model.finetuning import FINETUNE_FILE, check_feature_dims, load_finetuned
from uniter3m.train.distributed import init_backend
from uniter3m.train.precision import Precision

DB_KEY = {"V": "face_db", "A": "speech_db"}
STREAM_OF = {"V": "face", "A": "speech"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="a `<fold>/best` dir written by uniter3m finetune"
    )
    parser.add_argument(
        "--config", required=True, help="the downstream config the checkpoint was trained with"
    )
    parser.add_argument(
        "--modalities", default="L,V,A,LV,LA,VA,LVA", help="comma-separated cases (default: all 7)"
    )
    parser.add_argument("--split", choices=("test", "valid"), default="test")
    parser.add_argument("--fold", type=int, default=None, help="fold index (default: the checkpoint's own)")
    parser.add_argument("--out", default=None, help="output stem (default: <checkpoint>/../modalities)")
    add_set_argument(parser, "data.txt_db=db/other")


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = load_finetune_config(args.config, args.overrides)
    cases = [c for c in args.modalities.split(",") if c.strip()]
    result = evaluate_modalities(cfg, args.checkpoint, cases, split=args.split, fold=args.fold, out=args.out)
    print(result["table"])
    return 0


def check_cases(cfg: FinetuneConfig, model_config: Any, cases: list[str]) -> list[str]:
    """Normalised cases; an error for a stream neither the databases nor the checkpoint provide."""
    out = []
    for raw in cases:
        try:
            case = parse_modalities(raw)
        except ValueError as err:
            raise UserError(f"--modalities: {err}") from None
        for letter in case.replace("L", ""):
            key = DB_KEY[letter]
            if not getattr(cfg.data, key):
                raise UserError(
                    f"--modalities {raw}: {MODALITY_LETTERS[letter]} ({letter}) was asked for but the config sets no "
                    f"data.{key}; add it (--set data.{key}=DIR) or drop {letter} from the cases"
                )
            if model_config.stream(STREAM_OF[letter]).feat_dim == 0:
                raise UserError(
                    f"--modalities {raw}: the checkpoint has no {STREAM_OF[letter]} stream (it was fine-tuned without "
                    f"{letter}); drop {letter} from the cases"
                )
        out.append(case)
    return out


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
    backend = init_backend(cfg.train.device)
    try:
        special = special_from_db(cfg.data.txt_db)
        model = load_finetuned(ckpt, special)
        # Every stream of the config's databases must fit the checkpoint's input layers.
        dims = {}
        for letter, key in DB_KEY.items():
            path = getattr(cfg.data, key)
            if path:
                dims[STREAM_OF[letter]] = int(DbReader(path, kind="feat").meta["dim"])
        dims = {s: d for s, d in dims.items() if model.config.stream(s).feat_dim}
        check_feature_dims(
            model.config, dims, str(ckpt), {"face": cfg.data.face_db, "speech": cfg.data.speech_db}
        )
        cases = check_cases(cfg, model.config, cases)
        plan = plan_protocol(cfg, DbReader(cfg.data.txt_db, kind="txt"))
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
        precision = Precision(cfg.train.precision, backend.device)
        rows = []
        for case in cases:
            dataset = make_dataset(cfg, ids, modalities=case)
            loader = make_loader(
                dataset,
                Collator(special),
                cfg.train.eval_batch_size,
                backend,
                train=False,
                seed=cfg.train.seed,
                num_workers=cfg.data.num_workers,
            )
            metrics = score(plan, predict(model, loader, backend, precision), ids)
            rows.append({"modalities": case, "n": len(ids), "metrics": metrics})
        stem = Path(out) if out else ckpt.parent / "modalities"
        table = ""
        if backend.is_main:
            table = modality_table(rows, stem)
            atomic_write_json(
                stem.with_suffix(".json"), {"checkpoint": str(ckpt), "split": split, "fold": k, "rows": rows}
            )
        return {"rows": rows, "table": table, "fold": k}
    finally:
        backend.shutdown()
