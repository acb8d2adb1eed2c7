"""A training run and its folder: what `npyrnn train --out DIR` writes, how it survives, how it resumes.

A run folder holds:

| file | when | what |
|---|---|---|
| `metrics.csv` | grows one line per epoch | `epoch, perplexity, val_perplexity, tokens_per_s` |
| `checkpoint.safetensors` | every `--checkpoint-every` epochs, on interrupt, at the end | weights, optimiser state, every generator's state, epoch, metrics so far, the position inside the epoch and the carried state, the full settings |
| `best.safetensors` | when validation perplexity improves | the best model so far (a model file) |
| `model.safetensors` | at the end (or on interrupt) | weights, vocabulary and settings (`npyrnn.checkpoint`; no pickle) |
| `perplexity.png` | at the end (or on interrupt) | training and validation perplexity against epochs, log scale |
| `summary.json` | at the end (or on interrupt) | final and best perplexities, speed over the whole run, time, backend, settings, samples (strict JSON) |

Every file but `metrics.csv` is written atomically (staged, flushed, renamed: `npyrnn.files`),
and the four end files together, so a failure or a kill leaves the previous version, never
half of one. `metrics.csv` is rewritten from the checkpoint when a run resumes.

`train_run` drives `npyrnn.train.Trainer` with all of this: validation after every epoch,
checkpoints, SIGINT/SIGTERM (checkpoint, files so far, exit 130/143), divergence (exit 3, the
last good checkpoint kept, no bad weights saved) and bit-exact resume (`resume_settings`).
"""

import csv
import io
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

from npyrnn.errors import CheckpointError, DataError, UsageError
from npyrnn.files import atomic_write_bytes, write_files_together
from npyrnn.nn import kernels

__all__ = [
    "OUTPUT_FILES",
    "RUN_FILES",
    "EXIT_DIVERGED",
    "build_model",
    "load_data",
    "check_memory",
    "train_run",
    "resume_settings",
    "check_out_dir",
    "metrics_csv",
    "plot_png",
    "summary_json",
    "write_run",
    "read_summary",
    "read_metrics",
]

OUTPUT_FILES = ("model.safetensors", "metrics.csv", "perplexity.png", "summary.json")
RUN_FILES = OUTPUT_FILES + ("checkpoint.safetensors", "best.safetensors")
METRICS_FIELDS = ("epoch", "perplexity", "val_perplexity", "tokens_per_s", "lr")
EXIT_DIVERGED = 3
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


def check_out_dir(out, resume=False, overwrite=False):
    """Fail early, with one line, when `out` cannot become (or continue) a run folder.

    Raises
    ------
    UsageError
        `out` is empty, is a file, lies below a file, is not writable, holds one of the
        run's file names as something other than a file, or already holds a run while
        neither `resume` nor `overwrite` is given.
    """
    if str(out).strip() == "":
        raise UsageError("--out is empty; give a folder for the run's files, e.g. --out runs/tm512")
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
    if not resume and not overwrite and out.is_dir():
        found = [name for name in RUN_FILES if (out / name).exists()]
        if found:
            raise UsageError(
                f"--out {str(out)!r} already holds a run ({', '.join(found)}); continue it with "
                f"`npyrnn train --resume {out}`, replace it with --overwrite, or choose another --out"
            )


