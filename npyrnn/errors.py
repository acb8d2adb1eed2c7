"""Exceptions for bad input. Each message is one line: what is wrong, then how to fix it.

Kept in a module with no imports so that the CLI can catch them even when the
backend itself fails to start.
"""


class BackendError(RuntimeError):
    """The requested backend is unknown or cannot run on this machine."""
