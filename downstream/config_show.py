"""`uniter3m config show`: print a config as a run would use it.

    uniter3m config show --config configs/downstream/meld_text.json --set optim.lr=3e-5
    uniter3m config show --config my_run.yaml --format yaml          # YAML in, YAML out
    uniter3m config show --config X --raw                            # overrides applied, not validated

The file (JSON or YAML) is read, every `--set` applied, and the result validated with the schema its
keys name (`uniter3m.train.config.resolve_config`): the printed config holds every default, the paths
a run resolves and nothing unknown. Errors are listed all at once, as a run would list them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from uniter3m.config import YAML_SUFFIXES, add_set_argument, config_text
from uniter3m.train.config import resolve_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["show"], help="show: print the resolved config")
    parser.add_argument("--config", required=True, type=Path, help="a config file (.json, .yaml, .yml)")
    add_set_argument(parser, "optim.lr=3e-5")
    parser.add_argument("--format", choices=["json", "yaml"], default=None, help="default: the file's own")
    parser.add_argument("--raw", action="store_true", help="print the merged config without validating it")


def run(args: argparse.Namespace) -> int:
    fmt = args.format or ("yaml" if args.config.suffix in YAML_SUFFIXES else "json")
    print(config_text(resolve_config(args.config, args.overrides, args.raw), fmt))
    return 0
