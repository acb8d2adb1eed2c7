"""The run folder that `npyrnn train --out DIR` fills: what is in it, how it is written, how it is read.

A finished run holds four files:

| file | what |
|---|---|
| `model.safetensors` | weights, vocabulary and settings (`npyrnn.checkpoint`; no pickle) |
| `metrics.csv` | one line per epoch: `epoch, perplexity, tokens_per_s` |
| `perplexity.png` | training perplexity against epochs |
| `summary.json` | final perplexity, speed, time, backend, every setting and the samples (strict JSON) |

All four are computed in memory first and then written together (`npyrnn.files`): staged
in the folder, flushed, and renamed into place, so a failure leaves the previous run's files
(or none), never a mix.
"""

import csv
import io
import json
import math
import os
from pathlib import Path

from npyrnn.errors import UsageError
from npyrnn.files import write_files_together

__all__ = [
    "OUTPUT_FILES",
    "check_out_dir",
    "metrics_csv",
    "plot_png",
    "summary_json",
    "write_run",
    "read_summary",
    "read_metrics",
]

OUTPUT_FILES = ("model.safetensors", "metrics.csv", "perplexity.png", "summary.json")
METRICS_FIELDS = ("epoch", "perplexity", "tokens_per_s")


def check_out_dir(out):
    """Fail early, with one line, when `out` cannot become a run folder.

    Raises
    ------
    UsageError
        `out` is a file, lies below a file, is not writable, or holds one of the run's
        file names as something other than a file.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file; give a directory (it is created if missing)")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--out {str(out)!r}: {str(parent)!r} is a file, so no directory can be made there")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--out {str(out)!r}: {str(parent)!r} is not writable; choose another directory")
    for name in OUTPUT_FILES:
        target = out / name
        if target.exists() and not target.is_file():
            raise UsageError(
                f"--out {str(out)!r}: {str(target)!r} exists and is not a file; remove it or choose another --out"
            )


def _finite(value):
    """`value` with nan and inf floats replaced by None, so that it is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def metrics_csv(history):
    """`metrics.csv` as bytes: a header and one line per epoch of `history` (dicts with METRICS_FIELDS)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=METRICS_FIELDS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    return text.getvalue().encode()


def plot_png(history, title):
    """`perplexity.png` as bytes: perplexity against epochs (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot([r["epoch"] for r in history], [r["perplexity"] for r in history])
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def summary_json(summary):
    """`summary.json` as bytes: strict JSON (nan and inf become null), indented."""
    return (json.dumps(_finite(summary), indent=2, allow_nan=False) + "\n").encode()


def write_run(out, files):
    """Write a run's files (name -> bytes) into `out` together: all or none (`write_files_together`)."""
    write_files_together(out, files)


def read_summary(out):
    """The `summary.json` of the run in `out`, as a dict."""
    return json.loads((Path(out) / "summary.json").read_text(encoding="utf-8"))


def read_metrics(out):
    """The rows of the run's `metrics.csv`: a list of dicts with int epochs and float values."""
    with open(Path(out) / "metrics.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()} for row in rows]
