"""A step's recurrent product h W^T in each layout NumPy's OpenBLAS can be handed, timed per call.

npyrnn's step products read W^T either as the view ``W.T`` of the (G*H, H) parameter or as a
C-ordered copy (`Recurrent._step_weight`), whose rows, and the LSTM's step output's, are 64 bytes
longer where they would be a multiple of 1 KiB. Which is faster depends on OpenBLAS's kernels
(`backend.transposed_copies_pay`); this prints both for the cells' shapes, at one thread, and
whether they give the same bits. Compare the kernel families on one machine with
``OPENBLAS_CORETYPE=Haswell`` (AVX2) against the default (here SkylakeX, AVX-512)::

    python benchmarks/bench_layouts.py
    OPENBLAS_CORETYPE=Haswell python benchmarks/bench_layouts.py

Medians of 7 repeats of ``--calls`` calls each; printed, not saved.
"""

import argparse
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from npyrnn.nn.recurrent import row_pad

SHAPES = {"GRU, H = 256": (3, 256), "LSTM, H = 256": (4, 256), "RNN, H = 512": (1, 512)}


def per_call(fn, calls):
    """Median seconds of one call over 7 repeats of `calls` calls."""
    fn()
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def padded(rows, cols, pad):
    return np.zeros((rows, cols + pad), np.float32)[:, :cols]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="hidden sizes / 16 and 5 calls (a smoke test)")
    args = p.parse_args(argv)
    calls = 5 if args.quick else args.calls
    kernels = [lib.get("architecture") for lib in threadpool_info() if lib.get("internal_api") == "openblas"]
    print(f"OpenBLAS kernels: {kernels}; B = {args.batch}, 1 thread, us per call")
    print(f"{'cell':14s} {'view W.T':>9s} {'copy':>9s} {'copy, rows padded':>18s}  same bits")
    rng = np.random.default_rng(0)
    with threadpool_limits(1, user_api="blas"):
        for name, (G, H) in SHAPES.items():
            H = max(H // 16, 2) if args.quick else H
            W = rng.standard_normal((G * H, H)).astype(np.float32)
            h = rng.standard_normal((args.batch, H)).astype(np.float32)
            pad = row_pad(G * H, 4)  # as npyrnn pads its copy and the LSTM's output
            copy, padded_copy = np.ascontiguousarray(W.T), padded(H, G * H, pad)
            padded_copy[...] = W.T
            out, padded_out = np.empty((args.batch, G * H), np.float32), padded(args.batch, G * H, pad)
            cases = [(W.T, out), (copy, out), (padded_copy, padded_out)]
            times = [per_call(lambda b=b, o=o: np.matmul(h, b, out=o), calls) for b, o in cases]
            results = [np.matmul(h, b) for b, _ in cases]
            same = all(np.array_equal(results[0], r) for r in results[1:])
            print(f"{name:14s} {times[0] * 1e6:9.1f} {times[1] * 1e6:9.1f} {times[2] * 1e6:18.1f}  {same}")


if __name__ == "__main__":
    main()
