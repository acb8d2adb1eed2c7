#!/usr/bin/env python
"""One of npyrnn's switches on and off, minibatch by minibatch in one process, part by part.

Whole-epoch pairs (``bench_train.py``) compare runs a minute apart, and on a shared machine the
load moves by more than a change worth 5%. Here one model trains d2l's job (float32, batch 32,
35 steps, SGD lr 1, clipping at 1, on the cores as ``npyrnn train --threads`` sets them) and the
switch flips between consecutive minibatches, so both sides see the same machine; each
minibatch is timed whole and part by part (``benchmarks/sections/floor.timed_parts``). Prints
the median of each part with the switch on and off, and their difference.

    python benchmarks/bench_ab.py --switch halves --cell gru --hidden 256 --epochs 30
    python benchmarks/bench_ab.py --switch halves --cell lstm --load 1   # one busy process competing

Switches: ``halves`` (``cpu_loops.halves``: the gated cells' kernels shared by rows with the
helper), ``loops`` (``cpu_loops.enabled``: the compiled time loops), ``fused``
(``kernels.set_enabled``: the fused kernels), ``wt`` (``recurrent.transposed_copies``: the step
products read a C-ordered copy of W^T, not the view), ``pad`` (``recurrent.PAD_BYTES``: that copy's
rows 64 bytes longer where they are a multiple of 1 KiB), ``tail`` (the loss and its gradient
in one compiled pass, ``cpu_kernels.softmax_xent32``, and clipping's scaling with the SGD step in
another, ``cpu_kernels.clipped_sgd``; off: their array operations), ``gather`` (``cpu_loops.gather``:
the compiled forward loops gather token ids' input side step by step; off: all steps before the loop),
``scatter`` (``cpu_loops.scatter``: the compiled backward loops sum that gather's gradient step by
step; off: one pass after the loop), ``tiles`` (``cpu_gemm.NO_TILES``: the split products' blocks of
few rows computed by npyrnn's own tiles; off: by OpenBLAS).
"""

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import busy_processes  # noqa: E402
from benchmarks.sections.floor import timed_parts  # noqa: E402


def switch_setter(name):
    """A function that turns the switch on (True) or off (False)."""
    from npyrnn.nn import cpu_gemm, cpu_loops, kernels, recurrent

    if name == "tiles":
        return lambda on: cpu_gemm._ctl.__setitem__(cpu_gemm.NO_TILES, 0 if on is not False else 1)
    if name == "halves":
        return lambda on: setattr(cpu_loops, "halves", on)
    if name == "loops":
        return lambda on: setattr(cpu_loops, "enabled", on)
    if name == "gather":
        return lambda on: setattr(cpu_loops, "gather", on)
    if name == "scatter":
        return lambda on: setattr(cpu_loops, "scatter", on)
    if name == "wt":
        return lambda on: setattr(recurrent, "transposed_copies", on)
    if name == "pad":
        return lambda on: setattr(recurrent, "PAD_BYTES", 64 if on else 0)
    if name == "tail":
        compiled = {"softmax_xent": kernels.softmax_xent, "clipped_sgd": kernels.clipped_sgd}

        def turn(on):
            for attr, accessor in compiled.items():
                setattr(kernels, attr, accessor if on is not False else (lambda *_: None))

        return turn
    return kernels.set_enabled


def run(args):
    from npyrnn import backend
    from npyrnn.data import SeqDataLoader, load_corpus
    from npyrnn.models import RNNLM
    from npyrnn.optim import SGD
    from npyrnn.train import train_step

    corpus, vocab = load_corpus("timemachine", token="char", max_tokens=args.max_tokens)
    backend.set_cpu_threads(args.threads)
    extra = {"reset_after": args.gru_reset == "after"} if args.cell == "gru" else {}
    if args.proj_size:
        extra["proj_size"] = args.proj_size
    model = RNNLM(len(vocab), args.hidden, cell=args.cell, init="uniform", dtype="float32", seed=0, **extra)
    optimizer = SGD(model.params, 1.0)
    loader = SeqDataLoader(corpus, args.batch_size, args.num_steps, rng=np.random.default_rng(0))
    turn = switch_setter(args.switch)
    parts = {True: collections.defaultdict(list), False: collections.defaultdict(list)}
    state, i = None, 0
    try:
        for _ in range(args.epochs):
            for X, Y in loader:
                on = i % 2 == 0
                i += 1
                turn(on)
                if state is None:
                    state = model.begin_state(X.shape[0])
                times = collections.defaultdict(lambda: [0.0, 0])
                with timed_parts(times):
                    start = time.perf_counter()
                    loss, state = train_step(model, X, Y, state, optimizer, 1.0)
                    times["minibatch"] = [time.perf_counter() - start, 1]
                float(loss)
                if i > 2:  # the first of each: compiling
                    for name, (seconds, _) in times.items():
                        parts[on][name].append(seconds)
    finally:
        turn(None if args.switch == "fused" else True)
        backend.set_cpu_threads(args.threads, split=False)
    return parts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--switch", choices=("halves", "loops", "fused", "wt", "pad", "tail", "gather", "scatter", "tiles"), default="halves")
    p.add_argument("--cell", choices=("rnn", "gru", "lstm"), default="gru")
    p.add_argument("--gru-reset", choices=("after", "before"), default="after")
    p.add_argument("--proj-size", type=int, default=0)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--epochs", type=int, default=30, help="epochs of d2l's 10,000 characters (8 minibatches each)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--load", type=int, default=0, help="busy processes competing for the cores")
    p.add_argument("--max-tokens", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-steps", type=int, default=35)
    args = p.parse_args(argv)
    if args.load:
        with busy_processes(args.load):
            parts = run(args)
    else:
        parts = run(args)
    print(f"{args.cell} hidden {args.hidden}, {args.threads} thread(s), {args.load} busy: {args.switch} on / off, "
          f"median ms per minibatch over {len(parts[True]['minibatch'])} / {len(parts[False]['minibatch'])} minibatches")
    for name in sorted(set(parts[True]) | set(parts[False]), key=lambda n: (n == "minibatch", n)):
        on, off = (statistics.median(parts[k][name]) * 1e3 if parts[k][name] else 0.0 for k in (True, False))
        print(f"  {name[:60]:60s} on {on:8.3f}  off {off:8.3f}  on - off {on - off:+8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
