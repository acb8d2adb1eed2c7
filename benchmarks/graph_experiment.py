#!/usr/bin/env python
"""npyrnn's CUDA-graph training step (`npyrnn.cuda_graph`) against eager npyrnn and cuDNN, bits checked first.

At the book's settings npyrnn on CuPy is launch-bound: a minibatch is a few hundred small kernels
and products, each queued from Python. `npyrnn.cuda_graph.CudaGraphStep` captures a whole
minibatch in one CUDA graph and replays it (see that module for how it goes around CuPy's refusal
of cuBLAS during capture). The first version of this script, on an H100 on 2026-11-27 (JSON in
benchmarks/results/2026-11-27-gpu-h100-graph.json), held that code itself; it moved into the
library afterwards, unchanged but for the carried state's buffers and the pinning of work arrays.

Peers at each setting (float32, SGD lr 1, clipping at 1, state carried): ``eager`` (npyrnn as it
is, ``cupy.matmul``), ``direct`` (eager, products through the module's direct cuBLAS gemm),
``graph`` (`CudaGraphStep`: one replay per minibatch after the first two) and ``cudnn`` (torch's
nn.RNN/GRU/LSTM, as in bench_gpu.py). Correctness first: from the same initial weights, ``graph``
must give bit-identical losses and weights to ``direct`` over ``--check`` minibatches, and
``direct`` must stay within float32 rounding of ``eager``.

Needs a GPU (CUDA, CuPy, a CUDA build of torch); elsewhere it prints why and exits 0.

    NPYRNN_DATA_DIR=../shared/data python benchmarks/graph_experiment.py --json OUT/graph.json
"""

import argparse
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_gpu import (  # noqa: E402
    SETTINGS, CudnnPeer, Device, NpyrnnPeer, minibatches, why_not, write_json)
from benchmarks.common import git_commit, pair_order, ratio_summary, summary  # noqa: E402


# --------------------------------------------------------------------------- the npyrnn peers


class Direct(NpyrnnPeer):
    """npyrnn's eager step with its products through `npyrnn.cuda_graph`'s direct cuBLAS gemm."""

    def __init__(self, cell, V, setting, seed, host_batches, direct):
        super().__init__(cell, V, setting, seed, host_batches, name="direct")
        self.direct = direct

    def step(self, X, Y):
        import cupy

        with self.direct.patched(cupy.cuda.get_current_stream()):
            return super().step(X, Y)


class Graph(NpyrnnPeer):
    """`npyrnn.cuda_graph.CudaGraphStep`: the first minibatch eager, the second captured, then replays."""

    def __init__(self, cell, V, setting, seed, host_batches):
        from npyrnn.cuda_graph import CudaGraphStep

        super().__init__(cell, V, setting, seed, host_batches, name="graph")
        self.graph_step = CudaGraphStep(self.model, self.optimizer, 1.0)

    def step(self, X, Y):
        if self.state is None:
            self.state = self.model.begin_state(X.shape[0])
        loss, self.state, _ = self.graph_step(X, Y, self.state)
        return loss


# --------------------------------------------------------------------------- the experiment


def max_abs_diff(a, b):
    import numpy

    return float(numpy.max(numpy.abs(a.get().astype("float64") - b.get().astype("float64")))) if a.size else 0.0


def check(cell, V, setting, seed, host_batches, direct):
    """Graph against direct (bit-identical?), direct against eager (float32 rounding), over ``host_batches``."""
    import cupy

    eager = NpyrnnPeer(cell, V, setting, seed, host_batches, name="eager")
    plain = Direct(cell, V, setting, seed, host_batches, direct)
    graph = Graph(cell, V, setting, seed, host_batches)
    losses = {p.name: [] for p in (eager, plain, graph)}
    for i in range(len(host_batches)):
        for peer in (eager, plain, graph):
            losses[peer.name].append(peer.step(*peer.batches[i]).copy())  # a buffer the next step may reuse
    cupy.cuda.Device().synchronize()
    as_float = {k: [float(v.get()) for v in vs] for k, vs in losses.items()}
    weights_graph_direct = max(max_abs_diff(graph.model.params[k], plain.model.params[k]) for k in plain.model.params)
    weights_direct_eager = max(max_abs_diff(plain.model.params[k], eager.model.params[k]) for k in plain.model.params)
    loss_graph_direct = max(abs(a - b) for a, b in zip(as_float["graph"], as_float["direct"]))
    loss_direct_eager = max(abs(a - b) for a, b in zip(as_float["direct"], as_float["eager"]))
    return {"minibatches": len(host_batches), "losses": as_float, "captures": graph.graph_step.captures,
            "replays": graph.graph_step.replays,
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
    host_batches, V = minibatches(setting, max(args.batches, args.check), args.seed)
    row = {"cell": cell, "setting": setting.name, "batch_size": setting.batch_size, "num_steps": setting.num_steps,
           "hidden": setting.hidden}
    try:
        row["check"] = check(cell, V, setting, args.seed, host_batches[: args.check], direct)
    except Exception as exc:
        row["check_error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        log(f"  {setting.name} {cell}: check FAILED: {row['check_error']}")
        traceback.print_exc()
        return row
    host_batches = host_batches[: args.batches]
    tokens = args.batches * setting.batch_size * setting.num_steps
    impls = [NpyrnnPeer(cell, V, setting, args.seed, host_batches, name="eager"),
             Direct(cell, V, setting, args.seed, host_batches, direct),
             Graph(cell, V, setting, args.seed, host_batches),
             CudnnPeer(cell, V, setting, device.torch_device, host_batches)]
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
    from npyrnn.cuda_graph import direct_gemm

    backend.set_backend("cupy")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = Device(stand_in=False)
    direct = direct_gemm(cupy)

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
            write_json(args.json, results)
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
