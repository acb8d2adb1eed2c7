#!/usr/bin/env python
"""npyrnn against the seed's two PyTorch versions (d2l chapter 8), in one run.

Sections (``--only`` picks one):

train     training tokens/s, float32, same thread count, same data:
          ``scratch``: d2l's RNN from scratch under autograd (hidden 512) vs npyrnn RNNLM(512, init='normal');
          ``concise``: d2l's RNNModel, nn.RNN + nn.Linear (hidden 256) vs npyrnn RNNLM(256, init='uniform').
generate  greedy generation at batch 1 after ``'time traveller '``: npyrnn ``predict`` vs d2l's
          ``predict_ch8`` loop (one step at a time, under ``torch.no_grad``), for both models.
memory    peak resident memory of each implementation's training, one subprocess each: the rise of
          VmHWM (Linux peak RSS) over the RSS after imports and corpus loading.
floor     the matrix-multiply floor of one npyrnn training minibatch at the scratch size: NumPy matmul
          at exactly the shapes one step uses, summed, against npyrnn's measured time per minibatch.

Each torch twin starts from the npyrnn model's initial weights, so both sides do the same arithmetic
on the same minibatches (each side has its own ``SeqDataLoader`` with the same seed). Measurements
alternate per pair: npyrnn then torch, torch then npyrnn, and so on, after one warm-up epoch (or
generation) per implementation. See ``benchmarks/README.md`` for what each number means.

Usage::

    NPYRNN_DATA_DIR=../shared/data python benchmarks/bench_train.py            # 5 pairs, all sections
    python benchmarks/bench_train.py --quick --json /tmp/bench.json            # smoke test, seconds
    python benchmarks/bench_train.py --only floor --pairs 3 --threads 1
"""

import argparse
import dataclasses
import datetime
import gc
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # benchmark this checkout's npyrnn

import numpy as np  # noqa: E402  (host-side benchmark code; npyrnn itself runs on NumPy here)

SECTIONS = ("train", "generate", "memory", "floor")
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "latest.json"
ENV_VARS = (
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "MKL_DEBUG_CPU_TYPE",
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "NPYRNN_BACKEND",
)
MEMORY_CHILDREN = ("npyrnn-scratch", "torch-scratch", "npyrnn-concise", "torch-concise")


@dataclasses.dataclass
class Config:
    """Sizes of one benchmark run (d2l chapter 8 by default; ``--quick`` shrinks them)."""

    max_tokens: int = 10000
    batch_size: int = 32
    num_steps: int = 35
    hidden_scratch: int = 512
    hidden_concise: int = 256
    lr: float = 1.0
    clip: float = 1.0
    num_preds: int = 500
    prefix: str = "time traveller "
    seed: int = 0
    pairs: int = 5
    batches: int = 0  # minibatches per training measurement; 0 = one full epoch
    floor_reps: int = 20
    gap_s: float = 0.1  # pause (and gc) before each measurement, so the other side's worker threads go idle


QUICK = dict(max_tokens=200, batch_size=4, num_steps=5, hidden_scratch=16, hidden_concise=16, num_preds=20,
             pairs=1, floor_reps=3, gap_s=0.0)


# --------------------------------------------------------------------------- small helpers


def summary(values):
    """``{'values', 'median', 'min', 'max'}`` of a list of numbers."""
    values = [float(v) for v in values]
    return {"values": values, "median": statistics.median(values), "min": min(values), "max": max(values)}


def ratio_summary(a, b):
    """Per-pair ratios a[i] / b[i] and their summary."""
    return summary([x / y for x, y in zip(a, b)])


def pause(cfg):
    gc.collect()
    if cfg.gap_s:
        time.sleep(cfg.gap_s)


def pair_order(i, first, second):
    """Pair i runs (first, second) when i is even and (second, first) when odd."""
    return (first, second) if i % 2 == 0 else (second, first)


