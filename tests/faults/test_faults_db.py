"""Faults in databases, on real LMDB files: what --overwrite may delete, flipped bytes, a cut
data.mdb, a rebuild under a running reader, a writer killed mid-build, file modes, bad transcripts."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lmdb
import numpy as np
import pytest

from tests.support import REPO
from uniter3m.cli import main
from uniter3m.data import store
from uniter3m.data.store import DbReader, DbWriter, changed_databases, database_digest
from uniter3m.errors import DatabaseError


def feat_db(path: Path, n: int = 60, seed: int = 0, overwrite: bool = False) -> dict[str, np.ndarray]:
    """A feature database of `n` distinct random (8, 16) float32 records; returns what it holds."""
    rng = np.random.default_rng(seed)
    feats = {f"u{i:03d}": rng.standard_normal((8, 16)).astype(np.float32) for i in range(n)}
    w = DbWriter(path, "feat", overwrite=overwrite)
    for k, v in feats.items():
        w.put(k, {"feat": v}, len(v))
    w.finish({"dim": 16})
    return feats


def flip_byte_inside(data_mdb: Path, needle: bytes) -> None:
    """Flip one bit in the middle of every copy of `needle` (a record's array) in data.mdb
    (LMDB is copy-on-write: a freed page of an earlier transaction may still hold a copy)."""
    raw = bytearray(data_mdb.read_bytes())
    at = raw.find(needle)
    assert at >= 0, "the array's bytes must be in the file"
    while at >= 0:
        raw[at + len(needle) // 2] ^= 0x10
        at = raw.find(needle, at + 1)
    data_mdb.write_bytes(bytes(raw))


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def build_txt(src: Path, out: Path, tok: Path, *extra: str) -> int:
    args = ["--input", str(src), "--id-col", "id", "--text-col", "text", "--tokenizer", str(tok)]
    return main(["build-txt-db", *args, "--out", str(out), *extra])


# ------------------------------------------------------------------ 1. --overwrite deletes only ours
def test_overwrite_refuses_a_folder_holding_user_files(minilm_dir, tmp_path, capsys):
    src = tmp_path / "t.csv"
    src.write_text("id,text\na,hello there\n")
    out = tmp_path / "x"
    out.mkdir()
    (out / "important.txt").write_text("keep")
    assert build_txt(src, out, minilm_dir, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "not a uniter3m database" in err and "important.txt" in err and "nothing was changed" in err
    assert (out / "important.txt").read_text() == "keep" and sorted(os.listdir(out)) == ["important.txt"]
    assert siblings(out) == []  # no half-built folder left next to it


def test_out_dot_with_overwrite_leaves_the_working_directory_alone(minilm_dir, tmp_path, monkeypatch, capsys):
    src = tmp_path / "t.csv"
    src.write_text("id,text\na,hello there\n")
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.md").write_text("mine")
    monkeypatch.chdir(work)
    assert build_txt(src, Path("."), minilm_dir, "--overwrite") == 2
    assert "not a uniter3m database" in capsys.readouterr().err
    assert sorted(os.listdir(work)) == ["notes.md"]


def test_out_naming_a_file_is_a_clear_error(minilm_dir, tmp_path, capsys):
    src = tmp_path / "t.csv"
    src.write_text("id,text\na,hello there\n")
    target = tmp_path / "file.db"
    target.write_text("a file")
    for extra in ((), ("--overwrite",)):
        assert build_txt(src, target, minilm_dir, *extra) == 2
        assert "is a file, not a folder" in capsys.readouterr().err
    assert target.read_text() == "a file"
    npz = tmp_path / "npz"
    npz.mkdir()
    np.savez(npz / "a.npz", feat=np.ones((2, 3), np.float32))
    args = ["build-feat-db", "--input", str(npz), "--format", "npz", "--out", str(target), "--overwrite"]
    assert main(args) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_overwrite_replaces_our_database_and_leaves_nothing_beside_it(tmp_path):
    db = tmp_path / "db"
    feat_db(db, n=5, seed=0)
    with pytest.raises(DatabaseError, match="already holds a feat database of 5 records; pass --overwrite"):
        DbWriter(db, "feat")
    new = feat_db(db, n=7, seed=1, overwrite=True)
    r = DbReader(db, "feat")
    assert r.ids == list(new) and np.array_equal(r["u006"]["feat"], new["u006"])
    assert sorted(os.listdir(db)) == ["data.mdb", "lock.mdb", "meta.json"] and siblings(db) == []
    # an empty folder is taken as it is; a database kind mismatch is not our business here
    (tmp_path / "empty").mkdir()
    feat_db(tmp_path / "empty", n=2)
    assert DbReader(tmp_path / "empty").meta["count"] == 2


# ------------------------------------------------------------------ 4. flipped bytes, cut files
def test_flipped_bytes_in_records_are_errors_and_verify_lists_them(tmp_path, capsys):
    db = tmp_path / "db"
    feats = feat_db(db, n=60)
    bad = [f"u{i:03d}" for i in range(3, 60, 9)]  # 7 damaged records
    for uid in bad:
        flip_byte_inside(db / "data.mdb", feats[uid].tobytes())
    store._READ_ENVS.clear()
    r = DbReader(db, "feat")
    with pytest.raises(DatabaseError, match=r"record 'u003' is damaged \(checksum mismatch.*--verify"):
        r["u003"]
    assert np.array_equal(r["u004"]["feat"], feats["u004"])  # the others read as written
    r.close()

    assert main(["inspect", str(db), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "verify: 60 records read, 7 damaged, 0 missing, 0 not in the index" in out
    assert all(f"damaged {uid}: checksum mismatch" in out for uid in bad)
    assert "rebuild" in out and "--overwrite" in out
    assert main(["inspect", str(db), "--verify", "--json"]) == 1
    info = json.loads(capsys.readouterr().out)
    assert [d["id"] for d in info["verify"]["damaged"]] == bad and info["checksums"] == "crc32"


def test_an_intact_database_verifies_with_exit_0(tmp_path, capsys):
    feat_db(tmp_path / "db", n=10)
    assert main(["inspect", str(tmp_path / "db"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "verify: 10 records read, 0 damaged" in out and "record checksums: crc32" in out


@pytest.mark.parametrize("cut", [4096, "half"])
def test_truncated_data_mdb_is_refused_at_open_not_sigbus(tmp_path, cut):
    db = tmp_path / "db"
    feat_db(db, n=200)
    data = db / "data.mdb"
    size = data.stat().st_size
    keep = size - cut if isinstance(cut, int) else size // 2
    os.truncate(data, keep)
    # in a separate process: a SIGBUS there would show as a signal, not take the test run down
    proc = subprocess.run(
        [sys.executable, "-m", "uniter3m.cli", "inspect", str(db)], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 2, proc.stderr
    assert f"{data} is truncated: {keep} bytes where its own header says it uses" in proc.stderr
    assert "Traceback" not in proc.stderr
    store._READ_ENVS.clear()
    with pytest.raises(DatabaseError, match="is truncated"):
        DbReader(db)


def test_a_format_1_database_is_refused_with_the_command_that_rebuilds_it(tmp_path, capsys):
    db = tmp_path / "v1"
    env = lmdb.open(str(db), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b"a", store.pack({"feat": np.ones((2, 3), np.float16)}))
        txn.put(store.INDEX_KEY, store.pack({"ids": ["a"], "lengths": [2]}))
    env.close()
    (db / "meta.json").write_text(
        json.dumps({"format": store.FORMAT, "version": 1, "kind": "feat", "count": 1})
    )
    fix = f"`uniter3m build-feat-db ... --out {db} --overwrite`"
    with pytest.raises(
        DatabaseError, match="is a format-1 feat database; uniter3m reads format 2 only"
    ) as err:
        DbReader(db, "feat")
    assert fix in str(err.value)
    with pytest.raises(DatabaseError, match="format-1"):
        database_digest(db)
    assert main(["inspect", str(db)]) == 2
    assert fix in capsys.readouterr().err
    with pytest.raises(DatabaseError, match="pass --overwrite"):  # still recognised as ours: rebuildable
        DbWriter(db, "feat")


# ------------------------------------------------------------------ 3. a rebuild under a running reader
_REBUILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from uniter3m.data.store import DbWriter
    w = DbWriter(sys.argv[1], "feat", overwrite=True)
    for i in range(60):
        w.put(f"u{i:03d}", {"feat": np.full((8, 16), 1e6, np.float32)}, 8)
    w.finish({"dim": 16})
    """
)