def clean_staging(out):
    """Remove staging folders that a killed write left in `out` (`.staging-*`)."""
    for leftover in Path(out).glob(".staging-*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


# ----------------------------------------------------------------------------- building a run


def build_model(settings, vocab_size, dtype=None):
    """The language model that a run's settings describe (the one place it is built from them)."""
    from npyrnn.models import RNNLM

    return RNNLM(vocab_size, settings["hidden"], num_layers=settings["layers"],
                 bidirectional=settings["bidirectional"], nonlinearity=settings["nonlinearity"],
                 dtype=dtype or settings["dtype"], init=settings["init"], seed=settings["seed"],
                 cell=settings.get("cell", "rnn"), dropout=settings.get("dropout", 0.0),
                 reset_after=settings.get("gru_reset", "after") == "after", proj_size=settings.get("proj_size", 0))


def load_data(settings):
    """Training ids, validation ids (or None), the vocabulary and the minibatch loader of a run.

    The training text is the first `max_tokens` tokens (all when 0); the validation text
    the `val_tokens` tokens right after them (d2l's newer edition: train on the first
    10,000, validate on the next 5,000). With `max_tokens` 0 the last `val_tokens` tokens
    are held out. The loader draws from a generator seeded with `seed`, so the same
    settings give the same minibatches on either backend.
    """
    from npyrnn import backend
    from npyrnn.data import SeqDataLoader, load_corpus

    ids, vocab = load_corpus(settings["corpus"], token=settings["token"], max_tokens=None, raw=settings["raw"])
    n_train, n_val = settings["max_tokens"] or 0, settings.get("val_tokens", 0) or 0
    if n_train == 0:
        train_ids, val_ids = (ids[:-n_val], ids[-n_val:]) if n_val else (ids, None)
    else:
        train_ids = ids[:n_train]
        val_ids = ids[n_train : n_train + n_val] if n_val else None
    rng = backend.default_rng(settings["seed"])  # a host numpy Generator: the same batches on either backend
    loader = SeqDataLoader(train_ids, settings["batch_size"], settings["num_steps"],
                           use_random_iter=settings["random_iter"], rng=rng)
    if val_ids is not None and len(val_ids) < 2:
        raise DataError(
            f"the corpus has {len(ids)} tokens, all used for training by --max-tokens {n_train or 'all'}, so none "
            f"are left for --val-tokens {n_val}; give a smaller --max-tokens (e.g. {max(1, len(ids) * 9 // 10)}), "
            "or --val-tokens 0 to train without validation"
        )
    return train_ids, val_ids, vocab, loader


def estimate_memory(settings, vocab_size):
    """Bytes a run needs, roughly: weights, gradients and optimiser buffers, activations and logits."""
    H, L, V = settings["hidden"], settings["layers"], vocab_size
    D = 2 if settings["bidirectional"] else 1
    G = {"rnn": 1, "gru": 3, "lstm": 4}[settings.get("cell", "rnn")]  # gates per cell
    B, T = settings["batch_size"], settings["num_steps"]
    itemsize = 8 if settings["dtype"] == "float64" else 4
    params = sum(D * G * H * ((V if k == 0 else D * H) + H + 2) for k in range(L)) + V * (D * H + 1)
    activations = L * D * (T + 1) * B * H * (3 * G + 2)
    logits = 3 * T * B * V
    return itemsize * (5 * params + activations + logits)


def check_memory(settings, vocab_size):
    """Refuse, with one line, a model and batch far beyond the active device's memory."""
    from npyrnn import backend

    need, have = estimate_memory(settings, vocab_size), backend.memory_bytes()
    if have is not None and need > have:
        raise UsageError(
            f"this model and batch need about {need / 2**30:,.1f} GiB but {backend.name} has {have / 2**30:,.1f} GiB; "
            "use a smaller --hidden, --layers, --batch-size or --num-steps"
        )


def default_prefix(settings, train_ids, vocab):
    """The sample prefix when none is given: d2l's 'time traveller', or the corpus's first tokens."""
    if settings["corpus"] == "timemachine" and settings["token"] == "char" and not settings["raw"]:
        return "time traveller"
    tokens = vocab.to_tokens([int(i) for i in train_ids[:10]])
    return ("" if settings["token"] == "char" else " ").join(tokens)


def resume_settings(out, given):
    """The settings of the run in `out`, with the flags a resume may change applied.

    Parameters
    ----------
    out : path
        The run folder (it must hold `checkpoint.safetensors`).
    given : dict
        The flags given explicitly on the command line (name -> value).

    Raises
    ------
    UsageError
        No checkpoint in `out`, or a given flag contradicts the saved settings.
    """
    from npyrnn.checkpoint import load_training_checkpoint

    if str(out).strip() == "":  # Path("") is the current folder
        raise UsageError("--resume is empty; give the run folder to continue, e.g. --resume runs/tm512")
    path = Path(out) / "checkpoint.safetensors"
    if not path.is_file():
        raise UsageError(f"--resume {str(out)!r}: no checkpoint.safetensors there (not a run folder, or the run "
                         "stopped before its first checkpoint); start it again with --out and --overwrite")
    _, _, settings, _, _ = load_training_checkpoint(path)
    changeable = {"epochs", "checkpoint_every", "prefix", "sample_every", "threads", "cuda_graph"}
    for name, value in given.items():
        if name in changeable or name not in settings:
            continue
        if settings[name] != value:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} {value} contradicts the run in {str(out)!r} ({name}={settings[name]!r}); "
                             f"drop {flag} to resume it, or start a new run with another --out")
    settings = dict(settings)
    settings.update({k: v for k, v in given.items() if k in changeable})
    return settings


