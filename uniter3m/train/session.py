"""What every run of the engine does around its loop, so nothing of the user's is lost or silently wrong:

* `open_run_dir`: the run folder is locked for the life of the run and claimed (a folder that is
  not a uniter3m run is refused; an existing run needs `--resume auto` or `--overwrite`);
* `settings_on_resume`: a resumed run compares its config with the one the run recorded: a
  setting that may change is applied and listed, any other change is refused with the list;
* `database_digests` / `check_databases`: the content digest of every database is recorded in
  the checkpoints, and a resume on a database that changed since is refused;
* `check_vocabulary`: a model whose tokenizer differs from the text databases' is refused (an init
  folder without our record is compared by the tokenizer files it ships);
* `check_model_config`: a resume whose resolved model config differs from its checkpoint's is refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from uniter3m.data.store import changed_databases, database_digest
from uniter3m.data.tokenization import TOKENIZER_FILES, load_tokenizer, vocab_hash
from uniter3m.errors import UserError
from uniter3m.model.config import CONFIG_NAME, UniterConfig
from uniter3m.model.io import TOKENIZER_FILE
from uniter3m.train.checkpoint import MODEL_DIR
from uniter3m.train.distributed import Backend
from uniter3m.train.rundir import claim_output_dir, lock_run_dir

log = logging.getLogger(__name__)

#: settings a resumed run may change (applied and listed); every other change is refused
CHANGEABLE_ON_RESUME = frozenset(
    {
        "steps",  # a finished run is extended: the schedule is recomputed for the new length (no new warm-up)
        "epochs",
        "optim.lr",
        "optim.head_lr",
        "val_every",
        "ckpt_every",
        "keep_last",
        "log_every",
        "progress",
        "stop_after",
        "max_nonfinite_in_a_row",
        "val_max_batches",
        "batching.num_workers",
        "batching.val_max_tokens",
        "batching.val_max_batch_size",
        "patience",
    }
)


@contextmanager
def open_run_dir(
    output_dir: str | Path, kind: str, backend: Backend, *, resume: bool, overwrite: bool
) -> Iterator[Path]:
    """Lock and claim the run folder on the main rank for the `with` block; other ranks wait for it."""
    path = Path(output_dir)
    if not backend.is_main:
        backend.barrier()
        yield path
        return
    with lock_run_dir(path):
        try:
            claim_output_dir(path, overwrite, kind, resume=resume)
        except BaseException:
            backend.barrier()  # let the other ranks reach their error path instead of hanging
            raise
        backend.barrier()
        yield path


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def main_rank_print(backend: Backend):
    """`print` on the main rank, silence elsewhere: one copy of a line per run, not one per rank."""
    return print if backend.is_main else (lambda line: None)


def settings_on_resume(recorded_file: Path, now: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (was, now)} of the changes a resume applies; raises listing the ones it cannot apply."""
    if not recorded_file.is_file():
        return {}
    before = _flatten(json.loads(recorded_file.read_text()))
    after = _flatten(now)
    changed = {
        k: (before.get(k), after.get(k))
        for k in sorted(set(before) | set(after))
        if before.get(k) != after.get(k)
    }
    refused = {k: v for k, v in changed.items() if k not in CHANGEABLE_ON_RESUME}
    if refused:
        listed = "; ".join(f"{k}: {was!r} -> {new!r}" for k, (was, new) in refused.items())
        raise UserError(
            f"--resume: these settings differ from the run's {recorded_file} and cannot change in a resumed run: "
            f"{listed}. Resume with the run's settings, or start a new run (another output_dir, or --overwrite). "
            f"Settings that may change on resume: {', '.join(sorted(CHANGEABLE_ON_RESUME))}"
        )
    for key, (was, new) in changed.items():
        log.warning("resume: %s changed from %r to %r (applied)", key, was, new)
    return changed


def database_digests(paths: Iterable[str | Path]) -> dict[str, str]:
    """{resolved path: content digest} of every database a run reads."""
    return {str(Path(p).resolve()): database_digest(p) for p in dict.fromkeys(str(p) for p in paths)}


def check_databases(recorded: Mapping[str, str] | None, checkpoint: str | Path) -> None:
    """Refuse to resume when a database changed since the checkpoint's run recorded it."""
    if not recorded:
        return
    changed = changed_databases(recorded)
    if changed:
        raise UserError(
            f"cannot resume from {checkpoint}: database(s) {', '.join(changed)} changed since the run started "
            "(rebuilt or replaced); resuming would train on other data. Restore the databases, or start a new run"
        )


def check_vocabulary(
    model_tokenizer: Mapping[str, Any] | None, db_tokenizer: Mapping[str, Any], model: str, db: str
) -> None:
    """A model trained with one vocabulary is refused on text tokenised with another (same size or not)."""
    if not model_tokenizer or not model_tokenizer.get("vocab_hash") or not db_tokenizer.get("vocab_hash"):
        return
    if model_tokenizer["vocab_hash"] != db_tokenizer["vocab_hash"]:
        raise UserError(
            f"{model} was trained with tokenizer {model_tokenizer.get('name')!r} (vocab hash "
            f"{model_tokenizer['vocab_hash']}) but the text database {db} was built with {db_tokenizer.get('name')!r} "
            f"(vocab hash {db_tokenizer['vocab_hash']}); rebuild the text db with the model's tokenizer"
        )


def read_tokenizer_record(model_dir: str | Path) -> dict[str, Any] | None:
    """The tokenizer a model directory was trained with (name, vocab hash, size): the record we wrote, or
    for a folder without one (an HF model) the hash of the tokenizer files it ships; None without either."""
    model_dir = Path(model_dir)
    file = model_dir / TOKENIZER_FILE
    if file.is_file():
        return json.loads(file.read_text())
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        return None
    tokenizer = load_tokenizer(model_dir)
    return {"name": str(model_dir), "vocab_hash": vocab_hash(tokenizer), "size": len(tokenizer)}


def check_model_config(now: UniterConfig, checkpoint: str | Path) -> None:
    """A resumed run must build the model its checkpoint holds: the RESOLVED model config (a file named by
    `model.config` may have been edited since; only its path is a setting) is compared with the saved one."""
    file = Path(checkpoint) / MODEL_DIR / CONFIG_NAME
    if not file.is_file():
        return
    saved = json.loads(file.read_text())
    changed = {
        k: (saved.get(k), v) for k, v in now.to_dict().items() if k != "model_type" and saved.get(k) != v
    }
    if changed:
        listed = "; ".join(f"{k}: {was!r} -> {new!r}" for k, (was, new) in sorted(changed.items()))
        raise UserError(
            f"--resume: the model config resolved now differs from the one of checkpoint {checkpoint} ({listed}); "
            "the file model.config names (or model.overrides) changed since the run started. Restore it, or start "
            "a new run (another output_dir, or --overwrite)"
        )
