#!/usr/bin/env python
"""npyrnn on CuPy against torch on CUDA: training tokens/s and peak GPU memory, alternating pairs.

Peers, at each setting, all float32, the same minibatches of The Time Machine (characters):

``cudnn``    torch ``nn.RNN`` (``nn.GRU``, ``nn.LSTM``) + ``nn.Linear`` on CUDA (cuDNN), d2l's concise
             ``RNNModel`` from ``tests/reference.py``, ``torch.optim.SGD`` and
             ``torch.nn.utils.clip_grad_norm_`` (no host sync per step); the RNN starts from
             npyrnn's initial weights (``concise_twin``).
``scratch``  d2l's scratch model under autograd on CUDA (``RNNModelScratch`` from ``tests/reference.py``,
             ``scratch_twin`` of npyrnn's model, d2l's ``grad_clipping`` and ``sgd``): tanh RNN only.
``npyrnn``   ``RNNLM(V, H, init='uniform')`` trained with ``npyrnn.train.train_step`` (SGD, clipping at 1).

GRU and LSTM rows appear only when ``npyrnn.nn`` has ``GRU``/``LSTM`` and ``RNNLM`` accepts ``cell=``.

Settings: the book's (batch 32, 35 steps, hidden 256 and 512) and a large one (batch 256, 35 steps,
hidden 1024). Each measurement is ``--batches`` training minibatches with the state carried (its
gradient cut), timed between two device synchronisations (``cupy.cuda.Device().synchronize()``,
``torch.cuda.synchronize()``), after one warm-up measurement per implementation; pair i runs the
implementations in an order rotated by i. Peak memory is measured during each warm-up: torch's
``max_memory_allocated`` (and ``max_memory_reserved``) above what was allocated before, and the growth
of CuPy's default memory pool (``total_bytes``, blocks held, so at least the peak in use) from a
freed pool. TF32 is off on both sides unless ``--tf32``.

Without CUDA, CuPy or a CUDA build of torch the script prints why, writes ``{"skipped": reason}``
to the JSON and exits 0. ``--stand-in`` runs the whole script on the CPU (torch on the CPU, cupy
as found, e.g. the fake of ``../shared/tools/fakecupy``) to test its logic; its numbers mean nothing.

Usage:

    NPYRNN_DATA_DIR=../shared/data python benchmarks/bench_gpu.py --json OUT/bench_gpu.json
    python benchmarks/bench_gpu.py --quick                # tiny sizes, 1 pair, seconds
"""

import argparse
import dataclasses
import inspect
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    # the repository root: this checkout's npyrnn, the benchmarks package and tests/reference.py
    sys.path.insert(0, str(ROOT))

from benchmarks.common import git_commit, pair_order, ratio_summary, summary  # noqa: E402

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "gpu-latest.json"


@dataclasses.dataclass
class Setting:
    name: str
    batch_size: int
    num_steps: int
    hidden: int


SETTINGS = [Setting("book-256", 32, 35, 256), Setting("book-512", 32, 35, 512), Setting("large-1024", 256, 35, 1024)]
QUICK_SETTINGS = [Setting("quick-16", 4, 5, 16), Setting("quick-32", 8, 5, 32)]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 pair, 3 minibatches: a smoke test")
    p.add_argument("--pairs", type=int, help="alternating pairs per comparison (default 5; 1 with --quick)")
    p.add_argument("--batches", type=int, help="training minibatches per measurement (default 40; 3 with --quick)")
    p.add_argument("--only", action="append", metavar="SETTING",
                   help="run only this setting (repeatable): " + ", ".join(s.name for s in SETTINGS + QUICK_SETTINGS))
    p.add_argument("--cells", default="rnn,gru,lstm",
                   help="cells to compare, comma-separated (gru/lstm only where npyrnn has them)")
    p.add_argument("--no-scratch", action="store_true", help="leave out d2l's scratch model")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matrix products on both sides (default: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=DEFAULT_JSON,
                   help=f"where to write the results (default {DEFAULT_JSON.relative_to(ROOT)})")
    p.add_argument("--stand-in", action="store_true",
                   help="run on the CPU (torch on the CPU, cupy as installed, e.g. the fake): tests the script only")
    return p.parse_args(argv)


def write_json(path, results):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------- what this machine has


def why_not(stand_in):
    """None when the benchmark can run here, else the reason (one line)."""
    try:
        import torch
    except ImportError as exc:
        return f"torch cannot be imported ({exc}); install a CUDA build of torch"
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install raising anything
        return f"cupy cannot be imported ({exc.__class__.__name__}: {exc}); pip install -e '.[gpu]'"
    if stand_in:
        return None
    if hasattr(cupy, "_fake"):
        return "cupy is the CPU stand-in (fakecupy), not CuPy: no GPU here (use --stand-in to test the script)"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"CuPy sees no CUDA device ({exc.__class__.__name__}: {exc})"
    if count < 1:
        return "CuPy sees no CUDA device"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} has no CUDA (a CPU build, or no driver); install a CUDA build of torch"
    return None


