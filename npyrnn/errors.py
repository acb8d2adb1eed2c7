"""The errors npyrnn raises for bad input. Each message is one line: what is wrong, then how to fix it.

Every one derives from `NpyrnnError`, so a caller (the CLI first of all) can tell bad input
from a bug: the CLI prints these, `OSError` and `MemoryError` as one line and exits with 2;
any other exception is a bug in npyrnn and shows its traceback.

The classes also derive from the built-in exception that fits (`ValueError` or
`RuntimeError`), so `except ValueError` keeps working. This module imports nothing, so the
CLI can catch `BackendError` even when the backend itself fails to start.
"""

__all__ = ["NpyrnnError", "BackendError", "DataError", "CheckpointError", "UsageError"]


class NpyrnnError(Exception):
    """Base class of every error that reports bad input rather than a bug."""


class BackendError(NpyrnnError, RuntimeError):
    """The requested backend is unknown or cannot run on this machine."""


class DataError(NpyrnnError, ValueError):
    """Bad data input: a missing or unreadable corpus, impossible batch sizes, a failed download."""


class CheckpointError(NpyrnnError, ValueError):
    """A checkpoint file is missing, unreadable, or does not match what it claims to hold."""


class UsageError(NpyrnnError, ValueError):
    """An argument (or a combination of CLI flags) that cannot work, e.g. an empty prefix."""
