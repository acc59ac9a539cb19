"""Issue 28 ("nothing lost, round two"): each numbered case through the command the user meets it in.

Run folders belong to one kind of run and `--overwrite` deletes only what runs make (1, 2, 4);
`convert` never replaces its source or a foreign folder (3); model folders carry a manifest that
every reader checks and `best/` is swapped in whole (5, 6); CSV cells, meta.json, damaged pages
and long ids are errors naming what is wrong (9, 10, 13, 15, 20, 23); and the rest of the list.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support import REPO
from tests.support.runs import build_finetune_dbs, finetune_config, pretrain_config, tiny_checkpoint
from uniter3m.cli import main
from uniter3m.data.store import DbReader, DbWriter
from uniter3m.errors import DatabaseError, UserError
from uniter3m.fileio import MANIFEST_NAME
from uniter3m.train.rundir import RUN_LOCK, claim_output_dir, read_marker

pytestmark = pytest.mark.usefixtures("one_thread")


def _write_config(cfg: dict, folder: Path) -> Path:
    file = folder / "cfg.json"
    file.write_text(json.dumps(cfg))
    return file


def _tree(root: Path) -> list[str]:
    """Every path under `root` but the run lock (a run that is refused still took the lock)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name != RUN_LOCK)


# ------------------------------------------------------------------ 1, 2, 4: run folders
def test_1_pretrain_overwrite_refuses_a_demo_folder(tiny_dbs, tmp_path, capsys):
    from uniter3m.train.demo import claim_demo_dir

    demo = tmp_path / "W"
    claim_demo_dir(demo)
    (demo / "db" / "txt").mkdir(parents=True)
    (demo / "db" / "txt" / "data.mdb").write_bytes(b"the corpus")
    before = _tree(demo)
    cfg = _write_config(pretrain_config(tiny_dbs, demo, steps=2), tmp_path)
    assert main(["pretrain", "--config", str(cfg), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "holds a demo run" in err and "not a pretrain run" in err and "another output_dir" in err
    assert _tree(demo) == before and read_marker(demo)["kind"] == "demo"


def test_2_pretrain_resume_refuses_a_finetune_run_folder(tiny_dbs, tmp_path, capsys):
    run = tmp_path / "ft"
    claim_output_dir(run, overwrite=False, marker="finetune")
    (run / "config.json").write_text('{"protocol": "mine"}')
    (run / "fold00-split" / "best").mkdir(parents=True)
    cfg = _write_config(pretrain_config(tiny_dbs, run, steps=2), tmp_path)
    assert main(["pretrain", "--config", str(cfg), "--resume", "auto"]) == 2
    assert "holds a finetune run" in capsys.readouterr().err
    assert read_marker(run)["kind"] == "finetune"
    assert json.loads((run / "config.json").read_text()) == {"protocol": "mine"}


def test_4_run_folder_overwrite_refuses_files_the_user_added(tiny_dbs, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = _write_config(pretrain_config(tiny_dbs, run, steps=2), tmp_path)
    assert main(["pretrain", "--config", str(cfg)]) == 0
    (run / "NOTES.txt").write_text("what I tried")
    (run / "analysis").mkdir()
    (run / "analysis" / "plot.py").write_text("print(1)")
    before = _tree(run)
    assert main(["pretrain", "--config", str(cfg), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "holds files no run made: NOTES.txt, analysis/; nothing was deleted" in err
    assert _tree(run) == before
    (run / "NOTES.txt").unlink()
    (run / "analysis" / "plot.py").unlink()
    (run / "analysis").rmdir()
    assert main(["pretrain", "--config", str(cfg), "--overwrite"]) == 0  # only what runs make: replaced


def test_4_overwrite_replaces_everything_a_finetune_run_wrote(finetuned, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finetuned.parents[1], run)  # folds, summary tables, pictures, logs
    claim_output_dir(run, overwrite=True, marker="finetune")  # nothing in it is taken for the user's
    assert sorted(os.listdir(run)) == [RUN_LOCK, "uniter3m_run.json"]  # (the lock file stays, unlocked)


# ------------------------------------------------------------------ 3: convert
def test_3_convert_never_replaces_its_source_or_a_foreign_folder(tmp_path, minilm_dir, capsys):
    ours = tmp_path / "ours"
    assert main(["convert", "--from", "hf-bert", "--checkpoint", str(minilm_dir), "--out", str(ours)]) == 0
    assert (ours / MANIFEST_NAME).is_file()
    before = {p: p.read_bytes() for p in ours.iterdir()}
    args = ["convert", "--to", "hf-bert", "--checkpoint", str(ours), "--out", str(ours), "--overwrite"]
    assert main(args) == 2
    assert "is the source" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in ours.iterdir()} == before
    user = tmp_path / "user"
    user.mkdir()
    (user / "config.json").write_text('{"mine": true}')
    args = [
        "convert",
        "--from",
        "hf-bert",
        "--checkpoint",
        str(minilm_dir),
        "--out",
        str(user),
        "--overwrite",
    ]
    assert main(args) == 2
    assert "holds files uniter3m did not write (config.json" in capsys.readouterr().err
    assert (user / "config.json").read_text() == '{"mine": true}'
    # a folder a convert wrote is replaced whole: nothing of the earlier output stays beside the new one
    hf = tmp_path / "hf"
    assert main(["convert", "--to", "hf-bert", "--checkpoint", str(ours), "--out", str(hf)]) == 0
    assert (
        main(
            ["convert", "--from", "hf-bert", "--checkpoint", str(minilm_dir), "--out", str(hf), "--overwrite"]
        )
        == 0
    )
    assert json.loads((hf / "conversion_report.json").read_text())["kind"] == "hf-bert"


# ------------------------------------------------------------------ 5, 6: model folders
def _flip_floats(file: Path, count: int = 200) -> None:
    raw = bytearray(file.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    for i in range(count):
        at = 8 + header + 64 + 4 * i
        raw[at + 3] ^= 0x40
    file.write_bytes(bytes(raw))


def test_5_a_changed_weight_in_a_model_folder_is_refused_by_every_reader(tmp_path, minilm_dir, capsys):
    from uniter3m.model.uniter import UniterModel

    folder = tmp_path / "ours"
    assert main(["convert", "--from", "hf-bert", "--checkpoint", str(minilm_dir), "--out", str(folder)]) == 0
    UniterModel.from_pretrained(folder)  # intact: loads
    _flip_floats(folder / "model.safetensors")
    with pytest.raises(UserError, match=r"model.safetensors differs from what was written"):
        UniterModel.from_pretrained(folder)
    assert (
        main(["convert", "--to", "hf-bert", "--checkpoint", str(folder), "--out", str(tmp_path / "x")]) == 2
    )
    assert "SHA-256 mismatch" in capsys.readouterr().err


_SAVER = """
import sys, torch
from uniter3m.model.config import UniterConfig
from uniter3m.model.finetuning import FinetuneModel, HeadSpec, save_finetuned
from uniter3m.model.uniter import UniterModel
config = UniterConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=32)
model = FinetuneModel(UniterModel(config), HeadSpec(classifier="linear", classes=["a", "b"]))
step = 0
while True:
    step += 1
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(step))
    save_finetuned(model, sys.argv[1], {"step": step})
    if step == 3:
        print("saved", flush=True)
"""


def test_6_best_is_swapped_in_whole_when_its_writer_is_killed(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from uniter3m.fileio import check_manifest
    from uniter3m.model.finetuning import load_finetuned

    best = tmp_path / "run" / "fold00-x" / "best"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(best)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert proc.stdout.readline().strip() == "saved"
        time.sleep(0.3)  # somewhere inside a save
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert (best / MANIFEST_NAME).is_file()
    check_manifest(best)  # every file of best/ is from one save
    step = json.loads((best / "finetune.json").read_text())["step"]
    model = load_finetuned(best)
    assert all(bool((p == float(step)).all()) for p in model.parameters())


# ------------------------------------------------------------------ 9, 23: CSV feature tables
def test_9_a_bad_cell_in_a_feature_column_is_named_not_dropped(tmp_path, capsys, caplog):
    rows = ["id,f0,f1,f2,speaker"] + [f"u{i},{i},{i + 1},{i + 2},spk{i % 2}" for i in range(4)]
    rows[3] = "u2,2,N/A,4,spk0"
    (tmp_path / "f.csv").write_text("\n".join(rows) + "\n")
    args = ["build-feat-db", "--input", str(tmp_path / "f.csv"), "--format", "csv", "--id-col", "id"]
    assert main([*args, "--out", str(tmp_path / "db")]) == 2
    err = capsys.readouterr().err
    assert "line 4, column 'f1' holds 'N/A', which is not a number" in err and "--columns" in err
    assert not (tmp_path / "db").exists()
    # leaving the column out is a choice the user makes, and the text column is printed as left out
    assert main([*args, "--columns", "f0,f2", "--out", str(tmp_path / "db")]) == 0
    assert DbReader(tmp_path / "db").meta["dim"] == 2
    rows[3] = "u2,2,3,4,spk0"
    (tmp_path / "g.csv").write_text("\n".join(rows) + "\n")
    args[2] = str(tmp_path / "g.csv")
    assert main([*args, "--out", str(tmp_path / "db2")]) == 0
    assert "g.csv: 1 column(s) without numbers are not features and are left out: speaker" in caplog.text


def test_23_a_csv_with_a_utf8_bom_reads_its_first_column(tmp_path):
    rows = ["id,f0,f1"] + [f"u{i},{i},{i}" for i in range(3)]
    (tmp_path / "f.csv").write_bytes(b"\xef\xbb\xbf" + ("\n".join(rows) + "\n").encode())
    args = ["build-feat-db", "--input", str(tmp_path / "f.csv"), "--format", "csv", "--id-col", "id"]
    assert main([*args, "--out", str(tmp_path / "db")]) == 0
    assert DbReader(tmp_path / "db").ids == ["u0", "u1", "u2"]


# ------------------------------------------------------------------ 10, 13, 15, 20: databases
def _feat_db(path: Path, ids=("a", "b", "c")) -> Path:
    w = DbWriter(path, "feat")
    for i, uid in enumerate(ids):
        w.put(uid, {"feat": np.full((2, 3), float(i), np.float32)}, 2)
    w.finish({"dim": 3, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]})
    return path


def test_10_an_edited_meta_json_is_refused(tmp_path, capsys):
    db = _feat_db(tmp_path / "db")
    meta = json.loads((db / "meta.json").read_text())
    meta["std"] = [1e-5, 1.0, 1.0]
    (db / "meta.json").write_text(json.dumps(meta))
    assert main(["inspect", str(db), "--verify"]) == 2
    err = capsys.readouterr().err
    assert "differs from the meta its build recorded" in err and "in: std;" in err


def test_13_a_record_lost_from_the_index_is_a_database_error_naming_it(tiny_dbs, tmp_path, capsys):
    import shutil

    import lmdb

    dbs = dict(tiny_dbs)
    dbs["face"] = tmp_path / "face"
    shutil.copytree(tiny_dbs["face"], dbs["face"])
    reader = DbReader(dbs["face"])
    ids = reader.ids
    lost = ids[0]
    reader.close()
    env = lmdb.open(str(dbs["face"]))
    with env.begin(write=True) as txn:  # the pages of every record lost, the index intact
        for uid in ids:
            assert txn.delete(uid.encode())
    env.close()
    reader = DbReader(dbs["face"])
    assert lost in reader
    with pytest.raises(
        DatabaseError, match=rf"record '{lost}' is listed in the index but cannot be found.*--verify"
    ):
        reader[lost]
    with pytest.raises(KeyError):
        reader["never-there"]
    cfg = _write_config(pretrain_config(dbs, tmp_path / "run", steps=2), tmp_path)
    assert main(["pretrain", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "is listed in the index but cannot be found" in err and "KeyError" not in err


def test_15_an_id_longer_than_an_lmdb_key_is_refused_at_build_naming_it(tmp_path, capsys):
    uid = "x" * 600
    (tmp_path / "f.csv").write_text(f"id,f0\n{uid},1\nshort,2\n")
    args = ["build-feat-db", "--input", str(tmp_path / "f.csv"), "--format", "csv", "--id-col", "id"]
    assert main([*args, "--out", str(tmp_path / "db")]) == 2
    err = capsys.readouterr().err
    assert "'xxxxxxxx" in err and "is 600 bytes long, more than the 511" in err and "shorten the ids" in err
    assert not (tmp_path / "db").exists() and not list(tmp_path.glob(".db.*"))


def test_20_a_data_mdb_of_another_database_is_named_as_such(tmp_path, capsys):
    a, b = _feat_db(tmp_path / "a"), _feat_db(tmp_path / "b", ids=("x", "y", "z"))
    (a / "data.mdb").write_bytes((b / "data.mdb").read_bytes())
    assert main(["inspect", str(a)]) == 2
    err = capsys.readouterr().err
    assert "data.mdb and meta.json come from different builds" in err and "rebuilt after" not in err


# ------------------------------------------------------------------ 16, 21, 22: clear messages
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a visible GPU")
def test_16_extract_on_a_gpu_that_is_not_there_says_so(tmp_path, capsys):
    args = ["extract", "--checkpoint", str(tmp_path), "--config", str(tmp_path / "c.json")]
    assert main([*args, "--file", str(tmp_path / "e.npz"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "device 'cuda' was asked for but" in err and "--device cpu" in err


def test_21_a_checkpoint_path_that_does_not_exist_is_called_so(tmp_path, capsys):
    missing = tmp_path / "run" / "fold00-split" / "best"
    assert main(["extract", "--checkpoint", str(missing), "--file", str(tmp_path / "e.npz")]) == 2
    assert f"checkpoint {missing} does not exist" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(missing)]) == 2
    assert f"{missing} does not exist" in capsys.readouterr().err


def test_22_a_tokenizer_folder_without_tokenizer_files_is_called_so(tmp_path, capsys):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "t.csv").write_text("id,text\na,hello\n")
    args = ["build-txt-db", "--input", str(tmp_path / "t.csv"), "--id-col", "id", "--text-col", "text"]
    assert main([*args, "--tokenizer", str(tok), "--out", str(tmp_path / "db")]) == 2
    err = capsys.readouterr().err
    assert (
        "holds no tokenizer files" in err
        and "it holds config.json" in err
        and "install sentencepiece" not in err
    )


def test_24_config_errors_blame_the_right_place(tiny_dbs, tmp_path, capsys):
    cfg = pretrain_config(tiny_dbs, tmp_path / "run", steps=2)
    file = _write_config(cfg, tmp_path)
    assert main(["pretrain", "--config", str(file), "--set", "model.overrides.hidden_size=-128"]) == 2
    err = capsys.readouterr().err
    assert "model.overrides (hidden_size; --set model.overrides.KEY" in err and "applied to" in err
    cfg["output_dir"] = str(tmp_path / "run2")
    cfg["streams"] = {"pose": "P"}
    cfg["tasks"].append({"name": "pose_mrfr", "dataset": "syn", "ratio": 1.0})
    file = _write_config(cfg, tmp_path)
    assert main(["pretrain", "--config", str(file)]) == 2
    err = capsys.readouterr().err
    assert "task(s) pose_mrfr learn from the pose stream but no dataset gives a pose_db" in err
    toml = tmp_path / "c.toml"
    toml.write_text("output_dir = 'x'\n")
    assert main(["pretrain", "--config", str(toml)]) == 2
    assert "a .toml file is not a config uniter3m reads: configs are JSON" in capsys.readouterr().err


# ------------------------------------------------------------------ 7, 8: what a run starts from
def test_7_an_init_model_with_another_vocabulary_is_refused(tiny_dbs, tmp_path, minilm_dir, capsys):
    import shutil

    init = tmp_path / "minilm_swapped"
    init.mkdir()
    for name in ("config.json", "model.safetensors", "special_tokens_map.json", "tokenizer_config.json"):
        shutil.copy(minilm_dir / name, init / name)
    words = (minilm_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")
    a, b = words.index("happy"), words.index("sad")
    words[a], words[b] = words[b], words[a]  # same size, same words: only two ids swapped
    (init / "vocab.txt").write_text("\n".join(words), encoding="utf-8")
    cfg = pretrain_config(tiny_dbs, tmp_path / "run", steps=2)
    cfg["model"] = {
        "init": str(init),
        "overrides": {"face": {"max_frames": 16}, "speech": {"max_frames": 16}},
    }
    assert main(["pretrain", "--config", str(_write_config(cfg, tmp_path))]) == 2
    err = capsys.readouterr().err
    assert (
        f"{init} was trained with tokenizer" in err
        and "rebuild the text db with the model's tokenizer" in err
    )


def test_8_resume_refuses_an_edited_model_config_file(tiny_dbs, tmp_path, capsys):
    model_file = tmp_path / "model.json"
    model_file.write_text(Path(pretrain_config(tiny_dbs, tmp_path)["model"]["config"]).read_text())
    cfg = pretrain_config(tiny_dbs, tmp_path / "run", steps=4, stop_after=2)
    cfg["model"]["config"] = str(model_file)
    file = _write_config(cfg, tmp_path)
    assert main(["pretrain", "--config", str(file)]) == 0
    edited = json.loads(model_file.read_text())
    edited["hidden_dropout_prob"] = 0.3
    model_file.write_text(json.dumps(edited))
    assert main(["pretrain", "--config", str(file), "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "the model config resolved now differs" in err and "hidden_dropout_prob: 0.1 -> 0.3" in err


# ------------------------------------------------------------------ 11: truncated media
def _faststart(src: Path, dst: Path) -> Path:
    """`src` remuxed with its index (moov) first, as web videos are: a cut copy still declares every track."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w", options={"movflags": "faststart"}) as out:
        streams = {s.index: out.add_stream_from_template(s) for s in inp.streams}
        for packet in inp.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                out.mux(packet)
    return dst


def test_11_truncated_media_are_refused_not_shortened(shared_data, tmp_path, capsys):
    pytest.importorskip("av", reason="PyAV is not installed: pip install 'uniter3m[media]'")
    pytest.importorskip("opensmile", reason="openSMILE is not installed: pip install 'uniter3m[speech]'")
    from tests.support.media import make_video, read_wav

    wav = shared_data / "emodb" / "wav" / "03a01Fa.wav"
    if not wav.is_file():
        pytest.skip(f"EmoDB file {wav} not found")
    (tmp_path / "cut.wav").write_bytes(wav.read_bytes()[:40_000])
    build = ["build-media-db", "--format", "wav", "--input"]
    assert main([*build, str(tmp_path / "cut.wav"), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "cut.wav" in err and "its audio track declares" in err and "truncated" in err
    samples, rate = read_wav(wav)
    clip = make_video(tmp_path / "clip.mp4", frames=24, fps=6, audio=(np.tile(samples, 2), rate))
    import av

    fast = _faststart(clip, tmp_path / "fast.mp4")
    with av.open(str(fast)) as container:  # cut where a packet starts: what is left decodes without an error
        at = next(
            p.pos for p in container.demux() if p.pts is not None and p.pos and p.pts * p.time_base > 1.3
        )
    (tmp_path / "cut.mp4").write_bytes(fast.read_bytes()[:at])
    assert main([*build, str(tmp_path / "cut.mp4"), "--out", str(tmp_path / "b")]) == 2
    assert "its audio track declares" in capsys.readouterr().err
    assert (
        main([*build[:2], "video", "--input", str(tmp_path / "cut.mp4"), "--out", str(tmp_path / "c")]) == 2
    )
    assert "its video track declares" in capsys.readouterr().err
    assert (
        main([*build[:2], "video", "--input", str(tmp_path / "fast.mp4"), "--out", str(tmp_path / "d")]) == 0
    )


# ------------------------------------------------------------------ 17: SIGTERM outside the loop
def test_17_sigterm_during_a_database_build_says_what_stopped_and_how_to_go_on(tmp_path, minilm_dir):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "demo"
    cli = [sys.executable, "-c", "import sys; from uniter3m.cli import main; sys.exit(main())"]
    proc = subprocess.Popen(
        [*cli, "demo", "--out", str(out), "--tokenizer", str(minilm_dir), "--utterances", "400"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        deadline = time.time() + 240  # a loaded machine takes long to import torch
        while (
            not (out / "corpus" / "SYNTHETIC.json").exists()
            and proc.poll() is None
            and time.time() < deadline
        ):
            time.sleep(0.02)  # the database builds come next
        assert (out / "corpus" / "SYNTHETIC.json").exists(), "the demo never wrote its corpus"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "uniter3m demo: stopped by SIGTERM" in err and "To go on, run the same command again" in err
    assert "Traceback" not in err
    if (out / "db").is_dir():
        assert not [p for p in (out / "db").iterdir() if ".building-" in p.name]


# ------------------------------------------------------------------ 18, 19: found at the start
def test_18_a_context_budget_past_the_model_is_found_at_the_start(tmp_path, capsys, minilm_dir):

    root, model = _finetune_parts(tmp_path, minilm_dir)
    rows = [json.loads(line) for line in (root / "t.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):  # dialogues of four turns
        row.update(dia=f"d{i // 4}", turn=i % 4)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build = [
        "build-txt-db",
        "--input",
        str(tmp_path / "d.jsonl"),
        "--id-col",
        "dia,turn",
        "--text-col",
        "text",
    ]
    build += ["--label-col", "emo,split,score", "--tokenizer", str(minilm_dir), "--lexicon", "none"]
    assert main([*build, "--out", str(tmp_path / "txt")]) == 0
    cfg = finetune_config(root, model, tmp_path / "run")
    cfg["data"] = dict(
        cfg["data"], txt_db=str(tmp_path / "txt"), face_db=None, speech_db=None, modalities="L"
    )
    cfg["data"]["context"] = {"turns": 2, "max_context_tokens": 120}  # 16 + 2 + 120 > the model's 128
    assert main(["finetune", "--config", str(_write_config(cfg, tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "data.max_txt_len 16 + [CLS]/[SEP] + context.max_context_tokens 120 exceeds" in err
    assert not (tmp_path / "run" / "fold00-split" / "best").exists()  # nothing was trained


def test_19_missing_drop_that_would_drop_test_utterances_is_refused_at_the_start(
    tmp_path, capsys, minilm_dir
):

    root, model = _finetune_parts(tmp_path, minilm_dir)
    lines = (root / "face.csv").read_text().splitlines()
    (tmp_path / "face.csv").write_text("\n".join(line for line in lines if not line.startswith("u4")) + "\n")
    args = ["build-feat-db", "--input", str(tmp_path / "face.csv"), "--format", "csv", "--id-col", "id"]
    assert main([*args, "--out", str(tmp_path / "face")]) == 0
    cfg = finetune_config(root, model, tmp_path / "run")
    cfg["data"].update(face_db=str(tmp_path / "face"), missing="drop")
    assert main(["finetune", "--config", str(_write_config(cfg, tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "data.missing='drop' would leave 8 of its 10 test utterances out" in err and "shard" not in err
    assert not (tmp_path / "run" / "fold00-split" / "best").exists()


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, minilm_dir) -> Path:
    """A fine-tuning run of test_finetune's corpus: its `fold00-split/best` folder."""

    root = tmp_path_factory.mktemp("finetuned")
    data, model = _finetune_parts(root, minilm_dir)
    cfg = finetune_config(data, model, root / "run", top__epochs=1)
    assert main(["finetune", "--config", str(_write_config(cfg, root))]) == 0
    return root / "run" / "fold00-split" / "best"


def _finetune_parts(tmp_path: Path, minilm_dir: Path) -> tuple[Path, Path]:
    """test_finetune's 48-utterance databases and tiny model, built here (its fixtures are module-scoped there)."""
    return build_finetune_dbs(tmp_path / "ft", minilm_dir), tiny_checkpoint(tmp_path / "tiny")


def test_5_evaluate_and_extract_refuse_a_best_folder_whose_weights_changed(finetuned, tmp_path, capsys):
    import shutil

    from uniter3m.fileio import MANIFEST_NAME

    assert (finetuned / MANIFEST_NAME).is_file()
    best = tmp_path / "run" / "fold00-split" / "best"
    shutil.copytree(finetuned.parents[1], best.parents[1])
    _flip_floats(best / "model.safetensors")
    assert main(["evaluate", "--checkpoint", str(best)]) == 2
    assert "model.safetensors differs from what was written (SHA-256 mismatch" in capsys.readouterr().err
    assert main(["extract", "--checkpoint", str(best), "--file", str(tmp_path / "e.npz")]) == 2
    assert "SHA-256 mismatch" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(finetuned)]) == 0  # the intact one scores


# ------------------------------------------------------------------ 14: full disks, read-only folders
_DRIVER = """
import contextlib, io, json, sys
from pathlib import Path
from uniter3m.cli import main
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    results[name] = [rc, err.getvalue()]
results["left"] = [str(p) for p in map(Path, sys.argv[2:]) for p in p.rglob("*")]  # before the mounts go
print(json.dumps(results))
"""


def _in_mount_namespace(mounts: str, cases: dict[str, list[str]], look: list[Path]) -> dict[str, list]:
    """Run `uniter3m` commands in a private mount namespace (real read-only binds, a real tiny tmpfs: the
    kernel refuses the writes, even to root); the mounts vanish with the process."""
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("needs `unshare -m` (root or user namespaces) for a read-only folder and a full disk")
    script = f'{mounts} && exec "$0" -c "$@"'
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, sys.executable, _DRIVER, json.dumps(cases), *map(str, look)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_14_full_disks_and_read_only_folders_are_one_line_and_leave_nothing(tiny_dbs, finetuned, tmp_path):
    ro, full, small, tiny = tmp_path / "ro", tmp_path / "full", tmp_path / "small", tmp_path / "tiny"
    tiny_ft = tmp_path / "tiny_ft"
    for folder in (ro, full, small, tiny, tiny_ft):
        folder.mkdir()
    done = tmp_path / "done"  # a run that stopped at step 2, to be resumed in a read-only folder
    assert (
        main(
            [
                "pretrain",
                "--config",
                str(_write_config(pretrain_config(tiny_dbs, done, steps=4, stop_after=2), tmp_path)),
            ]
        )
        == 0
    )
    npz = tmp_path / "npz"
    npz.mkdir()
    for i in range(40):
        np.savez(npz / f"u{i}.npz", feat=np.random.default_rng(i).random((100, 64)).astype(np.float32))

    def pretrain(out: Path, name: str, *flags: str) -> list[str]:
        cfg = pretrain_config(tiny_dbs, out, steps=4, ckpt_every=2)
        return ["pretrain", "--config", str(_write_config(cfg, tmp_path / name)), *flags]

    for name in ("a", "b", "c", "d", "e"):
        (tmp_path / name).mkdir()
    ft_root = finetuned.parents[2]  # the fixture's databases and tiny model, fine-tuned again below
    ft_cfg = finetune_config(ft_root / "ft", ft_root / "tiny", tiny_ft / "run", top__epochs=1)
    cases = {
        "pretrain_read_only": pretrain(ro / "run", "a"),
        "resume_read_only": pretrain(done, "b", "--resume", "auto"),
        "build_read_only": ["build-feat-db", "--input", str(npz), "--format", "npz", "--out", str(ro / "db")],
        "build_full": ["build-feat-db", "--input", str(npz), "--format", "npz", "--out", str(small / "db")],
        "checkpoint_full": pretrain(full / "run", "c"),  # the weights fit, the trainer state does not
        "weights_full": pretrain(tiny / "run", "d"),  # the safetensors file does not fit
        # the same in fine-tuning: best/ (4 MB) fits, the checkpoint's weights (safetensors' own writer) do not
        "finetune_weights_full": ["finetune", "--config", str(_write_config(ft_cfg, tmp_path / "e"))],
        "evaluate_read_only": [
            "evaluate",
            "--checkpoint",
            str(finetuned),
        ],  # its table goes into the fold folder
    }
    fold = finetuned.parent
    mounts = (
        f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && mount --bind {done} {done} && "
        f"mount -o remount,bind,ro {done} && mount -t tmpfs -o size=6m tmpfs {full} && "
        f"mount -t tmpfs -o size=256k tmpfs {small} && mount -t tmpfs -o size=2m tmpfs {tiny} && mount -t tmpfs -o size=6m tmpfs {tiny_ft} && mount --bind {fold} {fold} && mount -o remount,bind,ro {fold}"
    )
    results = _in_mount_namespace(mounts, cases, [full, small, tiny, tiny_ft])
    left = results.pop("left")
    assert not [p for p in left if ".tmp-" in p or ".building-" in p], (
        left
    )  # nothing partial on the full disks
    for name, (rc, err) in results.items():
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert "cannot write in" in err and "free there" in err or "read-only file system" in err, (name, err)
    assert "read-only file system" in results["pretrain_read_only"][1]
    assert f"cannot write in {done}: it is on a read-only file system" in results["resume_read_only"][1]
    assert (
        "the write failed" in results["build_full"][1]
        and "nothing half-written was kept" in results["build_full"][1]
    )
    assert "checkpoints: the disk (or the quota) is full" in results["checkpoint_full"][1]
    assert "MB needed" in results["checkpoint_full"][1]
    assert (
        f"cannot write in {tiny / 'run' / 'checkpoints'}: the disk (or the quota) is full"
        in results["weights_full"][1]
    )
    assert (
        f"cannot write in {tiny_ft / 'run' / 'fold00-split' / 'checkpoints'}: the disk (or the quota) is full"
        in results["finetune_weights_full"][1]
    )
    assert f"cannot write in {fold}: it is on a read-only file system" in results["evaluate_read_only"][1]
    assert not list(ro.iterdir()) and not list(
        small.iterdir()
    )  # (the tmpfs is gone: its mount point is empty)


def test_17_a_second_sigterm_during_a_checkpoint_write_is_reported_as_sigterm():
    import signal

    from uniter3m.cli import Terminated, _terminate
    from uniter3m.train.preemption import StopRequest

    previous = signal.signal(signal.SIGTERM, _terminate)  # what `uniter3m` installs around a command
    try:
        with pytest.raises(Terminated):  # not KeyboardInterrupt: the CLI then says "stopped by SIGTERM"
            with StopRequest() as stop:
                os.kill(os.getpid(), signal.SIGTERM)  # the first: the loop checkpoints and stops
                assert stop.raised
                os.kill(os.getpid(), signal.SIGTERM)  # the second, e.g. during that checkpoint's write
    finally:
        signal.signal(signal.SIGTERM, previous)
