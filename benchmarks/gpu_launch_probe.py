#!/usr/bin/env python
"""What a CUDA graph saves on CuPy: the host's cost per queued launch, and what CuPy lets a capture hold.

Prints (no JSON): the cost per call, queued without a sync, of CuPy's `tanh(out=)` and
`matmul(out=)` and torch's `tanh(out=)` and `mm(out=)` at B = 32, H = 512; whether an
element-wise op, `cupy.matmul` and `cupy.dot` can be captured (CuPy 14 refuses cuBLAS); 210
eager element-wise launches against the replay of their graph; and whether a whole npyrnn
`train_step` captures as it is (it does not: its products are cuBLAS; see npyrnn.cuda_graph).
The numbers in docs/performance.md ("Why eager npyrnn is behind: launches") came from it on an H100.

    python benchmarks/gpu_launch_probe.py

Needs a GPU (CUDA, CuPy, a CUDA build of torch); elsewhere it prints why and exits 0.
"""
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_gpu import why_not  # noqa: E402


def main():
    reason = why_not(stand_in=False)
    if reason is not None:
        print(f"gpu_launch_probe: SKIPPED: {reason}", file=sys.stderr)
        return 0
    import cupy as cp
    import numpy as np
    import torch

    from npyrnn import backend

    backend.set_backend("cupy")
    print("cupy", cp.__version__, "torch", torch.__version__, "device", cp.cuda.runtime.getDeviceProperties(0)["name"])

    def per_call(fn, n=2000, sync=cp.cuda.Device().synchronize):
        for _ in range(50):
            fn()
        sync()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - t) / n * 1e6

    a = cp.ones((32, 512), "f")
    b = cp.ones((512, 512), "f")
    o = cp.empty((32, 512), "f")
    ta = torch.ones((32, 512), device="cuda")
    tb = torch.ones((512, 512), device="cuda")
    to = torch.empty((32, 512), device="cuda")
    print(f"launch cost (us per call, queued, B=32 H=512): cupy tanh(out=) {per_call(lambda: cp.tanh(a, out=o)):.1f}; "
          f"cupy matmul(out=) {per_call(lambda: cp.matmul(a, b, out=o)):.1f}; "
          f"torch tanh(out=) {per_call(lambda: torch.tanh(ta, out=to), sync=torch.cuda.synchronize):.1f}; "
          f"torch mm(out=) {per_call(lambda: torch.mm(ta, tb, out=to), sync=torch.cuda.synchronize):.1f}")

    from npyrnn.nn import kernels

    print("kernels status:", kernels.status())

    def try_capture(label, fn):
        s = cp.cuda.Stream(non_blocking=True)
        with s:
            try:
                s.begin_capture()
            except Exception as e:
                print(f"capture {label}: begin_capture failed: {type(e).__name__}: {e}")
                return None
            try:
                fn()
            except Exception as e:
                print(f"capture {label}: REFUSED: {type(e).__name__}: {e}")
                try:
                    s.end_capture()
                except Exception as e2:
                    print(f"  end_capture after refusal: {type(e2).__name__}: {e2}")
                return None
            g = s.end_capture()
        print(f"capture {label}: ok")
        return g, s

    try_capture("elementwise tanh", lambda: cp.tanh(a, out=o))
    try_capture("matmul", lambda: cp.matmul(a, b, out=o))
    try_capture("dot", lambda: cp.dot(a, b, out=o))

    # Elementwise-only graph replay against eager launches: 35 steps x 6 elementwise ops.
    def eager():
        for _ in range(35 * 6):
            cp.tanh(a, out=o)

    res = try_capture("210 tanh launches", eager)
    if res is not None:
        g, s = res
        print(f"210 elementwise ops: eager {per_call(eager, n=50):.0f} us, graph replay "
              f"{per_call(lambda: g.launch(s), n=200, sync=s.synchronize):.0f} us")

    # A whole npyrnn training step under capture.
    from npyrnn.models import RNNLM
    from npyrnn.optim import SGD
    from npyrnn.train import train_step

    m = RNNLM(28, 512, dtype="float32", seed=0)
    opt = SGD(m.params, 1.0)
    X = cp.asarray(np.random.default_rng(0).integers(0, 28, (32, 35)))
    Y = cp.asarray(np.random.default_rng(1).integers(0, 28, (32, 35)))
    st = m.begin_state(32)
    train_step(m, X, Y, st, opt, clip=1.0)
    try_capture("npyrnn train_step", lambda: train_step(m, X, Y, st, opt, clip=1.0))
    print("probe done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
