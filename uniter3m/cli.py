"""The `uniter3m` command.

Each sub-command lives in its own module (a recipe) that defines `add_arguments(parser)` and
`run(args) -> int | None`; every command logs through the one set-up (`console.setup_logging`). Only the chosen command's module is imported, so a slow or
optional dependency of one command never slows down or breaks another.
A `UserError` is printed without a traceback and exits with status 2; no command at all prints
the help and exits 2; Ctrl-C (SIGINT) prints one line and exits 130 (128 + SIGINT, as shells do);
SIGTERM outside a training loop (which checkpoints and stops on its own) prints what was stopped
and how to go on, and exits 143 (128 + SIGTERM);
a closed stdout (`uniter3m inspect DB --json | head`) ends the command quietly with 141
(128 + SIGPIPE, what a tool killed by the pipe reports).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from uniter3m.console import setup_logging
from uniter3m.errors import UserError
from uniter3m.fileio import WRITE_ERRNOS, write_failed

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
    "corpora": (
        "uniter3m.recipes.build_lmdb.corpora",
        "the shared corpora (meld, iemocap, mosi, emodb, ravdess) -> databases",
    ),
    "merge-db": ("uniter3m.recipes.build_lmdb.merge_db", "join feature databases (e.g. --shard K/N outputs)"),
    "pretrain": ("uniter3m.recipes.pretrain.pretrain", "pretrain with a mix of tasks"),
    "finetune": ("uniter3m.recipes.downstream.finetune", "fine-tune and test on an emotion corpus"),
    "summary": ("uniter3m.recipes.downstream.summary", "mean ± std over fine-tuning runs (seeds)"),
    "evaluate": ("uniter3m.recipes.downstream.evaluate", "score a checkpoint per modality case"),
    "predict": ("uniter3m.recipes.downstream.predict", "emotions of new recordings (CSV, JSON, timeline)"),
    "convert": ("uniter3m.recipes.downstream.convert", "convert BERT/UNITER/MEmoBERT checkpoints"),
    "extract": ("uniter3m.recipes.downstream.extract", "write utterance embeddings to h5/npz"),
    "probe": ("uniter3m.recipes.downstream.probe", "linear probe (logistic regression) on frozen features"),
    "demo": ("uniter3m.recipes.pretrain.demo", "full run on a bundled synthetic corpus"),
    "config": ("uniter3m.recipes.downstream.config_show", "config show: print a resolved config (JSON/YAML)"),
}


#: how to go on after a command was stopped (default: run it again; nothing half-written is kept)
_GO_ON = {
    "pretrain": "run the same command with --resume auto: it continues from the newest checkpoint",
    "finetune": "run the same command with --resume auto: finished folds are kept, the others continue",
    "demo": "run the same command again: it rebuilds what it had not finished",
}


class Terminated(BaseException):
    """SIGTERM outside a training loop (a BaseException, like KeyboardInterrupt: cleanup code re-raises it)."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


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
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: signals stay as they are
        previous = None
    try:
        module = importlib.import_module(COMMANDS[command][0])
        routed = getattr(module, "route", lambda argv: None)(rest)
        if routed is not None:  # the same line belongs to a sibling command (build-feat-db -> build-media-db)
            command = routed
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
    except Terminated:
        go_on = _GO_ON.get(command, "run the same command again")
        print(
            f"uniter3m {command}: stopped by SIGTERM (outside a training step, e.g. while starting, building a "
            f"database or scoring the test split); nothing half-written was kept. To go on, {go_on}",
            file=sys.stderr,
        )
        return 128 + signal.SIGTERM
    except BrokenPipeError:
        _silence_stdout()
        return 141
    except OSError as err:  # a folder that refused a write (full, read-only): one line, not a traceback
        if err.errno not in WRITE_ERRNOS:
            raise
        folder = Path(err.filename).parent if err.filename else Path.cwd()
        print(f"uniter3m {command}: error: {write_failed(folder, err)}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


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