def proc_status_kb(field):
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs); True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = proc_status_kb("VmHWM"), proc_status_kb("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit():
    try:  # read-only
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def load_data(cfg):
    from npyrnn.data import load_corpus

    return load_corpus("timemachine", token="char", max_tokens=cfg.max_tokens)


def limit_threads(n, with_torch):
    """Limit NumPy's BLAS (and every OpenMP runtime) to n threads, and torch's intra-op pool; return the limiter."""
    from threadpoolctl import threadpool_limits

    if with_torch:
        import torch

        torch.set_num_threads(n)
    return threadpool_limits(limits=n)


# --------------------------------------------------------------------------- implementations


class NpyrnnLM:
    """npyrnn's RNNLM trained with ``npyrnn.train.train_epoch`` (SGD, global-norm clipping)."""

    name = "npyrnn"

    def __init__(self, cfg, vocab, corpus, hidden, init):
        from npyrnn.data import SeqDataLoader
        from npyrnn.models import RNNLM
        from npyrnn.optim import SGD

        self.cfg, self.vocab = cfg, vocab
        self.model = RNNLM(len(vocab), hidden, init=init, dtype="float32", seed=cfg.seed)
        self.loader = SeqDataLoader(corpus, cfg.batch_size, cfg.num_steps, rng=np.random.default_rng(cfg.seed))
        self.optimizer = SGD(self.model.params, cfg.lr)

    def num_batches(self):
        n = len(self.loader)
        return min(n, self.cfg.batches) if self.cfg.batches else n

    def train_epoch(self):
        """Train one measurement; return (seconds, tokens, perplexity)."""
        from npyrnn.train import train_epoch

        batches = itertools.islice(iter(self.loader), self.num_batches())
        start = time.perf_counter()
        ppl, _ = train_epoch(self.model, batches, self.optimizer, clip=self.cfg.clip)
        seconds = time.perf_counter() - start
        return seconds, self.num_batches() * self.cfg.batch_size * self.cfg.num_steps, ppl

    def generate(self):
        """Greedy generation after the prefix; return (seconds, text)."""
        from npyrnn.train import predict

        start = time.perf_counter()
        text = predict(self.cfg.prefix, self.cfg.num_preds, self.model, self.vocab)
        return time.perf_counter() - start, text


class _TorchLM:
    """The d2l training epoch (``train_epoch_ch8``) and ``predict_ch8``, shared by both torch versions."""

    name = "torch"

    def __init__(self, cfg, vocab, corpus):
        from npyrnn.data import SeqDataLoader

        self.cfg, self.vocab = cfg, vocab
        self.loader = SeqDataLoader(corpus, cfg.batch_size, cfg.num_steps, rng=np.random.default_rng(cfg.seed))

    num_batches = NpyrnnLM.num_batches

    def grad_clipping(self, theta):
        """d2l's ``grad_clipping``: rescale all gradients when their global norm exceeds theta."""
        import torch

        params = self.parameters()
        norm = torch.sqrt(sum(torch.sum(p.grad**2) for p in params))
        if norm > theta:
            for p in params:
                p.grad[:] *= theta / norm

    def train_epoch(self):
        import torch

        start = time.perf_counter()
        state, loss_sum, num_tokens = None, 0.0, 0
        for X, Y in itertools.islice(iter(self.loader), self.num_batches()):
            X, Y = torch.from_numpy(X), torch.from_numpy(Y)
            if state is None:
                state = self.begin_state(X.shape[0])
            else:  # carry the state, cut its gradient (d2l: state.detach_())
                for s in state if isinstance(state, tuple) else (state,):
                    s.detach_()
            y = Y.T.reshape(-1)
            y_hat, state = self(X, state)
            loss = torch.nn.functional.cross_entropy(y_hat, y).mean()
            self.update(loss)
            loss_sum += float(loss.detach()) * y.numel()  # d2l's Accumulator: metric.add(l * y.numel(), y.numel())
            num_tokens += y.numel()
        seconds = time.perf_counter() - start
        return seconds, num_tokens, math.exp(loss_sum / num_tokens)

    def generate(self):
        """d2l's ``predict_ch8``, one token per step (prefix included), greedy, under ``torch.no_grad``."""
        import torch

        vocab, prefix = self.vocab, self.cfg.prefix
        start = time.perf_counter()
        with torch.no_grad():
            state = self.begin_state(1)
            outputs = [vocab[prefix[0]]]
            for ch in prefix[1:]:  # warm-up over the prefix
                _, state = self(torch.tensor([outputs[-1]]).reshape(1, 1), state)
                outputs.append(vocab[ch])
            for _ in range(self.cfg.num_preds):
                y, state = self(torch.tensor([outputs[-1]]).reshape(1, 1), state)
                outputs.append(int(y.argmax(dim=1).reshape(1)))
        seconds = time.perf_counter() - start
        return seconds, "".join(vocab.idx_to_token[i] for i in outputs)


class TorchScratch(_TorchLM):
    """d2l's ``RNNModelScratch`` with ``get_params``/``rnn``/``sgd``, under autograd."""

    def __init__(self, cfg, vocab, corpus, hidden, init_from=None):
        import torch

        super().__init__(cfg, vocab, corpus)
        V, H = len(vocab), hidden
        if init_from is None:  # d2l get_params: N(0, 0.01^2) weights, zero biases
            W_xh, W_hh, W_hq = torch.randn(V, H) * 0.01, torch.randn(H, H) * 0.01, torch.randn(H, V) * 0.01
            b_h, b_q = torch.zeros(H), torch.zeros(V)
        else:  # the npyrnn model's weights, transposed to d2l's (in, out) layout
            p = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in init_from.params.items()}
            W_xh, W_hh, W_hq = p["rnn.weight_ih_l0"].T, p["rnn.weight_hh_l0"].T, p["linear.weight"].T
            b_h, b_q = p["rnn.bias_ih_l0"] + p["rnn.bias_hh_l0"], p["linear.bias"]
        self.params = [t.contiguous().clone().requires_grad_(True) for t in (W_xh, W_hh, b_h, W_hq, b_q)]
        self.vocab_size, self.num_hiddens = V, H

    def parameters(self):
        return self.params

    def begin_state(self, batch_size):
        import torch

        return (torch.zeros((batch_size, self.num_hiddens)),)

    def __call__(self, X, state):
        import torch
        import torch.nn.functional as F

        inputs = F.one_hot(X.T, self.vocab_size).type(torch.float32)  # (T, B, V)
        W_xh, W_hh, b_h, W_hq, b_q = self.params
        (H,) = state
        outputs = []
        for x in inputs:
            H = torch.tanh(torch.mm(x, W_xh) + torch.mm(H, W_hh) + b_h)
            outputs.append(torch.mm(H, W_hq) + b_q)
        return torch.cat(outputs, dim=0), (H,)

    def update(self, loss):
        import torch

        loss.backward()
        self.grad_clipping(self.cfg.clip)
        with torch.no_grad():  # d2l sgd(params, lr, batch_size=1)
            for p in self.params:
                p -= self.cfg.lr * p.grad
                p.grad.zero_()