def npyrnn_cells():
    """The cells npyrnn's RNNLM offers: 'rnn', plus 'gru'/'lstm' once npyrnn.nn has them and RNNLM takes cell=."""
    import npyrnn.nn
    from npyrnn.models import RNNLM

    cells = ["rnn"]
    if "cell" in inspect.signature(RNNLM.__init__).parameters:
        cells += [c for c in ("gru", "lstm") if hasattr(npyrnn.nn, c.upper())]
    return cells


class Device:
    """Synchronisation and memory of the two libraries on one device (or on the CPU with ``--stand-in``)."""

    def __init__(self, stand_in):
        import cupy
        import torch

        self.cupy, self.torch, self.stand_in = cupy, torch, stand_in
        self.torch_device = torch.device("cpu" if stand_in else "cuda")

    def sync(self):
        self.cupy.cuda.Device().synchronize()
        if not self.stand_in:
            self.torch.cuda.synchronize()

    def name(self):
        if self.stand_in:
            return "CPU stand-in (numbers meaningless)"
        return self.torch.cuda.get_device_name(0)

    def begin_memory(self, library):
        """Start a peak-memory measurement; returns a token for `end_memory`."""
        if self.stand_in:
            return None
        if library == "torch":
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()
            return self.torch.cuda.memory_allocated(), self.torch.cuda.memory_reserved()
        pool = self.cupy.get_default_memory_pool()
        self.cupy.cuda.Device().synchronize()
        pool.free_all_blocks()
        return pool.total_bytes()

    def end_memory(self, library, token):
        """``{'peak_bytes', ...}`` since `begin_memory` (None on the stand-in)."""
        if self.stand_in:
            return None
        self.sync()
        if library == "torch":
            allocated, reserved = token
            return {"peak_bytes": self.torch.cuda.max_memory_allocated() - allocated,
                    "pool_bytes": self.torch.cuda.max_memory_reserved() - reserved,
                    "method": "torch.cuda.max_memory_allocated (pool: max_memory_reserved) above the start"}
        pool = self.cupy.get_default_memory_pool()
        grown = pool.total_bytes() - token
        return {"peak_bytes": grown, "pool_bytes": grown,
                "method": "growth of cupy.get_default_memory_pool().total_bytes() from a freed pool (>= peak in use)"}


# --------------------------------------------------------------------------- data


def minibatches(setting, count, seed):
    """``count`` host minibatches (X, Y) of shape (B, T) of The Time Machine, epochs in a row, and V."""
    import numpy as np

    from npyrnn import backend
    from npyrnn.data import SeqDataLoader, load_corpus

    corpus, vocab = load_corpus("timemachine", token="char", max_tokens=None)
    loader = SeqDataLoader(corpus, setting.batch_size, setting.num_steps, rng=np.random.default_rng(seed))
    batches = []
    while len(batches) < count:
        for X, Y in loader:
            batches.append((backend.to_numpy(X), backend.to_numpy(Y)))
            if len(batches) == count:
                break
    return batches, len(vocab)


# --------------------------------------------------------------------------- the implementations


class NpyrnnPeer:
    library = "cupy"

    def __init__(self, cell, V, setting, seed, host_batches, name="npyrnn"):
        from npyrnn import backend
        from npyrnn.models import RNNLM
        from npyrnn.optim import SGD

        kwargs = {} if cell == "rnn" else {"cell": cell}
        self.name = name
        self.model = RNNLM(V, setting.hidden, init="uniform", dtype="float32", seed=seed, **kwargs)
        self.optimizer = SGD(self.model.params, 1.0)
        self.batches = [(backend.asarray(X), backend.asarray(Y)) for X, Y in host_batches]
        self.state = None

    def step(self, X, Y):
        """One training minibatch, the state carried; its loss as a 0-d device array."""
        from npyrnn.train import train_step

        if self.state is None:
            self.state = self.model.begin_state(X.shape[0])
        loss, self.state = train_step(self.model, X, Y, self.state, self.optimizer, clip=1.0)
        return loss

    def train(self):
        """Train on every minibatch, the state carried; return the mean loss as a 0-d device array."""
        total = self.model.xp.zeros((), dtype="float32")
        for X, Y in self.batches:
            total += self.step(X, Y)
        return total / len(self.batches)

    def loss_value(self, loss):
        from npyrnn import backend

        return float(backend.to_numpy(loss))


class TorchPeer:
    library = "torch"

    def __init__(self, device, host_batches):
        import torch

        self.device = device
        self.batches = [(torch.from_numpy(X).to(device), torch.from_numpy(Y).to(device)) for X, Y in host_batches]
        self.state = None

    def loss_value(self, loss):
        return float(loss)


