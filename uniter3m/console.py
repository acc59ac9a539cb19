"""What a command prints while it runs: the one logging set-up (one format) of every command."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _CommandHandler(logging.StreamHandler):
    """The handler `setup_logging` installs (told apart from handlers someone else installed)."""


def setup_logging(level: int = logging.INFO) -> None:
    """Log to stderr in LOG_FORMAT at `level`. Called again, it changes the level only; a process whose
    logging someone else configured (a test runner, an application embedding the library) is left alone."""
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, _CommandHandler)]
    if root.handlers and not ours:
        return
    if not ours:
        handler = _CommandHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    root.setLevel(level)
