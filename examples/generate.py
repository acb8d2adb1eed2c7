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
"""

import argparse
import sys
from pathlib import Path

from npyrnn import backend
from npyrnn.checkpoint import CheckpointError, load_checkpoint
from npyrnn.train import predict


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=Path("runs/example-sequential/model.safetensors"))
    p.add_argument("--prefix", default="time traveller")
    p.add_argument("--length", type=int, default=50, help="characters to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="of the sampled text (0 would be greedy)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    try:
        model, vocab, extra = load_checkpoint(args.checkpoint)
    except CheckpointError as exc:
        print(f"generate.py: {exc}", file=sys.stderr)
        return 2
    print(f"{args.checkpoint}: {model.config} on {backend.name}, trained with {extra}")
    token = extra.get("token", "char")
    greedy = predict(args.prefix, args.length, model, vocab, token=token)
    sampled = predict(args.prefix, args.length, model, vocab, temperature=args.temperature, top_k=args.top_k,
                      seed=args.seed, token=token)
    print(f"greedy:  {greedy}")
    print(f"sampled: {sampled}   (temperature {args.temperature}, top-k {args.top_k}, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
