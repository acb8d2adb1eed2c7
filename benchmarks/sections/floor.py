"""floor: npyrnn's time per training minibatch against the time of its own matrix products.

``products`` describes each product of one minibatch once (name, shape, calls, FLOPs) together
with the NumPy call that times it; the floor is the sum of their median times. One floor per
cell in ``cfg.cells``: the Elman RNN at ``hidden_scratch`` (d2l's chapter 8 scratch size), the GRU
and LSTM at ``hidden_concise`` (chapter 9's 256), with G = 1, 3, 4 gates stacked in every
hidden-side product as npyrnn (and cuDNN) fuse them; the GRU is torch's variant
(``reset_after=True``), whose hidden product is one GEMM for all three gates.
"""

import collections
import contextlib
import dataclasses
import functools
import itertools
import math
import statistics
import time
from typing import Callable

import numpy as np

from benchmarks.common import pair_order, pause, ratio_summary, summary
from benchmarks.peers.npyrnn_peer import NpyrnnLM

GATES = {"rnn": 1, "gru": 3, "lstm": 4}

NOTES = (
    "floor = sum over the products of the median time of one call, numpy.matmul (the x T products: one loop of T calls "
    "into preallocated outputs, the forward ones chained and reading W_hh^T as npyrnn's do here: a C-ordered "
    "copy where OpenBLAS runs its AVX-512 kernels (forward_reads_a_copy_of_w_transposed), else the view); "
    "npyrnn time per minibatch = median over "
    "one epoch's minibatches of npyrnn.train.train_step (forward, loss, backward, clip, SGD); "
    "npyrnn_epoch_seconds_per_minibatch = the whole epoch (data slicing included) / minibatches. "
    "Not counted: the one-hot input gather and its scatter-add gradient (memory-bound, no FLOPs) and the "
    "elementwise work. npyrnn runs on the cores as `npyrnn train --threads` sets them (split products where "
    "the fast extra has them: npyrnn_split_products), the floor's products with OpenBLAS's own threads. "
    "npyrnn_parts: median seconds per minibatch of each call a minibatch is made of (outermost calls only; "
    "'other' is the rest of train_step: Python, zero_grad, the output layer's bias and state copies). "
    "npyrnn_products_floor_seconds: the same products through npyrnn.backend.matmul on the cores as "
    "`npyrnn train --threads` sets them (the split products' blocks, a step's product in npyrnn's tiles; the x T "
    "step products in one compiled loop of cpu_gemm.loop_product calls, as npyrnn's compiled time loops run them, "
    "since 2026-12-08 later: before, T calls of backend.matmul from Python, 10-15 us of Python each), "
    "and ratio_npyrnn_over_its_products_floor against it."
)


@dataclasses.dataclass
class Product:
    """One matrix product of a training minibatch, and a callable that performs all its calls."""

    name: str
    shape: str
    calls: int
    flops_per_call: int
    run: Callable[[], None]

    @property
    def flops(self):
        return self.calls * self.flops_per_call


StepLoops = collections.namedtuple("StepLoops", "forward backward step_operand run_loop")


@functools.lru_cache(maxsize=None)
def _step_loops():
    """`StepLoops` (forward, backward, step_operand, run_loop): compiled loops of a minibatch's x T step products, each product
    `cpu_gemm.loop_product` as npyrnn's compiled time loops call it (`cpu_gemm.run_loop`), with nothing
    between the products; None without the fast extra."""
    try:
        from numba import njit

        from npyrnn.nn import cpu_gemm
        from npyrnn.nn.cpu_loops import _step_operand
    except ImportError:
        return None
    if cpu_gemm.why_unavailable() is not None:
        return None
    loop_product, NO_TRANS = cpu_gemm.loop_product, cpu_gemm.NO_TRANS

    @njit(nogil=True)
    def forward(ctl, ts, hs, ps, helpers, plans, part, lseq, Gf, W, tb, H):
        took = 1
        for t in range(Gf.shape[0] - 1):  # chained, as `products` chains them
            took = max(took, loop_product(ctl, ts, Gf[t, :, :H], W, Gf[t + 1], hs, ps, tb, plans[0], helpers))
        return took

    @njit(nogil=True)
    def backward(ctl, ts, hs, ps, helpers, plans, part, lseq, dA, W, carry):
        took = 1
        for t in range(dA.shape[0] - 1, -1, -1):
            took = max(took, loop_product(ctl, ts, dA[t], W, carry, hs, ps, NO_TRANS, plans[0], helpers))
        return took

    return StepLoops(forward, backward, _step_operand, cpu_gemm.run_loop)