def _finite(value):
    """`value` with nan and inf floats replaced by None, so that it is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def metrics_csv(history, header=True):
    """`metrics.csv` as bytes: a header and one line per epoch of `history` (dicts with METRICS_FIELDS)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=METRICS_FIELDS, lineterminator="\n", extrasaction="ignore", restval="")
    if header:
        writer.writeheader()
    writer.writerows(history)
    return text.getvalue().encode()


def plot_png(history, title):
    """`perplexity.png` as bytes: training and validation perplexity against epochs, log scale (headless).

    None where matplotlib is not installed (it is optional).
    """
    try:
        import matplotlib
    except ImportError:
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    epochs = [r["epoch"] for r in history]
    ax.plot(epochs, [r["perplexity"] for r in history], label="training")
    if any(r.get("val_perplexity") is not None for r in history):
        ax.plot(epochs, [r.get("val_perplexity") for r in history], label="validation")
        ax.legend(fontsize=8)
    ax.set_yscale("log")
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
    return [{k: (int(v) if k == "epoch" else float(v) if v != "" else None) for k, v in row.items()} for row in rows]


def _ended(out, epoch):
    """True when `out`'s end files are those of a run that finished at `epoch`.

    `summary.json` is renamed into place last, so a summary that says so means all end files
    are there; an older run's files (before `--resume --epochs` extended it) are not the end.
    """
    try:
        summary = read_summary(out)
    except (OSError, ValueError):
        return False
    return (isinstance(summary, dict) and summary.get("status") == "finished" and summary.get("epochs") == epoch
            and all((Path(out) / name).is_file() for name in OUTPUT_FILES))


# ----------------------------------------------------------------------------- running


class _Signals:
    """SIGINT and SIGTERM set a flag instead of stopping the process at a random line."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        for sig in EXIT_SIGNAL:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: keep Python's default handling
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _optimizer_state(optimizer):
    """The optimiser's buffers (tensors named `optimizer.state.<param>.<buffer>`) and JSON-able rest."""
    from npyrnn.optim import split_state_dict

    tensors, meta = split_state_dict(optimizer.state_dict())
    return {f"optimizer.{k}": v for k, v in tensors.items()}, meta


def _load_optimizer_state(optimizer, tensors, meta):
    from npyrnn.optim import join_state_dict

    prefix = "optimizer."
    optimizer.load_state_dict(join_state_dict({k[len(prefix):]: v for k, v in tensors.items()
                                               if k.startswith(prefix)}, meta))


OPTIMIZERS = ("sgd", "momentum", "adagrad", "rmsprop", "adam", "adamw")
SCHEDULES = {
    "none": "constant learning rate",
    "step:K:GAMMA": "multiply by GAMMA every K epochs (StepLR)",
    "multistep:E1,E2,...:GAMMA": "multiply by GAMMA at each listed epoch (MultiStepLR)",
    "exp:GAMMA": "multiply by GAMMA every epoch (ExponentialLR)",
    "cosine[:ETA_MIN]": "cosine annealing from lr to ETA_MIN over the run's epochs (CosineAnnealingLR)",
    "warmup:K[:START]": "linear warm-up from START*lr (default 1/3) to lr over K epochs (LinearLR)",
    "decay:AFTER:FACTOR": "char-rnn's decay: multiply by FACTOR after every epoch from AFTER on (MultiStepLR)",
}


def build_optimizer(settings, params):
    """The optimiser that a run's settings name, with torch's defaults for what they leave out.

    `sgd` is plain SGD (d2l); `momentum` is SGD with `momentum` (default 0.9); `adagrad`,
    `rmsprop`, `adam` and `adamw` are torch's. `weight_decay` applies to each (AdamW's is
    decoupled).
    """
    from npyrnn import optim

    name, lr, wd = settings.get("optimizer", "sgd"), settings["lr"], settings.get("weight_decay", 0.0) or 0.0
    if name == "sgd":
        return optim.SGD(params, lr, weight_decay=wd)
    if name == "momentum":
        return optim.SGD(params, lr, momentum=settings.get("momentum", 0.9), weight_decay=wd)
    kinds = {"adagrad": optim.Adagrad, "rmsprop": optim.RMSprop, "adam": optim.Adam, "adamw": optim.AdamW}
    if name not in kinds:
        raise UsageError(f"--optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}")
    if name == "adamw" and settings.get("weight_decay") is None:
        return optim.AdamW(params, lr)  # torch's default decoupled decay, 0.01
    return kinds[name](params, lr, weight_decay=wd)


