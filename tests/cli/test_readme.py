"""The README's commands cannot drift: every `uniter3m ...` line of its code blocks names a real
command whose parser accepts the flags given, every `configs/...` file it names exists (or is
shipped), and the walk-through activates the venv before its first command.

The walk-through's commands (which name the user's own files) are parsed; docs/results.md's "Real data"
set-up block is run by bash exactly as written, on the shared corpora."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

from tests.support import REPO
from uniter3m.cli import COMMANDS

README = (REPO / "README.md").read_text()
RESULTS = (REPO / "docs" / "results.md").read_text()  # the results tables moved out of the README


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M)


def command_lines() -> list[str]:
    lines = []
    for block in code_blocks(README):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()  # trailing comments
            if line.startswith("uniter3m "):
                lines.append(line)
    return lines


def parse(line: str) -> argparse.Namespace:
    argv = shlex.split(line.replace("$TOK", "tok").replace("${SLURM_ARRAY_TASK_ID}", "0"))[1:]
    command, rest = argv[0], argv[1:]
    assert command in COMMANDS, f"README: unknown command in {line!r}"
    parser = argparse.ArgumentParser(prog=f"uniter3m {command}", exit_on_error=False)
    importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
    rest = ["placeholder" if a == "..." else a for a in rest]  # `--config ...`
    return parser.parse_args(rest)


LINES = command_lines()


def test_the_readme_has_commands():
    assert len(LINES) >= 15


@pytest.mark.parametrize("line", LINES)
def test_each_readme_command_parses(line, capsys):
    try:
        parse(line)
    except SystemExit as err:  # argparse reports unknown flags / bad choices this way
        pytest.fail(f"README line does not parse: {line!r}\n{capsys.readouterr().err}")
        raise AssertionError from err


def test_configs_named_in_the_readme_exist():
    from uniter3m.resources import resolve_config_path

    named = {n for n in re.findall(r"configs/[\w/.-]+\.(?:json|yaml)", README + RESULTS) if "/X." not in n}
    assert named
    missing = sorted(n for n in named if not resolve_config_path(n).is_file())
    assert not missing, f"README names configs that do not exist: {missing}"


def test_the_walk_through_activates_the_venv_first():
    first_command = min(README.find("\nuniter3m "), README.find("TOK=$(python"))
    assert 0 < README.find("source .venv/bin/activate") < first_command


def block_after(marker: str, text: str) -> str:
    """The first code block after the line `marker` of `text`."""
    tail = text[text.index(marker) :]
    return code_blocks(tail)[0]


def test_the_results_set_up_block_runs_as_written(shared_data, tmp_path):
    """docs/results.md's "Set up once" block, run by bash as written, from a checkout-like folder whose
    `.venv` is this one and whose `../shared/data` is the shared data: it builds every database the
    results table needs (MELD and IEMOCAP text, MOSI text/audio/video and its train-only split)."""
    import os
    import subprocess
    import sys

    from uniter3m.data.store import DbReader

    work = tmp_path / "checkout"
    work.mkdir()
    (tmp_path / "shared").symlink_to(shared_data.parent)
    venv = Path(sys.prefix)
    (work / ".venv").symlink_to(venv)
    script = block_after("Set up once:", RESULTS)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=work,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("meld_txt", "iemocap6_txt", "mosi_txt", "mosi_audio", "mosi_video", "mosi_txt_train"):
        assert len(DbReader(work / "db" / name)) > 0, name


def config_blocks() -> list[tuple[int, dict]]:
    """(line, config fragment) of every JSON or YAML block of the README: ```json / ```yaml blocks and
    untagged blocks of `"key": value` lines (up to the first command line; `...` stands for more keys)."""
    import json

    import yaml

    out = []
    for match in re.finditer(r"^```([a-z]*)\n(.*?)^```", README, flags=re.S | re.M):
        tag, body = match.group(1), match.group(2)
        line = README[: match.start()].count("\n") + 1
        if tag in ("yaml", "yml"):
            out.append((line, yaml.safe_load(body)))
            continue
        if tag not in ("", "json") or not body.lstrip().startswith(("{", '"')):
            continue
        lines = []
        for text in body.splitlines():
            if text.startswith("uniter3m "):
                break
            lines.append(text)
        text = re.sub(r",\s*\.\.\.\s*([}\]])", r"\1", "\n".join(lines)).strip().rstrip(",")
        out.append((line, json.loads(text if text.startswith("{") else "{" + text + "}")))
    return out


CONFIG_BLOCKS = config_blocks()


def test_the_readme_has_config_blocks():
    assert len(CONFIG_BLOCKS) >= 2


@pytest.mark.parametrize("line,fragment", CONFIG_BLOCKS, ids=[f"line{n}" for n, _ in CONFIG_BLOCKS])
def test_each_readme_config_block_validates(line, fragment, tmp_path, monkeypatch):
    """Each block, completed with the keys it leaves out, passes the config schema (only the databases,
    which a reader builds later, may be missing)."""
    from uniter3m.config import load_config
    from uniter3m.errors import ConfigError
    from uniter3m.train.config import FinetuneConfig, PretrainConfig

    monkeypatch.chdir(tmp_path)  # no database exists here
    if "datasets" in fragment or "tasks" in fragment:
        first = next(iter(fragment.get("datasets") or {"d": None}))
        base = {"output_dir": "x", "steps": 1, "model": {"config": "configs/model/tiny.json"},
                "datasets": {first: {"txt_db": "db/txt"}}, "tasks": [{"name": "mlm", "dataset": first}]}  # fmt: skip
        schema = PretrainConfig
    else:
        base = {"output_dir": "x", "model": {"config": "configs/model/tiny.json"}, "data": {"txt_db": "db/txt"},
                "protocol": {"name": "meld", "scheme": "split"}}  # fmt: skip
        schema = FinetuneConfig
    try:
        load_config(schema, {**base, **fragment})
    except ConfigError as err:
        problems = [
            p for p in re.split(r"\n|; (?=\w+(?:\.\d+)?: )", str(err))[1:] if "does not exist" not in p
        ]
        problems = [p for p in problems if p.strip() and not p.strip().endswith("Value error,")]
        assert not problems, f"README line {line}: {problems}"
