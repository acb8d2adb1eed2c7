#!/usr/bin/env python
"""Experiment (issue 11): a whole npyrnn training minibatch captured in one CUDA graph on CuPy.

At the book's settings npyrnn on CuPy is launch-bound: a minibatch is a few hundred small kernels
and products, each queued from Python. CuPy can capture a stream's work into a CUDA graph and
replay it with one launch, but refuses cuBLAS during capture ("calling cuBLAS API during stream
capture is currently unsupported", cupy/cupy#6290), and every step of npyrnn has a matrix product.
This experiment goes around that refusal, without changing npyrnn:

- ``cupy.matmul`` on 2-D float arrays (npyrnn writes every product as ``xp.matmul``) is replaced by a call of cuBLAS's own
  ``cublasSgemm_v2``/``cublasDgemm_v2`` through ctypes, on a handle of its own (its stream set
  before capture, its own workspace), the library being the one CuPy has loaded;
- ``cupy.vdot`` (the clipping norm's sums of squares, also cuBLAS) by ``(a * b).sum()``;
- the capture allocates from a private ``cupy.cuda.MemoryPool`` that nothing else uses
  afterwards, so every address the graph reads or writes stays its own (as PyTorch's graph pools);
- the minibatch is copied into fixed input buffers before each replay; the graph itself carries
  the state into the next minibatch and sums the losses.

Peers at each setting (float32, SGD lr 1, clipping at 1, state carried): ``eager`` (npyrnn as it
is, ``cupy.matmul``), ``direct`` (eager, products through the direct gemm), ``graph`` (one replay
per minibatch) and ``cudnn`` (torch's nn.RNN/GRU/LSTM, as in bench_gpu.py). Correctness first: from
the same initial weights, ``graph`` must give bit-identical losses and weights to ``direct`` over
``--check`` minibatches, and ``direct`` must stay within float32 rounding of ``eager``.

Needs a GPU (CUDA, CuPy, a CUDA build of torch); elsewhere it prints why and exits 0.

    NPYRNN_DATA_DIR=../shared/data python benchmarks/graph_experiment.py --json OUT/graph.json
"""

import argparse
import contextlib
import ctypes
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_gpu import SETTINGS, CudnnPeer, Device, minibatches, why_not, write_json  # noqa: E402
from benchmarks.common import git_commit, pair_order, ratio_summary, summary  # noqa: E402


# --------------------------------------------------------------------------- cuBLAS through ctypes


