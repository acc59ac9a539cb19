"""The `uniter3m` command.

Each sub-command lives in its own module that defines `add_arguments(parser)` and
`run(args) -> int | None`. Only the chosen command's module is imported, so a slow or
optional dependency of one command never slows down or breaks another.
A `UserError` is printed without a traceback and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from uniter3m.errors import UserError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "build-txt-db": ("uniter3m.recipes.build_lmdb.build_txt_db", "tokenise transcripts into a text LMDB"),
    "build-feat-db": (
        "uniter3m.recipes.build_lmdb.build_feat_db",
        "pack face/speech frame features into an LMDB",
    ),
    "inspect": ("uniter3m.recipes.build_lmdb.inspect_db", "show what a database holds"),
    "merge-db": ("uniter3m.recipes.build_lmdb.merge_db", "join feature databases (e.g. --shard K/N outputs)"),
    "pretrain": ("uniter3m.recipes.pretrain.pretrain", "pretrain with a mix of tasks"),
    "finetune": ("uniter3m.recipes.downstream.finetune", "fine-tune and test on an emotion corpus"),
    "evaluate": ("uniter3m.recipes.downstream.evaluate", "score a checkpoint per modality case"),
    "convert": ("uniter3m.recipes.downstream.convert", "convert BERT/UNITER/MEmoBERT checkpoints"),
    "extract": ("uniter3m.recipes.downstream.extract", "write utterance embeddings to h5/npz"),
    "demo": ("uniter3m.recipes.pretrain.demo", "full run on a bundled synthetic corpus"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uniter3m",
        description="Multimodal (text, face, speech) pretraining and fine-tuning for emotion recognition.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items()),
    )
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND", help="see below")
    parser.add_argument("--version", action="version", version=_version())
    return parser


def _version() -> str:
    from uniter3m import __version__

    return f"uniter3m {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "--version"}:
        _top_parser().parse_args(argv or ["--help"])
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        _top_parser().parse_args([command])  # prints the usage error and exits 2
    module = importlib.import_module(COMMANDS[command][0])
    parser = argparse.ArgumentParser(prog=f"uniter3m {command}", description=COMMANDS[command][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except UserError as err:
        print(f"uniter3m {command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
