"""The entry point every example shares: bad input is one line on stderr and exit code 2, like `npyrnn`.

Not an example itself: the scripts import it from their own folder (on `sys.path` when a
script runs). `Parser` is the `npyrnn` command's argparse, whose usage errors are one line (no
usage dump); `positive_int` and friends (also the command's) reject impossible flag values while
parsing; `folder` an empty output folder name; `check_memory`
refuses a model far beyond the machine's memory; `run` calls a
script's `main` and turns `npyrnn.errors.NpyrnnError` (an unusable backend, a missing corpus
or checkpoint, impossible sizes), `OSError` and `MemoryError` into
`NAME: error: MESSAGE` and exit code 2. Any other exception is a bug and keeps its
traceback; `NPYRNN_DEBUG=1` shows the traceback of the handled ones too.

`npyrnn.backend` chooses its backend when it is first imported and raises `BackendError`
for an unusable `NPYRNN_BACKEND`, so the scripts import the library inside `main`, where
`run` catches it.
"""

import argparse
import os
import sys
from pathlib import Path

# the `npyrnn` command's own parser and flag types (npyrnn.cli imports only the standard library and
# npyrnn.errors at import time, so they work whatever NPYRNN_BACKEND says)
from npyrnn.cli import Parser, nonnegative_float, nonnegative_int, positive_float, positive_int, probability
from npyrnn.errors import NpyrnnError

__all__ = ["Parser", "positive_int", "nonnegative_int", "positive_float", "nonnegative_float", "probability", "folder",
           "check_memory", "run"]


def folder(text):
    """A folder to write into, as a Path; an empty name (which Path reads as the current folder) is refused."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder name; give one, e.g. runs/mine")
    return Path(text)


def check_memory(hidden, batch_size, num_steps, vocab_size):
    """Refuse, with `UsageError`, a model and batch far beyond the machine's memory (as `npyrnn train` does).

    Without it, `--hidden 100000000` is killed by the kernel, with no message, while its
    weights are drawn.
    """
    from npyrnn.runs import check_memory

    check_memory({"hidden": hidden, "layers": 1, "bidirectional": False, "batch_size": batch_size,
                  "num_steps": num_steps, "dtype": "float32"}, vocab_size)


def _one_line(text):
    return " ".join(str(text).split())


def run(main, *args, oom_advice="use a smaller --hidden, --batch-size or --num-steps", **kwargs):
    """Call `main(*args, **kwargs)` and return its exit code; bad input ends in one line on stderr.

    Parameters
    ----------
    main : callable
        The script's entry point, returning an exit code.
    *args, **kwargs
        Passed to `main`.
    oom_advice : str
        What to change after a `MemoryError`: the flags of this script.

    Returns
    -------
    int
        What `main` returned; 2 after an `NpyrnnError`, `OSError` or `MemoryError`; 130
        after Ctrl-C; 141, quietly, when the reader of the output went away.
    """
    prog = Path(sys.argv[0]).name or "example"
    debug = bool(os.environ.get("NPYRNN_DEBUG"))
    try:
        code = main(*args, **kwargs)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return code
    except BrokenPipeError:  # the reader went away (`... | head -1`): quietly, as `npyrnn` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (NpyrnnError, OSError) as exc:
        if debug:
            raise
        message = _one_line(exc) or exc.__class__.__name__
        if isinstance(exc, OSError) and exc.filename:
            message = f"{exc.strerror or exc.__class__.__name__}: {exc.filename}"
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except MemoryError as exc:
        if debug:
            raise
        print(f"{prog}: error: out of memory ({_one_line(exc) or 'MemoryError'}); "
              f"{oom_advice}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