def _read_in_child(reader: DbReader, key: str, queue: mp.Queue) -> None:
    try:
        queue.put(("ok", float(reader[key]["feat"][0, 0])))
    except DatabaseError as err:
        queue.put(("error", str(err)))


def test_rebuild_under_a_running_reader_swaps_whole_and_is_detected(tmp_path):
    db = tmp_path / "db"
    feats = feat_db(db, n=60)
    digest = database_digest(db)
    reader = DbReader(db, "feat")
    assert np.array_equal(reader["u000"]["feat"], feats["u000"])  # its environment is open now
    subprocess.run([sys.executable, "-c", _REBUILD, str(db)], check=True, cwd=REPO)

    # the open reader keeps reading the database it opened, every record consistent with its index
    assert all(np.array_equal(reader[k]["feat"], v) for k, v in feats.items())
    # a process that opens the folder anew with the old index (a DataLoader worker) is stopped
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(reader, "u001", queue))
    child.start()
    child.join(30)
    status, message = queue.get(timeout=5)
    assert status == "error" and "was rebuilt after this reader read its index" in message
    # a new reader sees the new build; the run's recorded digest no longer matches
    assert float(DbReader(db, "feat")["u001"]["feat"][0, 0]) == 1e6
    problems = changed_databases({str(db): digest})
    assert len(problems) == 1 and "content changed since the run started" in problems[0]
    assert siblings(db) == []


