#!/usr/bin/env python
"""d2l's scratch job (chapter 8) written as idiomatic JAX: the benchmark's third peer.

One jitted training step does everything for a minibatch: the one-hot input as a gather of
rows of ``W_xh``, ``lax.scan`` over the T steps, ``jax.value_and_grad`` of the mean
cross-entropy, global-norm clipping and the SGD update, with the parameters, the state and
the running loss donated (updated in place). The state is carried across sequential
minibatches; its gradient is cut because the step differentiates with respect to the
parameters only (the incoming state is an input, as after d2l's ``state.detach_()``). The
loss stays on the device and is read once per epoch.

The model is npyrnn's ``RNNLM(V, H, init='normal')`` in d2l's ``(in, out)`` layout, started from
its weights: ``W_xh = weight_ih_l0^T``, ``W_hh = weight_hh_l0^T``, ``W_hq = linear.weight^T``. It
keeps torch's two hidden biases (``b_ih``, ``b_hh``) where d2l's scratch model has one, so that
both sides train the same model and follow the same perplexity trajectory (with one bias the
trajectories drift apart: SGD moves one bias by its gradient, two biases' sum by twice that).
Clipping is ``min(1, theta / (norm + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_`` and npyrnn.

Measurements run in a child process (this file as a script), so that JAX's thread pool can be
held to the benchmark's thread count: XLA's flags do not limit it, so the child is pinned with
``taskset -c 0`` (1 thread) or ``taskset -c 0-(n-1)`` (n threads, fewer than the cores); with as
many threads as cores it runs unpinned. The child compiles the step (one warm-up call on copies
of the parameters, not counted), then trains ``cfg.epochs`` whole epochs from npyrnn's initial
weights and reports the wall time of all of them.

    taskset -c 0 python benchmarks/peers/jax_rnn.py --mode measure --hidden 512 --config '{"epochs": 2}'
    python benchmarks/peers/jax_rnn.py --mode check --hidden 16 --config '{"max_tokens": 200, "batch_size": 4}'

Each prints one line of JSON (``measure``: seconds, tokens, per-epoch perplexity, CPU seconds,
compile seconds, CPU affinity; ``check``: see ``trajectory_check``).
"""

import argparse
import dataclasses
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__" and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the repository root: this checkout's npyrnn and the benchmarks package

from benchmarks.common import Config, load_data  # noqa: E402
from benchmarks.peers.npyrnn_peer import make_loader, num_batches  # noqa: E402

CHECK_EPOCHS = 3
CHECK_RTOL = 1e-3  # per-epoch perplexity, float32; the differences measured are far smaller


def available():
    """True when jax is installed (the benchmark-only extra: pip install -e '.[bench]')."""
    import importlib.util

    try:
        return importlib.util.find_spec("jax") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["jax"] is None (import blocked)
        return False


# --------------------------------------------------------------------------- the model, in JAX


def params_from(model):
    """The parameters of an npyrnn ``RNNLM`` (one layer, tanh) as JAX arrays in d2l's layout."""
    import jax.numpy as jnp

    from npyrnn import backend

    p = {k: backend.to_numpy(v) for k, v in model.state_dict().items()}
    host = {
        "W_xh": p["rnn.weight_ih_l0"].T,  # (V, H)
        "W_hh": p["rnn.weight_hh_l0"].T,  # (H, H)
        "b_ih": p["rnn.bias_ih_l0"],  # (H,)
        "b_hh": p["rnn.bias_hh_l0"],  # (H,)
        "W_hq": p["linear.weight"].T,  # (H, V)
        "b_q": p["linear.bias"],  # (V,)
    }
    return {k: jnp.asarray(np.ascontiguousarray(v)) for k, v in host.items()}