class CudnnPeer(TorchPeer):
    """d2l's concise ``RNNModel`` around torch's cuDNN layer, ``torch.optim.SGD``, ``clip_grad_norm_``."""

    def __init__(self, cell, V, setting, device, host_batches, npyrnn_model=None):
        import torch
        from torch import nn

        from tests.reference import RNNModel, concise_twin

        super().__init__(device, host_batches)
        self.name = "cudnn"
        if cell == "rnn" and npyrnn_model is not None:
            net = concise_twin(npyrnn_model)  # npyrnn's initial weights
        else:
            layer = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[cell](V, setting.hidden)
            net = RNNModel(layer, V)  # torch's initialisation (the same scheme as init='uniform')
        self.cell = cell
        self.net = net.to(device)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=1.0)

    def begin_state(self, batch_size):
        import torch

        h = torch.zeros((1, batch_size, self.net.num_hiddens), device=self.device)
        return (h, torch.zeros_like(h)) if self.cell == "lstm" else h

    def train(self):
        import torch
        from torch.nn import functional as F

        total = torch.zeros((), device=self.device)
        for X, Y in self.batches:
            if self.state is None:
                self.state = self.begin_state(X.shape[0])
            else:
                for s in self.state if isinstance(self.state, tuple) else (self.state,):
                    s.detach_()
            y_hat, self.state = self.net(X, self.state)
            loss = F.cross_entropy(y_hat, Y.T.reshape(-1))
            self.optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
            self.optimizer.step()
            total += loss.detach()
        return total / len(self.batches)


class ScratchPeer(TorchPeer):
    """d2l's scratch model under autograd, d2l's ``grad_clipping`` (a host sync per step, as in the book) and ``sgd``."""

    def __init__(self, V, setting, device, host_batches, npyrnn_model):
        import torch

        from tests.reference import scratch_twin

        super().__init__(device, host_batches)
        self.name = "scratch"
        self.net = scratch_twin(npyrnn_model)
        self.net.params = [p.detach().to(device).requires_grad_(True) for p in self.net.params]
        self.net.init_state = lambda b, h, dtype: (torch.zeros((b, h), dtype=dtype, device=device),)

    def train(self):
        import torch
        from torch.nn import functional as F

        from tests.reference import grad_clipping, sgd

        total = torch.zeros((), device=self.device)
        for X, Y in self.batches:
            if self.state is None:
                self.state = self.net.begin_state(X.shape[0])
            else:
                for s in self.state:
                    s.detach_()
            y_hat, self.state = self.net(X, self.state)
            loss = F.cross_entropy(y_hat, Y.T.reshape(-1))
            loss.backward()
            grad_clipping(self.net, 1.0)
            sgd(self.net.params, 1.0, batch_size=1)
            total += loss.detach()
        return total / len(self.batches)


# --------------------------------------------------------------------------- measuring


def measure(impl, device):
    """One timed measurement: (seconds, mean loss as a float)."""
    device.sync()
    start = time.perf_counter()
    loss = impl.train()
    device.sync()
    seconds = time.perf_counter() - start
    return seconds, impl.loss_value(loss)


def run_setting(setting, cells, args, device, log):
    batches_per = args.batches
    host_batches, V = minibatches(setting, batches_per, args.seed)
    tokens = batches_per * setting.batch_size * setting.num_steps
    rows = {}
    for cell in cells:
        ours = NpyrnnPeer(cell, V, setting, args.seed, host_batches)
        impls = [ours, CudnnPeer(cell, V, setting, device.torch_device, host_batches, ours.model)]
        if cell == "rnn" and not args.no_scratch:
            impls.append(ScratchPeer(V, setting, device.torch_device, host_batches, ours.model))
        row = {"cell": cell, "vocab_size": V, "tokens_per_measurement": tokens, "memory": {}, "first_loss": {},
               "clipping": {"npyrnn": "npyrnn.optim.clip_grad_norm", "cudnn": "torch.nn.utils.clip_grad_norm_",
                            "scratch": "d2l grad_clipping (host sync per step)"},
               "weights": "cudnn and scratch start from npyrnn's initial weights" if cell == "rnn"
               else "cudnn uses torch's initialisation (npyrnn has no twin for this cell here)"}
        for impl in impls:  # warm-up, with the peak memory of a whole measurement
            token = device.begin_memory(impl.library)
            _, row["first_loss"][impl.name] = measure(impl, device)
            row["memory"][impl.name] = device.end_memory(impl.library, token)
        times = {impl.name: [] for impl in impls}
        losses = {impl.name: [] for impl in impls}
        for i in range(args.pairs):
            for impl in pair_order(i, *impls):
                seconds, loss = measure(impl, device)
                times[impl.name].append(seconds)
                losses[impl.name].append(loss)
        row["tokens_per_s"] = {n: summary([tokens / s for s in t]) for n, t in times.items()}
        row["mean_loss"] = losses
        for other in times:
            if other != "npyrnn":
                row[f"ratio_npyrnn_over_{other}"] = ratio_summary([tokens / s for s in times["npyrnn"]],
                                                                  [tokens / s for s in times[other]])
        rows[cell] = row
        log(f"  {setting.name} {cell}: " + ", ".join(f"{n} {row['tokens_per_s'][n]['median']:,.0f} tok/s"
                                                      for n in times))
        del impls, ours
    return {**dataclasses.asdict(setting), "batches_per_measurement": batches_per, "cells": rows}


