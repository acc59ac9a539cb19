"""The `uniter3m` command under faults, in real processes: no command, Ctrl-C (SIGINT), a reader
of stdout that goes away (`| head`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np

from tests.support import REPO
from uniter3m.cli import main
from uniter3m.data.store import DbWriter

# what the `uniter3m` console script runs (`python -m` differs: CPython may report a caught Ctrl-C
# as death by SIGINT when the signal landed inside code run by PyRun_String)
CLI = [sys.executable, "-c", "import sys; from uniter3m.cli import main; sys.exit(main())"]


def test_no_command_prints_the_help_and_exits_2(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: uniter3m") and "build-txt-db" in err


def test_sigint_ends_with_one_line_and_status_130(tmp_path, minilm_dir):
    out = tmp_path / "demo"
    proc = subprocess.Popen(
        [*CLI, "demo", "--out", str(out), "--tokenizer", str(minilm_dir), "--utterances", "400"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        # as an interactive shell starts a command: SIGINT at its default, whatever this process
        # inherited (an ignored SIGINT survives exec, and Python then keeps ignoring it)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.time() + 240  # a loaded machine takes long to import torch
        while (
            not (out / "corpus" / "SYNTHETIC.json").exists()
            and proc.poll() is None
            and time.time() < deadline
        ):
            time.sleep(0.02)  # interrupt once the corpus is written: the database builds come next
        assert (out / "corpus" / "SYNTHETIC.json").exists(), "the demo never wrote its corpus"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip() == "uniter3m demo: interrupted (Ctrl-C)"
    db = out / "db"
    if db.is_dir():  # an interrupted build leaves no half-built folder behind
        assert not [p for p in db.iterdir() if ".building-" in p.name]


def test_a_closed_stdout_ends_quietly(tmp_path):
    db = tmp_path / "db"
    w = DbWriter(db, "feat")
    w.put("a", {"feat": np.zeros((2, 3), np.float32)}, 2)
    w.finish({"dim": 3})
    read, write = os.pipe()
    proc = subprocess.Popen(
        [*CLI, "inspect", str(db), "--json"], stdout=write, stderr=subprocess.PIPE, cwd=REPO
    )
    os.close(write)
    os.close(read)  # like `| head` that already exited: the first write gets EPIPE
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141 and err == b""