class TorchConcise(_TorchLM):
    """d2l's ``RNNModel(nn.RNN(V, H), V)`` with ``torch.optim.SGD`` and d2l's ``grad_clipping``."""

    def __init__(self, cfg, vocab, corpus, hidden, init_from=None):
        import torch
        from torch import nn

        super().__init__(cfg, vocab, corpus)

        class RNNModel(nn.Module):  # d2l, verbatim but for the fixed single direction
            def __init__(self, rnn_layer, vocab_size):
                super().__init__()
                self.rnn, self.vocab_size = rnn_layer, vocab_size
                self.num_hiddens = rnn_layer.hidden_size
                self.linear = nn.Linear(self.num_hiddens, vocab_size)

            def forward(self, inputs, state):
                X = torch.nn.functional.one_hot(inputs.T.long(), self.vocab_size).to(torch.float32)
                Y, state = self.rnn(X, state)
                return self.linear(Y.reshape((-1, Y.shape[-1]))), state

        self.net = RNNModel(nn.RNN(len(vocab), hidden), len(vocab))
        if init_from is not None:  # npyrnn uses torch's parameter names: the state dicts match
            self.net.load_state_dict(
                {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in init_from.params.items()}
            )
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=cfg.lr)
        self.hidden = hidden

    def parameters(self):
        return [p for p in self.net.parameters() if p.requires_grad]

    def begin_state(self, batch_size):
        import torch

        return torch.zeros((1, batch_size, self.hidden))

    def __call__(self, X, state):
        return self.net(X, state)

    def update(self, loss):
        self.optimizer.zero_grad()
        loss.backward()
        self.grad_clipping(self.cfg.clip)
        self.optimizer.step()


def make_pair(cfg, vocab, corpus, kind):
    """(npyrnn, torch) twins with the same initial weights, for 'scratch' or 'concise'."""
    if kind == "scratch":
        ours = NpyrnnLM(cfg, vocab, corpus, cfg.hidden_scratch, init="normal")
        return ours, TorchScratch(cfg, vocab, corpus, cfg.hidden_scratch, init_from=ours.model)
    ours = NpyrnnLM(cfg, vocab, corpus, cfg.hidden_concise, init="uniform")
    return ours, TorchConcise(cfg, vocab, corpus, cfg.hidden_concise, init_from=ours.model)


# --------------------------------------------------------------------------- sections


