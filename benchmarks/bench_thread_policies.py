#!/usr/bin/env python
"""Thread policies for npyrnn's training, quiet and with busy processes: whole-epoch tokens/s.

Policies (OpenBLAS through threadpoolctl): ``every-core`` (the default: 2 threads here),
``recurrence-1`` (the cells' time loops at 1 thread, the large products at every core) and
``one`` (1 thread for everything, ``npyrnn train --threads 1``). Each is timed on one epoch of
d2l's job (10,000 characters, batch 32, 35 steps, SGD lr 1, clipping 1) for the RNN at hidden
512 and the LSTM at 256, ``--reps`` times in rotation, with 0, 1 and 2 busy processes.

    NPYRNN_DATA_DIR=../shared/data python benchmarks/bench_thread_policies.py --reps 3

Prints the median tokens/s per policy; measured in docs/performance.md ("A busy machine").
"""

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from threadpoolctl import ThreadpoolController  # noqa: E402

from npyrnn.data import SeqDataLoader, load_corpus  # noqa: E402
from npyrnn.models import RNNLM  # noqa: E402
from npyrnn.nn import GRU, LSTM, RNN  # noqa: E402
from npyrnn.optim import SGD  # noqa: E402
from npyrnn.train import train_epoch  # noqa: E402

BLAS = next(c for c in ThreadpoolController().lib_controllers if c.user_api == "blas")
ALL = os.cpu_count() or 1
POLICIES = {"every-core": (ALL, None), "recurrence-1": (ALL, 1), "one": (1, None)}
RECURRENCE = {"threads": None}  # the time loops' thread count, or None: as the rest


def _at_recurrence_threads(method):
    def run(self, *args):
        n = RECURRENCE["threads"]
        if n is None:
            return method(self, *args)
        before = BLAS.num_threads
        BLAS.set_num_threads(n)
        try:
            return method(self, *args)
        finally:
            BLAS.set_num_threads(before)

    return run


for cls in (RNN, GRU, LSTM):
    cls._scan = _at_recurrence_threads(cls._scan)
    cls._scan_back = _at_recurrence_threads(cls._scan_back)


def _busy():
    while True:
        pass


def epoch(corpus, vocab, cell, hidden):
    model = RNNLM(len(vocab), hidden, cell=cell, seed=0)
    optimizer = SGD(model.params, 1.0)
    loader = SeqDataLoader(corpus, 32, 35, rng=np.random.default_rng(0))
    tokens = len(loader) * 32 * 35
    start = time.perf_counter()
    train_epoch(model, iter(loader), optimizer, clip=1.0)
    return tokens / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    corpus, vocab = load_corpus("timemachine", token="char", max_tokens=10000)[:2]
    for busy in args.busy:
        procs = [mp.Process(target=_busy, daemon=True) for _ in range(busy)]
        for proc in procs:
            proc.start()
        time.sleep(0.5)
        for cell, hidden in (("rnn", 512), ("lstm", 256)):
            epoch(corpus, vocab, cell, hidden)  # warm-up (and the kernels' first compile)
            speeds = {name: [] for name in POLICIES}
            for _ in range(args.reps):
                for name, (threads, recurrence) in POLICIES.items():
                    BLAS.set_num_threads(threads)
                    RECURRENCE["threads"] = recurrence
                    speeds[name].append(epoch(corpus, vocab, cell, hidden))
            print(f"busy={busy} {cell} {hidden}: " + ", ".join(
                f"{name} {statistics.median(v):,.0f}" for name, v in speeds.items()) + " tokens/s", flush=True)
        for proc in procs:
            proc.terminate()
        BLAS.set_num_threads(ALL)


if __name__ == "__main__":
    main()
