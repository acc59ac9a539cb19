"""Atomic file writes: temp file in the same folder, fsync, rename, fsync of the folder.

A reader (or a resumed run) therefore sees either the old file or the new one, never half of one.
Files get the mode an ordinary `open()` would give (0666 minus the umask), not mkstemp's 0600, so a
group that may read the run's other files can read checkpoints and meta.json too.

Folders: `building_dir(target)` fills a hidden sibling and swaps it in whole, so a folder rewritten
again and again (a fine-tuning run's `best/`) never mixes files of two saves. `write_manifest(dir)`
records the size and SHA-256 of every file of a folder (`manifest.json`); `manifest_problems` is what
every reader of such a folder checks, so bytes changed on disk are an error, never a silent result.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from uniter3m.errors import UserError

MANIFEST_NAME = "manifest.json"
#: files a manifest does not cover: the model card is for people, who may edit it
UNLISTED = frozenset({MANIFEST_NAME, "README.md"})


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (no window for other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """What `open(path, "w")` would create: 0666 minus the umask."""
    return 0o666 & ~current_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically; a full disk or a read-only folder is a `WriteFailed` naming it
    (and the temp file is gone)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        if err.errno in WRITE_ERRNOS:
            raise write_failed(path.parent, err, len(data)) from err
        raise
    try:
        os.fchmod(fd, default_file_mode())  # mkstemp creates 0600 whatever the umask says
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
            raise write_failed(path.parent, err, len(data)) from err
        raise
    fsync_dir(path.parent)


# ---------------------------------------------------------------- writes the machine refuses
class WriteFailed(UserError):
    """A write refused by the machine (full disk, size limit, read-only or forbidden folder), in one line."""


#: errno values that mean "this folder cannot take the write", not a bug: the user fixes them
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the file system of `path` (or of its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _size(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover - the loop returns


def write_failed(folder: str | os.PathLike, err: BaseException, need: int | None = None) -> WriteFailed:
    """The one-line error for a write into `folder` that failed with `err`: what happened, the free space
    there and what the write needed (when known), and the fix."""
    code = getattr(err, "errno", None)
    free = f"{_size(free_bytes(folder))} free there" + (f", about {_size(need)} needed" if need else "")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = "is on a read-only file system" if code == errno.EROFS else "cannot be written by this user"
        return WriteFailed(
            f"cannot write in {folder}: it {why} ({os.strerror(code)}); choose a writable output folder "
            "(output_dir / --out / --file), or make this one writable"
        )
    if code == errno.EFBIG:
        what = "a file grew past the size limit of this process or file system (ulimit -f)"
    elif code in (errno.ENOSPC, errno.EDQUOT) or (need and (free_bytes(folder) or 0) < need):
        what = "the disk (or the quota) is full"
    else:
        what = f"the write failed ({type(err).__name__}: {err}); the disk may be full"
    return WriteFailed(
        f"cannot write in {folder}: {what} ({free}); nothing half-written was kept. Free space there (or raise the "
        "limit), or choose another output folder, and run the command again"
    )


def replace_dir(new: str | os.PathLike, target: str | os.PathLike, trash: str | os.PathLike) -> bool:
    """Put folder `new` at `target`; an existing `target` ends up at `trash`. Returns True when it did.

    On Linux this is one `renameat2(RENAME_EXCHANGE)`: at every instant `target` names either the
    old folder or the new one, so a reader that opens it in between never finds it missing. Where
    that call is unavailable (another OS, a file system without it) two renames are used, with a
    window of microseconds in which `target` does not exist. Processes that already opened files of
    the old folder keep reading them (an unlinked file lives on while it is open or mapped).
    """
    new, target, trash = Path(new), Path(target), Path(trash)
    if not target.exists():
        os.rename(new, target)
        fsync_dir(target.parent)
        return False
    if not _exchange(new, target):
        os.rename(target, new.with_name(new.name + ".swap"))
        os.rename(new, target)
        new = new.with_name(new.name + ".swap")
    os.rename(new, trash)  # after an exchange `new` holds the old folder
    fsync_dir(target.parent)
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where that is not available."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(
        path, (json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n").encode()
    )


def json_default(obj: Any) -> Any:
    """`json.dumps(default=...)` for numpy scalars/arrays and paths."""
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


# ---------------------------------------------------------------- folders and their manifests
def hash_files(root: str | os.PathLike, skip: Iterable[str] = ()) -> list[dict[str, Any]]:
    """fsync every file under `root` (except top-level names in `skip`) and list it with its size and
    SHA-256, read back from disk. Each file also gets the mode the umask gives: some writers
    (safetensors) create files 0600."""
    root, skip = Path(root), set(skip)
    files = []
    mode = default_file_mode()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if rel in skip:
                continue
            os.chmod(p, mode)
            with open(p, "rb") as f:
                os.fsync(f.fileno())
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            files.append({"path": rel, "size": p.stat().st_size, "sha256": digest})
        fsync_dir(dirpath)
    return files


def manifest_problems(root: str | os.PathLike, files: Iterable[dict[str, Any]]) -> list[str]:
    """One line for every listed file of `root` that is missing, of another size or other bytes."""
    root = Path(root)
    problems = []
    for entry in files:
        file = root / entry["path"]
        if not file.is_file():
            problems.append(f"{entry['path']} is missing")
            continue
        size = file.stat().st_size
        if size != entry["size"]:
            problems.append(
                f"{entry['path']} is {size} bytes where {entry['size']} were written (truncated or cut)"
            )
        elif "sha256" in entry:
            with open(file, "rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != entry["sha256"]:
                    problems.append(
                        f"{entry['path']} differs from what was written (SHA-256 mismatch: bytes changed on disk)"
                    )
    return problems


def write_manifest(folder: str | os.PathLike) -> None:
    """Record every file of a finished model folder (all but `UNLISTED`) in its `manifest.json`; last."""
    folder = Path(folder)
    atomic_write_json(folder / MANIFEST_NAME, {"files": hash_files(folder, UNLISTED), "format": 1})


def read_manifest(folder: str | os.PathLike) -> list[dict[str, Any]] | None:
    """The files `folder`'s manifest lists; None when it has none (a folder we did not write)."""
    file = Path(folder) / MANIFEST_NAME
    if not file.is_file():
        return None
    try:
        return list(json.loads(file.read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{file} is unreadable ({err}): the folder is damaged; write it again") from err


def check_manifest(folder: str | os.PathLike) -> None:
    """Raise naming every damaged file when `folder` has a manifest its files no longer match."""
    files = read_manifest(folder)
    problems = manifest_problems(folder, files) if files is not None else []
    if problems:
        raise UserError(
            f"{folder} is damaged: {'; '.join(problems)}. Its {MANIFEST_NAME} records what was written; "
            "write the folder again (or restore it from a backup)"
        )


def unlisted_entries(folder: str | os.PathLike) -> list[str]:
    """Top-level names of `folder` that its manifest does not list (files someone added); all of them
    when it has no manifest."""
    folder = Path(folder)
    files = read_manifest(folder) or []
    listed = {Path(f["path"]).parts[0] for f in files} | (UNLISTED if files else set())
    return sorted(p.name for p in folder.iterdir() if p.name not in listed)


@contextmanager
def building_dir(target: str | os.PathLike) -> Iterator[Path]:
    """A new hidden sibling of `target` to fill; when the block ends without an error it replaces
    `target` whole (`replace_dir`), otherwise it is removed and `target` keeps what it held.
    Leftovers of killed writers (`.NAME.tmp-*`, `.NAME.old-*`) are removed first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for p in target.parent.glob(f".{target.name}.*-*"):
        if p.name.startswith((f".{target.name}.tmp-", f".{target.name}.old-")) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_dir(tmp)
        trash = target.parent / f".{target.name}.old-{os.getpid()}"
        if replace_dir(tmp, target, trash):
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