def loss_fn(params, state, X, Y):
    """Mean cross-entropy over the T*B tokens of a minibatch, and the last state.

    X, Y: (B, T) int32 token ids; state: (B, H).
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    xs = params["W_xh"][X.T] + (params["b_ih"] + params["b_hh"])  # one-hot @ W_xh as a gather: (T, B, H)

    def step(h, x):
        h = jnp.tanh(x + h @ params["W_hh"])  # (B, H)
        return h, h

    state, hs = lax.scan(step, state, xs)  # hs: (T, B, H)
    logits = hs.reshape(-1, hs.shape[-1]) @ params["W_hq"] + params["b_q"]  # (T*B, V), time-major rows
    y = Y.T.reshape(-1)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1)), state


def make_train_step(lr, clip):
    """``step(params, state, loss_sum, X, Y) -> (params, state, loss_sum)``, jitted, first three donated."""
    import jax
    import jax.numpy as jnp

    def train_step(params, state, loss_sum, X, Y):
        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, X, Y)
        norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree_util.tree_leaves(grads)))
        scale = lr * jnp.minimum(1.0, clip / (norm + 1e-6))  # global-norm clipping, then SGD
        params = jax.tree_util.tree_map(lambda p, g: p - scale * g, params, grads)
        return params, state, loss_sum + loss

    return jax.jit(train_step, donate_argnums=(0, 1, 2))


class JaxRNN:
    """d2l's scratch job in JAX, from an npyrnn model's initial weights, on its own ``SeqDataLoader``."""

    name = "jax"

    def __init__(self, cfg, corpus, model):
        self.cfg = cfg
        self.params = params_from(model)
        self.hidden = model.num_hiddens
        self.loader = make_loader(cfg, corpus)
        self.corpus = corpus
        self.step = make_train_step(cfg.lr, cfg.clip)

    def _batches(self, loader=None):
        import jax.numpy as jnp

        from npyrnn import backend

        loader = self.loader if loader is None else loader
        for X, Y in itertools.islice(iter(loader), num_batches(loader, self.cfg)):
            X, Y = backend.to_numpy(X), backend.to_numpy(Y)  # the loader's arrays may be on the GPU
            yield jnp.asarray(X.astype(np.int32)), jnp.asarray(Y.astype(np.int32))

    def warm_up(self):
        """Compile the step with one call on copies of the parameters (the model does not change).

        The minibatch comes from a loader of its own: each pass over a loader draws a random
        offset, and the training loader must draw the same ones as npyrnn's.
        """
        import jax
        import jax.numpy as jnp

        X, Y = next(self._batches(make_loader(self.cfg, self.corpus)))
        params = jax.tree_util.tree_map(jnp.copy, self.params)
        state = jnp.zeros((X.shape[0], self.hidden), jnp.float32)
        jax.block_until_ready(self.step(params, state, jnp.zeros((), jnp.float32), X, Y))

    def train_epoch(self):
        """One epoch, the state carried from zeros; return (perplexity, tokens). One host sync, at the end."""
        import jax.numpy as jnp

        state = loss_sum = None
        n = 0
        for X, Y in self._batches():
            if state is None:
                state = jnp.zeros((X.shape[0], self.hidden), jnp.float32)
                loss_sum = jnp.zeros((), jnp.float32)
            self.params, state, loss_sum = self.step(self.params, state, loss_sum, X, Y)
            n += 1
        # every minibatch has B*T tokens: the mean of the minibatch means is the mean over all tokens
        return math.exp(float(loss_sum) / n), n * self.cfg.batch_size * self.cfg.num_steps


# --------------------------------------------------------------------------- what the child does


def measure(cfg, hidden):
    """Compile, then train ``cfg.epochs`` epochs from npyrnn's initial weights; the numbers of one measurement."""
    import jax

    from npyrnn.models import RNNLM

    corpus, vocab = load_data(cfg)
    model = RNNLM(len(vocab), hidden, init="normal", dtype="float32", seed=cfg.seed)
    peer = JaxRNN(cfg, corpus, model)
    start = time.perf_counter()
    peer.warm_up()
    compile_seconds = time.perf_counter() - start
    cpu, start, tokens, ppls = time.process_time(), time.perf_counter(), 0, []
    for _ in range(cfg.epochs):
        ppl, n = peer.train_epoch()
        ppls.append(ppl)
        tokens += n
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "tokens": tokens,
        "perplexity": ppls,
        "cpu_seconds": time.process_time() - cpu,
        "compile_seconds": compile_seconds,  # the warm-up call (tracing, compiling, one step): not in "seconds"
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
    }