def products(B, T, H, V, rng, gates=1, copies=None, matmul=np.matmul, loops=False):
    """The matrix products of one npyrnn training minibatch (one layer, token-id input), torch layout.

    ``gates`` is G: 1 (RNN), 3 (GRU), 4 (LSTM); ``W_hh`` is (G*H, H) with the gates stacked, so each
    step's hidden product is one (B, H) @ (H, G*H) GEMM forward and one (B, G*H) @ (G*H, H) backward,
    and the weight gradient one (G*H, T*B) @ (T*B, H) GEMM after the loop. The input side is a gather
    (token ids): no product. Each runs as npyrnn calls it: float32, ``np.matmul`` into preallocated
    outputs; the x T products as one loop of T calls, the forward ones chained (``h_{t+1}`` = the
    first H columns of ``h_t W^T``, with ``W ~ N(0, 1/H)`` so that the values stay O(1): no inf, no
    denormals; no non-linearity). The forward products read W^T as npyrnn's do on this machine
    (``copies``, default ``backend.transposed_copies_pay()``): a C-ordered copy where OpenBLAS runs
    its AVX-512 kernels, which multiply 32 rows by the view ``W.T`` 1.2 to 1.5 times slower (the
    copy itself, 0.03 to 0.07 ms a minibatch, is not a product: npyrnn pays it, the floor does
    not), else the view; the copy's rows and the outputs' are padded where npyrnn pads them.
    ``matmul(a, b, out=)``: what runs each product, ``numpy.matmul`` (OpenBLAS's threads) or
    ``npyrnn.backend.matmul`` while the split products are on (their blocks and tiles, as npyrnn's
    loops run them). ``loops``: the x T step products in a compiled loop (`_step_loops`), as npyrnn's
    compiled time loops run them, rather than T calls from Python (``backend.matmul`` costs 10 to 15 us
    of Python a call, most of a step product's 35 to 60 here); where the split products decline the
    loop, T calls of ``matmul`` as without it.
    """
    from npyrnn import backend
    from npyrnn.nn.recurrent import row_pad

    copies = backend.transposed_copies_pay() if copies is None else copies
    f32, N, G = np.float32, T * B, gates
    # rows 64 bytes further apart where they would be a multiple of 1 KiB, as npyrnn pads its copy
    # of W^T and the LSTM's step output (`Recurrent._padded_buffer`): 32 rows 4 KiB apart share cache sets
    pad = row_pad(G * H, 4)

    def padded(shape):
        return np.zeros((shape[0], shape[1] + pad), f32)[:, : shape[1]]

    W_hh = (rng.standard_normal((G * H, H)) / math.sqrt(H)).astype(f32)
    W_out = (rng.standard_normal((V, H)) / math.sqrt(H)).astype(f32)
    Hs = rng.standard_normal((T + 1, B, H)).astype(f32)
    dA = rng.standard_normal((T, B, G * H)).astype(f32)
    dlogits = rng.standard_normal((N, V)).astype(f32)
    out2, prev, dA2 = Hs[1:].reshape(N, H), Hs[:T].reshape(N, H), dA.reshape(N, G * H)
    Gf = np.zeros((T + 1, B, G * H + pad), f32)[:, :, : G * H]  # forward: step t+1's gates; its first H columns feed step t+2
    Gf[0, :, :H] = Hs[0]
    if copies:
        W_hhT = padded((H, G * H))  # (H, G*H), C-ordered
        W_hhT[...] = W_hh.T
    else:
        W_hhT = W_hh.T
    carry = np.empty((B, H), f32)
    logits, dout = np.empty((N, V), f32), np.empty((N, H), f32)
    dW_hh, dW_out = np.empty((G * H, H), f32), np.empty((V, H), f32)

    compiled = _step_loops() if loops else None

    def forward():
        if compiled is not None:
            W, tb, W_buffer = compiled.step_operand(W_hhT)
            if compiled.run_loop(compiled.forward, [(B, G * H, H)], np.dtype(f32), (Gf.base, W_buffer), Gf, W, tb, H):
                return
        for t in range(T):  # all G gates in one product, chained like the recurrence (a strided view: no copy)
            matmul(Gf[t, :, :H], W_hhT, out=Gf[t + 1])

    def backward():
        if compiled is not None and compiled.run_loop(compiled.backward, [(B, H, G * H)], np.dtype(f32),
                                                      (dA, W_hh, carry), dA, W_hh, carry):
            return
        for t in range(T - 1, -1, -1):
            matmul(dA[t], W_hh, out=carry)

    GH = G * H
    return [
        Product("forward h_{t-1} W_hh^T", f"({B},{H})@({H},{GH}) x{T}", T, 2 * B * H * GH, forward),
        Product("output logits = out W^T", f"({N},{H})@({H},{V})", 1, 2 * N * H * V,
                lambda: matmul(out2, W_out.T, out=logits)),
        Product("output dout = dlogits W", f"({N},{V})@({V},{H})", 1, 2 * N * V * H,
                lambda: matmul(dlogits, W_out, out=dout)),
        Product("backward da_t W_hh", f"({B},{GH})@({GH},{H}) x{T}", T, 2 * B * GH * H, backward),
        Product("grad dW_hh = dA^T H_prev", f"({GH},{N})@({N},{H})", 1, 2 * GH * N * H,
                lambda: matmul(dA2.T, prev, out=dW_hh)),
        Product("grad dW_out = dlogits^T out", f"({V},{N})@({N},{H})", 1, 2 * V * N * H,
                lambda: matmul(dlogits.T, out2, out=dW_out)),
    ]


