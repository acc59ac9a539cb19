"""A pretraining run, top to bottom: config -> backend -> data -> tasks -> model -> optimiser ->
streams -> loop. The same call runs alone, under `torchrun` and under `horovodrun`
(scripts/pretrain_torchrun.sh, scripts/pretrain_horovod.sh); `uniter3m pretrain` is its recipe.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from uniter3m.data.tokenization import SpecialTokens
from uniter3m.fileio import atomic_write_json
from uniter3m.tasks.base import TaskContext, build_task
from uniter3m.train.assembly import (
    Databases,
    build_dataset,
    build_pretraining_model,
    loop_settings,
    run_collator,
    run_optimizer,
    run_tokenizer,
    text_db_paths,
    tokenizer_meta,
    tokenizer_record,
)
from uniter3m.train.checkpoint import find_resume
from uniter3m.train.config import PretrainConfig, load_pretrain_config
from uniter3m.train.distributed import init_backend
from uniter3m.train.loaders import TaskStream, share_workers, validation_loader
from uniter3m.train.loop import TrainLoop, TrainTask
from uniter3m.train.precision import Precision
from uniter3m.train.session import (
    check_model_config,
    check_vocabulary,
    main_rank_print,
    open_run_dir,
    read_tokenizer_record,
    settings_on_resume,
)

log = logging.getLogger("uniter3m.pretrain")


def run_pretrain(
    config: str | os.PathLike | Mapping[str, Any] | PretrainConfig,
    overrides: Iterable[str] = (),
    resume: str | None = None,
    overwrite: bool = False,
) -> dict[str, float]:
    """Pretrain as the config says; returns the final validation metrics ('task/metric' -> value).

    `resume`: "auto" (the last complete checkpoint of output_dir, or a fresh start) or a checkpoint DIR."""
    # 1. config, and the run folder: locked for the whole run, claimed (never someone else's folder)
    cfg = config if isinstance(config, PretrainConfig) else load_pretrain_config(config, overrides)
    backend = init_backend(cfg.device, grad_sync=cfg.grad_sync)
    if not backend.is_main:  # one copy of the data reports, not one per rank
        logging.getLogger("uniter3m").setLevel(logging.WARNING)
    loop = optimizer = scheduler = model = None
    run_dir = ExitStack()
    try:
        run_dir.enter_context(
            open_run_dir(cfg.output_dir, "pretrain", backend, resume=bool(resume), overwrite=overwrite)
        )
        checkpoint = find_resume(cfg.output_dir, resume, report=main_rank_print(backend))
        changes = (
            settings_on_resume(Path(cfg.output_dir) / "config.json", cfg.model_dump(mode="json"))
            if checkpoint
            else {}
        )
        if backend.is_main:
            atomic_write_json(Path(cfg.output_dir) / "config.json", cfg.model_dump(mode="json"))

        # 2. data: every text db must share one tokenizer; the special ids come from it
        dbs = Databases()
        meta = tokenizer_meta(
            dbs, [p for name, ds in cfg.datasets.items() for p in text_db_paths(ds, f"datasets.{name}")]
        )
        special = SpecialTokens.from_dict(meta)
        if cfg.model.init:
            check_vocabulary(read_tokenizer_record(cfg.model.init), meta, cfg.model.init, "the text dbs")
        tokenizer = run_tokenizer([cfg.tokenizer, meta.get("name")], meta)  # prompt tasks need its words
        collator = run_collator(cfg.batching, special, backend.device, cfg.stream_table)

        # 3. tasks, each with its training dataset (and validation dataset when it has one)
        context = TaskContext(special=special, tokenizer=tokenizer, stream_table=cfg.stream_table)
        active = cfg.active_tasks()
        tasks = [build_task(t.name, context, **t.options) for t in active]
        pairs = list(zip(active, tasks, strict=True))

        def dataset_of(t: Any, task: Any, validation: bool) -> Any:
            data = cfg.datasets[t.dataset]
            return build_dataset(
                data, dbs, modalities=t.modalities, validation=validation, tokenizer=tokenizer, task=task
            )

        train_sets = [dataset_of(t, task, validation=False) for t, task in pairs]
        val_sets = [
            dataset_of(t, task, validation=True) if cfg.datasets[t.dataset].valid is not None else None
            for t, task in pairs
        ]

        # 4. model: the heads the tasks use, stream dims from the databases
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = build_pretraining_model(cfg, tasks, dbs, special).to(backend.device)
        if checkpoint is not None:
            check_model_config(model.config, checkpoint)
        model.tokenizer_record = tokenizer_record(meta)

        # 5. optimiser, schedule, precision
        optimizer, scheduler = run_optimizer(model, cfg.optim, cfg.steps, backend.device)
        precision = Precision(cfg.precision, backend.device)

        # 6. one endless, resumable stream per task; fixed validation batches
        b = cfg.batching
        pin = backend.device.type == "cuda"
        workers = share_workers(
            b.workers_for(backend.device, backend.local_world_size), [tc.ratio for tc in active]
        )
        if backend.is_main:
            log.info(
                "DataLoader workers of each rank, by task: %s",
                ", ".join(f"{tc.key} {n}" for tc, n in zip(active, workers, strict=True)),
            )
        train_tasks = []
        for i, (tc, task, train, val) in enumerate(zip(active, tasks, train_sets, val_sets, strict=True)):
            common = dict(
                task_index=i,
                seed=cfg.seed,
                max_batch_size=b.max_batch_size,
                pool_size=b.pool_size,
                num_workers=workers[i],
                world_size=backend.world_size,
                rank=backend.rank,
                pin_memory=pin,
            )
            stream = TaskStream(task, train, collator, max_tokens=b.max_tokens, **common)
            val_loader = (
                validation_loader(
                    task,
                    val,
                    collator,
                    max_tokens=b.val_max_tokens or b.max_tokens,
                    max_batches=cfg.val_max_batches,
                    **common,
                )
                if val is not None
                else None
            )
            train_tasks.append(TrainTask(tc.key, task, tc.ratio, stream, val_loader))

        # 7. the loop (resume loads weights, optimiser, RNG and loader positions before DDP wraps)
        settings = loop_settings(
            cfg,
            backend.device,
            dbs,
            output_dir=cfg.output_dir,
            steps=cfg.steps,
            val_every=cfg.val_every,
            ckpt_every=cfg.ckpt_every,
            log_every=cfg.log_every,
        )
        if checkpoint is not None and backend.is_main:
            log.info("resuming from %s", checkpoint)
        loop = TrainLoop(settings, model, train_tasks, backend, precision, optimizer, scheduler, checkpoint)
        if "optim.lr" in changes:
            loop.apply_lr_change(*changes["optim.lr"])
        metrics = loop.run()
        if backend.is_main and metrics:
            log.info("final validation: %s", ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics
    finally:
        # gloo: the DDP model and optimiser must be gone before the process group is destroyed
        if loop is not None:
            loop.close()
        del loop, scheduler, optimizer, model
        gc.collect()
        run_dir.close()
        backend.shutdown()