def trajectory_check(cfg, corpus, vocab, hidden, epochs=CHECK_EPOCHS):
    """npyrnn and JAX from the same initial weights on the same minibatches: per-epoch perplexities.

    Returns ``{'epochs', 'npyrnn', 'jax', 'max_rel_diff', 'rtol', 'agree'}``.
    """
    from npyrnn.models import RNNLM
    from npyrnn.optim import SGD
    from npyrnn.train import train_epoch

    model = RNNLM(len(vocab), hidden, init="normal", dtype="float32", seed=cfg.seed)
    peer = JaxRNN(cfg, corpus, model)  # copies the weights before npyrnn trains them
    loader, optimizer = make_loader(cfg, corpus), SGD(model.params, cfg.lr)
    ours, theirs = [], []
    for _ in range(epochs):
        batches = itertools.islice(iter(loader), num_batches(loader, cfg))
        ours.append(train_epoch(model, batches, optimizer, clip=cfg.clip)[0])
        theirs.append(peer.train_epoch()[0])
    diff = max(abs(a - b) / abs(a) for a, b in zip(ours, theirs))
    return {"epochs": epochs, "npyrnn": ours, "jax": theirs, "max_rel_diff": diff, "rtol": CHECK_RTOL,
            "agree": diff <= CHECK_RTOL}


# --------------------------------------------------------------------------- the parent's side


def pinning(threads):
    """The ``taskset`` prefix that holds a child to ``threads`` cores, or [] (all cores, or no taskset)."""
    cores = os.cpu_count() or 1
    if threads >= cores or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", "0" if threads == 1 else f"0-{threads - 1}"]


def run_child(cfg, hidden, threads, mode):
    """Run this file as a pinned child process; return its JSON."""
    cmd = [*pinning(threads), sys.executable, str(Path(__file__).resolve()), "--mode", mode, "--hidden", str(hidden),
           "--config", json.dumps(dataclasses.asdict(cfg))]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"jax child ({mode}) failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["pinning"] = " ".join(pinning(threads)) or None
    return result


class JaxPeer:
    """The JAX peer as the train section sees it: each measurement is a child process (see the module's doc)."""

    name = "jax"
    warm_up_in_child = True  # each child compiles before it times; no warm-up measurement in the parent

    def __init__(self, cfg, hidden, threads):
        self.cfg, self.hidden, self.threads = cfg, hidden, threads
        self.children = []  # what each measurement's child reported

    def train(self):
        """One measurement; return (seconds, tokens, last perplexity, CPU seconds)."""
        r = run_child(self.cfg, self.hidden, self.threads, "measure")
        self.children.append(r)
        return r["seconds"], r["tokens"], r["perplexity"][-1], r["cpu_seconds"]

    def check(self):
        """The perplexity-trajectory check, in a child pinned like the measurements."""
        return run_child(self.cfg, self.hidden, self.threads, "check")


def main(argv=None):
    p = argparse.ArgumentParser(description="JAX child of benchmarks/bench_train.py (one measurement or the check)")
    p.add_argument("--mode", choices=("measure", "check"), required=True)
    p.add_argument("--hidden", type=int, required=True)
    p.add_argument("--config", default="{}", help="Config fields as JSON (the book's settings when empty)")
    args = p.parse_args(argv)
    cfg = Config(**json.loads(args.config))
    if args.mode == "measure":
        result = measure(cfg, args.hidden)
    else:
        corpus, vocab = load_data(cfg)
        result = trajectory_check(cfg, corpus, vocab, args.hidden)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