def time_products(prods, reps):
    """Median seconds of each product over ``reps`` runs (after one warm-up run each), interleaved."""
    for p in prods:
        p.run()
    times = [[] for _ in prods]
    for _ in range(reps):
        for p, ts in zip(prods, times):
            t0 = time.perf_counter()
            p.run()
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
    """Time forward / loss / backward / clipping and the SGD step of each minibatch of one epoch,
    with the public API (clipping and the step: `clip_and_step`, one phase, as `train_step` runs them)."""
    from npyrnn.losses import softmax_cross_entropy
    from npyrnn.optim.clip import clip_and_step

    model, cfg = ours.model, ours.cfg
    phases = {"zero_grad": [], "forward": [], "loss": [], "backward": [], "clip_and_sgd": []}
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
        clip_and_step(model.grads, cfg.clip, ours.optimizer)
        t5 = time.perf_counter()
        for name, a, b in zip(phases, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5)):
            phases[name].append(b - a)
    return {name: statistics.median(ts) for name, ts in phases.items()}


def _shape(a):
    return "(" + ",".join(str(d) for d in a.shape) + ")"


@contextlib.contextmanager
def timed_parts(times):
    """Add each call's seconds to ``times[label]`` while inside: the compiled time loops, every
    product outside them by shape, the input gather and its gradient, the loss, clipping and the
    optimizer step. Outermost calls only: the product inside the gather's gradient counts there."""
    import npyrnn.train as train_module
    from npyrnn import backend
    from npyrnn.nn import recurrent

    depth = [0]

    def timed(fn, label):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if depth[0]:
                return fn(*args, **kwargs)
            depth[0] += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - start
                depth[0] -= 1
                name = label(*args) if callable(label) else label
                times[name][0] += seconds
                times[name][1] += 1
        return wrapper

    patches = [
        (backend, "matmul", lambda a, b, *_, **__: f"product {_shape(a)}@{_shape(b)}"),
        (backend, "take_rows", "input gather (5.1)"),
        (recurrent, "_scatter_columns", "input gather's gradient (5.2), with the bias's (5.3)"),
        (train_module, "softmax_cross_entropy", "loss and its gradient"),
        (train_module, "clip_and_step", "clipping and the optimizer step"),
    ]
    try:
        from npyrnn.nn import cpu_loops
    except ImportError:  # no fast extra: no compiled loops
        cpu_loops = None
    if cpu_loops is not None:
        patches += [(cpu_loops, name, f"compiled time loop {name}") for name in cpu_loops.__all__]
    saved = [(obj, name, vars(obj).get(name)) for obj, name, _ in patches]
    try:
        for obj, name, label in patches:
            setattr(obj, name, timed(getattr(obj, name), label))
        yield
    finally:
        for obj, name, original in saved:
            if original is None:  # an instance's method: the class's again
                delattr(obj, name)
            else:
                setattr(obj, name, original)


def npyrnn_parts(ours):
    """One epoch of ``train_step`` with ``timed_parts``: {part: {"seconds": median per minibatch,
    "calls": calls per minibatch}}, and "other": the rest of each minibatch."""
    from npyrnn.train import train_step

    model, cfg, per_batch = ours.model, ours.cfg, []
    state = None
    for X, Y in itertools.islice(iter(ours.loader), ours.num_batches()):
        if state is None:
            state = model.begin_state(X.shape[0])
        times = collections.defaultdict(lambda: [0.0, 0])
        with timed_parts(times):
            start = time.perf_counter()
            loss, state = train_step(model, X, Y, state, ours.optimizer, cfg.clip)
            total = time.perf_counter() - start
        float(loss)
        times["other"] = [total - sum(seconds for seconds, _ in times.values()), 1]
        per_batch.append(dict(times))
    names = list(dict.fromkeys(name for times in per_batch for name in times))
    return {name: {"seconds": statistics.median(t.get(name, (0.0, 0))[0] for t in per_batch),
                   "calls": statistics.median(t.get(name, (0.0, 0))[1] for t in per_batch)} for name in names}


def run(cfg, corpus, vocab, log):
    """``{cell: floor results}`` for the cells in ``cfg.cells``."""
    return {cell: run_cell(cfg, corpus, vocab, log, cell) for cell in cfg.cells}


