"""Train d2l's "RNN from scratch" on The Time Machine with sequential minibatches.

What it shows: the whole Python API in one page (``load_corpus``,
``SeqDataLoader``, ``RNNLM``, ``train``, ``predict``, ``save_checkpoint``) with
the settings of d2l chapter 8.5: character level, the first 10,000 tokens,
hidden 512, batch 32, 35 steps, SGD with learning rate 1, gradient clipping at
norm 1, 500 epochs. Sequential minibatches continue each other, so the hidden
state is carried from one minibatch to the next (its gradient is cut).
d2l reaches a perplexity of about 1.0.

Run it (about two minutes on a 2-core CPU: the same settings took 107 s through
`npyrnn train` on this project's machine, see the README):

    python examples/train_sequential.py                         # d2l's settings
    NPYRNN_BACKEND=cupy python examples/train_sequential.py     # the same on a GPU
    python examples/train_sequential.py --epochs 20 --hidden 64 # a quick look

It writes ``OUT/model.safetensors`` (default ``runs/example-sequential``); read
it back with ``python examples/generate.py --checkpoint OUT/model.safetensors``.
The Time Machine is looked up in ``$NPYRNN_DATA_DIR``, then in the cache, then
downloaded; ``--corpus PATH`` trains on any UTF-8 text file instead. Bad input (a
flag value, a missing corpus, an unusable ``NPYRNN_BACKEND``) ends in one line on
stderr and exit code 2, as with ``npyrnn train``.
"""

import sys
from pathlib import Path

import _entry  # this folder is on sys.path when the script runs
from _entry import folder, nonnegative_int, positive_float, positive_int


def parse_args(argv, default_out):
    p = _entry.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default="timemachine", help="'timemachine' or a UTF-8 text file")
    p.add_argument("--max-tokens", type=nonnegative_int, default=10000,
                   help="first N characters, 0 for all (default 10000, as d2l)")
    p.add_argument("--hidden", type=positive_int, default=512, help="hidden units (default 512, d2l's scratch RNN)")
    p.add_argument("--epochs", type=positive_int, default=500)
    p.add_argument("--lr", type=positive_float, default=1.0)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--num-steps", type=positive_int, default=35)
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--out", type=folder, default=Path(default_out), help="folder for model.safetensors")
    return p.parse_args(argv)


def run(argv=None, use_random_iter=False):
    """Train with the given flags; ``use_random_iter`` picks d2l's random sampling."""
    kind = "random" if use_random_iter else "sequential"
    args = parse_args(argv, f"runs/example-{kind}")  # flags first: --help works whatever NPYRNN_BACKEND says

    import numpy

    from npyrnn import backend  # chooses NPYRNN_BACKEND here; an unusable one raises BackendError
    from npyrnn.checkpoint import save_checkpoint
    from npyrnn.data import SeqDataLoader, load_corpus
    from npyrnn.models import RNNLM
    from npyrnn.train import predict, train

    # text -> ids: lower-case letters and spaces, vocabulary of 28 ('<unk>', ' ', a-z)
    corpus, vocab = load_corpus(args.corpus, token="char", max_tokens=args.max_tokens)
    _entry.check_memory(args.hidden, args.batch_size, args.num_steps, len(vocab))  # one line, not an OOM kill
    # one generator for the whole run: every epoch draws a new offset (and order), the run repeats
    rng = numpy.random.default_rng(args.seed)
    train_iter = SeqDataLoader(corpus, args.batch_size, args.num_steps, use_random_iter=use_random_iter, rng=rng)
    # weights N(0, 0.01^2), biases 0: the scratch model's initialisation
    model = RNNLM(len(vocab), args.hidden, init="normal", seed=args.seed)
    print(f"{len(corpus)} tokens, vocabulary {len(vocab)}, {len(train_iter)} minibatches of "
          f"{args.batch_size} x {args.num_steps} per epoch, {kind} sampling, hidden {args.hidden}, on {backend.name}")

    every = max(1, args.epochs // 10)

    def log(epoch, perplexity, tokens_per_s):
        if epoch % every == 0 or epoch == args.epochs:
            print(f"epoch {epoch}: perplexity {perplexity:.2f}, {predict('time traveller', 50, model, vocab)!r}")

    history = train(model, train_iter, vocab, args.lr, args.epochs, clip=1.0, use_random_iter=use_random_iter,
                    progress=False, sample_every=0, on_epoch=log)

    last = history[-1]
    print(f"perplexity {last['perplexity']:.1f}, {last['tokens_per_s']:.1f} tokens/s on {backend.name}")
    print(predict("time traveller", 50, model, vocab))
    print(predict("traveller", 50, model, vocab))

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "model.safetensors"
    save_checkpoint(path, model, vocab, extra={"token": "char", "corpus": args.corpus, "epochs": args.epochs,
                                                "random_iter": use_random_iter, "perplexity": last["perplexity"]})
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(_entry.run(run))