def _loaded_library(prefix):
    """Path of the shared library of this process whose file name starts with ``prefix``."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if path.startswith("/") and Path(path).name.startswith(prefix):
                return path
    return None


class DirectGemm:
    """``matmul(a, b, out=None)`` of 2-D float arrays by cublas<S|D>gemm_v2 on a handle of our own."""

    def __init__(self, cupy):
        import numpy

        self.cupy, self.numpy = cupy, numpy
        self.original_matmul, self.original_vdot = cupy.matmul, cupy.vdot
        cupy.matmul(cupy.ones((2, 2), "f"), cupy.ones((2, 2), "f"))  # CuPy loads cuBLAS now
        cupy.cuda.Device().synchronize()
        path = _loaded_library("libcublas.so")
        if path is None:
            raise RuntimeError("libcublas.so is not loaded in this process after a cupy.matmul")
        self.path = path
        lib = self.lib = ctypes.CDLL(path)
        handle = ctypes.c_void_p()
        self._check(lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate_v2")
        self.handle = handle
        # A workspace of our own: cuBLAS must not allocate while a graph is being captured.
        self.workspace = cupy.empty(32 << 20, dtype=cupy.uint8)
        if hasattr(lib, "cublasSetWorkspace_v2"):
            self._check(lib.cublasSetWorkspace_v2(handle, ctypes.c_void_p(self.workspace.data.ptr),
                                                  ctypes.c_size_t(self.workspace.nbytes)), "cublasSetWorkspace_v2")
        args = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                ctypes.c_void_p, ctypes.c_int]
        self.gemm = {}
        self.scalars = {}
        for dtype, name, ctype in ((numpy.float32, "cublasSgemm_v2", ctypes.c_float),
                                   (numpy.float64, "cublasDgemm_v2", ctypes.c_double)):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
            self.gemm[numpy.dtype(dtype)] = fn
            one, zero = ctype(1.0), ctype(0.0)
            self.scalars[numpy.dtype(dtype)] = (one, zero, ctypes.addressof(one), ctypes.addressof(zero))
        self.calls = 0
        self.fallbacks = 0

    @staticmethod
    def _check(status, what):
        if status != 0:
            raise RuntimeError(f"{what} returned cuBLAS status {status}")

    def set_stream(self, stream):
        self._check(self.lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(stream.ptr)), "cublasSetStream_v2")

    @staticmethod
    def _layout(x, isz):
        """(op, ld) describing 2-D ``x`` to column-major cuBLAS as its transpose, or None."""
        r, c = x.shape
        s0, s1 = x.strides
        if s0 % isz or s1 % isz:
            return None
        s0, s1 = s0 // isz, s1 // isz
        if s1 == 1 or c == 1:  # rows contiguous: x^T is column-major with ld = row stride
            ld = s0 if r > 1 else c
            if ld >= max(1, c):
                return 0, ld  # CUBLAS_OP_N on x^T
        if s0 == 1 or r == 1:  # columns contiguous: x itself is column-major
            ld = s1 if c > 1 else r
            if ld >= max(1, r):
                return 1, ld  # CUBLAS_OP_T gives x^T
        return None

    def matmul(self, a, b, out=None, **kwargs):
        cupy = self.cupy
        ok = (not kwargs and isinstance(a, cupy.ndarray) and isinstance(b, cupy.ndarray) and a.ndim == 2
              and b.ndim == 2 and a.dtype == b.dtype and a.dtype in self.gemm and a.shape[1] == b.shape[0])
        if ok and out is None:
            out = cupy.empty((a.shape[0], b.shape[1]), dtype=a.dtype)
        ok = ok and out.ndim == 2 and out.dtype == a.dtype and out.shape == (a.shape[0], b.shape[1])
        if ok:
            isz = a.dtype.itemsize
            la, lb, lc = self._layout(a, isz), self._layout(b, isz), self._layout(out, isz)
            ok = la is not None and lb is not None and lc is not None and lc[0] == 0
        if not ok:
            self.fallbacks += 1
            return self.original_matmul(a, b, out=out, **kwargs)
        M, K = a.shape
        N = b.shape[1]
        one, zero, p_one, p_zero = self.scalars[a.dtype]
        # row-major C = A B  is  column-major C^T = B^T A^T
        status = self.gemm[a.dtype](self.handle, lb[0], la[0], N, M, K, p_one, b.data.ptr, lb[1], a.data.ptr, la[1],
                                    p_zero, out.data.ptr, lc[1])
        self._check(status, "cublasXgemm_v2")
        self.calls += 1
        return out

    def vdot(self, a, b):
        if a.ndim == 1 and b.ndim == 1 and a.dtype == b.dtype and a.dtype.kind == "f":
            return (a * b).sum()
        return self.original_vdot(a, b)

    @contextlib.contextmanager
    def patched(self, stream):
        """cupy.matmul and cupy.vdot replaced while inside; cuBLAS's handle on ``stream``."""
        cupy = self.cupy
        self.set_stream(stream)
        cupy.matmul, cupy.vdot = self.matmul, self.vdot
        try:
            yield
        finally:
            cupy.matmul, cupy.vdot = self.original_matmul, self.original_vdot


# --------------------------------------------------------------------------- the npyrnn peers


class Eager:
    library = "cupy"

    def __init__(self, name, cell, V, setting, seed, batches, stream, direct=None):
        from npyrnn.models import RNNLM
        from npyrnn.optim import SGD

        kwargs = {} if cell == "rnn" else {"cell": cell}
        self.name, self.stream, self.direct, self.batches = name, stream, direct, batches
        self.model = RNNLM(V, setting.hidden, init="uniform", dtype="float32", seed=seed, **kwargs)
        self.optimizer = SGD(self.model.params, 1.0)
        self.state = self.model.begin_state(setting.batch_size)

    def _context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(self.stream)
        if self.direct is not None:
            stack.enter_context(self.direct.patched(self.stream))
        return stack

    def step(self, X, Y):
        from npyrnn.train import train_step

        with self._context():
            loss, self.state = train_step(self.model, X, Y, self.state, self.optimizer, clip=1.0)
        return loss

    def train(self, batches=None):
        cupy = self.model.xp
        with self.stream:
            total = cupy.zeros((), dtype="float32")
        for X, Y in batches or self.batches:
            loss = self.step(X, Y)
            with self.stream:
                total += loss
        with self.stream:
            return total / len(batches or self.batches)

    def loss_value(self, loss):
        return float(loss.get())