def build_schedule(spec, optimizer, epochs):
    """The learning-rate schedule that `--schedule SPEC` names (see `SCHEDULES`), or None for 'none'."""
    from npyrnn import optim

    spec = (spec or "none").strip()
    kind, _, rest = spec.partition(":")
    args = rest.split(":") if rest else []

    def bad(why=""):
        forms = "; ".join(SCHEDULES)
        return UsageError(f"--schedule {spec!r} cannot be read{why}; use one of: {forms}")

    try:
        if kind == "none" and not args:
            return None
        if kind == "step" and len(args) == 2:
            return optim.StepLR(optimizer, int(args[0]), float(args[1]))
        if kind == "multistep" and len(args) == 2:
            return optim.MultiStepLR(optimizer, [int(e) for e in args[0].split(",")], float(args[1]))
        if kind == "exp" and len(args) == 1:
            return optim.ExponentialLR(optimizer, float(args[0]))
        if kind == "cosine" and len(args) <= 1:
            return optim.CosineAnnealingLR(optimizer, epochs, float(args[0]) if args else 0.0)
        if kind == "warmup" and 1 <= len(args) <= 2:
            start = float(args[1]) if len(args) == 2 else 1.0 / 3
            return optim.LinearLR(optimizer, start_factor=start, total_iters=int(args[0]))
        if kind == "decay" and len(args) == 2:
            after = int(args[0])
            return optim.MultiStepLR(optimizer, list(range(max(after, 1), epochs + 1)), float(args[1]))
    except ValueError as exc:  # a number that does not parse, or one out of its range
        raise bad(f" ({exc})") from None
    raise bad()


