"""Run folders: claim one without destroying what is not ours, and hold it while a run is alive.

A run folder (pretraining, fine-tuning, the demo) carries a marker file, `RUN_MARKER`, written
when the folder is claimed. The marker is what makes the folder recognisably ours:
- a new or empty folder is claimed (and marked);
- a marked folder is continued with `resume=True`, or emptied and re-marked with `overwrite=True`;
  without either it is refused, so a second run never replaces the checkpoints of the first;
- a marked folder belongs to one kind of run: another kind (a pretraining into a fine-tuning run or
  a demo folder) is refused whatever the flags;
- `overwrite` deletes only what a run makes (`RUN_CONTENT`): a folder that also holds files the user
  added (notes, analysis scripts) is refused, listing them;
- a folder holding anything else is refused even with `overwrite`, naming what it holds.

`lock_run_dir` holds an exclusive `flock` on `<dir>/RUN_LOCK` for the life of a run: a second
run started on the same folder (same host, or another one on NFS, which maps flock to POSIX
locks) stops at once with the pid and host of the holder. The kernel drops the lock when the
holder dies, even by SIGKILL, so a stale lock file never blocks the next run. Take the lock on
the main rank only (ranks of one run would lock each other out), before `claim_output_dir`.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from uniter3m.errors import UserError
from uniter3m.fileio import atomic_write_json

RUN_MARKER = "uniter3m_run.json"
RUN_LOCK = ".uniter3m.lock"
#: what runs write at the top of their folder (pretraining, fine-tuning folds, their tables and
#: pictures, interrupted atomic writes): `--overwrite` deletes these and nothing else
RUN_CONTENT = (
    RUN_MARKER,
    "config.json",
    "checkpoints",
    "logs",
    "fold[0-9][0-9]-*",
    "summary.csv",
    "summary.md",
    "summary.json",
    "confusion.png",
    "learning_curve.png",
    ".*.tmp",
)


class RunDirBusy(UserError):
    """Another live process holds the run folder's lock."""


def output_folder(path: str | os.PathLike) -> Path:
    """`path` as a folder, created with its parents; a file there is an error (nothing is replaced)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"output folder {path} is a file; give a folder path (it is created)")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def lock_run_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Hold the run folder's exclusive lock (creating the folder) for the `with` block.

    Raises `RunDirBusy` at once, naming the holder, when another process holds it.
    """
    path = output_folder(path)
    lock = path / RUN_LOCK
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            holder = _read_holder(fd)
            raise RunDirBusy(
                f"{path} is in use by another run ({holder}); two runs in one folder would overwrite each "
                "other's checkpoints and logs: wait for it to end, stop it, or choose another output_dir"
            ) from None
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        info["command"] = " ".join(sys.argv)[:300]
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock; the file stays (deleting it would race with a new holder)


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']} since {info['since']}: {info.get('command', '?')}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def claim_output_dir(
    path: str | os.PathLike,
    overwrite: bool,
    marker: str,
    *,
    resume: bool = False,
) -> Path:
    """Make `path` this run's folder, or refuse with the reason; returns it (created if needed).

    `marker` names the kind of run ("pretrain", "finetune", "demo"); it is recorded in RUN_MARKER.
    `resume=True` keeps the content (the caller continues from it); `overwrite=True` deletes it first. Call it while
    holding `lock_run_dir(path)`, so the folder cannot be in use by a live run.
    """
    path = output_folder(path)
    entries = sorted(p.name for p in path.iterdir() if p.name != RUN_LOCK)
    if entries:
        if RUN_MARKER not in entries:
            shown = ", ".join(entries[:8]) + (" ..." if len(entries) > 8 else "")
            raise UserError(
                f"output folder {path} is not empty and is not a uniter3m run folder (it holds {shown}; no "
                f"{RUN_MARKER}); nothing was changed. Choose a new or empty folder (only a folder that a "
                "uniter3m run created is ever continued or replaced; to start from a checkpoint of a run "
                "without that file, set model.init to its checkpoints/step_N/model)"
            )
        kind = (read_marker(path) or {}).get("kind")
        if kind != marker:
            raise UserError(
                f"output folder {path} holds a {kind} run ({_describe(path)}), not a {marker} run; a run folder "
                f"belongs to one kind of run, so nothing was changed. Choose another output_dir for the {marker} run"
            )
        if resume:
            _write_marker(path, marker)
            return path
        if not overwrite:
            raise UserError(
                f"output folder {path} already holds a run ({_describe(path)}); pass --resume auto to continue "
                "it, --overwrite to replace it, or choose another output_dir"
            )
        foreign = [n for n in entries if not any(fnmatch.fnmatchcase(n, p) for p in RUN_CONTENT)]
        if foreign:
            raise UserError(
                f"--overwrite: output folder {path} holds files no run made: {', '.join(n + '/' if (path / n).is_dir() else n for n in foreign)}; nothing was "
                "deleted. Move them out of the folder (or choose another output_dir), then run again"
            )
        for name in entries:
            p = path / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    _write_marker(path, marker)
    return path


def read_marker(path: str | os.PathLike) -> dict[str, object] | None:
    """The run folder's marker, or None when `path` is not a marked run folder."""
    try:
        data = json.loads((Path(path) / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_marker(path: Path, marker: str) -> None:
    old = read_marker(path) or {}
    created = old.get("created") if old.get("kind") == marker else None
    atomic_write_json(
        path / RUN_MARKER,
        {"kind": marker, "created": created or time.strftime("%Y-%m-%d %H:%M:%S"), "format": 1},
    )


def _describe(path: Path) -> str:
    info = read_marker(path) or {}
    steps = sorted((path / "checkpoints").glob("step_*")) if (path / "checkpoints").is_dir() else []
    parts = [f"a {info.get('kind', 'uniter3m')} run"]
    if info.get("created"):
        parts.append(f"started {info['created']}")
    if steps:
        parts.append(f"checkpoints up to {steps[-1].name}")
    return ", ".join(parts)
