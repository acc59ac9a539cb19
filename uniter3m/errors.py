"""One exception type for every user-facing error.

A `UserError` carries a message that names the file, the id and the fix. The CLI prints it
without a traceback and exits with status 2; nothing ends with `exit(0)` on failure.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, bad config or a broken database: something the user can fix."""


class ConfigError(UserError):
    """A configuration with one or more bad keys (the message lists every one of them)."""


class DatabaseError(UserError):
    """A database that is missing, incomplete, foreign or inconsistent with another one."""
