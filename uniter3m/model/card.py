"""What travels with every model directory besides the weights: the tokenizer and a model card.

Every checkpoint directory (pretraining `checkpoints/step_N/model/`, fine-tuning `fold*/best/`,
`uniter3m convert` outputs) holds the tokenizer files it was trained with, so
`AutoTokenizer.from_pretrained(dir)` works on it, and a `README.md` model card: what the model is,
how transformers reads it, its config, data, metrics and the command that made it.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from uniter3m.fileio import atomic_write_bytes

TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
CARD_NAME = "README.md"


def has_tokenizer(folder: str | os.PathLike | None) -> bool:
    """True when `folder` holds a vocabulary an HF tokenizer can be built from."""
    if not folder:
        return False
    folder = Path(folder)
    return folder.is_dir() and any(
        (folder / n).is_file() for n in ("vocab.txt", "tokenizer.json", "vocab.json")
    )


def find_tokenizer_dir(candidates: Iterable[str | os.PathLike | None]) -> Path | None:
    """The first candidate folder that holds tokenizer files (None when none does)."""
    return next((Path(c) for c in candidates if has_tokenizer(c)), None)


def copy_tokenizer(folder: str | os.PathLike | None, out: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files of `folder` into `out` (atomically); the names copied."""
    if not has_tokenizer(folder):
        return []
    folder, out = Path(folder), Path(out)
    copied = []
    for name in TOKENIZER_FILES:
        file = folder / name
        if file.is_file() and file.resolve() != (out / name).resolve():
            atomic_write_bytes(out / name, file.read_bytes())
            copied.append(name)
        elif file.is_file():
            copied.append(name)
    return copied


def command_line() -> str:
    """The command this process runs, as a shell line (`uniter3m ...` when started by the CLI)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("uniter3m", "__main__.py", "cli.py"):
        argv[0] = "uniter3m"
    return " ".join(shlex.quote(a) for a in argv)


def write_model_card(
    out: str | os.PathLike,
    title: str,
    summary: str,
    *,
    transformers_use: str,
    sections: Mapping[str, Any] | None = None,
) -> Path:
    """Write `out/README.md`: title, summary, how to load it, then one JSON block per section."""
    lines = [
        "---",
        "library_name: uniter3m",
        "tags: [emotion-recognition, multimodal, bert]",
        "---",
        f"# {title}",
        "",
        summary,
        "",
        "## Loading",
        "",
        transformers_use,
        "",
        "Model directories are local paths: nothing is downloaded at run time.",
        "",
        "## Command",
        "",
        "```",
        command_line(),
        "```",
    ]
    for name, value in (sections or {}).items():
        if value in (None, {}, []):
            continue
        body = value if isinstance(value, str) else json.dumps(value, indent=2, sort_keys=True, default=str)
        lines += ["", f"## {name}", "", "```", body, "```"]
    path = Path(out) / CARD_NAME
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path


def native_loading_note(architecture: str) -> str:
    """How transformers reads a native uniter3m directory (text backbone only)."""
    return (
        f"`config.json` is an HF BERT config (`architectures: [{architecture}]`, plus uniter3m's frame-stream "
        "fields), and the backbone weights keep HF BERT names, so `transformers.BertModel.from_pretrained(dir)` "
        "loads the TEXT encoder (frame streams and task heads are reported as unused keys); "
        "`uniter3m.UniterModel.from_pretrained(dir)` loads everything. For a clean HF export (BERT encoder + "
        "MLM head, or a text classifier as BertForSequenceClassification) run "
        "`uniter3m convert --to hf-bert --checkpoint DIR --out HF_DIR`."
    )


def run_tokenizer_dir(run_config: Mapping[str, Any] | None) -> Path | None:
    """The tokenizer a run used: its `tokenizer` / `model.tokenizer` setting, else the folder its text
    databases were built with (their meta.json), else `model.init` when that folder holds one."""
    if not run_config:
        return None
    model = run_config.get("model") or {}
    candidates: list[Any] = [run_config.get("tokenizer"), model.get("tokenizer")]
    for db in _text_dbs(run_config):
        try:
            meta = json.loads((Path(db) / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        candidates.append((meta.get("tokenizer") or {}).get("name"))
    candidates.append(model.get("init"))
    return find_tokenizer_dir(c for c in candidates if isinstance(c, (str, os.PathLike)))


def _text_dbs(run_config: Mapping[str, Any]) -> list[str]:
    """Text database paths of a fine-tuning (`data.txt_db`) or pretraining (`datasets.*.txt_db`) config."""
    found: list[str] = []

    def add(value: Any) -> None:
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, Mapping):
            for v in value.values():
                add(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                add(v)

    add((run_config.get("data") or {}).get("txt_db"))
    for dataset in (run_config.get("datasets") or {}).values():
        if isinstance(dataset, Mapping):
            add(dataset.get("txt_db"))
    return found


def read_run_config(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """`<output_dir>/config.json`, the resolved config every run writes (None when absent or unreadable)."""
    try:
        data = json.loads((Path(output_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