def bench_train(cfg, corpus, vocab, log):
    results = {}
    impls = {kind: make_pair(cfg, vocab, corpus, kind) for kind in ("scratch", "concise")}
    for kind, (ours, theirs) in impls.items():
        for impl in (ours, theirs):  # warm-up epoch per implementation
            impl.train_epoch()
        results[kind] = {
            "hidden": cfg.hidden_scratch if kind == "scratch" else cfg.hidden_concise,
            "minibatches_per_measurement": ours.num_batches(),
            "tokens_per_measurement": ours.num_batches() * cfg.batch_size * cfg.num_steps,
            "clipping": "d2l grad_clipping (torch); npyrnn.optim.clip_grad_norm (npyrnn)",
        }
    rec = {kind: {"npyrnn": [], "torch": [], "ppl_npyrnn": [], "ppl_torch": [], "cpu_util_npyrnn": [],
                  "cpu_util_torch": []} for kind in impls}
    for i in range(cfg.pairs):
        for kind, (ours, theirs) in impls.items():
            for impl in pair_order(i, ours, theirs):
                pause(cfg)
                cpu0 = time.process_time()
                seconds, tokens, ppl = impl.train_epoch()
                cpu = time.process_time() - cpu0
                rec[kind][impl.name].append(tokens / seconds)
                rec[kind][f"ppl_{impl.name}"].append(ppl)
                rec[kind][f"cpu_util_{impl.name}"].append(cpu / seconds)
            log(f"  train {kind} pair {i + 1}/{cfg.pairs}: npyrnn {rec[kind]['npyrnn'][-1]:,.0f} tok/s, "
                f"torch {rec[kind]['torch'][-1]:,.0f} tok/s")
    for kind, r in rec.items():
        results[kind].update(
            tokens_per_s={"npyrnn": summary(r["npyrnn"]), "torch": summary(r["torch"])},
            ratio_npyrnn_over_torch=ratio_summary(r["npyrnn"], r["torch"]),
            perplexity={"npyrnn": r["ppl_npyrnn"], "torch": r["ppl_torch"]},
            cpu_seconds_per_wall_second={"npyrnn": summary(r["cpu_util_npyrnn"]),
                                         "torch": summary(r["cpu_util_torch"])},
        )
    return results


def bench_generate(cfg, corpus, vocab, log):
    results = {}
    impls = {kind: make_pair(cfg, vocab, corpus, kind) for kind in ("scratch", "concise")}
    texts = {}
    for kind, pair in impls.items():
        for impl in pair:  # warm-up
            texts[(kind, impl.name)] = impl.generate()[1]
    rec = {kind: {"npyrnn": [], "torch": []} for kind in impls}
    for i in range(cfg.pairs):
        for kind, (ours, theirs) in impls.items():
            for impl in pair_order(i, ours, theirs):
                pause(cfg)
                seconds, _ = impl.generate()
                rec[kind][impl.name].append(cfg.num_preds / seconds)
        log(f"  generate pair {i + 1}/{cfg.pairs}: " + ", ".join(
            f"{kind} npyrnn {r['npyrnn'][-1]:,.0f} / torch {r['torch'][-1]:,.0f} chars/s" for kind, r in rec.items()))
    for kind, r in rec.items():
        results[kind] = {
            "hidden": cfg.hidden_scratch if kind == "scratch" else cfg.hidden_concise,
            "num_preds": cfg.num_preds,
            "prefix": cfg.prefix,
            "chars_per_s": {"npyrnn": summary(r["npyrnn"]), "torch": summary(r["torch"])},
            "ratio_npyrnn_over_torch": ratio_summary(r["npyrnn"], r["torch"]),
            "same_text": texts[(kind, "npyrnn")] == texts[(kind, "torch")],  # same untrained weights, greedy
        }
    return results


def memory_child(cfg, which, threads):
    """Run in a subprocess: peak RSS rise of one implementation's training (warm-up + one measurement)."""
    with_torch = which.startswith("torch")
    if with_torch:
        import torch

        # torch.optim imports torch._dynamo lazily, on the first optimizer (~60 MiB): count it as an import
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    import npyrnn.data  # noqa: F401
    import npyrnn.models  # noqa: F401
    import npyrnn.train  # noqa: F401

    with limit_threads(threads, with_torch):
        corpus, vocab = load_data(cfg)
        baseline = proc_status_kb("VmRSS")
        hwm_before = proc_status_kb("VmHWM")
        reset = reset_peak_rss()
        lib, kind = which.split("-")
        hidden = cfg.hidden_scratch if kind == "scratch" else cfg.hidden_concise
        if lib == "npyrnn":
            impl = NpyrnnLM(cfg, vocab, corpus, hidden, init="normal" if kind == "scratch" else "uniform")
        else:  # the framework's own initialisation: no npyrnn model in this process
            impl = (TorchScratch if kind == "scratch" else TorchConcise)(cfg, vocab, corpus, hidden)
        impl.train_epoch()
        impl.train_epoch()
        peak = proc_status_kb("VmHWM")
    return {
        "implementation": which,
        "hidden": hidden,
        "baseline_rss_kb": baseline,
        "hwm_before_reset_kb": hwm_before,
        "hwm_reset": reset,
        "peak_rss_kb": peak,
        # without a working reset the peak may be the import peak; fall back to the larger of the two
        "increase_kb": None if peak is None or baseline is None else peak - baseline,
    }


