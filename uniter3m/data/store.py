"""LMDB databases: a batched writer and a read-only, lock-free, fork-safe reader.

Layout of a database folder:
    data.mdb / lock.mdb   LMDB environment; one msgpack record per utterance id, plus the
                          reserved key INDEX_KEY holding {"ids": [...], "lengths": [...]}
    meta.json             written last and atomically: a folder without it is an interrupted
                          build and is refused on open

Records are dicts whose numpy arrays travel as msgpack extension objects (dtype, shape, raw
bytes), so a reader gets arrays back without pickle. `lengths` is the per-utterance length
the batch sampler needs (tokens for text, frames for features) without reading every record.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import numpy as np

from uniter3m.errors import DatabaseError
from uniter3m.fileio import atomic_write_json

FORMAT = "uniter3m-lmdb"
FORMAT_VERSION = 1
INDEX_KEY = b"\x00index"
META_FILE = "meta.json"
_NDARRAY_EXT = 1
_MAP_SIZE = 1 << 40  # virtual; the file grows only as data is written

# One read-only environment per (process, folder): LMDB refuses a second open of the same
# environment in one process, and an environment must never be used across a fork.
_READ_ENVS: dict[tuple[int, str], lmdb.Environment] = {}


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


def is_database(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / META_FILE).is_file() or (path / "data.mdb").exists()


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

    Refuses a folder that already holds a database unless `overwrite=True` (which deletes it
    first), so a rebuild never mixes old and new records.
    """

    def __init__(self, path: str | os.PathLike, kind: str, overwrite: bool = False, commit_every: int = 512):
        self.path = Path(path)
        self.kind = kind
        if self.path.exists() and any(self.path.iterdir()):
            if not overwrite:
                raise DatabaseError(
                    f"{self.path} is not empty (it may hold a database); pass --overwrite to replace it "
                    "or choose another --out"
                )
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(str(self.path), map_size=_MAP_SIZE, subdir=True, readahead=False, meminit=False)
        self._txn = self._env.begin(write=True)
        self._pending = 0
        self._commit_every = commit_every
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
        self._seen.add(key)
        self._txn.put(key.encode("utf-8"), pack(record))
        self.ids.append(key)
        self.lengths.append(int(length))
        self._pending += 1
        if self._pending >= self._commit_every:
            self._txn.commit()
            self._txn = self._env.begin(write=True)
            self._pending = 0

    def finish(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Commit everything, then write meta.json (atomically, last). Returns the full meta."""
        self._txn.put(INDEX_KEY, pack({"ids": self.ids, "lengths": self.lengths}))
        self._txn.commit()
        self._env.sync(True)
        self._env.close()
        full = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "kind": self.kind,
            "count": len(self.ids),
            **meta,
        }
        atomic_write_json(self.path / META_FILE, full)
        return full

    def abort(self) -> None:
        """Drop the open transaction and close; the folder stays without meta.json (refused on open)."""
        try:
            self._txn.abort()
        finally:
            self._env.close()


class DbReader:
    """Read-only, lock-free view of a database, safe in DataLoader workers.

    The LMDB environment is opened lazily in each process (an environment must not cross a
    fork), with `readonly=True, lock=False, readahead=False` so many readers on NFS are safe.
    """

    def __init__(self, path: str | os.PathLike, kind: str | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise DatabaseError(
                f"database {self.path} does not exist; build it with `uniter3m build-*-db --out {self.path}`"
            )
        self._env_path = str(self.path.resolve())  # once: a realpath per read costs a third of a read
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            raise DatabaseError(
                f"{self.path} has no {META_FILE}: its build was interrupted or it is not a uniter3m database; "
                "rebuild it with --overwrite"
            )
        import json

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
        index = self._read(INDEX_KEY)
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
        key = (os.getpid(), self._env_path)
        env = _READ_ENVS.get(key)
        if env is None:
            _close_inherited(key[1])
            try:
                env = lmdb.open(
                    key[1], readonly=True, lock=False, readahead=False, subdir=True, max_readers=1024
                )
            except lmdb.Error as err:
                raise DatabaseError(
                    f"cannot open {self.path} as an LMDB ({err}); the file is truncated or foreign: "
                    "rebuild it with --overwrite"
                ) from err
            _READ_ENVS[key] = env
        return env

    def _read(self, key: bytes) -> dict[str, Any] | None:
        env = self._txn_env()
        try:
            with env.begin(buffers=False) as txn:
                data = txn.get(key)
            return None if data is None else unpack(data)
        except (lmdb.Error, msgpack.exceptions.ExtraData, ValueError) as err:
            raise DatabaseError(
                f"{self.path}: record {key!r} cannot be read ({err}); rebuild with --overwrite"
            ) from err

    def __getitem__(self, key: str) -> dict[str, Any]:
        record = self._read(key.encode("utf-8"))
        if record is None:
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

    def close(self) -> None:
        """Close this process's environment for the folder (other readers of it reopen lazily)."""
        env = _READ_ENVS.pop((os.getpid(), self._env_path), None)
        if env is not None:
            env.close()