def render(results):
    lines = [f"GPU: {results['meta']['device']}", "",
             "| setting | cell | npyrnn tok/s | cudnn tok/s | npyrnn/cudnn | scratch tok/s | npyrnn/scratch "
             "| peak MiB npyrnn / cudnn |",
             "|---|---|---|---|---|---|---|---|"]

    def mib(m):
        return "-" if m is None else f"{m['peak_bytes'] / 2**20:,.0f}"

    for s in results["settings"]:
        for cell, r in s["cells"].items():
            tps = r["tokens_per_s"]
            scratch = tps.get("scratch")
            lines.append(
                f"| {s['name']} (B {s['batch_size']}, T {s['num_steps']}, H {s['hidden']}) | {cell} "
                f"| {tps['npyrnn']['median']:,.0f} | {tps['cudnn']['median']:,.0f} "
                f"| {r['ratio_npyrnn_over_cudnn']['median']:.2f}x "
                f"| {'-' if scratch is None else format(scratch['median'], ',.0f')} "
                f"| {'-' if scratch is None else format(r['ratio_npyrnn_over_scratch']['median'], '.2f') + 'x'} "
                f"| {mib(r['memory']['npyrnn'])} / {mib(r['memory']['cudnn'])} |")
    return "\n".join(lines)


def metadata(args, device, cells):
    import platform

    import cupy
    import numpy
    import torch

    import npyrnn

    meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": platform.python_version(),
            "numpy": numpy.__version__, "cupy": cupy.__version__, "torch": torch.__version__,
            "npyrnn": npyrnn.__version__, "git_commit": git_commit(), "device": device.name(),
            "stand_in": args.stand_in, "tf32": args.tf32, "pairs": args.pairs, "batches": args.batches,
            "cells": cells, "dtype": "float32", "lr": 1.0, "clip": 1.0}
    if not args.stand_in:
        meta["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        meta["torch_cuda"] = torch.version.cuda
        meta["cudnn"] = torch.backends.cudnn.version()
    return meta


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.pairs is None:
        args.pairs = 1 if args.quick else 5
    if args.batches is None:
        args.batches = 3 if args.quick else 40
    if args.pairs < 1 or args.batches < 1:
        print("bench_gpu: --pairs and --batches must be at least 1", file=sys.stderr)
        return 2
    settings = QUICK_SETTINGS if args.quick else SETTINGS
    if args.only:
        known = {s.name: s for s in SETTINGS + QUICK_SETTINGS}
        unknown = [n for n in args.only if n not in known]
        if unknown:
            print(f"bench_gpu: unknown setting {unknown[0]!r}; choose from {', '.join(known)}", file=sys.stderr)
            return 2
        settings = [known[n] for n in args.only]
    if args.tf32:
        os.environ.setdefault("CUPY_TF32", "1")  # read when cupy is imported
    reason = why_not(args.stand_in)
    if reason is not None:
        print(f"bench_gpu: SKIPPED: {reason}", file=sys.stderr)
        write_json(args.json, {"skipped": reason})
        return 0
    import torch

    from npyrnn import backend

    backend.set_backend("cupy")
    if not args.stand_in:
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    device = Device(args.stand_in)
    wanted = [c.strip() for c in args.cells.split(",") if c.strip()]
    available = npyrnn_cells()
    cells = [c for c in wanted if c in available]
    missing = [c for c in wanted if c not in available]

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if missing:
        log(f"bench_gpu: npyrnn has no {'/'.join(missing)} yet: those rows are left out")
    results = {"meta": metadata(args, device, cells), "settings": []}
    start = time.perf_counter()
    for setting in settings:
        log(f"{setting.name} ...")
        results["settings"].append(run_setting(setting, cells, args, device, log))
        results["meta"]["complete"] = len(results["settings"]) == len(settings)
        results["meta"]["seconds"] = time.perf_counter() - start
        write_json(args.json, results)  # after each setting: a run stopped by a time limit keeps what it measured
    print(render(results))
    print(f"\n{results['meta']['seconds']:.0f} s; JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