def bench_memory(cfg, threads, log):
    results = {}
    for which in MEMORY_CHILDREN:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-child", which, "--threads", str(threads),
               "--_config", json.dumps(dataclasses.asdict(cfg))]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"memory child {which} failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results[which] = r
        log(f"  memory {which}: +{r['increase_kb'] / 1024:.1f} MiB over {r['baseline_rss_kb'] / 1024:.1f} MiB "
            f"(peak reset {'ok' if r['hwm_reset'] else 'FAILED'})")
    for kind in ("scratch", "concise"):
        a, b = results[f"npyrnn-{kind}"]["increase_kb"], results[f"torch-{kind}"]["increase_kb"]
        results[f"ratio_{kind}_npyrnn_over_torch"] = a / b if a is not None and b else None
    results["method"] = (
        "one subprocess per implementation; baseline = VmRSS after imports (for torch including the lazy import of "
        "torch._dynamo that the first torch.optim optimizer triggers) and corpus loading; then VmHWM is reset "
        "(echo 5 > /proc/self/clear_refs), the model is built and trained for two measurements' worth of "
        "minibatches (warm-up + one), and the increase is VmHWM - baseline. Includes parameters, gradients, "
        "activations, autograd graph, allocator caches and thread stacks; RSS counts pages touched, not bytes "
        "requested."
    )
    return results


def matmul_products(B, T, H, V):
    """The matrix products of one npyrnn training minibatch (one layer, token-id input), torch layout.

    Returns a list of (name, shape text, count, flops of one call).
    """
    N = T * B
    return [
        ("forward h_{t-1} W_hh^T", f"({B},{H})@({H},{H}) x{T}", T, 2 * B * H * H),
        ("output logits = out W^T", f"({N},{H})@({H},{V})", 1, 2 * N * H * V),
        ("output dout = dlogits W", f"({N},{V})@({V},{H})", 1, 2 * N * V * H),
        ("backward da_t W_hh", f"({B},{H})@({H},{H}) x{T}", T, 2 * B * H * H),
        ("grad dW_hh = dA^T H_prev", f"({H},{N})@({N},{H})", 1, 2 * H * N * H),
        ("grad dW_out = dlogits^T out", f"({V},{N})@({N},{H})", 1, 2 * V * N * H),
    ]


def floor_kernels(B, T, H, V, rng):
    """Callables running each product of :func:`matmul_products` once (the x T ones: a loop of T), as npyrnn does."""
    f32 = np.float32
    N = T * B
    # variance 1/H: h W^T keeps the norm of h on average, so 35 chained steps stay O(1) (no inf, no denormals)
    W_hh = (rng.standard_normal((H, H)) / math.sqrt(H)).astype(f32)
    W_out = (rng.standard_normal((V, H)) / math.sqrt(H)).astype(f32)
    Hs = rng.standard_normal((T + 1, B, H)).astype(f32)
    dA = rng.standard_normal((T, B, H)).astype(f32)
    dlogits = rng.standard_normal((N, V)).astype(f32)
    out2, prev, dA2 = Hs[1:].reshape(N, H), Hs[:T].reshape(N, H), dA.reshape(N, H)
    Hf = Hs.copy()
    carry = np.empty((B, H), f32)
    logits, dout = np.empty((N, V), f32), np.empty((N, H), f32)
    dW_hh, dW_out = np.empty((H, H), f32), np.empty((V, H), f32)

    def forward():
        for t in range(T):
            np.matmul(Hf[t], W_hh.T, out=Hf[t + 1])  # chained, like the recurrence; no tanh: matmul only

    def backward():
        for t in range(T - 1, -1, -1):
            np.matmul(dA[t], W_hh, out=carry)

    return [
        forward,
        lambda: np.matmul(out2, W_out.T, out=logits),
        lambda: np.matmul(dlogits, W_out, out=dout),
        backward,
        lambda: np.matmul(dA2.T, prev, out=dW_hh),
        lambda: np.matmul(dlogits.T, out2, out=dW_out),
    ]


