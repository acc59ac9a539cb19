"""Atomic checkpoints and exact resume.

Layout under `<output_dir>/checkpoints/`:
    step_000100/
        model/               the model's save_pretrained dir (config.json + model.safetensors)
        trainer_state.pt     optimiser, scaler, scheduler, step, every RNG and loader position
                             (one entry per rank), counters
        checkpoint.json      written LAST: step, the file list with sizes; its presence and a
                             match of every listed size make the checkpoint COMPLETE
    latest                   JSON pointer {"step", "dir"} replaced atomically after each save

A save writes everything into `.tmp-step_N-<pid>/`, fsyncs each file and folder, renames the
folder to `step_N` (atomic on POSIX) and only then moves the `latest` pointer. A process killed
at any moment therefore leaves either the previous checkpoints untouched plus a `.tmp-*` folder
(ignored, removed by the next save) or the new complete one. `find_resume` trusts `latest` only
after checking the folder it names, and otherwise falls back to the newest complete `step_*`.

The trainer state is loaded with `torch.load(weights_only=True)`: RNG states are stored as
tensors and plain Python values, so loading never runs pickled code.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from uniter3m.errors import UserError
from uniter3m.fileio import atomic_write_json, fsync_dir

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
MANIFEST = "checkpoint.json"
TRAINER_STATE = "trainer_state.pt"
MODEL_DIR = "model"
_STEP_RE = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


# ---------------------------------------------------------------- RNG states
def capture_rng_state() -> dict[str, Any]:
    """Every RNG a training step may touch: python, numpy, torch CPU and each CUDA device."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": _to_plain(random.getstate()),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return [_to_plain(x) for x in obj]
    return obj


def _to_tuple(obj: Any) -> Any:
    if isinstance(obj, list):
        return tuple(_to_tuple(x) for x in obj)
    return obj


# ---------------------------------------------------------------- model weights
def save_model(model: nn.Module, path: Path) -> None:
    """`model.save_pretrained(path)` when the model has it, else its safetensors state dict."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(path)
        return
    from safetensors.torch import save_model as st_save

    path.mkdir(parents=True, exist_ok=True)
    st_save(model, str(path / "model.safetensors"))


def load_model_weights(model: nn.Module, model_dir: str | os.PathLike) -> None:
    """Load a saved model dir into `model` in place, strictly (tied weights are restored by the tie)."""
    from safetensors.torch import load_model as st_load

    file = Path(model_dir) / "model.safetensors"
    if not file.is_file():
        raise UserError(f"{file} is missing: the checkpoint is damaged; resume from an older one")
    missing, unexpected = st_load(model, str(file), strict=False)
    if missing or unexpected:
        raise UserError(
            f"{file} does not fit the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}; "
            "resume with the config the checkpoint was trained with"
        )


# ---------------------------------------------------------------- saving
def _fsync_tree(root: Path) -> list[dict[str, Any]]:
    files = []
    for dirpath, _, filenames in os.walk(root):
        for name in sorted(filenames):
            p = Path(dirpath) / name
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            files.append({"path": str(p.relative_to(root)), "size": p.stat().st_size})
        fsync_dir(dirpath)
    return files


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    trainer_state: dict[str, Any],
    keep_last: int = 3,
) -> Path:
    """Write checkpoint `step` atomically (call on the main rank only); return its folder.

    `trainer_state` is saved with torch.save and must hold only tensors and plain values.
    Afterwards only the newest `keep_last` complete checkpoints are kept (0 = keep all).
    """
    root = Path(output_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    save_model(model, tmp / MODEL_DIR)
    torch.save({**trainer_state, "step": step}, tmp / TRAINER_STATE)
    files = _fsync_tree(tmp)
    atomic_write_json(tmp / MANIFEST, {"step": step, "files": files, "format": 1})
    fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. a resumed run): swap, never mix
        old = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(root)
    atomic_write_json(root / LATEST, {"step": step, "dir": final.name})
    if keep_last > 0:
        for old_step in complete_checkpoints(root.parent)[:-keep_last]:
            shutil.rmtree(old_step, ignore_errors=True)
    return final


def _remove_stale_temps(root: Path) -> None:
    for p in root.iterdir():
        if p.name.startswith((".tmp-", ".old-")) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------- finding + loading
def is_complete(path: str | os.PathLike) -> bool:
    """A checkpoint folder whose manifest exists and whose every listed file has its size."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return bool(manifest["files"]) and all(
            (path / f["path"]).is_file() and (path / f["path"]).stat().st_size == f["size"]
            for f in manifest["files"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete `step_N` folders under `<output_dir>/checkpoints`, oldest first."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def find_resume(output_dir: str | os.PathLike, resume: str | None) -> Path | None:
    """The checkpoint to resume from: None/'' = start fresh; 'auto' = the last complete one
    under `output_dir` (None when there is none yet); a path = that checkpoint, which must be complete."""
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        if not is_complete(path):
            raise UserError(
                f"--resume {path}: not a complete checkpoint (no {MANIFEST} or a file is missing/short); "
                f"use --resume auto to take the last complete one under {output_dir}"
            )
        return path
    root = Path(output_dir) / CHECKPOINT_DIR
    try:
        pointer = json.loads((root / LATEST).read_text())
        candidate = root / pointer["dir"]
        if is_complete(candidate):
            newer = [p for p in complete_checkpoints(output_dir) if p.name > candidate.name]
            return newer[-1] if newer else candidate
    except (OSError, ValueError, KeyError, TypeError):
        pass
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def load_trainer_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    path = Path(checkpoint) / TRAINER_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as err:
        raise UserError(f"cannot read {path} ({err}); resume from an older checkpoint") from err
