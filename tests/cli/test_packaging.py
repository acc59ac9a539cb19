"""The installable package: licence metadata, the configs shipped as package data (a wheel installed
outside the checkout finds them), YAML configs, `uniter3m config show`, the default text model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support import REPO
from uniter3m.cli import main as cli_main
from uniter3m.config import read_json
from uniter3m.errors import ConfigError
from uniter3m.resources import configs_dir, resolve_config_path
from uniter3m.train.config import DEFAULT_MODEL_ENV, load_finetune_config


def test_licence_metadata_is_spdx_and_the_file_exists():
    pyproject = (REPO / "pyproject.toml").read_text()  # (tomllib is 3.11+; the package supports 3.10)
    assert '\nlicense = "Apache-2.0"\n' in pyproject and '\nlicense-files = ["LICENSE"]\n' in pyproject
    assert "Apache License" in (REPO / "LICENSE").read_text()[:200]


def test_shipped_configs_resolve_from_anywhere(tmp_path, monkeypatch):
    assert (configs_dir() / "pretrain" / "demo.json").is_file()
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    assert resolve_config_path("configs/model/tiny.json") == configs_dir() / "model" / "tiny.json"
    assert read_json("model/tiny.json")["hidden_size"] > 0
    (tmp_path / "configs" / "model").mkdir(parents=True)
    (tmp_path / "configs" / "model" / "tiny.json").write_text('{"mine": 1}')
    assert read_json("configs/model/tiny.json") == {"mine": 1}  # a path that exists always wins


@pytest.mark.slow
def test_the_wheel_ships_configs_and_licence_and_works_outside_the_checkout(tmp_path):
    """`pip wheel .` -> the wheel holds configs + LICENSE; unpacked elsewhere it finds its configs."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("uniter3m-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in (REPO / "configs").rglob("*.json"):
        assert f"uniter3m/configs/{shipped.relative_to(REPO / 'configs')}" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = (
        "import uniter3m.resources as r, uniter3m.cli as c, sys; "
        "print(r.__file__); print(r.config_file('pretrain/demo.json')); "
        "sys.exit(c.main(['config', 'show', '--config', 'configs/model/tiny.json', '--raw']))"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    module, demo_config, *shown = proc.stdout.splitlines()
    assert module.startswith(str(tmp_path / "site")) and demo_config.startswith(str(tmp_path / "site"))
    assert Path(demo_config).is_file() and json.loads("\n".join(shown))["hidden_size"] > 0


def test_yaml_config_with_comments_equals_the_json_one(tmp_path, capsys):
    (tmp_path / "m.yaml").write_text("# a tiny model\nhidden_size: 32  # wide\nface:\n  feat_dim: 5\n")
    (tmp_path / "m.json").write_text(json.dumps({"hidden_size": 32, "face": {"feat_dim": 5}}))
    assert read_json(tmp_path / "m.yaml") == read_json(tmp_path / "m.json")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML at line"):
        read_json(tmp_path / "bad.yaml")


def test_config_show_prints_the_resolved_config(tmp_path, capsys, minilm_dir, monkeypatch):
    from uniter3m.ingest.text_db import TextDbSpec, build_text_db

    (tmp_path / "t.jsonl").write_text(
        "".join(
            json.dumps({"id": f"u{i}", "text": "hello there", "emo": "neu", "split": "train"}) + "\n"
            for i in range(3)
        )
    )
    build_text_db(
        TextDbSpec(
            input=tmp_path / "t.jsonl", id_cols=["id"], text_col="text", tokenizer=minilm_dir,
            out=tmp_path / "txt", label_cols=["emo", "split"], lexicon="none", progress=False,
        )
    )  # fmt: skip
    (tmp_path / "run.yaml").write_text(
        f"# fine-tune\noutput_dir: {tmp_path / 'out'}\ndata:\n  txt_db: {tmp_path / 'txt'}\n"
        "protocol: {name: generic, label_column: emo}\nmodel: {init: default}  # the default text model\n"
    )
    monkeypatch.setenv(DEFAULT_MODEL_ENV, str(minilm_dir))
    assert cli_main(["config", "show", "--config", str(tmp_path / "run.yaml"), "--set", "optim.lr=3e-5"]) == 0
    import yaml

    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["optim"]["lr"] == 3e-5 and shown["model"]["init"] == str(minilm_dir)
    assert shown["batching"]["max_tokens"] == 4096  # defaults filled in
    assert cli_main(["config", "show", "--config", str(tmp_path / "run.yaml"), "--set", "optim.lrr=1"]) == 2
    assert "optim.lrr: unknown key" in capsys.readouterr().err


def test_a_missing_default_model_says_how_to_set_it(tmp_path, monkeypatch):
    monkeypatch.setenv(DEFAULT_MODEL_ENV, str(tmp_path / "nowhere"))
    cfg = {
        "output_dir": str(tmp_path / "o"),
        "data": {"txt_db": str(tmp_path)},
        "protocol": {"name": "generic"},
    }
    with pytest.raises(ConfigError, match=r"--set model.init=DIR.*UNITER3M_TEXT_MODEL"):
        load_finetune_config({**cfg, "model": {"init": "default"}})