def time_floor(kernels, reps):
    """Median seconds of each kernel over ``reps`` calls (after one warm-up call each), interleaved."""
    for k in kernels:
        k()
    times = [[] for _ in kernels]
    for _ in range(reps):
        for k, ts in zip(kernels, times):
            t0 = time.perf_counter()
            k()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def npyrnn_steps(ours):
    """One epoch of ``npyrnn.train.train_step`` calls, state carried; return (seconds, seconds of each minibatch)."""
    from npyrnn.train import train_step

    model, cfg, times = ours.model, ours.cfg, []
    state = None
    start = time.perf_counter()
    for X, Y in itertools.islice(iter(ours.loader), ours.num_batches()):
        t0 = time.perf_counter()
        if state is None:
            state = model.begin_state(X.shape[0])
        loss, state = train_step(model, X, Y, state, ours.optimizer, cfg.clip)
        float(loss)  # a no-op on NumPy; a sync on CuPy
        times.append(time.perf_counter() - t0)
    return time.perf_counter() - start, times


def npyrnn_phases(ours):
    """Time forward / loss / backward / clip / SGD of each minibatch of one epoch, with the public API."""
    from npyrnn.losses import softmax_cross_entropy
    from npyrnn.optim import clip_grad_norm

    model, cfg = ours.model, ours.cfg
    phases = {"zero_grad": [], "forward": [], "loss": [], "backward": [], "clip": [], "sgd": []}
    state = None
    for X, Y in itertools.islice(iter(ours.loader), ours.num_batches()):
        if state is None:
            state = model.begin_state(X.shape[0])
        t0 = time.perf_counter()
        model.zero_grad()
        t1 = time.perf_counter()
        logits, state = model.forward(X, state)
        t2 = time.perf_counter()
        _, dlogits = softmax_cross_entropy(logits, Y.T.reshape(-1))
        t3 = time.perf_counter()
        model.backward(dlogits)
        t4 = time.perf_counter()
        clip_grad_norm(model.grads, cfg.clip)
        t5 = time.perf_counter()
        ours.optimizer.step(model.grads)
        t6 = time.perf_counter()
        for name, a, b in zip(phases, (t0, t1, t2, t3, t4, t5), (t1, t2, t3, t4, t5, t6)):
            phases[name].append(b - a)
    return {name: statistics.median(ts) for name, ts in phases.items()}


def bench_floor(cfg, corpus, vocab, log):
    B, T, H, V = cfg.batch_size, cfg.num_steps, cfg.hidden_scratch, len(vocab)
    products = matmul_products(B, T, H, V)
    kernels = floor_kernels(B, T, H, V, np.random.default_rng(cfg.seed))
    ours = NpyrnnLM(cfg, vocab, corpus, H, init="normal")
    ours.train_epoch()  # warm-up
    time_floor(kernels, 1)
    flops = sum(count * f for _, _, count, f in products)
    floor_s, step_s, epoch_step_s, per_product, phases = [], [], [], [], []

    def measure_floor():
        pause(cfg)
        ts = time_floor(kernels, cfg.floor_reps)
        per_product.append(ts)
        floor_s.append(sum(ts))

    def measure_npyrnn():
        pause(cfg)
        seconds, times = npyrnn_steps(ours)
        step_s.append(statistics.median(times))  # robust to preemption, like the floor's medians
        epoch_step_s.append(seconds / len(times))

    for i in range(cfg.pairs):
        for measure in pair_order(i, measure_npyrnn, measure_floor):
            measure()
        pause(cfg)
        phases.append(npyrnn_phases(ours))
        log(f"  floor pair {i + 1}/{cfg.pairs}: floor {floor_s[-1] * 1e3:.2f} ms, "
            f"npyrnn {step_s[-1] * 1e3:.2f} ms per minibatch")
    ratio = ratio_summary(step_s, floor_s)
    return {
        "shapes": {"batch_size": B, "num_steps": T, "hidden": H, "vocab_size": V},
        "products": [
            {"name": name, "shape": shape, "calls": count, "flops": count * f,
             "seconds": summary([p[j] for p in per_product]),
             "gflops_per_s": count * f / statistics.median([p[j] for p in per_product]) / 1e9}
            for j, (name, shape, count, f) in enumerate(products)
        ],
        "flops_per_minibatch": flops,
        "floor_seconds": summary(floor_s),
        "npyrnn_seconds_per_minibatch": summary(step_s),
        "npyrnn_epoch_seconds_per_minibatch": summary(epoch_step_s),
        "ratio_npyrnn_over_floor": ratio,
        "target_ratio": 1.25,
        "floor_gflops_per_s": flops / statistics.median(floor_s) / 1e9,
        "npyrnn_gflops_per_s": flops / statistics.median(step_s) / 1e9,
        "npyrnn_phase_seconds": {name: statistics.median(p[name] for p in phases) for name in phases[0]},
        "notes": (
            "floor = sum over the products of the median time of one call (the x T products: one loop of T calls "
            "into preallocated outputs, the forward ones chained); npyrnn time per minibatch = median over "
            "one epoch's minibatches of npyrnn.train.train_step (forward, loss, backward, clip, SGD); "
            "npyrnn_epoch_seconds_per_minibatch = the whole epoch (data slicing included) / minibatches. "
            "Not counted: the one-hot input "
            "gather and its scatter-add gradient (memory-bound, no FLOPs) and the elementwise work."
        ),
    }


