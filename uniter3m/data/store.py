"""LMDB databases: a batched writer and a read-only, lock-free, fork-safe reader.

Layout of a database folder:
    data.mdb / lock.mdb   LMDB environment; one msgpack record per utterance id, plus the
                          reserved key INDEX_KEY holding {"ids": [...], "lengths": [...]}
    meta.json             written last and atomically: a folder without it is an interrupted
                          build and is refused on open

Records are dicts whose numpy arrays travel as msgpack extension objects (dtype, shape, raw
bytes), so a reader gets arrays back without pickle. `lengths` is the per-utterance length
the batch sampler needs (tokens for text, frames for features) without reading every record.

Faults (format version 2, the only one read):
- every value is a CRC-32 of its msgpack bytes followed by those bytes; a read verifies it, so a
  flipped byte is an error naming the record instead of training data. A database of another
  version (format 1 had no checksums) is refused with the command that rebuilds it.
- a database is built in a hidden sibling folder (`.NAME.building-*`) and swapped in whole by
  `finish()`; a reader that already has the old one open keeps reading the old records, and a
  process that opens the folder later checks that it holds the build its index came from
  (`build_id`), so a rebuild under a running job is an error, never a silent switch of data.
- a data.mdb shorter than the pages its own header says it uses (a cut copy, a full disk) is
  refused when opened: reading it would kill the process with SIGBUS.
- `meta["content_digest"]` hashes every (id, record) in order: `database_digest(path)` is what a
  run records at its start to refuse resuming on a database that changed.
- meta.json is covered too: the build record (BUILD_KEY, checksummed like every value) holds a copy
  of it, and a reader refuses a meta.json that differs from it (an edited mean/std would otherwise
  train on wrongly normalised features). Format-2 databases built before the copy was kept still
  open (their meta.json is not covered); rebuilding one covers it.
- an id longer than LMDB's key limit (511 bytes) is refused at build, naming it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import numpy as np

from uniter3m.errors import DatabaseError
from uniter3m.fileio import atomic_write_json, fsync_dir, json_default, replace_dir, write_failed

FORMAT = "uniter3m-lmdb"
FORMAT_VERSION = 2
CHECKSUM = "crc32"
INDEX_KEY = b"\x00index"
BUILD_KEY = b"\x00build"
META_FILE = "meta.json"
DB_FILES = frozenset({"data.mdb", "lock.mdb", META_FILE})
_BUILD_LOCK = ".building.lock"  # inside a folder under construction: held (flock) by its writer
_STALE_UNLOCKED_S = 600  # a build folder without its lock file is left alone this long
_NDARRAY_EXT = 1
_MAP_SIZE = 1 << 40  # virtual; the file grows only as data is written

# One read-only environment per (process, folder, build): LMDB refuses a second open of the same
# environment in one process, and an environment must never be used across a fork.
_READ_ENVS: dict[tuple[int, str, str], lmdb.Environment] = {}


def _encode(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        header = msgpack.packb([arr.dtype.str, list(arr.shape)])
        return msgpack.ExtType(_NDARRAY_EXT, len(header).to_bytes(4, "little") + header + arr.tobytes())
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} in a database record")


def _decode_ext(code: int, data: bytes) -> Any:
    if code != _NDARRAY_EXT:
        return msgpack.ExtType(code, data)
    n = int.from_bytes(data[:4], "little")
    dtype, shape = msgpack.unpackb(data[4 : 4 + n])
    return np.frombuffer(data, dtype=np.dtype(dtype), offset=4 + n).reshape(shape)


def pack(record: dict[str, Any]) -> bytes:
    return msgpack.packb(record, default=_encode, use_bin_type=True)


def unpack(data: bytes) -> dict[str, Any]:
    return msgpack.unpackb(data, ext_hook=_decode_ext, raw=False, strict_map_key=False)


def seal(payload: bytes) -> bytes:
    """A stored value: the CRC-32 of `payload` (4 bytes, little-endian), then `payload`."""
    return zlib.crc32(payload).to_bytes(4, "little") + payload


def unseal(value: bytes) -> bytes:
    """The payload of a sealed value; ValueError naming both checksums when they differ."""
    if len(value) < 4:
        raise ValueError(f"the value holds {len(value)} bytes, fewer than its 4-byte checksum")
    stored, payload = int.from_bytes(value[:4], "little"), value[4:]
    computed = zlib.crc32(payload)
    if stored != computed:
        raise ValueError(f"checksum mismatch: stored {stored:08x}, computed {computed:08x}")
    return payload


def claim_database_dir(path: Path, overwrite: bool) -> bool:
    """Check that `path` may receive a new database; True when it holds one that will be replaced.

    Only what is recognisably ours is ever replaced: a folder holding nothing but data.mdb,
    lock.mdb, a uniter3m meta.json and the side files it lists (`side_files`, e.g. landmarks.npz),
    or an interrupted build (LMDB files without meta.json), or an empty folder. Anything else is
    refused with what was found; nothing is deleted here.
    """
    if path.exists() and not path.is_dir():
        raise DatabaseError(
            f"--out {path} is a file, not a folder; give a folder path for the database (it is created)"
        )
    if not path.exists():
        return False
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return False
    meta_path = path / META_FILE
    ours = DB_FILES | _side_files(meta_path)
    foreign = [name for name in entries if name not in ours and name != _BUILD_LOCK]
    meta: dict[str, Any] | None = None
    if not foreign and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            foreign = [META_FILE + " (not a uniter3m database's)"]
    if foreign or "data.mdb" not in entries and meta is None:
        shown = ", ".join(foreign[:8] or entries[:8]) + (" ..." if len(foreign or entries) > 8 else "")
        raise DatabaseError(
            f"--out {path} is not empty and is not a uniter3m database (it holds {shown}); nothing was "
            "changed. Choose a new or empty folder: --overwrite replaces only a database folder "
            f"(nothing but {', '.join(sorted(DB_FILES))})"
        )
    if not overwrite:
        what = (
            f"a {meta.get('kind')} database of {meta.get('count')} records"
            if meta
            else "an interrupted build"
        )
        raise DatabaseError(
            f"--out {path} already holds {what}; pass --overwrite to replace it or choose another --out"
        )
    return True


def _side_files(meta_path: Path) -> frozenset[str]:
    """The side files a database's meta.json lists (none when it has no readable meta.json)."""
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return frozenset()
    side = meta.get("side_files") if isinstance(meta, dict) else None
    if not isinstance(side, list):
        return frozenset()
    return frozenset(n for n in side if isinstance(n, str) and "/" not in n)


