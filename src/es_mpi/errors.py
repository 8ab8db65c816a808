"""Every error es-mpi turns into an exit code (cli.py): the user's input, the run log, a replay
that disagrees with it, and a clean stop on a signal."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input: the message names the offending field (and file). Exit code 2."""


class RunLogError(RuntimeError):
    """The run log is missing, unreadable or inconsistent with what is asked of it. Exit 2."""


class ReplayMismatch(RuntimeError):
    """Weights rebuilt from the log differ from a logged checksum. Exit 3."""


class Interrupted(Exception):
    """The run stopped early on a signal at an iteration boundary; resumable. Exit 75."""
