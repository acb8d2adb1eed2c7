"""`npyrnn train | generate | gradcheck | info` (also `python -m npyrnn`): the arguments, and nothing else.

This module parses flags and calls the library: the model is built from flags in one place
(`build_model`), the run folder is written by `npyrnn.runs`, generation is
`npyrnn.generate.generate_stream`, the gradient check `npyrnn.gradcheck.check_model`, the
description of a checkpoint `npyrnn.info.checkpoint_info`.

Bad input (a missing or non-UTF-8 corpus, one too short for the batch shape, bad flag
values, an unreadable or mismatched checkpoint, an unusable backend) raises an
`npyrnn.errors.NpyrnnError`; `main` prints it as one line on stderr and exits with 2, as it
does for `OSError` and `MemoryError`. Any other exception is a bug and shows its traceback.
"""

import argparse
import copy
import json
import os
import sys
import warnings
from pathlib import Path

from npyrnn.errors import NpyrnnError, UsageError


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help, with every flag's default shown, except the noise of None and off switches."""

    def _format_action(self, action):
        if not action.help and self._shows_default(action):
            action = copy.copy(action)
            action.help = f"default {self._spec(action)}"  # a flag without help text still shows its default
        return super()._format_action(action)

    def _get_help_string(self, action):
        if self._shows_default(action) and "default" not in action.help:
            return f"{action.help} (default {self._spec(action)})"
        return action.help

    @staticmethod
    def _spec(action):
        return "%(default)r" if isinstance(action.default, str) else "%(default)s"

    @staticmethod
    def _shows_default(action):
        default = action.default
        return bool(action.option_strings) and not (default is None or default is False or default == argparse.SUPPRESS)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump), exit code 2; defaults shown in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def _typed(kind, check, what):
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    convert.__name__ = what
    return convert