class Graph(Eager):
    """One CUDA graph per minibatch: captured once (after one eager step), replayed for every minibatch."""

    def __init__(self, cell, V, setting, seed, batches, stream, direct):
        super().__init__("graph", cell, V, setting, seed, batches, stream, direct)
        self.captured = False

    def capture(self, X0, Y0):
        from npyrnn.train import train_step

        cupy = self.model.xp
        with self.stream:
            self.X = cupy.empty_like(X0)
            self.Y = cupy.empty_like(Y0)
            self.total = cupy.zeros((), dtype="float32")
            self.last = cupy.zeros((), dtype="float32")
        self.pool = cupy.cuda.MemoryPool()  # the graph's own memory: nothing else allocates from it
        with self._context(), cupy.cuda.using_allocator(self.pool.malloc):
            self.stream.begin_capture()
            try:
                loss, new_state = train_step(self.model, self.X, self.Y, self.state, self.optimizer, clip=1.0)
                for into, value in zip(*(s if isinstance(s, tuple) else (s,) for s in (self.state, new_state))):
                    into[...] = value  # the carried state (LSTM: h and c), for the next replay
                self.total += loss
                self.last[...] = loss
            except BaseException:
                with contextlib.suppress(Exception):
                    self.stream.end_capture()
                raise
            self.graph = self.stream.end_capture()
        self.keep = (loss, new_state)  # addresses the graph writes: never freed
        self.captured = True

    def step(self, X, Y):
        with self.stream:
            self.X[...] = X
            self.Y[...] = Y
            self.graph.launch(self.stream)
            return self.last.copy()

    def train(self, batches=None):
        batches = batches or self.batches
        with self.stream:
            self.total.fill(0)
            for X, Y in batches:
                self.X[...] = X
                self.Y[...] = Y
                self.graph.launch(self.stream)
            return self.total / len(batches)


# --------------------------------------------------------------------------- the experiment


def max_abs_diff(a, b):
    import numpy

    return float(numpy.max(numpy.abs(a.get().astype("float64") - b.get().astype("float64")))) if a.size else 0.0


def check(cell, V, setting, seed, batches, stream, direct, count):
    """Graph against direct (bit-identical?), direct against eager (float32 rounding), over ``count`` minibatches."""
    eager = Eager("eager", cell, V, setting, seed, batches, stream)
    plain = Eager("direct", cell, V, setting, seed, batches, stream, direct)
    graph = Graph(cell, V, setting, seed, batches, stream, direct)
    X0, Y0 = batches[0]
    for peer in (eager, plain, graph):  # one eager step each: kernels compiled, buffers allocated
        Eager.step(peer, X0, Y0)
    graph.capture(X0, Y0)
    losses = {p.name: [] for p in (eager, plain, graph)}
    for X, Y in batches[1:count + 1]:
        for peer in (eager, plain, graph):
            loss = peer.step(X, Y)
            with stream:
                losses[peer.name].append(loss.copy())  # a buffer the next step may reuse
    stream.synchronize()
    as_float = {k: [float(v.get()) for v in vs] for k, vs in losses.items()}
    weights_graph_direct = max(max_abs_diff(graph.model.params[k], plain.model.params[k]) for k in plain.model.params)
    weights_direct_eager = max(max_abs_diff(plain.model.params[k], eager.model.params[k]) for k in plain.model.params)
    loss_graph_direct = max(abs(a - b) for a, b in zip(as_float["graph"], as_float["direct"]))
    loss_direct_eager = max(abs(a - b) for a, b in zip(as_float["direct"], as_float["eager"]))
    return {"minibatches": count, "losses": as_float,
            "graph_vs_direct": {"loss_max_abs": loss_graph_direct, "weights_max_abs": weights_graph_direct,
                                "bit_identical": loss_graph_direct == 0 and weights_graph_direct == 0},
            "direct_vs_eager": {"loss_max_abs": loss_direct_eager, "weights_max_abs": weights_direct_eager}}


def measure(impl, device):
    device.sync()
    start = time.perf_counter()
    loss = impl.train()
    device.sync()
    return time.perf_counter() - start, impl.loss_value(loss)


