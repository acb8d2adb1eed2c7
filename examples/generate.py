"""Load a checkpoint and generate text from it, greedily and by sampling.

What it shows: ``load_checkpoint`` rebuilds the model, its vocabulary and the
settings it was trained with from one pickle-free ``.safetensors`` file (on
whichever backend is active), and ``predict`` continues a prefix either
greedily (``temperature=0``, d2l's ``predict_ch8``) or by drawing from
``softmax(logits / temperature)`` restricted to the ``top_k`` likeliest
characters, reproducibly from a seed.

Run it after one of the training examples:

    python examples/train_sequential.py --epochs 50 --hidden 128
    python examples/generate.py --checkpoint runs/example-sequential/model.safetensors --prefix "time traveller"
    python examples/generate.py --temperature 0.5 --top-k 3 --seed 1 --length 200

A missing or damaged checkpoint, a bad flag value or an unusable ``NPYRNN_BACKEND``
ends in one line on stderr and exit code 2, as with ``npyrnn generate``.
"""

import sys
from pathlib import Path

import _entry  # this folder is on sys.path when the script runs
from _entry import nonnegative_float, nonnegative_int, positive_int, probability


def main(argv=None):
    p = _entry.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=Path("runs/example-sequential/model.safetensors"))
    p.add_argument("--prefix", default="time traveller")
    p.add_argument("--length", type=nonnegative_int, default=50, help="characters to generate")
    p.add_argument("--temperature", type=nonnegative_float, default=0.8,
                   help="of the sampled text (0: greedy only, no sampled text)")
    p.add_argument("--top-k", type=positive_int, default=5)
    p.add_argument("--top-p", type=probability, default=None, help="nucleus sampling, after top-k (default off)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    args = p.parse_args(argv)

    from npyrnn import backend  # chooses NPYRNN_BACKEND here; an unusable one raises BackendError
    from npyrnn.checkpoint import load_checkpoint
    from npyrnn.generate import predict

    model, vocab, extra = load_checkpoint(args.checkpoint)  # a missing or bad file raises CheckpointError
    print(f"{args.checkpoint}: {model.config} on {backend.name}, trained with {extra}")
    token = extra.get("token", "char")
    greedy = predict(args.prefix, args.length, model, vocab, token=token)
    print(f"greedy:  {greedy}")
    if args.temperature > 0:
        sampled = predict(args.prefix, args.length, model, vocab, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, token=token)
        top_p = "" if args.top_p is None else f", top-p {args.top_p}"
        print(f"sampled: {sampled}   (temperature {args.temperature}, top-k {args.top_k}{top_p}, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(_entry.run(main, oom_advice="use a shorter --length"))