positive_int = _typed(int, lambda v: v >= 1, "a positive integer")
nonnegative_int = _typed(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _typed(float, lambda v: v > 0 and v != float("inf"), "a positive number")
dropout_rate = _typed(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
nonnegative_float = _typed(float, lambda v: v >= 0 and v != float("inf"), "a non-negative number")
probability = _typed(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def _add_model_flags(p, hidden=512, gradcheck=False):
    g = p.add_argument_group("model")
    g.add_argument("--cell", choices=("rnn", "gru", "lstm"), default="rnn",
                   help="rnn: Elman (d2l chapter 8); gru, lstm: as torch.nn.GRU / nn.LSTM (d2l chapter 9)")
    g.add_argument("--hidden", type=positive_int, default=hidden, help="hidden units per layer")
    g.add_argument("--layers", type=positive_int, default=1, help="stacked recurrent layers")
    g.add_argument("--bidirectional", action="store_true", help="read each window in both directions")
    g.add_argument("--nonlinearity", choices=("tanh", "relu"), default="tanh", help="the Elman RNN's activation")
    g.add_argument("--dropout", type=dropout_rate, default=0.0, help="dropout between stacked layers, in [0, 1)")
    g.add_argument("--gru-reset", choices=("after", "before"), default="after",
                   help="GRU: reset gate after the hidden product (torch, cuDNN) or before it (d2l's scratch GRU)")
    g.add_argument("--proj-size", type=nonnegative_int, default=0,
                   help="LSTM: project h to this size (torch's proj_size; 0: none; below --hidden)")
    g.add_argument("--init", choices=("normal", "uniform"), default="uniform" if gradcheck else "normal",
                   help="normal: N(0, 0.01^2) weights, zero biases (d2l's scratch model); uniform: torch's default "
                        "(default %(default)s)")
    if gradcheck:  # accepted like train's model flags, but finite differences need float64
        g.add_argument("--dtype", choices=("float32", "float64"), default="float64",
                       help="ignored: the check always runs in float64 (float32 cannot resolve the differences)")
    else:
        g.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    g.add_argument("--seed", type=nonnegative_int, default=0, help="seed of weights and minibatch order")
    g.add_argument("--backend", choices=("numpy", "cupy"), default=None,
                   help="array backend (default: $NPYRNN_BACKEND, else numpy)")


def _add_data_flags(p):
    g = p.add_argument_group("data")
    g.add_argument("--corpus", default="timemachine",
                   help="'timemachine' (downloaded and cached, or found in $NPYRNN_DATA_DIR) or a UTF-8 text file")
    g.add_argument("--max-tokens", type=nonnegative_int, default=10000,
                   help="use the first N tokens of the corpus; 0 for all (default %(default)s)")
    g.add_argument("--token", choices=("char", "word"), default="char")
    g.add_argument("--raw", action="store_true",
                   help="keep every character (default: letters only, lower case, as d2l)")
    g.add_argument("--batch-size", type=positive_int, default=32)
    g.add_argument("--num-steps", type=positive_int, default=35, help="BPTT window T (default %(default)s)")
    g.add_argument("--random-iter", action="store_true", help="random minibatches (state reset each one)")


def build_parser():
    from npyrnn import __version__

    parser = Parser(prog="npyrnn", description="Recurrent language models with hand-derived BPTT on NumPy or CuPy.")
    parser.add_argument("--version", action="version", version=f"npyrnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    t = sub.add_parser("train", help="train a character-level RNN language model",
                       description="Train an RNN language model and write model.safetensors, metrics.csv, "
                                   "perplexity.png and summary.json into --out.")
    _add_data_flags(t)
    _add_model_flags(t)
    g = t.add_argument_group("training")
    g.add_argument("--epochs", type=positive_int, default=500)
    g.add_argument("--lr", type=positive_float, default=1.0, help="learning rate")
    g.add_argument("--optimizer", choices=("sgd", "momentum", "adagrad", "rmsprop", "adam", "adamw"), default="sgd",
                   help="sgd: plain SGD (d2l); momentum: SGD with --momentum; the others as torch.optim's")
    g.add_argument("--momentum", type=nonnegative_float, default=0.9, help="momentum of --optimizer momentum")
    g.add_argument("--weight-decay", type=nonnegative_float, default=None,
                   help="L2 penalty (decoupled for adamw); default 0, and 0.01 for adamw as torch")
    g.add_argument("--schedule", default="none",
                   help="learning-rate schedule: none, step:K:GAMMA, multistep:E1,E2:GAMMA, exp:GAMMA, "
                        "cosine[:ETA_MIN], warmup:K[:START], decay:AFTER:FACTOR (char-rnn)")
    g.add_argument("--clip", type=positive_float, default=1.0, help="global gradient-norm threshold (default 1)")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="cores for NumPy's matrix products (default: every core). With the fast extra the "
                        "products are split into blocks fixed by their shapes, so a run repeats bit for bit at "
                        "any count and a busy machine slows it to about one core's speed; without it, "
                        "OpenBLAS's threads, where 1 is steadier on a busy machine and a run repeats bit for "
                        "bit with the same count")
    g.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=False,
                   help="on CuPy: replay each minibatch from one CUDA graph (no dropout between layers; sgd, "
                        "momentum, adagrad or rmsprop); several times faster at the book's sizes")
    g.add_argument("--val-tokens", type=nonnegative_int, default=5000,
                   help="validate on the N tokens after the training tokens; 0: no validation (default %(default)s)")
    g = t.add_argument_group("run folder")
    g.add_argument("--out", default=None, help="output directory (default runs/CORPUS-hHIDDEN-ITER)")
    g.add_argument("--checkpoint-every", type=nonnegative_int, default=10,
                   help="epochs between checkpoints in OUT/checkpoint.safetensors; 0: only at the end "
                        "(default %(default)s)")
    g.add_argument("--resume", default=None, metavar="OUT",
                   help="continue the run in OUT with its saved settings (raise --epochs to train it further)")
    g.add_argument("--overwrite", action="store_true", help="replace a run that --out already holds")
    g.add_argument("--prefix", default=None,
                   help="prefix of the sample generations (default: 'time traveller' on The Time Machine, "
                        "else the corpus's first tokens)")
    g.add_argument("--sample-every", type=nonnegative_int, default=10, help="epochs between samples (0: none)")
    g.add_argument("--quiet", action="store_true", help="no progress bar and no samples; only the last line")
    t.set_defaults(func=cmd_train)

    gen = sub.add_parser("generate", help="generate text from a checkpoint",
                         description="Continue --prefix with a trained model and print it as it is generated. "
                                     "Sampling filters apply in the order temperature, top-k, top-p.")
    gen.add_argument("--checkpoint", type=Path, required=True, help="model.safetensors written by `npyrnn train`")
    gen.add_argument("--prefix", default="time traveller", help="text that warms the state up (not empty)")
    gen.add_argument("--length", type=nonnegative_int, default=50, help="tokens to generate")
    gen.add_argument("--temperature", type=nonnegative_float, default=0.0,
                     help="0: greedy; above 0: sample from softmax(logits / T)")
    gen.add_argument("--top-k", type=positive_int, default=None, help="sample among the K most likely tokens")
    gen.add_argument("--top-p", type=probability, default=None,
                     help="sample among the fewest most likely tokens whose probability reaches P (nucleus)")
    gen.add_argument("--num-samples", type=positive_int, default=1,
                     help="samples, generated together as one batch; more than 1 needs --temperature above 0")
    gen.add_argument("--stop", default=None, help="stop after this string appears in the generated text "
                                                   "(printed with it)")
    gen.add_argument("--seed", type=nonnegative_int, default=None,
                     help="seed of the sampling; sample i uses SEED+i (default: fresh entropy)")
    gen.add_argument("--no-stream", action="store_true",
                     help="print each sample when it is complete (greedy then needs no host sync per token)")
    gen.add_argument("--threads", type=positive_int, default=None,
                     help="cores for NumPy's matrix products (default: every core)")
    gen.add_argument("--backend", choices=("numpy", "cupy"), default=None,
                     help="array backend (default: $NPYRNN_BACKEND, else numpy)")
    gen.set_defaults(func=cmd_generate)

    c = sub.add_parser("gradcheck", help="check the hand gradient against finite differences",
                       description="Build the configured model in float64, take one minibatch of the corpus and "
                                   "compare every parameter's hand gradient with central differences along "
                                   "random directions. Prints the largest relative error; exit 1 above --tol.")
    _add_data_flags(c)
    _add_model_flags(c, hidden=512, gradcheck=True)
    c.add_argument("--directions", type=positive_int, default=2, help="random directions per parameter")
    c.add_argument("--tol", type=positive_float, default=1e-6, help="largest acceptable relative error")
    c.set_defaults(func=cmd_gradcheck)

    i = sub.add_parser("info", help="describe a checkpoint: cell, sizes, vocabulary, settings, final metrics",
                       description="Print what a checkpoint holds: the model's cell and sizes, its vocabulary, "
                                   "the training settings stored in it and, when summary.json sits beside it, "
                                   "the run's final metrics.")
    i.add_argument("checkpoint", type=Path, help="a model.safetensors written by `npyrnn train`")
    i.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    i.set_defaults(func=cmd_info)
    return parser


def _use_backend(args):
    if args.backend and "npyrnn.backend" not in sys.modules:
        os.environ["NPYRNN_BACKEND"] = args.backend  # the flag wins over an invalid NPYRNN_BACKEND
    from npyrnn import backend

    if args.backend:
        backend.set_backend(args.backend)
    return backend


def _default_out(args):
    name = Path(args.corpus).stem if args.corpus != "timemachine" else "timemachine"
    return Path("runs") / f"{name}-h{args.hidden}-{'random' if args.random_iter else 'sequential'}"


SETTINGS = ("corpus", "token", "raw", "max_tokens", "val_tokens", "hidden", "layers", "bidirectional",
            "nonlinearity", "init", "dtype", "epochs", "lr", "clip", "batch_size", "num_steps", "random_iter",
            "seed", "prefix", "checkpoint_every", "optimizer", "momentum", "weight_decay", "schedule", "cell",
            "dropout", "gru_reset", "proj_size", "threads", "cuda_graph")


def _check_cell_flags(args):
    """Flags that belong to another cell are usage errors, not silently ignored."""
    given = _given_flags(args.argv, args.command)
    if args.cell != "rnn" and "nonlinearity" in given:
        raise UsageError(f"--nonlinearity applies to --cell rnn only; the {args.cell.upper()} has its own gates")
    if args.cell != "gru" and "gru_reset" in given:
        raise UsageError("--gru-reset applies to --cell gru only")
    if args.cell != "lstm" and args.proj_size:
        raise UsageError("--proj-size applies to --cell lstm only")
    if args.proj_size >= args.hidden:
        raise UsageError(f"--proj-size {args.proj_size} must be below --hidden {args.hidden}")


def _given_flags(argv, command="train"):
    """The flags of `command` that `argv` gives explicitly (dest -> value), whatever their defaults."""
    parser = build_parser()
    for action in _subparsers(parser)[command]._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def _subparsers(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def cmd_train(args):
    backend = _use_backend(args)
    from npyrnn import runs

    if args.resume is not None:
        if args.out is not None or args.overwrite:
            raise UsageError("--resume OUT continues the run in OUT; drop --out and --overwrite")
        given = {k: v for k, v in _given_flags(args.argv).items() if k in SETTINGS}
        settings = runs.resume_settings(args.resume, given)
        out = args.resume
    else:
        _check_cell_flags(args)
        settings = {name: getattr(args, name) for name in SETTINGS}
        out = args.out if args.out is not None else _default_out(args)
    from npyrnn.optim import SGD

    probe = SGD({"probe": backend.xp.zeros(1)}, 1.0)
    runs.build_schedule(settings["schedule"], probe, settings["epochs"])  # a bad spec fails before any work
    return runs.train_run(settings, out, resume=args.resume is not None, overwrite=args.overwrite,
                          quiet=args.quiet, progress=False if args.quiet else None,
                          sample_every=0 if args.quiet else args.sample_every,
                          resume_hint=f"npyrnn train --resume {out}")


def cmd_generate(args):
    _use_backend(args).set_cpu_threads(args.threads)
    from npyrnn.checkpoint import load_checkpoint
    from npyrnn.generate import generate_stream, predict

    model, vocab, extra = load_checkpoint(args.checkpoint)
    if not extra.get("raw", False):  # the model saw d2l's cleaned text: clean the prefix the same way
        from npyrnn.data import clean_text

        args.prefix = clean_text(args.prefix)
    n = args.num_samples
    options = dict(temperature=args.temperature, top_k=args.top_k, seed=args.seed, token=extra.get("token", "char"),
                   top_p=args.top_p, num_samples=n, stop=args.stop)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.no_stream:
            texts = predict(args.prefix, args.length, model, vocab, **options)
        else:
            pieces = generate_stream(args.prefix, args.length, model, vocab, **options)  # checks everything first
    for w in caught:
        print(f"npyrnn: warning: {w.message}", file=sys.stderr)
    if args.no_stream:
        pieces = ((i, text) for i, text in enumerate(texts))
    _print_samples(pieces, n)
    return 0


def _print_samples(pieces, n):
    """Print `(i, piece)` pairs as they come: one sample alone; several under `--- sample I ---` lines.

    The samples are generated together, so the first streams and the others, kept meanwhile,
    follow when the batch is done.
    """
    out = sys.stdout
    later = [[] for _ in range(n)]
    if n > 1:
        out.write("--- sample 1 ---\n")
    for i, piece in pieces:
        if i == 0:
            out.write(piece)
            out.flush()
        else:
            later[i].append(piece)
    out.write("\n")
    for i in range(1, n):
        out.write(f"--- sample {i + 1} ---\n{''.join(later[i])}\n")
    out.flush()


def cmd_info(args):
    from npyrnn.info import checkpoint_info, format_info

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = checkpoint_info(args.checkpoint)
    for w in caught:
        print(f"npyrnn: warning: {w.message}", file=sys.stderr)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def cmd_gradcheck(args):
    backend = _use_backend(args)
    from npyrnn.gradcheck import check_model

    from npyrnn.runs import load_data

    _check_cell_flags(args)
    _, _, vocab, loader = load_data(vars(args))
    X, Y = next(iter(loader))
    from npyrnn.runs import build_model, check_memory

    check_memory(dict(vars(args), dtype="float64"), len(vocab))  # refuse, before allocating, what cannot fit
    model = build_model(vars(args), len(vocab), dtype="float64")  # finite differences need float64
    errors = check_model(model, X, Y, num_directions=args.directions, seed=args.seed)
    width = max(map(len, errors))
    for name, err in errors.items():
        print(f"{name:<{width}}  {err:.3e}")
    worst = max(errors, key=errors.get)
    ok = errors[worst] <= args.tol
    print(f"largest relative error {errors[worst]:.3e} ({worst}) on {backend.name}: "
          f"{'ok' if ok else 'FAILED'} (tolerance {args.tol:g})")
    return 0 if ok else 1


OOM_ADVICE = {
    "train": "use a smaller --hidden, --layers, --batch-size or --num-steps",
    "gradcheck": "use a smaller --hidden, --layers, --batch-size or --num-steps",
    "generate": "use a shorter --length or a smaller model",
}


def main(argv=None):
    """Entry point of the ``npyrnn`` command; returns the exit code."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return code
    except BrokenPipeError:  # the reader went away (`npyrnn generate ... | head -1`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's last flush goes nowhere
        return 141  # as a shell reports a command ended by SIGPIPE
    except (NpyrnnError, OSError) as exc:
        if os.environ.get("NPYRNN_DEBUG"):
            raise
        message = " ".join(str(exc).split()) or exc.__class__.__name__
        if isinstance(exc, OSError) and exc.filename:
            message = f"{exc.strerror or exc.__class__.__name__}: {exc.filename}"
        print(f"npyrnn: error: {message}", file=sys.stderr)
        return 2
    except MemoryError as exc:
        if os.environ.get("NPYRNN_DEBUG"):
            raise
        print(f"npyrnn: error: out of memory ({' '.join(str(exc).split()) or 'MemoryError'}); "
              f"{OOM_ADVICE.get(args.command, '')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("npyrnn: interrupted" + ("; no output was written" if args.command == "gradcheck" else ""),
              file=sys.stderr)
        return 130
