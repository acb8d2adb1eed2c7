#!/usr/bin/env python
"""The matrix products of one training step, one at a time: OpenBLAS's own threads against npyrnn's split products.

Each product of a minibatch at the book's settings (batch 32, 35 steps, float32; the RNN at
hidden 512 and 256, the GRU and LSTM at 256): a step's recurrent product forward and backward,
the weight gradient over all T*B rows, the output layer. Four ways, each timed ``--reps``
times in rotation, ``--calls`` calls back to back per time (a recurrent product's 35 steps), after
as many untimed ones (the operands in cache, as in a time loop):

- ``openblas-1`` and ``openblas-2``: ``numpy.matmul`` with OpenBLAS at 1 and 2 threads;
- ``split-1`` and ``split-2``: ``backend.matmul`` with the split products on 1 and 2 threads
  (``npyrnn.nn.cpu_gemm``: at most two blocks fixed by the shape; ``blocks`` says which), every
  block OpenBLAS's (``cpu_gemm.NO_TILES``);
- ``tiles-1`` and ``tiles-2``: the same with npyrnn's tiles on (where ``cpu_gemm.TILES``): a
  block of at most 96 rows with neither operand transposed is computed by them.

Printed: median microseconds a call, and the split products' blocks (axis: rows, columns or k).
With ``--busy N``, N processes spin on the CPU meanwhile; with ``--copy`` a step's forward
product reads a C-ordered copy of W^T, its rows padded as the layers pad it (as they do where
the copy pays or the tiles take it), not the view. Needs the ``fast`` extra.

    python benchmarks/bench_products.py --reps 7
    python benchmarks/bench_products.py --reps 7 --copy
"""

import argparse
import multiprocessing as mp
import statistics
import time

import numpy as np

# name: (m, k, n, b transposed), as the layers call them: op(b) is W^T (transposed) or W
SHAPES = {
    "rnn512 step forward": (32, 512, 512, True),
    "rnn512 step backward": (32, 512, 512, False),
    "rnn512 dW_hh": (512, 1120, 512, False),
    "rnn256 step forward": (32, 256, 256, True),
    "gru256 step forward": (32, 256, 768, True),
    "gru256 step backward": (32, 768, 256, False),
    "gru256 dW_hh": (768, 1120, 256, False),
    "lstm256 step forward": (32, 256, 1024, True),
    "lstm256 step backward": (32, 1024, 256, False),
    "lstm256 dW_hh": (1024, 1120, 256, False),
    "output logits (256)": (1120, 256, 28, True),
    "output dW (256)": (28, 1120, 256, False),
}
AXES = {0: "rows", 1: "columns", 2: "k"}


def operands(m, k, n, transposed, rng, copy=False):
    """a (m, k) and b (k, n) laid out as the layers have them (weight gradients: a is dG^T, a transposed
    view); copy: a transposed b (a step's W^T) as the layers' padded C-ordered copy instead."""
    from npyrnn.nn.recurrent import row_pad

    a = rng.standard_normal((k, m)).astype(np.float32).T if m > 32 and k > 1000 else rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((n, k)).astype(np.float32).T if transposed else rng.standard_normal((k, n)).astype(np.float32)
    if transposed and copy and m <= 32:
        padded = np.zeros((k, n + row_pad(n, 4)), np.float32)[:, :n]
        padded[...] = b
        b = padded
    return a, b


def _busy():
    while True:
        pass


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--calls", type=int, default=35)
    p.add_argument("--busy", type=int, default=0, help="processes spinning on the CPU meanwhile")
    p.add_argument("--gap", type=float, default=0.3, help="seconds of rest before each timing (default 0.3)")
    p.add_argument("--copy", action="store_true", help="a step's forward product reads a padded C-ordered copy of W^T")
    args = p.parse_args(argv)
    from threadpoolctl import threadpool_limits

    from npyrnn import backend
    from npyrnn.nn import cpu_gemm

    if cpu_gemm.why_unavailable() is not None:
        raise SystemExit(f"bench_products: split products {cpu_gemm.why_unavailable()}")

    def openblas(threads):
        backend.set_cpu_threads(threads, split=False)
        threadpool_limits(threads)
        return lambda a, b, out: np.matmul(a, b, out=out)

    def split(threads, tiles=False):
        backend.set_cpu_threads(threads, split=True)
        cpu_gemm._ctl[cpu_gemm.NO_TILES] = 0 if tiles else 1
        return lambda a, b, out: backend.matmul(a, b, out=out)

    ways = {"openblas-1": lambda: openblas(1), "openblas-2": lambda: openblas(2),
            "split-1": lambda: split(1), "split-2": lambda: split(2)}
    if cpu_gemm.TILES:
        ways.update({"tiles-1": lambda: split(1, tiles=True), "tiles-2": lambda: split(2, tiles=True)})
    procs = [mp.Process(target=_busy, daemon=True) for _ in range(args.busy)]
    for proc in procs:
        proc.start()
    rng = np.random.default_rng(0)
    try:
        print(f"busy={args.busy}, copy={args.copy}, median us a call over {args.reps} reps of {args.calls} calls")
        for name, (m, k, n, transposed) in SHAPES.items():
            a, b = operands(m, k, n, transposed, rng, copy=args.copy)
            out = np.empty((m, n), dtype=np.float32)
            times = {way: [] for way in ways}
            for _ in range(args.reps):
                for way, make in ways.items():
                    time.sleep(args.gap)  # OpenBLAS's idle threads spin for a while after their last product
                    mm = make()  # (after the rest: a helper idle for over 200 ms sleeps in 1 ms steps, and misses blocks)
                    for _ in range(args.calls):  # warm: the operands in cache
                        mm(a, b, out)
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        mm(a, b, out)
                    times[way].append((time.perf_counter() - start) / args.calls * 1e6)
            axis, count, _ = cpu_gemm.blocks(m, n, k)
            cells = ", ".join(f"{way} {statistics.median(t):,.1f}" for way, t in times.items())
            print(f"{name} ({m}x{k} by {k}x{n}, {count} block{'s' if count > 1 else ''} by {AXES[axis]}): {cells}")
    finally:
        cpu_gemm._ctl[cpu_gemm.NO_TILES] = 0
        backend.set_cpu_threads(None, split=False)
        for proc in procs:
            proc.terminate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
