"""Runs under faults (issue 10 items 2, 3, 5, 6, 7, 10 and preemption), through the real recipes.

Each case ends as a clear error or a printed rule, and nothing of a previous run is lost.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.support.runs import pretrain_config
from uniter3m.errors import ConfigError, UserError
from uniter3m.train.checkpoint import find_resume
from uniter3m.train.logs import read_metrics
from uniter3m.train.pretrain import run_pretrain

pytestmark = pytest.mark.usefixtures("one_thread")


def face_db_from(ids, frame, folder):
    """A face db built with the real command from one (T, 6) array per utterance id."""
    from uniter3m.cli import main

    npz = folder.with_name(folder.name + "_npz")
    npz.mkdir()
    for uid in ids:
        np.savez(npz / f"{uid}.npz", feat=frame)
    assert main(["build-feat-db", "--input", str(npz), "--format", "npz", "--out", str(folder)]) == 0
    return folder


def test_a_second_run_into_a_run_folder_is_refused_and_the_first_survives(tiny_dbs, tmp_path):
    out = tmp_path / "run"
    run_pretrain(pretrain_config(tiny_dbs, out, steps=2))
    first = find_resume(out, "auto")
    with pytest.raises(UserError, match=r"already holds a run .*--resume auto.*--overwrite"):
        run_pretrain(pretrain_config(tiny_dbs, out, steps=2))
    assert find_resume(out, "auto") == first and len(read_metrics(out, "train")) == 1
    run_pretrain(pretrain_config(tiny_dbs, out, steps=2), overwrite=True)  # replaced on request
    assert find_resume(out, "auto") is not None


def test_resume_applies_a_new_lr_and_refuses_a_new_schedule(tiny_dbs, tmp_path, caplog):
    out = tmp_path / "run"
    run_pretrain(pretrain_config(tiny_dbs, out, steps=6, stop_after=3, log_every=1))
    new_warmup = pretrain_config(tiny_dbs, out, steps=6)
    new_warmup["optim"]["warmup_steps"] = 3  # (a longer run, `steps`, may be asked for: it extends the run)
    with pytest.raises(UserError, match=r"cannot change in a resumed run: optim.warmup_steps: 2 -> 3"):
        run_pretrain(new_warmup, resume="auto")
    cfg = pretrain_config(tiny_dbs, out, steps=6, log_every=1)
    cfg["optim"]["lr"] = 4e-3  # twice the run's 2e-3
    run_pretrain(cfg, resume="auto")
    assert "optim.lr changed from 0.002 to 0.004 (applied)" in caplog.text
    lrs = {r["step"]: r["lr"] for r in read_metrics(out, "train")}
    # warmup 2 then linear decay to 0 at step 6: the factor at step 4 is 0.5 -> 0.5 * 4e-3
    assert lrs[4] == pytest.approx(0.5 * 4e-3)
    assert json.loads((out / "config.json").read_text())["optim"]["lr"] == 4e-3  # what was used


def test_resume_on_a_rebuilt_database_is_refused(tiny_dbs, tmp_path):
    from uniter3m.cli import main

    dbs = {k: tmp_path / "dbs" / Path(v).name for k, v in tiny_dbs.items()}
    for k, v in tiny_dbs.items():
        shutil.copytree(v, dbs[k])
    out = tmp_path / "run"
    run_pretrain(pretrain_config(dbs, out, steps=4, stop_after=2))
    # rebuild the face db from other frames, as `build-feat-db --overwrite` would
    frames = tmp_path / "npz"
    frames.mkdir()
    for i, uid in enumerate(
        __import__("uniter3m.data.store", fromlist=["DbReader"]).DbReader(dbs["face"]).ids
    ):
        np.savez(frames / f"{uid}.npz", feat=np.full((3, 6), float(i), np.float32))
    assert (
        main(
            [
                "build-feat-db",
                "--input",
                str(frames),
                "--format",
                "npz",
                "--out",
                str(dbs["face"]),
                "--overwrite",
            ]
        )
        == 0
    )
    with pytest.raises(UserError, match=r"changed since the run started"):
        run_pretrain(pretrain_config(dbs, out, steps=4), resume="auto")


def test_a_frame_task_on_a_database_without_frames_is_an_error(tiny_dbs, tmp_path, minilm_dir):
    from uniter3m.data.store import DbReader

    face0 = face_db_from(DbReader(tiny_dbs["face"]).ids, np.zeros((0, 6), np.float32), tmp_path / "face0")
    cfg = pretrain_config(dict(tiny_dbs, face=face0), tmp_path / "run", steps=2)
    with pytest.raises(ConfigError, match=r"task face_mrfr learns from face frames but no utterance"):
        run_pretrain(cfg)


def test_a_task_option_of_the_wrong_type_is_a_config_error(tiny_dbs, tmp_path):
    cfg = pretrain_config(tiny_dbs, tmp_path / "run", steps=2)
    cfg["tasks"][0]["options"] = {"mask_prob": "high"}
    with pytest.raises(ConfigError, match=r"task mlm: an option has the wrong type.*mask_prob"):
        run_pretrain(cfg)


def test_a_model_trained_with_another_vocabulary_is_refused(tiny_dbs, tmp_path, minilm_dir):
    from uniter3m.cli import main
    from uniter3m.data.store import DbReader

    # the same tokenizer with two words swapped: same size, another vocabulary
    other = tmp_path / "tok"
    shutil.copytree(minilm_dir, other, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx"))
    vocab = (other / "vocab.txt").read_text().splitlines()
    a, b = vocab.index("happy"), vocab.index("sad")
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (other / "tokenizer.json").unlink(missing_ok=True)
    rows = tmp_path / "t.csv"
    rows.write_text(
        "id,text,emotion\n" + "".join(f"{u},i am happy,joy\n" for u in DbReader(tiny_dbs["face"]).ids)
    )
    args = [
        "build-txt-db",
        "--input",
        str(rows),
        "--id-col",
        "id",
        "--text-col",
        "text",
        "--label-col",
        "emotion",
    ]
    assert main([*args, "--tokenizer", str(other), "--out", str(tmp_path / "txt_other")]) == 0
    out = tmp_path / "run"
    run_pretrain(pretrain_config(tiny_dbs, out, steps=2))
    model_dir = find_resume(out, "auto") / "model"
    assert json.loads((model_dir / "tokenizer_meta.json").read_text())["vocab_hash"]
    cfg = pretrain_config(
        dict(tiny_dbs, txt_train=tmp_path / "txt_other", txt_valid=tmp_path / "txt_other"), tmp_path / "b"
    )
    cfg["model"] = {"init": str(model_dir)}
    with pytest.raises(
        UserError, match=r"was trained with tokenizer .* but the text database .* was built with"
    ):
        run_pretrain(cfg)


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(tiny_dbs, tmp_path):
    cfg = pretrain_config(tiny_dbs, tmp_path / "run", steps=400, log_every=1)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "uniter3m.cli", "pretrain", "--config", str(path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "logs" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-2000:]
    assert "SIGTERM received: stopped after step" in err and "--resume auto" in err
    ckpt = find_resume(tmp_path / "run", "auto")
    assert ckpt is not None and 2 <= int(ckpt.name.split("_")[1]) < 400


def test_a_class_only_in_the_test_split_is_listed_not_silently_scored():
    from uniter3m.evaluation.protocols import Fold, LabelSpec, ProtocolPlan
    from uniter3m.train.folds import untrained_classes

    spec = LabelSpec("label", ("a", "b", "c"), {"a": "a", "b": "b", "c": "c"})
    targets = {"u1": 0, "u2": 1, "u3": 0, "u4": 2, "u5": 1}
    plan = ProtocolPlan("generic", spec, targets, [Fold("split", ["u1", "u2"], ["u3"], ["u4", "u5"])], "uar")
    assert untrained_classes(plan, plan.folds[0]) == ["c"]


def test_raw_frames_far_from_unit_scale_are_warned_about_when_normalisation_is_off(
    tmp_path, minilm_dir, caplog
):
    from uniter3m.cli import main
    from uniter3m.data.dataset import JoinedDataset

    frames = tmp_path / "npz"
    frames.mkdir()
    rows = tmp_path / "t.csv"
    rows.write_text("id,text\n" + "".join(f"u{i},hello there\n" for i in range(3)))
    for i in range(3):
        np.savez(frames / f"u{i}.npz", feat=np.full((4, 3), 1e6 * (i + 1), np.float32))
    assert (
        main(
            [
                "build-feat-db",
                "--input",
                str(frames),
                "--format",
                "npz",
                "--dtype",
                "float32",
                "--out",
                str(tmp_path / "f"),
            ]
        )
        == 0
    )
    args = [
        "build-txt-db",
        "--input",
        str(rows),
        "--id-col",
        "id",
        "--text-col",
        "text",
        "--tokenizer",
        str(minilm_dir),
    ]
    assert main([*args, "--out", str(tmp_path / "t")]) == 0
    JoinedDataset(tmp_path / "t", tmp_path / "f", normalize=False)
    assert "reach about" in caplog.text and "set the data's normalize to true" in caplog.text
    caplog.clear()
    JoinedDataset(tmp_path / "t", tmp_path / "f", normalize=True)
    assert "reach about" not in caplog.text


def test_face_mrc_without_soft_labels_names_the_databases(tiny_dbs, tmp_path):
    from uniter3m.data.store import DbReader

    nosoft = face_db_from(DbReader(tiny_dbs["face"]).ids, np.ones((3, 6), np.float32), tmp_path / "nosoft")
    cfg = pretrain_config(dict(tiny_dbs, face=nosoft), tmp_path / "run", steps=2)
    cfg["tasks"] = [{"name": "face_mrc", "dataset": "syn", "ratio": 1.0}]
    with pytest.raises(ConfigError, match=r"face_mrc needs per-frame soft labels in the face databases"):
        run_pretrain(cfg)