def run(setting, cell, args, device, direct, log):
    import cupy

    host_batches, V = minibatches(setting, max(args.batches, args.check + 1), args.seed)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        batches = [(cupy.asarray(X), cupy.asarray(Y)) for X, Y in host_batches]
    row = {"cell": cell, "setting": setting.name, "batch_size": setting.batch_size, "num_steps": setting.num_steps,
           "hidden": setting.hidden}
    try:
        row["check"] = check(cell, V, setting, args.seed, batches, stream, direct, args.check)
    except Exception as exc:
        row["check_error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        log(f"  {setting.name} {cell}: check FAILED: {row['check_error']}")
        traceback.print_exc()
        return row
    batches = batches[: args.batches]
    tokens = args.batches * setting.batch_size * setting.num_steps
    impls = [Eager("eager", cell, V, setting, args.seed, batches, stream),
             Eager("direct", cell, V, setting, args.seed, batches, stream, direct),
             Graph(cell, V, setting, args.seed, batches, stream, direct),
             CudnnPeer(cell, V, setting, device.torch_device, host_batches[: args.batches])]
    Eager.step(impls[2], *batches[0])
    impls[2].capture(*batches[0])
    for impl in impls:
        measure(impl, device)  # warm-up
    times = {impl.name: [] for impl in impls}
    for i in range(args.pairs):
        for impl in pair_order(i, *impls):
            times[impl.name].append(measure(impl, device)[0])
    row["tokens_per_s"] = {n: summary([tokens / s for s in t]) for n, t in times.items()}
    row["ms_per_minibatch"] = {n: summary([s / args.batches * 1e3 for s in t]) for n, t in times.items()}
    for other in ("cudnn", "eager"):
        row[f"ratio_graph_over_{other}"] = ratio_summary([tokens / s for s in times["graph"]],
                                                         [tokens / s for s in times[other]])
    row["ratio_direct_over_eager"] = ratio_summary([tokens / s for s in times["direct"]],
                                                   [tokens / s for s in times["eager"]])
    c = row["check"]
    log(f"  {setting.name} {cell}: ms/minibatch " + ", ".join(
        f"{n} {row['ms_per_minibatch'][n]['median']:.2f}" for n in times)
        + f"; graph/cudnn {row['ratio_graph_over_cudnn']['median']:.2f}x"
        + f"; graph==direct bitwise: {c['graph_vs_direct']['bit_identical']}"
        + f"; direct-eager loss {c['direct_vs_eager']['loss_max_abs']:.1e}")
    return row


def render(results):
    lines = ["| setting | cell | eager ms | direct ms | graph ms | cudnn ms | graph/cudnn | graph/eager "
             "| graph = direct, bitwise | direct vs eager, max loss diff |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        if "check_error" in r:
            lines.append(f"| {r['setting']} | {r['cell']} | failed: {r['check_error'][:80]} |||||||")
            continue
        ms = r["ms_per_minibatch"]
        lines.append(f"| {r['setting']} (B {r['batch_size']}, H {r['hidden']}) | {r['cell']} "
                     f"| {ms['eager']['median']:.2f} | {ms['direct']['median']:.2f} | {ms['graph']['median']:.2f} "
                     f"| {ms['cudnn']['median']:.2f} | {r['ratio_graph_over_cudnn']['median']:.2f}x "
                     f"| {r['ratio_graph_over_eager']['median']:.2f}x | {r['check']['graph_vs_direct']['bit_identical']} "
                     f"| {r['check']['direct_vs_eager']['loss_max_abs']:.1e} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--batches", type=int, default=40, help="minibatches per measurement")
    p.add_argument("--check", type=int, default=20, help="minibatches compared for bit-identity")
    p.add_argument("--only", action="append", metavar="SETTING", help="; ".join(s.name for s in SETTINGS))
    p.add_argument("--cells", default="rnn,gru,lstm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "graph-latest.json")
    args = p.parse_args(argv)
    reason = why_not(stand_in=False)
    if reason is not None:
        print(f"graph_experiment: SKIPPED: {reason}", file=sys.stderr)
        return 0
    import cupy
    import torch

    from npyrnn import backend

    backend.set_backend("cupy")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = Device(stand_in=False)
    direct = DirectGemm(cupy)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    settings = [s for s in SETTINGS if not args.only or s.name in args.only]
    results = {"meta": {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": device.name(),
                        "cupy": cupy.__version__, "torch": torch.__version__, "git_commit": git_commit(),
                        "cublas": direct.path, "pairs": args.pairs, "batches": args.batches, "check": args.check},
               "rows": []}
    for setting in settings:
        for cell in [c.strip() for c in args.cells.split(",") if c.strip()]:
            results["rows"].append(run(setting, cell, args, device, direct, log))
            results["meta"]["direct_gemm_calls"], results["meta"]["fallbacks"] = direct.calls, direct.fallbacks
            write_json(args.json, results)
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
