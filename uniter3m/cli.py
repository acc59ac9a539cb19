"""The `uniter3m` command.

Each sub-command lives in its own module (a recipe) that defines `add_arguments(parser)` and
`run(args) -> int | None`; every command logs through the one set-up (`console.setup_logging`). Only the chosen command's module is imported, so a slow or
optional dependency of one command never slows down or breaks another.
A `UserError` is printed without a traceback and exits with status 2; no command at all prints
the help and exits 2; Ctrl-C (SIGINT) prints one line and exits 130 (128 + SIGINT, as shells do);
a closed stdout (`uniter3m inspect DB --json | head`) ends the command quietly with 141
(128 + SIGPIPE, what a tool killed by the pipe reports).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from uniter3m.console import setup_logging
from uniter3m.errors import UserError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "build-txt-db": ("uniter3m.recipes.build_lmdb.build_txt_db", "tokenise transcripts into a text LMDB"),
    "build-feat-db": (
        "uniter3m.recipes.build_lmdb.build_feat_db",
        "pack feature files (npz/h5/csv/OpenFace) into an LMDB",
    ),
    "build-media-db": (
        "uniter3m.recipes.build_lmdb.build_media_db",
        "recordings (wav/video) -> features by a registered extractor -> an LMDB",
    ),
    "inspect": ("uniter3m.recipes.build_lmdb.inspect_db", "show what a database holds"),
    "merge-db": ("uniter3m.recipes.build_lmdb.merge_db", "join feature databases (e.g. --shard K/N outputs)"),
    "pretrain": ("uniter3m.recipes.pretrain.pretrain", "pretrain with a mix of tasks"),
    "finetune": ("uniter3m.recipes.downstream.finetune", "fine-tune and test on an emotion corpus"),
    "summary": ("uniter3m.recipes.downstream.summary", "mean ± std over fine-tuning runs (seeds)"),
    "evaluate": ("uniter3m.recipes.downstream.evaluate", "score a checkpoint per modality case"),
    "convert": ("uniter3m.recipes.downstream.convert", "convert BERT/UNITER/MEmoBERT checkpoints"),
    "extract": ("uniter3m.recipes.downstream.extract", "write utterance embeddings to h5/npz"),
    "demo": ("uniter3m.recipes.pretrain.demo", "full run on a bundled synthetic corpus"),
    "config": ("uniter3m.recipes.downstream.config_show", "config show: print a resolved config (JSON/YAML)"),
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
    """Run one command; the exit status (see the module docstring)."""
    return _main(list(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    if not argv:
        _top_parser().print_help(sys.stderr)
        return 2
    if argv[0] in {"-h", "--help", "--version"}:
        _top_parser().parse_args(argv)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        _top_parser().parse_args([command])  # prints the usage error and exits 2
    try:
        module = importlib.import_module(COMMANDS[command][0])
        parser = argparse.ArgumentParser(prog=f"uniter3m {command}", description=COMMANDS[command][1])
        module.add_arguments(parser)
        args = parser.parse_args(rest)
        setup_logging()
        status = int(module.run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here, inside the handler below
        return status
    except UserError as err:
        print(f"uniter3m {command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"uniter3m {command}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 141


def _silence_stdout() -> None:
    """The reader of stdout went away: point stdout at /dev/null so the exit flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
