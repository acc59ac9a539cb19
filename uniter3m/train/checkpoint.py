"""Atomic checkpoints and exact resume.

Layout under `<output_dir>/checkpoints/`:
    step_000100/
        model/               the model's save_pretrained dir (config.json + model.safetensors)
        trainer_state.pt     optimiser, scaler, scheduler, step, every RNG and loader position
                             (one entry per rank), counters
        checkpoint.json      written LAST: step, the file list with sizes and SHA-256; its presence
                             and a match of every listed size make the checkpoint COMPLETE, a match
                             of every hash (and readable, finite contents) make it INTACT
    latest.json              JSON pointer {"step", "dir"} replaced atomically after each save
    latest -> step_000100    a relative symlink replaced with it, so `checkpoints/latest/model` is a path

`model/` also holds the tokenizer files of the run (from its resolved `config.json`) and a model
card (`README.md`: what transformers loads, the config, data, last validation metrics, command).

A save writes everything into `.tmp-step_N-<pid>/`, fsyncs each file and folder, renames the
folder to `step_N` (atomic on POSIX) and only then moves the `latest` pointer. A process killed
at any moment therefore leaves either the previous checkpoints untouched plus a `.tmp-*` folder
(ignored, removed by the next save) or the new complete one.

Files on disk can still be damaged later (a bad disk, a cut copy, a flipped bit). `--resume auto`
therefore verifies each candidate, newest first (`verify_checkpoint`: sizes, hashes, a readable
safetensors header, finite weights, a loadable trainer state of the right step) and resumes from
the newest intact one, printing one line for every damaged checkpoint it passes over and why.
Checkpoints written before hashes were recorded are checked for everything else; the loop then
compares the loaded weights with the parameter digest the trainer state holds
(`check_parameter_digest`).

The trainer state is loaded with `torch.load(weights_only=True)`: RNG states are stored as
tensors and plain Python values, so loading never runs pickled code.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from uniter3m.errors import UserError
from uniter3m.fileio import (
    WRITE_ERRNOS,
    WriteFailed,
    atomic_write_json,
    fsync_dir,
    hash_files,
    manifest_problems,
    write_failed,
    write_manifest,
)
from uniter3m.model.io import load_into, read_saved

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.json"  # the JSON pointer
LATEST_LINK = "latest"  # the symlink to the newest step folder
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
    from safetensors import SafetensorError
    from safetensors.torch import save_model as st_save

    path.mkdir(parents=True, exist_ok=True)
    file = path / "model.safetensors"
    try:
        st_save(model, str(file))
    except SafetensorError as err:  # its failed writes are no OSError: make them one, for the full-disk rule
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(file)) from err


def load_model_weights(model: nn.Module, model_dir: str | os.PathLike) -> None:
    """Resume: `model_dir` into `model` through the one load path, strictly (tied weights are restored
    by the tie); a weights file that cannot be read points at the older checkpoints."""
    try:
        loaded = read_saved(model_dir)
    except UserError as err:
        raise UserError(f"{err}: {_OLDER}") from err
    load_into(model, loaded, strict=True)


# ---------------------------------------------------------------- saving
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
    try:
        tmp.mkdir()
        save_model(model, tmp / MODEL_DIR)
        _describe_model(Path(output_dir), tmp / MODEL_DIR, step)
        write_manifest(tmp / MODEL_DIR)  # `checkpoints/step_N/model` is read alone too (model.init)
        torch.save({**trainer_state, "step": step}, tmp / TRAINER_STATE)
        files = hash_files(tmp)
        atomic_write_json(tmp / MANIFEST, {"step": step, "files": files, "format": 1})
        fsync_dir(tmp)
    except BaseException as err:  # a full disk leaves no partial checkpoint behind
        shutil.rmtree(tmp, ignore_errors=True)
        # said of the checkpoints folder, not of the temp folder just removed; torch.save reports a failed
        # write as a RuntimeError of its stream writer
        cause = err.__cause__ if isinstance(err, WriteFailed) else err
        refused = isinstance(cause, OSError) and cause.errno in WRITE_ERRNOS
        if (
            refused
            or isinstance(cause, RuntimeError)
            and ("write" in str(cause) or "inline_container" in str(cause))
        ):
            need = sum(t.nbytes for _, t in _tensors([model.state_dict(), trainer_state], ""))
            raise write_failed(root, cause, need) from cause
        raise
    if final.exists():  # the same step saved again (e.g. a resumed run): swap, never mix
        old = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(root)
    atomic_write_json(root / LATEST, {"step": step, "dir": final.name})
    point_latest(root, final.name)
    if keep_last > 0:
        for old_step in complete_checkpoints(root.parent)[:-keep_last]:
            shutil.rmtree(old_step, ignore_errors=True)
    return final


def point_latest(root: Path, name: str) -> None:
    """Replace the `latest` symlink atomically (a new link renamed over the old one or an old pointer file)."""
    link = root / LATEST_LINK
    tmp = root / f".tmp-link-{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(name, tmp, target_is_directory=True)
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)
        os.replace(tmp, link)
    except OSError as err:  # a file system without symlinks: the JSON pointer still says it
        tmp.unlink(missing_ok=True)
        _print_stderr(
            f"could not point {link} at {name} ({err}); {root / LATEST} names the newest checkpoint"
        )


def _describe_model(output_dir: Path, model_dir: Path, step: int) -> None:
    """Tokenizer files and a model card in a checkpoint's model folder (from the run's config.json)."""
    from uniter3m.model.card import (
        copy_tokenizer,
        native_loading_note,
        read_run_config,
        run_tokenizer_dir,
        write_model_card,
    )

    run_config = read_run_config(output_dir)
    copied = copy_tokenizer(run_tokenizer_dir(run_config), model_dir)
    try:
        architecture = json.loads((model_dir / "config.json").read_text())["architectures"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        architecture = "BertModel"
    write_model_card(
        model_dir,
        f"uniter3m pretraining checkpoint, step {step}",
        f"Step {step} of the run in `{output_dir}`."
        + ("" if copied else " No tokenizer files were found for this run (set `tokenizer` in its config)."),
        transformers_use=native_loading_note(architecture),
        sections={
            "Last validation metrics": _last_validation(output_dir),
            "Data": (run_config or {}).get("datasets") or (run_config or {}).get("data"),
            "Run config": run_config,
        },
    )


def _last_validation(output_dir: Path) -> dict[str, Any] | None:
    """The newest `split: val` line of `<output_dir>/logs/metrics.jsonl`, if any."""
    try:
        lines = (output_dir / "logs" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("split") == "val":
            return record
    return None


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


def verify_checkpoint(path: str | os.PathLike) -> list[str]:
    """Everything wrong with checkpoint folder `path`, one line each; [] when it is intact.

    Reads every file: the sizes and SHA-256 of the manifest (when it has them), the safetensors
    header and every weight (finite), and the trainer state (loadable, of the manifest's step,
    finite floating tensors). Cost: one read of the checkpoint.
    """
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = list(manifest["files"])
        step = int(manifest["step"])
    except FileNotFoundError:
        return [f"no {MANIFEST}: its save was interrupted or the folder was not written by uniter3m"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{MANIFEST} is unreadable ({err})"]
    problems = manifest_problems(path, files)
    if problems:
        return problems
    problems += _weight_problems(path / MODEL_DIR / "model.safetensors")
    problems += _trainer_state_problems(path / TRAINER_STATE, step)
    return problems


def _weight_problems(file: Path) -> list[str]:
    if not file.is_file():
        return [f"{file.relative_to(file.parents[1])} is missing"]
    from safetensors import safe_open

    name = f"{MODEL_DIR}/{file.name}"
    try:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    return [f"{name}: weight {key} holds NaN or Inf"]
    except Exception as err:  # SafetensorError and friends: any failure means unreadable
        return [f"{name} cannot be read ({type(err).__name__}: {err})"]
    return []


def _trainer_state_problems(file: Path, step: int) -> list[str]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and tensor errors alike mean unreadable
        return [f"{TRAINER_STATE} cannot be loaded ({type(err).__name__}: {err})"]
    if not isinstance(state, dict) or state.get("step") != step:
        found = state.get("step") if isinstance(state, dict) else type(state).__name__
        return [f"{TRAINER_STATE} is for step {found}, the manifest for step {step}"]
    for where, tensor in _tensors(state, TRAINER_STATE):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return [f"{where} holds NaN or Inf"]
    return []


def _tensors(obj: Any, where: str) -> Iterable[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield where, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{where}[{i}]")


def _print_stderr(line: str) -> None:
    print(f"uniter3m: {line}", file=sys.stderr, flush=True)


def find_resume(
    output_dir: str | os.PathLike, resume: str | None, report: Callable[[str], None] | None = None
) -> Path | None:
    """The checkpoint to resume from: None/'' = start fresh; 'auto' = the newest INTACT one under
    `output_dir` (None when there is none yet); a path = that checkpoint, which must be intact.

    With 'auto', each damaged checkpoint passed over is reported (to stderr unless `report` is
    given) with the reason; when checkpoints exist but none is intact, that is an error.
    """
    if not resume:
        return None
    report = report or _print_stderr
    if resume != "auto":
        path = Path(resume)
        problems = verify_checkpoint(path)
        if problems:
            raise UserError(
                f"--resume {path}: not a complete checkpoint, or a damaged one ({'; '.join(problems)}); "
                f"use --resume auto to take the newest intact one under {output_dir}"
            )
        return path
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    candidates = sorted(
        ((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()),
        reverse=True,
    )
    damaged = []
    for _, candidate in candidates:
        problems = verify_checkpoint(candidate)
        if not problems:
            if damaged:
                report(f"resuming from {candidate}, the newest intact checkpoint")
            return candidate
        damaged.append(candidate)
        report(f"checkpoint {candidate} is damaged, skipping it: {'; '.join(problems)}")
    if damaged:
        raise UserError(
            f"every checkpoint under {root} is damaged (see above); nothing to resume from: "
            "restore one from a backup, or start a new run in another output_dir"
        )
    return None


def load_trainer_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    path = Path(checkpoint) / TRAINER_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and tensor errors alike: the file is damaged
        raise UserError(f"cannot read {path} ({type(err).__name__}: {err}); {_OLDER}") from err


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in name order: equal exactly when the weights are.

    A trainer state records it per rank (`ranks[r]["param_digest"]`): ranks that drifted apart stop a
    save, and weights changed on disk after it stop a resume (`check_parameter_digest`).
    """
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_parameter_digest(model: nn.Module, state: dict[str, Any], checkpoint: str | os.PathLike) -> None:
    """After loading `checkpoint` into `model`: raise when its weights differ from the digest recorded
    in its trainer state (`state["ranks"][r]["param_digest"]`); a state without digests passes."""
    recorded = {r.get("param_digest") for r in state.get("ranks", []) if isinstance(r, dict)} - {None}
    if not recorded:
        return
    now = parameter_digest(model)
    if now not in recorded:
        raise UserError(
            f"{checkpoint}: the loaded weights differ from those its trainer state recorded "
            f"(digest {now[:12]} vs {sorted(recorded)[0][:12]}); {MODEL_DIR}/model.safetensors was changed after "
            f"the save. {_OLDER}"
        )


_OLDER = "resume from an older checkpoint (--resume auto takes the newest intact one)"
