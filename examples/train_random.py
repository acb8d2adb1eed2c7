"""Train d2l's "RNN from scratch" with random sampling instead of sequential minibatches.

What it shows: the one switch between d2l's two ways of cutting the corpus,
``SeqDataLoader(..., use_random_iter=True)`` and ``train(..., use_random_iter=True)``.
Each minibatch is then a set of random, non-adjacent windows, so the hidden
state starts from zeros every minibatch instead of being carried over. d2l
reaches a perplexity of about 1.3 this way (about 1.0 sequentially).
Everything else (flags, defaults: hidden 512, 500 epochs, lr 1, batch 32,
35 steps) is ``train_sequential.py``'s.

Run it:

    python examples/train_random.py                          # d2l's settings
    python examples/train_random.py --epochs 20 --hidden 64  # a quick look
    NPYRNN_BACKEND=cupy python examples/train_random.py      # on a GPU

It writes ``OUT/model.safetensors`` (default ``runs/example-random``).
"""

import sys

import _entry  # this folder is on sys.path when the script runs
from train_sequential import run

if __name__ == "__main__":
    sys.exit(_entry.run(run, use_random_iter=True))
