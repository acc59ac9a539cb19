import numpy as np
import pytest

from uniter3m.data import store
from uniter3m.data.store import DbReader, DbWriter
from uniter3m.errors import DatabaseError


def test_round_trip_arrays_and_index(tmp_path):
    w = DbWriter(tmp_path / "db", "feat")
    feats = {f"u{i}": np.random.rand(i, 4).astype(np.float16) for i in range(5)}
    for k, v in feats.items():
        w.put(k, {"feat": v, "note": k}, len(v))
    meta = w.finish({"dim": 4})
    assert meta["count"] == 5
    r = DbReader(tmp_path / "db", "feat")
    assert r.ids == list(feats) and r.lengths.tolist() == [0, 1, 2, 3, 4]
    for k, v in feats.items():
        got = r[k]["feat"]
        assert got.dtype == np.float16 and np.array_equal(got, v)
    with pytest.raises(KeyError):
        r["nope"]


def test_refuses_existing_db_unless_overwrite(tmp_path):
    DbWriter(tmp_path / "db", "txt").finish({})
    with pytest.raises(DatabaseError, match="--overwrite"):
        DbWriter(tmp_path / "db", "txt")
    DbWriter(tmp_path / "db", "txt", overwrite=True).finish({})


def test_interrupted_build_is_refused(tmp_path):
    w = DbWriter(tmp_path / "db", "txt")
    w.put("a", {"x": 1}, 1)
    w.abort()
    with pytest.raises(DatabaseError, match="interrupted"):
        DbReader(tmp_path / "db")


def test_foreign_file_is_refused(tmp_path):
    DbWriter(tmp_path / "db", "txt").finish({})
    (tmp_path / "db" / "data.mdb").write_bytes(b"not an lmdb" * 100)
    store._READ_ENVS.clear()
    with pytest.raises(DatabaseError, match="truncated or foreign"):
        DbReader(tmp_path / "db")


def test_wrong_kind_and_duplicate_ids(tmp_path):
    w = DbWriter(tmp_path / "db", "txt")
    w.put("a", {}, 0)
    with pytest.raises(DatabaseError, match="duplicate"):
        w.put("a", {}, 0)
    w.finish({})
    with pytest.raises(DatabaseError, match="'feat'"):
        DbReader(tmp_path / "db", "feat")