def _held(lock_file: Path) -> bool:
    """True while some process holds the flock on `lock_file` (a live writer)."""
    try:
        fd = os.open(lock_file, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)  # closing releases a lock we may just have taken
    return False


def remove_stale_builds(path: Path) -> list[Path]:
    """Delete what killed writers of `path` left: `.NAME.building-*` folders nobody holds, `.NAME.old-*`."""
    removed = []
    if not path.parent.is_dir():
        return removed
    for p in path.parent.iterdir():
        if not p.name.startswith(f".{path.name}.") or not p.is_dir():
            continue
        if p.name.startswith(f".{path.name}.building-"):
            lock = p / _BUILD_LOCK
            if lock.exists():
                if _held(lock):
                    continue
            elif time.time() - p.stat().st_mtime < _STALE_UNLOCKED_S:
                continue  # a writer between mkdir and taking its lock
        elif not p.name.startswith(f".{path.name}.old-"):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _close_inherited(path: str) -> None:
    """Close environments of `path` that this (forked) process inherited from its parent.

    py-lmdb refuses to open files that an environment in the process still holds, and a
    forked DataLoader worker inherits the parent's handles (unusable there: LMDB environments
    must not cross a fork). Closing the child's copy releases only the child's mmap and fds.
    """
    for key in [k for k in _READ_ENVS if k[1] == path and k[0] != os.getpid()]:
        _READ_ENVS.pop(key).close()


