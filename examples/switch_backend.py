"""Choose NumPy or CuPy with the environment variable NPYRNN_BACKEND.

What it shows: the same code runs on the CPU or on an NVIDIA GPU. The backend
is picked once, when ``npyrnn.backend`` is first imported, from
``NPYRNN_BACKEND`` (``numpy``, the default, or ``cupy``); ``backend.name``
and ``backend.xp`` say which one is active, every parameter and minibatch is
created there, and ``backend.to_numpy`` brings results back to the host. The
script trains a tiny model on The Time Machine and prints where its weights
live. ``backend.set_backend('numpy')`` switches at run time; with cupy present
the script also checks that one seed gives the same initial weights on both.

Run it:

    python examples/switch_backend.py                       # NumPy
    NPYRNN_BACKEND=cupy python examples/switch_backend.py   # CuPy (pip install npyrnn[gpu])
    python examples/switch_backend.py --epochs 2 --hidden 8 --max-tokens 1000

Where cupy cannot import or sees no GPU, the CuPy run stops with one line
that says what to install or to use NPYRNN_BACKEND=numpy (exit code 2); so does
an unknown NPYRNN_BACKEND, a bad flag value or a missing corpus.
"""

import os
import sys

import _entry  # this folder is on sys.path when the script runs
from _entry import positive_int


def main(argv=None):
    p = _entry.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default="timemachine")
    p.add_argument("--max-tokens", type=positive_int, default=5000)
    p.add_argument("--hidden", type=positive_int, default=64)
    p.add_argument("--epochs", type=positive_int, default=5)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--num-steps", type=positive_int, default=35)
    args = p.parse_args(argv)

    from npyrnn import backend  # reads NPYRNN_BACKEND here, once; an unusable one raises BackendError (_entry.run)
    import numpy

    from npyrnn.data import SeqDataLoader, load_corpus
    from npyrnn.models import RNNLM
    from npyrnn.train import predict, train

    print(f"NPYRNN_BACKEND={os.environ.get('NPYRNN_BACKEND', '') or '(unset)'} -> backend.name = {backend.name!r}, "
          f"backend.xp = {backend.xp.__name__}")

    corpus, vocab = load_corpus(args.corpus, max_tokens=args.max_tokens)
    _entry.check_memory(args.hidden, args.batch_size, args.num_steps, len(vocab))  # one line, not an OOM kill
    loader = SeqDataLoader(corpus, args.batch_size, args.num_steps, rng=numpy.random.default_rng(0))
    model = RNNLM(len(vocab), args.hidden, seed=0)
    X, _ = next(iter(loader))
    weight = model.params["rnn.weight_hh_l0"]
    print(f"minibatch X: {type(X).__module__}.{type(X).__name__} {X.shape}; "
          f"rnn.weight_hh_l0: {type(weight).__module__}.{type(weight).__name__} {weight.shape} {weight.dtype}")

    history = train(model, loader, vocab, lr=1.0, num_epochs=args.epochs, progress=False, sample_every=0)
    host = backend.to_numpy(model.params["linear.weight"])  # a numpy copy, wherever the model lives
    print(f"linear.weight on the host: {type(host).__module__}.{type(host).__name__}, norm {numpy.linalg.norm(host):.4f}")
    print(predict("time traveller", 30, model, vocab))

    if backend.is_cupy_available():
        # one seed, the same weights on both backends: they are drawn on the host, then copied
        first = backend.name
        on = {}
        for name in ("numpy", "cupy"):
            backend.set_backend(name)
            on[name] = backend.to_numpy(RNNLM(len(vocab), args.hidden, seed=0).params["rnn.weight_hh_l0"])
        backend.set_backend(first)
        print(f"same seed on numpy and cupy: initial weights equal = {bool((on['numpy'] == on['cupy']).all())}")
    else:
        print("cupy is not usable here; NPYRNN_BACKEND=cupy needs `pip install npyrnn[gpu]` and an NVIDIA GPU")

    last = history[-1]
    print(f"perplexity {last['perplexity']:.1f}, {last['tokens_per_s']:.1f} tokens/s on {backend.name}")
    return 0


if __name__ == "__main__":
    sys.exit(_entry.run(main))