def run_cell(cfg, corpus, vocab, log, cell):
    B, T, V = cfg.batch_size, cfg.num_steps, len(vocab)
    H = cfg.hidden_scratch if cell == "rnn" else cfg.hidden_concise
    from npyrnn import backend

    prods = products(B, T, H, V, np.random.default_rng(cfg.seed), gates=GATES[cell])
    # the RNN as d2l's scratch model (normal init); the GRU and LSTM as torch's (uniform init, reset after)
    ours = NpyrnnLM(cfg, vocab, corpus, H, init="normal" if cell == "rnn" else "uniform", cell=cell)
    ours.train()  # warm-up
    time_products(prods, 1)
    with ours.cores():  # the same products as npyrnn runs them: the split products' blocks, W^T copied where
        # OpenBLAS's kernels pay for it or the tiles take it (`Recurrent._step_weight`)
        copies = backend.transposed_copies_pay() or backend.split_products_tiled()
        ours_prods = products(B, T, H, V, np.random.default_rng(cfg.seed), gates=GATES[cell], copies=copies,
                              matmul=backend.matmul, loops=True)
        time_products(ours_prods, 1)
    flops = sum(p.flops for p in prods)
    floor_s, step_s, epoch_step_s, per_product, phases = [], [], [], [], []
    ours_floor_s, ours_per_product = [], []

    parts, split = [], []

    def measure_floor():
        pause(cfg)
        ts = time_products(prods, cfg.floor_reps)  # numpy.matmul, OpenBLAS's threads (ours.cores gives them back)
        per_product.append(ts)
        floor_s.append(sum(ts))
        pause(cfg)
        with ours.cores():  # the same products through npyrnn's (backend.matmul, as the cores are set)
            ts = time_products(ours_prods, cfg.floor_reps)
        ours_per_product.append(ts)
        ours_floor_s.append(sum(ts))

    def measure_npyrnn():
        pause(cfg)
        with ours.cores():  # as `npyrnn train` runs: the split products where the fast extra has them
            split.append(backend.split_products())
            seconds, times = npyrnn_steps(ours)
        step_s.append(statistics.median(times))  # robust to preemption, like the floor's medians
        epoch_step_s.append(seconds / len(times))

    for i in range(cfg.pairs):
        for measure in pair_order(i, measure_npyrnn, measure_floor):
            measure()
        pause(cfg)
        with ours.cores():
            phases.append(npyrnn_phases(ours))
            parts.append(npyrnn_parts(ours))
        log(f"  floor {cell} pair {i + 1}/{cfg.pairs}: floor {floor_s[-1] * 1e3:.2f} ms (npyrnn's products "
            f"{ours_floor_s[-1] * 1e3:.2f} ms), npyrnn {step_s[-1] * 1e3:.2f} ms per minibatch")
    return {
        "cell": cell,
        "shapes": {"batch_size": B, "num_steps": T, "hidden": H, "vocab_size": V, "gates": GATES[cell]},
        "products": [
            {"name": p.name, "shape": p.shape, "calls": p.calls, "flops": p.flops,
             "seconds": summary([pp[j] for pp in per_product]),
             "gflops_per_s": p.flops / statistics.median([pp[j] for pp in per_product]) / 1e9}
            for j, p in enumerate(prods)
        ],
        "npyrnn_products": [
            {"name": p.name, "seconds": summary([pp[j] for pp in ours_per_product]),
             "gflops_per_s": p.flops / statistics.median([pp[j] for pp in ours_per_product]) / 1e9}
            for j, p in enumerate(ours_prods)
        ],
        "flops_per_minibatch": flops,
        "floor_seconds": summary(floor_s),
        "npyrnn_products_floor_seconds": summary(ours_floor_s),
        "ratio_npyrnn_over_its_products_floor": ratio_summary(step_s, ours_floor_s),
        "npyrnn_seconds_per_minibatch": summary(step_s),
        "npyrnn_epoch_seconds_per_minibatch": summary(epoch_step_s),
        "ratio_npyrnn_over_floor": ratio_summary(step_s, floor_s),
        "floor_gflops_per_s": flops / statistics.median(floor_s) / 1e9,
        "npyrnn_gflops_per_s": flops / statistics.median(step_s) / 1e9,
        "npyrnn_phase_seconds": {name: statistics.median(p[name] for p in phases) for name in phases[0]},
        "npyrnn_split_products": split[0],
        "forward_reads_a_copy_of_w_transposed": backend.transposed_copies_pay(),
        "npyrnn_parts": {name: {"seconds": statistics.median(p.get(name, {"seconds": 0.0})["seconds"] for p in parts),
                                "calls": statistics.median(p.get(name, {"calls": 0})["calls"] for p in parts)}
                         for name in dict.fromkeys(n for p in parts for n in p)},
        "notes": NOTES,
    }