class DbWriter:
    """Write records in batched transactions; `finish(meta)` writes the index, then meta.json.

    The database is built in a hidden sibling folder and swapped in whole by `finish()`, so the
    target keeps the previous database (if any) until the new one is complete and a killed build
    changes nothing. A target that already holds a database is replaced only with `overwrite=True`;
    a target holding anything else is refused (see `claim_database_dir`).
    """

    def __init__(self, path: str | os.PathLike, kind: str, overwrite: bool = False, commit_every: int = 512):
        self.path = Path(path)
        self.kind = kind
        target = self.path.resolve()
        claim_database_dir(target, overwrite)
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_builds(target)
        self.build_id = uuid.uuid4().hex
        self._target = target
        self._tmp = target.parent / f".{target.name}.building-{self.build_id[:12]}"
        self._tmp.mkdir()  # honours the umask, unlike mkdtemp's 0700
        self._lock_fd: int | None = os.open(self._tmp / _BUILD_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._env = lmdb.open(
            str(self._tmp), map_size=_MAP_SIZE, subdir=True, readahead=False, meminit=False, mode=0o666
        )
        self._txn = self._env.begin(write=True)
        self._pending = 0
        self._commit_every = commit_every
        self._digest = hashlib.sha256(kind.encode())
        self._closed = False
        self.ids: list[str] = []
        self.lengths: list[int] = []
        self._seen: set[str] = set()

    def put(self, key: str, record: dict[str, Any], length: int) -> None:
        """Store one utterance; `length` is its token or frame count (for batching)."""
        if key in self._seen:
            raise DatabaseError(
                f"duplicate utterance id {key!r} while building {self.path}; ids must be unique"
            )
        if "\x00" in key:
            raise DatabaseError(f"utterance id {key!r} contains a NUL character, which ids may not hold")
        encoded = key.encode("utf-8")
        if len(encoded) > self._env.max_key_size():
            raise DatabaseError(
                f"utterance id {key[:80]!r}... is {len(encoded)} bytes long, more than the "
                f"{self._env.max_key_size()} an LMDB key may hold ({self.path}); shorten the ids (shorter file "
                "names or folder paths, or a shorter --id-col value)"
            )
        self._seen.add(key)
        payload = pack(record)
        self._digest.update(len(encoded).to_bytes(4, "little") + encoded)
        self._digest.update(len(payload).to_bytes(8, "little") + payload)
        self.ids.append(key)
        self.lengths.append(int(length))
        self._pending += 1
        try:
            self._txn.put(encoded, seal(payload))
            if self._pending >= self._commit_every:
                self._txn.commit()
                self._txn = self._env.begin(write=True)
                self._pending = 0
        except lmdb.Error as err:
            raise self._write_failed(err) from err

    def _write_failed(self, err: lmdb.Error) -> DatabaseError:
        """LMDB reports a full disk or a size limit as a bare error (often EIO): say it once, with the folder."""
        failed = write_failed(self._target.parent, err)
        return DatabaseError(f"building {self.path}: {failed}")

    def finish(self, meta: dict[str, Any], files: Mapping[str, Path] | None = None) -> dict[str, Any]:
        """Commit everything, write meta.json (atomically, last), swap the folder in. Returns the meta.

        `files`: {name: finished side file} (e.g. a feature db's landmarks.npz), moved in beside meta.json before it.
        """
        self._side = list(files or {})
        for name, path in (files or {}).items():
            shutil.move(str(path), self._tmp / name)
        full = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "kind": self.kind,
            "count": len(self.ids),
            "checksums": CHECKSUM,
            "build_id": self.build_id,
            "content_digest": "sha256:" + self._digest.hexdigest(),
            **meta,
            **({"side_files": self._side} if self._side else {}),
        }
        full = json.loads(json.dumps(full, default=json_default))  # what meta.json will hold
        try:
            self._txn.put(INDEX_KEY, seal(pack({"ids": self.ids, "lengths": self.lengths})))
            self._txn.put(BUILD_KEY, seal(pack({"build_id": self.build_id, "meta": full})))
            self._txn.commit()
            self._env.sync(True)
        except lmdb.Error as err:
            raise self._write_failed(err) from err
        self._env.close()
        atomic_write_json(self._tmp / META_FILE, full)
        for name in ("data.mdb", "lock.mdb"):
            with open(self._tmp / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(self._tmp)
        (self._tmp / _BUILD_LOCK).unlink()  # our flock stays on the open descriptor
        if self._target.is_dir() and not any(self._target.iterdir()):
            self._fill_empty_target()
        else:
            trash = self._target.parent / f".{self._target.name}.old-{self.build_id[:12]}"
            replace_dir(self._tmp, self._target, trash)
            shutil.rmtree(trash, ignore_errors=True)  # readers that mapped the old files keep them
        self._release()
        return full

    def _fill_empty_target(self) -> None:
        """Move the files into an existing empty folder (it may be someone's working directory,
        which must not be swapped away), meta.json last: until then a reader refuses the folder."""
        for name in ("data.mdb", "lock.mdb", *self._side, META_FILE):
            os.rename(self._tmp / name, self._target / name)
        fsync_dir(self._target)
        self._tmp.rmdir()

    def abort(self) -> None:
        """Drop everything written; the target folder keeps what it held before. Safe to call twice."""
        if self._closed:
            return
        try:
            try:
                self._txn.abort()
            except lmdb.Error:
                pass
            self._env.close()
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._release()

    def _release(self) -> None:
        self._closed = True
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


#: the databases `uniter3m corpora NAME` writes are named NAME_... (db/emodb_txt, db/meld_train_txt, ...)
CORPUS_PREFIXES = ("meld", "iemocap", "mosi", "emodb", "ravdess")


def build_command(path: str | os.PathLike, kind: str | None = None) -> str:
    """The command that builds the database `path`: a shared corpus's builder by its folder name,
    else the builder of its kind ("txt" | "feat")."""
    p = Path(path)
    corpus = next((c for c in CORPUS_PREFIXES if p.name.startswith(c)), None)
    if corpus:
        return f"`uniter3m corpora {corpus} --data ../shared/data --tokenizer TOK --out {p.parent}`"
    if kind == "txt":
        return f"`uniter3m build-txt-db --input FILE --id-col ID --text-col TEXT --tokenizer TOK --out {p}`"
    if kind == "feat":
        return (
            f"`uniter3m build-media-db --input RECORDINGS --format wav|video --out {p}` (recordings) or "
            f"`uniter3m build-feat-db --out {p} ...` (feature files)"
        )
    return f"`uniter3m build-txt-db` (text) or `uniter3m build-media-db` / `build-feat-db` (features) with --out {p}"


class DbReader:
    """Read-only, lock-free view of a database, safe in DataLoader workers.

    The LMDB environment is opened lazily in each process (an environment must not cross a
    fork), with `readonly=True, lock=False, readahead=False` so many readers on NFS are safe.
    Each open checks that data.mdb is not truncated and that the folder still holds the build
    this reader's index came from; each read verifies the record's CRC.
    """

    def __init__(self, path: str | os.PathLike, kind: str | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise DatabaseError(
                f"database {self.path} does not exist; build it with {build_command(self.path, kind)}"
            )
        self._env_path = str(self.path.resolve())  # once: a realpath per read costs a third of a read
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            raise DatabaseError(
                f"{self.path} has no {META_FILE}: its build was interrupted or it is not a uniter3m database; "
                "rebuild it with --overwrite"
            )
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatabaseError(
                f"{meta_path} is not valid JSON ({err}); rebuild the database with --overwrite"
            ) from err
        if self.meta.get("format") != FORMAT:
            raise DatabaseError(
                f"{self.path} is not a {FORMAT} database (format={self.meta.get('format')!r})"
            )
        if kind is not None and self.meta.get("kind") != kind:
            raise DatabaseError(
                f"{self.path} is a {self.meta.get('kind')!r} database where a {kind!r} one was expected"
            )
        if self.meta.get("version") != FORMAT_VERSION:
            raise DatabaseError(_rebuild_message(self.path, self.meta))
        self.build_id: str = self.meta.get("build_id") or ""
        if not self.build_id:
            raise DatabaseError(
                f"{meta_path} has no build_id: it is damaged; rebuild the database with --overwrite"
            )
        self._indexed = False  # until the index is read, a build mismatch is not a rebuild under us
        index = self._read(INDEX_KEY)
        self._indexed = True
        if index is None:
            raise DatabaseError(
                f"{self.path} has no index record; the database is damaged, rebuild it with --overwrite"
            )
        self.ids: list[str] = list(index["ids"])
        self.lengths = np.asarray(index["lengths"], dtype=np.int64)
        if len(self.ids) != self.meta.get("count"):
            raise DatabaseError(
                f"{self.path}: meta.json says {self.meta.get('count')} records but the index holds {len(self.ids)}; "
                "rebuild it with --overwrite"
            )
        self._pos = {k: i for i, k in enumerate(self.ids)}

    @property
    def kind(self) -> str:
        return str(self.meta["kind"])

    def _txn_env(self) -> lmdb.Environment:
        key = (os.getpid(), self._env_path, self.build_id)
        env = _READ_ENVS.get(key)
        if env is None:
            _close_inherited(self._env_path)
            try:
                env = lmdb.open(
                    self._env_path, readonly=True, lock=False, readahead=False, subdir=True, max_readers=1024
                )
            except lmdb.Error as err:
                raise DatabaseError(
                    f"cannot open {self.path} as an LMDB ({err}); the file is truncated or foreign: "
                    "rebuild it with --overwrite"
                ) from err
            try:
                self._check_opened(env)
            except BaseException:
                env.close()
                raise
            _READ_ENVS[key] = env
        return env

    def _check_opened(self, env: lmdb.Environment) -> None:
        """Refuse a truncated data.mdb (reading it would SIGBUS) and a folder rebuilt since `__init__`."""
        data = Path(self._env_path) / "data.mdb"
        need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        have = data.stat().st_size
        if have < need:
            raise DatabaseError(
                f"{data} is truncated: {have} bytes where its own header says it uses {need}; a copy was cut "
                "short or the disk filled up. Copy it again or rebuild the database with --overwrite"
            )
        with env.begin(buffers=False) as txn:
            raw = txn.get(BUILD_KEY)
        try:
            build = {} if raw is None else unpack(unseal(raw))
        except (ValueError, msgpack.exceptions.UnpackException) as err:
            raise DatabaseError(
                f"{self.path}: its build record is damaged ({err}); rebuild it with --overwrite"
            ) from err
        found = build.get("build_id")
        if found != self.build_id and not self._indexed:
            raise DatabaseError(
                f"{self.path}: data.mdb and {META_FILE} come from different builds (data.mdb from build "
                f"{str(found)[:12]}, {META_FILE} says {self.build_id[:12]}): a data.mdb copied from another "
                f"database, or an edited {META_FILE}. Copy the whole folder again or rebuild it with --overwrite"
            )
        if found != self.build_id:
            raise DatabaseError(
                f"{self.path} was rebuilt after this reader read its index (build {self.build_id[:12]} is now "
                f"{str(found)[:12]}): its records no longer match the ids and lengths in use. Restart the job; "
                "a run resumed on a changed database is refused (see database_digest)"
            )
        recorded = build.get("meta")
        changed = [] if recorded is None else _differing_keys(recorded, self.meta)
        if changed:
            raise DatabaseError(
                f"{self.path / META_FILE} differs from the meta its build recorded (in data.mdb, checksummed) in: "
                f"{', '.join(changed)}; it was edited after the build. Restore it, or rebuild the database with "
                "--overwrite"
            )

    def _read(self, key: bytes) -> dict[str, Any] | None:
        env = self._txn_env()
        try:
            with env.begin(buffers=False) as txn:
                data = txn.get(key)
            if data is None:
                return None
            return unpack(unseal(data))
        except (lmdb.Error, msgpack.exceptions.UnpackException, ValueError, TypeError) as err:
            name = key.decode("utf-8", "replace") if not key.startswith(b"\x00") else key.decode("latin-1")
            raise DatabaseError(
                f"{self.path}: record {name!r} is damaged ({err}); rebuild the database with --overwrite "
                f"(`uniter3m inspect {self.path} --verify` lists every damaged record)"
            ) from err

    def __getitem__(self, key: str) -> dict[str, Any]:
        record = self._read(key.encode("utf-8"))
        if record is None:
            if key in self._pos:
                raise DatabaseError(
                    f"{self.path}: record {key!r} is listed in the index but cannot be found (a damaged page); "
                    f"`uniter3m inspect {self.path} --verify` lists every lost record; rebuild the database "
                    "with --overwrite"
                )
            raise KeyError(key)
        return record

    def __contains__(self, key: object) -> bool:
        return key in self._pos

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def length_of(self, key: str) -> int:
        return int(self.lengths[self._pos[key]])

    def verify(self) -> dict[str, Any]:
        """Read and check every record: {"checked", "damaged": [{id, reason}], "missing", "unindexed"}.

        `missing` = ids in the index without a record; `unindexed` = records the index does not list.
        """
        damaged: list[dict[str, str]] = []
        missing: list[str] = []
        for uid in self.ids:
            try:
                if self._read(uid.encode("utf-8")) is None:
                    missing.append(uid)
            except DatabaseError as err:
                damaged.append({"id": uid, "reason": str(err.__cause__ or err)})
        listed = set(self._pos)
        unindexed = 0
        with self._txn_env().begin(buffers=False) as txn:
            for raw in txn.cursor().iternext(keys=True, values=False):
                if not raw.startswith(b"\x00") and raw.decode("utf-8", "replace") not in listed:
                    unindexed += 1
        return {
            "checked": len(self.ids),
            "damaged": damaged,
            "missing": missing,
            "unindexed": unindexed,
        }

    def close(self) -> None:
        """Close this process's environment for the folder (other readers of it reopen lazily)."""
        env = _READ_ENVS.pop((os.getpid(), self._env_path, self.build_id), None)
        if env is not None:
            env.close()


def _differing_keys(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Top-level keys whose values differ, compared as JSON text (so a NaN equals a NaN)."""
    return sorted(
        k
        for k in set(a) | set(b)
        if json.dumps(a.get(k), sort_keys=True) != json.dumps(b.get(k), sort_keys=True)
    )


def database_digest(path: str | os.PathLike) -> str:
    """A digest of a database's content, to record at a run's start and compare on resume: the
    `content_digest` the writer computed over every (id, record) in order (free to read; rebuilding
    from the same input gives the same digest)."""
    reader = DbReader(path)
    try:
        return str(reader.meta["content_digest"])
    finally:
        reader.close()


def _rebuild_message(path: Path, meta: Mapping[str, Any]) -> str:
    """The error for a database of a format version this reader does not read, with its fix."""
    command = {"txt": "build-txt-db", "feat": "build-feat-db"}.get(
        str(meta.get("kind")), "build-txt-db/build-feat-db"
    )
    return (
        f"{path} is a format-{meta.get('version')} {meta.get('kind')} database; uniter3m reads format "
        f"{FORMAT_VERSION} only (records with checksums). Rebuild it from its sources with the same arguments: "
        f"`uniter3m {command} ... --out {path} --overwrite`"
    )


def changed_databases(recorded: Mapping[str, str]) -> list[str]:
    """For each {path: digest} a run recorded at its start, a line for every database now different."""
    problems = []
    for path, digest in recorded.items():
        try:
            now = database_digest(path)
        except DatabaseError as err:
            problems.append(f"{path}: cannot be opened any more ({err})")
            continue
        if now != digest:
            problems.append(
                f"{path}: its content changed since the run started (digest {digest[:19]}... is now {now[:19]}...); "
                "resuming would train on other data: restore the database or start a new run"
            )
    return problems