def train_run(settings, out, resume=False, overwrite=False, quiet=False, progress=None, sample_every=10,
              echo=print, resume_hint=None):
    """Train the run that `settings` describes in the folder `out`; return the exit code.

    Parameters
    ----------
    settings : dict
        Every setting of the run (the CLI's flags): corpus, tokens, model, optimisation,
        `epochs`, `val_tokens`, `checkpoint_every`, `prefix`, `seed`, `dtype`.
    out : path
        The run folder. With `resume`, it must hold `checkpoint.safetensors`, whose weights,
        optimiser, generators, metrics and position are restored.
    overwrite : bool
        Start afresh in a folder that holds an earlier run (its run files are removed).
    quiet : bool
        No progress bar, no samples; only the last line.
    sample_every : int
        Epochs between printed samples (0: none).
    echo : callable
        Where lines for the user go (stdout by default).
    resume_hint : str, optional
        The command that resumes this run, printed on interrupt.

    Returns
    -------
    int
        0 when done, `EXIT_DIVERGED` (3) when training diverged, 130 or 143 when SIGINT or
        SIGTERM stopped it (a resumable checkpoint written).
    """
    from npyrnn import backend
    from npyrnn.checkpoint import checkpoint_bytes, load_training_checkpoint, require_safetensors
    from npyrnn.generate import predict, split_prefix
    from npyrnn.train import Diverged, Trainer, evaluate, progress_bar

    require_safetensors("npyrnn train writes its checkpoints")
    backend.set_cpu_threads(settings.get("threads"))  # a missing threadpoolctl fails before anything is written
    kernels.enabled()  # and so does a bad NPYRNN_FUSED (NPYRNN_SPLIT_PRODUCTS: in set_cpu_threads)
    check_out_dir(out, resume=resume, overwrite=overwrite)  # before Path(): Path("") is "."
    out = Path(out)
    if settings.get("prefix") is not None:
        split_prefix(settings["prefix"], settings["token"])  # an empty prefix fails before anything else
    train_ids, val_ids, vocab, loader = load_data(settings)
    prefix = settings["prefix"] if settings.get("prefix") is not None else default_prefix(settings, train_ids, vocab)
    split_prefix(prefix, settings["token"])  # an empty prefix fails now, not after training
    check_memory(settings, len(vocab))
    model = build_model(settings, len(vocab))
    optimizer = build_optimizer(settings, model.params)
    schedule = build_schedule(settings.get("schedule"), optimizer, settings["epochs"])
    trainer = Trainer(model, loader, optimizer, settings["clip"], settings["random_iter"],
                      cuda_graph=settings.get("cuda_graph", False))
    extra = dict(settings, num_tokens=int(len(train_ids)), vocab_size=len(vocab))
    best = {"val_perplexity": None, "epoch": None}
    run_seconds = 0.0
    if resume:
        clean_staging(out)
        model_ck, vocab_ck, _, tensors, training = load_training_checkpoint(out / "checkpoint.safetensors")
        if vocab_ck.idx_to_token != vocab.idx_to_token or training.get("num_train_tokens") != len(train_ids):
            raise CheckpointError(f"checkpoint {str(out / 'checkpoint.safetensors')!r}: the corpus "
                                  f"{settings['corpus']!r} no longer gives the tokens this run was trained on; "
                                  "restore the original corpus file to resume")
        model.load_state_dict(model_ck.state_dict())
        trainer.load_state_dict(tensors, training["trainer"])
        _load_optimizer_state(optimizer, tensors, training["optimizer"])
        model.set_generator_state(training["model_rng"])  # the dropout masks to come
        if schedule is not None:
            schedule.load_state_dict(training["schedule"])
        best, run_seconds = training["best"], float(training["run_seconds"])
        finished = trainer.epoch >= settings["epochs"] and not trainer.in_epoch
        if finished and _ended(out, trainer.epoch):  # else killed while writing the end files: write them below
            raise UsageError(f"the run in {str(out)!r} has finished its {trainer.epoch} epochs; "
                             f"give --epochs above {trainer.epoch} to train it further")
        if trainer.epoch > settings["epochs"]:
            raise UsageError(f"the run in {str(out)!r} is at epoch {trainer.epoch}; --epochs must be at least that")
        atomic_write_bytes(out / "metrics.csv", metrics_csv(trainer.history))  # drop lines after the checkpoint
    else:
        if overwrite and out.is_dir():
            for name in RUN_FILES:
                if (out / name).is_file():
                    (out / name).unlink()
            clean_staging(out)
        write_files_together(out, {"metrics.csv": metrics_csv([])})  # creates out; removes it again on failure

    def training_state():
        tensors, meta = trainer.state_dict()
        opt_tensors, opt_meta = _optimizer_state(optimizer)
        meta = {"trainer": meta, "optimizer": opt_meta, "best": best, "run_seconds": run_seconds + elapsed(),
                "schedule": None if schedule is None else schedule.state_dict(),
                "model_rng": model.generator_state(),
                "num_train_tokens": int(len(train_ids))}
        return {**tensors, **opt_tensors}, _finite(meta)

    def write_checkpoint():
        atomic_write_bytes(out / "checkpoint.safetensors", checkpoint_bytes(model, vocab, extra, training_state()))

    session_start = time.perf_counter()

    def elapsed():
        return time.perf_counter() - session_start

    def end_files(status):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            samples = {prefix: predict(prefix, 50, model, vocab, token=settings["token"])}
        last = trainer.history[-1] if trainer.history else {}
        seconds = run_seconds + elapsed()
        summary = {
            "status": status,
            "perplexity": last.get("perplexity"), "val_perplexity": last.get("val_perplexity"),
            "best_val_perplexity": best["val_perplexity"], "best_epoch": best["epoch"],
            "tokens_per_s": trainer.tokens / seconds if seconds > 0 else None,
            "tokens_per_s_last_epoch": last.get("tokens_per_s"),
            "epochs": trainer.epoch, "epochs_planned": settings["epochs"], "seconds": seconds,
            "backend": backend.name, "fused_kernels": kernels.status(backend.xp),
            "blas_threads": backend.cpu_threads() if backend.name == "numpy" else None,
            "split_products": backend.split_products() if backend.name == "numpy" else None,
            "cuda_graph_replays": trainer.graph_replays, "samples": samples,
        }
        for key, value in extra.items():  # every setting, after the results
            summary.setdefault(key, value)
        kind = "random" if settings["random_iter"] else "sequential"
        title = (f"{settings['corpus']}: {settings.get('cell', 'rnn').upper()} h={settings['hidden']}, {kind}, "
                 f"{settings.get('optimizer', 'sgd')} lr={settings['lr']:g}"
                 + (f", {settings['schedule']}" if settings.get("schedule", "none") != "none" else ""))
        files = {
            "model.safetensors": checkpoint_bytes(model, vocab, extra=extra),
            "checkpoint.safetensors": checkpoint_bytes(model, vocab, extra, training_state()),
            "metrics.csv": metrics_csv(trainer.history),
            "perplexity.png": plot_png(trainer.history, title),
            "summary.json": summary_json(summary),
        }
        if files["perplexity.png"] is None:  # matplotlib is optional
            del files["perplexity.png"]
            print("npyrnn: note: perplexity.png not written: matplotlib is not installed (pip install matplotlib)",
                  file=sys.stderr)
        write_files_together(out, files)
        return samples, caught

    bar = progress_bar(total=settings["epochs"], initial=trainer.epoch, disable=(None if progress is None else not progress),
               unit="epoch", dynamic_ncols=True, leave=False)
    every = settings.get("checkpoint_every", 10)
    with _Signals() as signals, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unknown character in the prefix is reported once, at the end
        try:
            while trainer.epoch < settings["epochs"] or trainer.in_epoch:
                lr = optimizer.lr
                record = trainer.run_epoch(should_stop=lambda: signals.received is not None)
                if record is None:
                    break
                record["lr"] = lr
                if schedule is not None:
                    schedule.step()  # the next epoch's learning rate
                if val_ids is not None:
                    record["val_perplexity"] = evaluate(model, val_ids, settings["batch_size"], settings["num_steps"])
                    if best["val_perplexity"] is None or record["val_perplexity"] < best["val_perplexity"]:
                        best = {"val_perplexity": record["val_perplexity"], "epoch": record["epoch"]}
                        atomic_write_bytes(out / "best.safetensors", checkpoint_bytes(model, vocab, extra=extra))
                with open(out / "metrics.csv", "ab") as f:  # one line per epoch, for `tail -f`
                    f.write(metrics_csv([record], header=False))
                if every and trainer.epoch % every == 0:
                    write_checkpoint()
                bar.update(1)
                bar.set_postfix(perplexity=f"{record['perplexity']:.2f}", tokens_per_s=f"{record['tokens_per_s']:,.0f}")
                if not quiet and sample_every and trainer.epoch % sample_every == 0:
                    bar.write(f"epoch {trainer.epoch}: {predict(prefix, 50, model, vocab, token=settings['token'])!r}")
                if signals.received is not None:
                    break
        except Diverged as exc:
            bar.close()
            kept = (f"the last good checkpoint is kept in {out / 'checkpoint.safetensors'}"
                    if (out / "checkpoint.safetensors").exists() else "no checkpoint had been written yet")
            print(f"npyrnn: error: {exc}; {kept}, and the diverged weights were not saved", file=sys.stderr)
            return EXIT_DIVERGED
        bar.close()
        if signals.received is not None:
            end_files("interrupted")
            where = (f"in epoch {trainer.epoch + 1} after {trainer.batches_done} of {len(loader)} minibatches"
                     if trainer.in_epoch else f"after epoch {trainer.epoch}")
            hint = resume_hint or f"npyrnn train --resume {out}"
            print(f"npyrnn: interrupted by {signals.received.name} {where}; resume with: {hint}", file=sys.stderr)
            return EXIT_SIGNAL[signals.received]
        samples, caught = end_files("finished")
    for w in caught:
        print(f"npyrnn: warning: {w.message}", file=sys.stderr)
    last = trainer.history[-1]
    if not quiet:
        for text in samples.values():
            echo(text)
        echo(f"wrote {', '.join(f for f in OUTPUT_FILES if (out / f).exists())} to {out}")
    if not quiet and last.get("val_perplexity") is not None:
        echo(f"validation perplexity {last['val_perplexity']:.1f} (best {best['val_perplexity']:.1f} "
             f"at epoch {best['epoch']})")
    echo(f"perplexity {last['perplexity']:.1f}, {last['tokens_per_s']:.1f} tokens/s on {backend.name}")
    return 0
