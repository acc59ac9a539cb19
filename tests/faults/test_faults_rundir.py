"""Run folders: claiming one deletes nothing that is not ours; one live run per folder (two real
processes, the holder SIGKILLed); the demo's --out."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.support import REPO
from uniter3m.cli import main
from uniter3m.errors import UserError
from uniter3m.train.rundir import (
    RUN_LOCK,
    RUN_MARKER,
    RunDirBusy,
    claim_output_dir,
    lock_run_dir,
    read_marker,
)


def test_new_and_empty_folders_are_claimed_and_marked(tmp_path):
    assert claim_output_dir(tmp_path / "a" / "b", overwrite=False, marker="pretrain") == tmp_path / "a" / "b"
    assert read_marker(tmp_path / "a" / "b")["kind"] == "pretrain"
    (tmp_path / "empty").mkdir()
    claim_output_dir(tmp_path / "empty", overwrite=False, marker="finetune")
    assert read_marker(tmp_path / "empty")["kind"] == "finetune"


def test_a_folder_that_is_not_a_run_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "important.txt").write_text("keep")
    for overwrite, resume in ((False, False), (True, False), (False, True)):
        with pytest.raises(UserError, match=r"not a uniter3m run folder \(it holds important.txt"):
            claim_output_dir(tmp_path, overwrite=overwrite, marker="pretrain", resume=resume)
    assert sorted(os.listdir(tmp_path)) == ["important.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file; give a folder path"):
        claim_output_dir(tmp_path / "file", overwrite=True, marker="pretrain")
    with pytest.raises(UserError, match="is a file; give a folder path"):
        with lock_run_dir(tmp_path / "file"):
            pass


def test_an_existing_run_needs_resume_or_overwrite(tmp_path):
    run = tmp_path / "run"
    claim_output_dir(run, overwrite=False, marker="pretrain")
    (run / "checkpoints" / "step_000010").mkdir(parents=True)
    with pytest.raises(UserError, match="already holds a run .*step_000010.*--resume auto.*--overwrite"):
        claim_output_dir(run, overwrite=False, marker="pretrain")
    claim_output_dir(run, overwrite=False, marker="pretrain", resume=True)
    assert (run / "checkpoints" / "step_000010").is_dir()
    claim_output_dir(run, overwrite=True, marker="pretrain")
    assert sorted(os.listdir(run)) == [RUN_MARKER]


def test_a_run_folder_without_the_marker_is_refused_even_to_resume(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.json").write_text("{}")
    for flags in ({"resume": True}, {"overwrite": True}):
        with pytest.raises(
            UserError, match=rf"holds checkpoints, config.json; no {RUN_MARKER}.*set model.init"
        ):
            claim_output_dir(tmp_path, marker="pretrain", **{"overwrite": False, **flags})
    assert sorted(os.listdir(tmp_path)) == ["checkpoints", "config.json"] and read_marker(tmp_path) is None


_HOLDER = textwrap.dedent(
    """
    import sys
    from uniter3m.train.rundir import lock_run_dir
    with lock_run_dir(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()
    """
)


def test_two_runs_on_one_folder_the_second_stops_and_a_killed_holder_frees_it(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(run)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            RunDirBusy, match=rf"in use by another run \(pid {holder.pid} on .*choose another output_dir"
        ):
            with lock_run_dir(run):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with lock_run_dir(run):  # the kernel dropped the dead holder's lock: no stale-lock cleanup needed
        claim_output_dir(run, overwrite=False, marker="pretrain")  # the lock file does not count as content
        assert (run / RUN_LOCK).is_file() and read_marker(run)["kind"] == "pretrain"


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    with lock_run_dir(tmp_path):
        with pytest.raises(RunDirBusy):
            with lock_run_dir(tmp_path):
                pass
    with lock_run_dir(tmp_path):
        pass


# ------------------------------------------------------------------ the demo's --out
def test_demo_refuses_a_folder_it_did_not_make_and_a_file(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "db").mkdir(parents=True)
    (out / "db" / "important.txt").write_text("keep")
    assert main(["demo", "--out", str(out)]) == 2
    assert "not a uniter3m run folder" in capsys.readouterr().err
    assert (out / "db" / "important.txt").read_text() == "keep"
    (tmp_path / "file").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_demo_rerun_replaces_only_its_own_folders(tmp_path):
    from uniter3m.train.demo import claim_demo_dir

    out = tmp_path / "demo"
    claim_demo_dir(out)
    (out / "pretrain" / "checkpoints").mkdir(parents=True)
    (out / "db" / "face").mkdir(parents=True)
    (out / "db" / "face" / "notes.txt").write_text("mine")
    (out / "README.txt").write_text("mine too")
    claim_demo_dir(out)
    assert not (out / "pretrain").exists()
    assert (out / "README.txt").is_file() and (out / "db" / "face" / "notes.txt").is_file()
