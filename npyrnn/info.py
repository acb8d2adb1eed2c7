"""What a checkpoint holds, for `npyrnn info`: the model, its vocabulary, its training settings and results.

The checkpoint is read and checked by `npyrnn.checkpoint.load_checkpoint` (so a bad file is
a `CheckpointError`, one line). The run's results come from the checkpoint's metadata when
it holds them and from the `summary.json` that `npyrnn train` writes beside it.
"""

import json
import warnings
from pathlib import Path

__all__ = ["checkpoint_info", "format_info", "METRICS", "VOCAB_SHOWN"]

METRICS = ("perplexity", "val_perplexity", "best_val_perplexity", "best_epoch", "tokens_per_s", "seconds", "backend")
"""The keys of a run's results (the rest of a checkpoint's metadata are its settings)."""

VOCAB_SHOWN = 30
"""How many tokens of the vocabulary `checkpoint_info` lists (the first ones, by id)."""


def _summary_beside(path):
    """The `summary.json` in the checkpoint's folder as a dict, or None (with a warning when unreadable)."""
    summary = Path(path).parent / "summary.json"
    if not summary.is_file():
        return None
    try:
        value = json.loads(summary.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        warnings.warn(f"{str(summary)!r} beside the checkpoint is unreadable ({exc.__class__.__name__}); "
                      "its metrics are not shown", stacklevel=3)
        return None
    if not isinstance(value, dict):
        warnings.warn(f"{str(summary)!r} beside the checkpoint is not a JSON object; its metrics are not shown",
                      stacklevel=3)
        return None
    return value


def checkpoint_info(path):
    """A JSON-ready description of the checkpoint at `path`.

    Parameters
    ----------
    path : str or Path
        A `model.safetensors` written by `npyrnn train` (or `save_checkpoint`).

    Returns
    -------
    dict
        `checkpoint` (the path), `cell` (`'rnn'` unless the config names another),
        `nonlinearity` (the RNN's; None for the GRU and LSTM), `reset_after` (the GRU's;
        else None), `proj_size` (the LSTM's; else None), `dtype`, `vocab_size`, `hidden`, `layers`, `directions`,
        `parameters` (how many numbers), `token` (`'char'` or `'word'`), `vocabulary` (the
        first `VOCAB_SHOWN` tokens), `settings` (the training settings stored in the
        checkpoint), `metrics` (results found in the checkpoint or in `summary.json` beside
        it, which wins) and `summary` (the path of that `summary.json`, or None).

    Raises
    ------
    CheckpointError
        The file is missing or is not a valid npyrnn checkpoint.
    """
    from npyrnn.checkpoint import load_checkpoint

    model, vocab, extra = load_checkpoint(path)
    config = model.config
    settings = {k: v for k, v in extra.items() if k not in METRICS}
    metrics = {k: extra[k] for k in METRICS if k in extra}
    summary = _summary_beside(path)
    if summary is not None:
        metrics.update({k: summary[k] for k in METRICS if k in summary})
    cell = config.get("cell", "rnn")
    return {
        "checkpoint": str(path),
        "cell": cell,
        "nonlinearity": config.get("nonlinearity") if cell == "rnn" else None,
        "reset_after": config.get("reset_after", True) if cell == "gru" else None,
        "proj_size": config.get("proj_size", 0) if cell == "lstm" else None,
        "dtype": str(config.get("dtype")),
        "vocab_size": len(vocab),
        "hidden": config["num_hiddens"],
        "layers": config["num_layers"],
        "directions": 2 if config.get("bidirectional") else 1,
        "parameters": sum(int(p.size) for p in model.params.values()),
        "token": extra.get("token", "char"),
        "vocabulary": list(vocab.idx_to_token[:VOCAB_SHOWN]),
        "settings": settings,
        "metrics": metrics,
        "summary": None if summary is None else str(Path(path).parent / "summary.json"),
    }


def _value(v):
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def _cell(info):
    """'rnn (tanh)', 'gru (reset after)', 'lstm', 'lstm (proj_size 4)'."""
    if info.get("nonlinearity"):
        return f"{info['cell']} ({info['nonlinearity']})"
    if info.get("reset_after") is not None:
        return f"{info['cell']} (reset {'after' if info['reset_after'] else 'before'})"
    if info.get("proj_size"):
        return f"{info['cell']} (proj_size {info['proj_size']})"
    return info["cell"]


def format_info(info):
    """`checkpoint_info`'s dict as the text `npyrnn info` prints: one `name  value` pair a line."""
    shown = ", ".join(map(repr, info["vocabulary"]))
    more = info["vocab_size"] - len(info["vocabulary"])
    lines = [
        ("checkpoint", info["checkpoint"]),
        ("cell", _cell(info)),
        ("vocabulary", f"{info['vocab_size']} {info['token']} tokens: {shown}{f', ... ({more} more)' if more else ''}"),
        ("hidden", info["hidden"]),
        ("layers", info["layers"]),
        ("directions", info["directions"]),
        ("parameters", f"{info['parameters']:,} ({info['dtype']})"),
    ]
    out = [f"{name:<12}{value}" for name, value in lines]
    if info["settings"]:
        out.append("training settings:")
        width = max(map(len, info["settings"]))
        out += [f"  {k:<{width}}  {v}" for k, v in info["settings"].items()]
    if info["metrics"]:
        source = f" (from {info['summary']})" if info["summary"] else ""
        out.append(f"final metrics{source}:")
        width = max(map(len, info["metrics"]))
        out += [f"  {k:<{width}}  {_value(v)}" for k, v in info["metrics"].items()]
    else:
        out.append("final metrics: none recorded (no summary.json beside the checkpoint)")
    return "\n".join(out)
