"""Atomic file writes: temp file in the same folder, fsync, rename, fsync of the folder.

A reader (or a resumed run) therefore sees either the old file or the new one, never half of one.
Files get the mode an ordinary `open()` would give (0666 minus the umask), not mkstemp's 0600, so a
group that may read the run's other files can read checkpoints and meta.json too.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, default_file_mode())  # mkstemp creates 0600 whatever the umask says
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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