# --------------------------------------------------------------------------- report


def metadata(cfg, threads, args):
    import threadpoolctl
    import torch

    import npyrnn

    blas = threadpoolctl.threadpool_info()
    torch_config = torch.__config__.show()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "npyrnn": npyrnn.__version__,
        "git_commit": git_commit(),
        "threadpoolctl": threadpoolctl.__version__,
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "blas": blas,
        "numpy_blas_architecture": [b.get("architecture") for b in blas if b.get("user_api") == "blas"],
        "torch_blas": [line.strip(" -") for line in torch_config.splitlines()
                       if "Math Kernel" in line or "CPU capability" in line]
                      + [w.strip(" ,") for w in torch_config.split() if w.startswith("BLAS_INFO=")],
        "env": {k: os.environ.get(k) for k in ENV_VARS},
        "config": dataclasses.asdict(cfg),
        "argv": sys.argv[1:],
        "sections": args.only or list(SECTIONS),
    }


def fmt_table(rows, header):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if j else str(c).ljust(w) for j, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def render(results):
    meta = results["meta"]
    out = [
        f"npyrnn benchmark  {meta['date']}  {meta['cpu_model']}  threads={meta['threads']}  "
        f"numpy {meta['numpy']} (BLAS {', '.join(map(str, meta['numpy_blas_architecture']))})  torch {meta['torch']}",
        "env: " + (" ".join(f"{k}={v}" for k, v in meta["env"].items() if v is not None)
                   or "(none of the BLAS/OpenMP variables set)"),
        f"pairs={meta['config']['pairs']}; ratio = npyrnn / torch per pair (median [min, max]); "
        "higher is better for npyrnn",
    ]
    r3 = lambda s: f"{s['median']:.2f} [{s['min']:.2f}, {s['max']:.2f}]"
    if "train" in results:
        rows = []
        for kind, r in results["train"].items():
            rows.append([kind, r["hidden"], f"{r['tokens_per_s']['npyrnn']['median']:,.0f}",
                         f"{r['tokens_per_s']['torch']['median']:,.0f}", r3(r["ratio_npyrnn_over_torch"]),
                         f"{r['perplexity']['npyrnn'][-1]:.2f} / {r['perplexity']['torch'][-1]:.2f}"])
        out += ["", "TRAIN tokens/s (median over pairs; each measurement "
                f"{next(iter(results['train'].values()))['tokens_per_measurement']} tokens)",
                fmt_table(rows, ["model", "hidden", "npyrnn", "torch", "ratio", "last ppl npyrnn/torch"])]
    if "generate" in results:
        rows = [[kind, r["hidden"], f"{r['chars_per_s']['npyrnn']['median']:,.0f}",
                 f"{r['chars_per_s']['torch']['median']:,.0f}", r3(r["ratio_npyrnn_over_torch"]), r["same_text"]]
                for kind, r in results["generate"].items()]
        out += ["", f"GENERATE chars/s (batch 1, greedy, {meta['config']['num_preds']} chars after "
                f"{meta['config']['prefix']!r})",
                fmt_table(rows, ["model", "hidden", "npyrnn", "torch", "ratio", "same text"])]
    if "memory" in results:
        m = results["memory"]
        rows = []
        for kind in ("scratch", "concise"):
            a, b = m[f"npyrnn-{kind}"], m[f"torch-{kind}"]
            ratio = m[f"ratio_{kind}_npyrnn_over_torch"]
            rows.append([kind, a["hidden"], f"{a['increase_kb'] / 1024:.1f}", f"{b['increase_kb'] / 1024:.1f}",
                         "-" if ratio is None else f"{ratio:.2f}",
                         f"{a['baseline_rss_kb'] / 1024:.0f} / {b['baseline_rss_kb'] / 1024:.0f}"])
        out += ["", "MEMORY peak RSS increase over baseline during training, MiB (lower is better)",
                fmt_table(rows, ["model", "hidden", "npyrnn", "torch", "npyrnn/torch", "baseline npyrnn/torch"])]
    if "floor" in results:
        f = results["floor"]
        rows = [[p["name"], p["shape"], f"{p['seconds']['median'] * 1e3:.3f}", f"{p['gflops_per_s']:.1f}"]
                for p in f["products"]]
        rows.append(["floor (sum)", "", f"{f['floor_seconds']['median'] * 1e3:.3f}", f"{f['floor_gflops_per_s']:.1f}"])
        rows.append(["npyrnn minibatch", "", f"{f['npyrnn_seconds_per_minibatch']['median'] * 1e3:.3f}",
                     f"{f['npyrnn_gflops_per_s']:.1f}"])
        ph = f["npyrnn_phase_seconds"]
        out += ["", f"FLOOR at hidden {f['shapes']['hidden']} (NumPy matmul, float32; "
                f"{f['flops_per_minibatch'] / 1e9:.3f} GFLOP per minibatch)",
                fmt_table(rows, ["product", "shape", "ms", "GFLOP/s"]),
                f"npyrnn / floor: {r3(f['ratio_npyrnn_over_floor'])} (target <= {f['target_ratio']})",
                "npyrnn phases, ms (median): " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in ph.items())]
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, help="A/B pairs per measurement (default 5; 1 with --quick)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for NumPy's BLAS and torch (default os.cpu_count())")
    p.add_argument("--quick", action="store_true", help="tiny sizes for smoke tests (hidden 16, 200 tokens, 1 pair)")
    p.add_argument("--only", choices=SECTIONS, action="append", help="run only this section (repeatable)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON,
                   help=f"where to write the results (default {DEFAULT_JSON.relative_to(ROOT)})")
    p.add_argument("--batches", type=int, help="minibatches per training measurement (default: one full epoch)")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-steps", type=int)
    p.add_argument("--hidden-scratch", type=int)
    p.add_argument("--hidden-concise", type=int)
    p.add_argument("--num-preds", type=int)
    p.add_argument("--floor-reps", type=int, help="calls per product in each floor measurement (default 20)")
    p.add_argument("--seed", type=int)
    p.add_argument("--_memory-child", dest="memory_child", choices=MEMORY_CHILDREN, help=argparse.SUPPRESS)
    p.add_argument("--_config", dest="config", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_config(args):
    if args.config:
        return Config(**json.loads(args.config))
    values = dict(QUICK) if args.quick else {}
    for field in dataclasses.fields(Config):
        v = getattr(args, field.name, None)
        if v is not None:
            values[field.name] = v
    cfg = Config(**values)
    if cfg.pairs < 1:
        raise SystemExit("bench_train: --pairs must be at least 1")
    return cfg


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = make_config(args)
    threads = args.threads or os.cpu_count() or 1
    if args.memory_child:
        print(json.dumps(memory_child(cfg, args.memory_child, threads)))
        return 0
    try:
        import threadpoolctl  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        print(f"bench_train: needs torch and threadpoolctl ({exc}); pip install torch==2.13.0 threadpoolctl",
              file=sys.stderr)
        return 2
    sections = args.only or list(SECTIONS)
    results = {"meta": metadata(cfg, threads, args)}
    progress = results["meta"]["progress"] = []  # every progress line with the 1-minute load average then

    def log(msg):
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        progress.append({"message": msg.strip(), "loadavg_1min": load})
        print(msg if load is None else f"{msg}  [load {load:.2f}]", file=sys.stderr, flush=True)

    start = time.perf_counter()
    with limit_threads(threads, with_torch=True):
        import threadpoolctl
        import torch

        results["meta"]["threads_in_effect"] = {  # what the limits actually set, per library
            "torch.get_num_threads": torch.get_num_threads(),
            **{f"{b['prefix']} ({b['user_api']})": b["num_threads"] for b in threadpoolctl.threadpool_info()},
        }
        corpus, vocab = load_data(cfg)
        if "train" in sections:
            log("train ...")
            results["train"] = bench_train(cfg, corpus, vocab, log)
        if "generate" in sections:
            log("generate ...")
            results["generate"] = bench_generate(cfg, corpus, vocab, log)
        if "floor" in sections:
            log("floor ...")
            results["floor"] = bench_floor(cfg, corpus, vocab, log)
    if "memory" in sections:
        log("memory ...")
        results["memory"] = bench_memory(cfg, threads, log)
    results["meta"]["seconds"] = time.perf_counter() - start
    results["meta"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_name(args.json.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(args.json)
    print(render(results))
    print(f"\n{results['meta']['seconds']:.0f} s; loadavg {results['meta']['loadavg_start']} -> "
          f"{results['meta']['loadavg_end']}; JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
