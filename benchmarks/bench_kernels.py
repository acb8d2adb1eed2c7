#!/usr/bin/env python
"""Each fused kernel against its array-op twin on NumPy, one step's blocks, microseconds per call.

The kernels are the Numba-compiled ones of ``npyrnn/nn/cpu_kernels.py`` (the ``fast`` extra);
the twins are the array operations they replace (``kernels.SPECS[name].reference``). Inputs are
gate-like views (rows contiguous, as the cells pass them), values N(0, 0.3^2), B = 32 and H from
``--hidden``; each figure is the best of 5 repeats of ``--calls`` calls. Last, the compiled copy of
W_hh^T the step products read (``transpose_into``) against ``numpy.copyto(WT, W.T)``.

    python benchmarks/bench_kernels.py --hidden 256 --dtype float32
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npyrnn.nn import kernels  # noqa: E402


def best_time(f, calls):
    f()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            f()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--calls", type=int, default=400)
    args = p.parse_args(argv)
    B, H = args.batch, args.hidden
    rng = np.random.default_rng(0)
    kernels.set_enabled(True)  # compare them whatever NPYRNN_FUSED says
    print(f"{'kernel':22s} {'fused us':>9s} {'array ops us':>13s} {'ratio':>6s}   ({kernels.status(np)})")
    for name, spec in kernels.SPECS.items():
        fused = kernels.get(np, name, args.dtype)
        if fused is None:
            raise SystemExit(f"bench_kernels: no fused CPU kernels: {kernels.status(np)}")
        names = kernels._names(spec.inputs) + kernels._names(spec.outputs)
        inputs = [rng.standard_normal(H).astype(args.dtype) if n.startswith("b_")
                  else (rng.standard_normal((B, H + 2)) * 0.3).astype(args.dtype)[:, 1 : H + 1] for n in names]
        with np.errstate(all="ignore"):  # carries (in and out) grow over repeated calls: same data both ways
            t_fused = best_time(lambda: fused(*inputs), args.calls)
            t_ops = best_time(lambda: spec.reference(np, *inputs), args.calls)
        print(f"{name:22s} {t_fused:9.1f} {t_ops:13.1f} {t_ops / t_fused:6.2f}")
    transpose = kernels.transpose_into(np)  # W^T's copy for the step products, against numpy.copyto
    for gates in (1, 3, 4):  # W_hh of the RNN, the GRU, the LSTM: (G*H, H)
        W = rng.standard_normal((gates * H, H)).astype(args.dtype)
        WT = np.empty((H, gates * H + 16), args.dtype)[:, : gates * H]  # rows padded, as the layers pad them
        t_fused = best_time(lambda: transpose(W, WT), args.calls)
        t_ops = best_time(lambda: np.copyto(WT, W.T), args.calls)
        print(f"{f'transpose_into ({gates * H}, {H})':22s} {t_fused:9.1f} {t_ops:13.1f} {t_ops / t_fused:6.2f}")


if __name__ == "__main__":
    main()