def test_content_digest_depends_on_content_not_on_the_build(tmp_path):
    feat_db(tmp_path / "a", seed=0)
    feat_db(tmp_path / "b", seed=0)
    feat_db(tmp_path / "c", seed=1)
    a, b, c = (database_digest(tmp_path / n) for n in "abc")
    assert a == b != c and a.startswith("sha256:")
    assert DbReader(tmp_path / "a").build_id != DbReader(tmp_path / "b").build_id
    assert changed_databases({str(tmp_path / "a"): b}) == []


# ------------------------------------------------------------------ a writer killed mid-build
_SLOW_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from uniter3m.data.store import DbWriter
    w = DbWriter(sys.argv[1], "feat", overwrite=True, commit_every=10)
    for i in range(50):
        w.put(f"u{i:03d}", {"feat": np.zeros((8, 16), np.float32)}, 8)
    print("building", flush=True)
    sys.stdin.read()  # hold here until killed
    """
)


def test_sigkill_mid_build_keeps_the_old_database_and_the_leftover_is_cleaned(tmp_path):
    db = tmp_path / "db"
    feats = feat_db(db, n=20)
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITER, str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert proc.stdout.readline().strip() == "building"
        (live,) = siblings(db)
        assert live.startswith(".db.building-")
        # another build while the first is alive does not touch the live build folder
        w = DbWriter(db, "feat", overwrite=True)
        w.abort()
        assert live in siblings(db)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    store._READ_ENVS.clear()
    r = DbReader(db, "feat")  # untouched: the killed build never reached the target
    assert r.ids == list(feats) and all(np.array_equal(r[k]["feat"], v) for k, v in feats.items())
    assert r.verify()["damaged"] == []
    assert siblings(db) == [live]
    feat_db(db, n=3, overwrite=True)  # the next build removes the dead writer's folder
    assert siblings(db) == [] and len(DbReader(db)) == 3


def test_an_interrupted_build_keeps_the_previous_database(tmp_path):
    db = tmp_path / "db"
    feats = feat_db(db, n=5)
    w = DbWriter(db, "feat", overwrite=True)
    w.put("new", {"feat": np.zeros((1, 16), np.float32)}, 1)
    w.abort()
    w.abort()  # twice is harmless
    assert DbReader(db).ids == list(feats) and siblings(db) == []


# ------------------------------------------------------------------ file modes
def test_files_follow_the_umask_not_0600(tmp_path):
    old = os.umask(0o027)
    try:
        feat_db(tmp_path / "db", n=3)
    finally:
        os.umask(old)
    for name in ("meta.json", "data.mdb"):
        assert (tmp_path / "db" / name).stat().st_mode & 0o777 == 0o640, name
    assert (tmp_path / "db").stat().st_mode & 0o777 == 0o750


# ------------------------------------------------------------------ 9 + empty input: transcripts
def test_literal_special_tokens_in_a_transcript_are_text(minilm_dir, tokenizer, special, tmp_path):
    src = tmp_path / "t.csv"
    src.write_text("id,text\na,I typed [SEP] and [MASK] then [CLS] [PAD] [UNK]\nb,plain words\n")
    assert build_txt(src, tmp_path / "db", minilm_dir) == 0
    ids = DbReader(tmp_path / "db")["a"]["input_ids"].tolist()
    forged = {special.cls_id, special.sep_id, special.mask_id, special.pad_id, special.unk_id}
    assert not forged & set(ids)
    assert tokenizer.convert_ids_to_tokens(ids)[:8] == ["i", "typed", "[", "sep", "]", "and", "[", "mask"]
    assert (
        "".join(tokenizer.convert_ids_to_tokens(ids)).replace("##", "")
        == "ityped[sep]and[mask]then[cls][pad][unk]"
    )


def test_header_only_csv_and_all_rows_skipped_are_errors(minilm_dir, tmp_path, capsys):
    header_only = tmp_path / "h.csv"
    header_only.write_text("id,text\n")
    assert build_txt(header_only, tmp_path / "db", minilm_dir) == 2
    assert f"{header_only} holds no utterance" in capsys.readouterr().err
    all_empty = tmp_path / "e.csv"
    all_empty.write_text("id,text\na,\nb,  \n")
    assert build_txt(all_empty, tmp_path / "db", minilm_dir) == 2
    assert "every one of its 2 rows was skipped (2 empty text)" in capsys.readouterr().err
    assert not (tmp_path / "db").exists() and siblings(tmp_path / "db") == []


def test_a_reader_opened_before_the_swap_in_this_process_and_a_new_one_coexist(tmp_path):
    db = tmp_path / "db"
    old = feat_db(db, n=4, seed=0)
    r_old = DbReader(db)
    r_old["u000"]
    new = feat_db(db, n=4, seed=1, overwrite=True)
    r_new = DbReader(db)  # both environments stay usable side by side
    assert np.array_equal(r_old["u002"]["feat"], old["u002"])
    assert np.array_equal(r_new["u002"]["feat"], new["u002"])


def test_an_empty_working_directory_is_filled_in_place_not_swapped_away(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    inode = work.stat().st_ino
    monkeypatch.chdir(work)
    feats = feat_db(Path("."), n=3)
    assert work.stat().st_ino == inode  # the shell sitting in it still sees the database
    assert sorted(os.listdir(".")) == ["data.mdb", "lock.mdb", "meta.json"] and siblings(work) == []
    assert np.array_equal(DbReader(".")["u001"]["feat"], feats["u001"])
