"""npyrnn: recurrent networks with hand-derived backpropagation through time on NumPy or CuPy.

Submodules load on first use (``npyrnn.backend``, ``npyrnn.nn``, ``npyrnn.data``, ...).
The backend is chosen when ``npyrnn.backend`` is first imported, from
``NPYRNN_BACKEND``; a bad value raises `npyrnn.errors.BackendError` there.
"""

import importlib

__version__ = "0.1.0"
_SUBMODULES = ("backend", "nn", "losses", "optim", "data", "models", "train", "checkpoint", "gradcheck", "cli", "errors", "files",
               "generate", "runs", "info")
__all__ = [*_SUBMODULES, "__version__"]


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"npyrnn.{name}")
    raise AttributeError(f"module 'npyrnn' has no attribute {name!r}")
