"""`uniter3m config show`: print a config as a run would use it.

    uniter3m config show --config configs/downstream/meld_text.json --set optim.lr=3e-5
    uniter3m config show --config my_run.yaml --format yaml          # YAML in, YAML out
    uniter3m config show --config X --raw                            # overrides applied, not validated

The file (JSON or YAML, comments allowed in YAML) is read, every `--set` applied, and the result
validated with the schema its keys name (a `protocol` = fine-tuning, `tasks` = pretraining): the
printed config holds every default, the paths a run resolves (`model.init: "default"`, shipped
configs) and nothing unknown. Errors are listed all at once, as a run would list them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from uniter3m.config import add_set_argument, apply_overrides, config_text, read_json
from uniter3m.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["show"], help="show: print the resolved config")
    parser.add_argument("--config", required=True, type=Path, help="a config file (.json, .yaml, .yml)")
    add_set_argument(parser, "optim.lr=3e-5")
    parser.add_argument("--format", choices=["json", "yaml"], default=None, help="default: the file's own")
    parser.add_argument("--raw", action="store_true", help="print the merged config without validating it")


def resolve(path: str | Path, overrides: list[str], raw: bool = False) -> dict:
    """The config `path` with `overrides`, validated (every default filled in) unless `raw`."""
    from uniter3m.train.config import load_finetune_config, load_pretrain_config

    data = apply_overrides(read_json(path), overrides)
    if raw:
        return data
    if "protocol" in data:
        return load_finetune_config(data).model_dump(mode="json")
    if "tasks" in data:
        return load_pretrain_config(data).model_dump(mode="json")
    raise UserError(
        f"{path}: neither a fine-tuning config (no 'protocol') nor a pretraining one (no 'tasks')"
    )


def run(args: argparse.Namespace) -> int:
    fmt = args.format or ("yaml" if args.config.suffix in (".yaml", ".yml") else "json")
    print(config_text(resolve(args.config, args.overrides, args.raw), fmt))
    return 0
