"""npyrnn's RNNLM trained with ``npyrnn.train.train_epoch`` (SGD, global-norm clipping)."""

import contextlib
import itertools
import time

import numpy as np


def num_batches(loader, cfg):
    """Minibatches per measurement: one epoch, or ``cfg.batches`` if fewer."""
    n = len(loader)
    return min(n, cfg.batches) if cfg.batches else n


def make_loader(cfg, corpus):
    """Sequential minibatches, seeded with ``cfg.seed``: every peer gets its own, so all see the same order."""
    from npyrnn.data import SeqDataLoader

    return SeqDataLoader(corpus, cfg.batch_size, cfg.num_steps, rng=np.random.default_rng(cfg.seed))


class NpyrnnLM:
    """npyrnn's ``RNNLM(V, hidden, init=init, dtype='float32', seed=cfg.seed, cell=cell, reset_after=...)``
    with ``npyrnn.optim.SGD``."""

    name = "npyrnn"

    def __init__(self, cfg, vocab, corpus, hidden, init, cell="rnn", reset_after=True):
        self.cfg, self.vocab, self.corpus, self.hidden, self.init = cfg, vocab, corpus, hidden, init
        self.cell, self.reset_after = cell, reset_after
        self.reset()

    def initial_model(self):
        """A fresh model with the initial weights (the same every call: seeded)."""
        from npyrnn.models import RNNLM

        extra = {"reset_after": self.reset_after} if self.cell == "gru" else {}
        return RNNLM(len(self.vocab), self.hidden, init=self.init, dtype="float32", seed=self.cfg.seed,
                     cell=self.cell, **extra)

    def reset(self):
        """Back to the initial weights and a fresh loader: the next measurement is a run from the start."""
        from npyrnn.optim import SGD

        self.model = self.initial_model()
        self.loader = make_loader(self.cfg, self.corpus)
        self.optimizer = SGD(self.model.params, self.cfg.lr)

    def num_batches(self):
        return num_batches(self.loader, self.cfg)

    split = None  # npyrnn's default: split products where the fast extra has them

    @contextlib.contextmanager
    def cores(self):
        """The cores set as ``npyrnn train --threads`` sets them (``backend.set_cpu_threads``), then
        given back to OpenBLAS at the same count, as the other peers (and the floor's products) see them."""
        from npyrnn import backend

        backend.set_cpu_threads(self.cfg.threads, split=self.split)
        try:
            yield
        finally:
            backend.set_cpu_threads(self.cfg.threads, split=False)

    def train(self):
        """Train one measurement, ``cfg.epochs`` epochs, on the cores as ``cores`` sets them; return
        (seconds, tokens, last perplexity, CPU seconds)."""
        with self.cores():
            return self._train()

    def _train(self):
        from npyrnn.train import train_epoch

        cpu, start = time.process_time(), time.perf_counter()
        for _ in range(self.cfg.epochs):
            batches = itertools.islice(iter(self.loader), self.num_batches())
            ppl, _ = train_epoch(self.model, batches, self.optimizer, clip=self.cfg.clip)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        return seconds, self.cfg.epochs * self.num_batches() * self.cfg.batch_size * self.cfg.num_steps, ppl, cpu

    def generate(self):
        """Greedy generation after the prefix, on the cores as ``npyrnn generate --threads`` sets them
        (``cores``); return (seconds, text)."""
        from npyrnn.train import predict

        with self.cores():
            start = time.perf_counter()
            text = predict(self.cfg.prefix, self.cfg.num_preds, self.model, self.vocab)
            return time.perf_counter() - start, text


class NpyrnnOpenBLAS(NpyrnnLM):
    """The same model and loop with OpenBLAS's own threads (``split=False``; ``NPYRNN_SPLIT_PRODUCTS=0``).

    Beside ``NpyrnnLM`` it measures what the split products (``npyrnn.nn.cpu_gemm``) pay,
    quiet and on a busy machine.
    """

    name = "npyrnn-openblas"
    split = False


class NpyrnnArrayOps(NpyrnnLM):
    """The same model and loop with the fused kernels off (``kernels.set_enabled(False)``): the array-op path.

    Beside ``NpyrnnLM`` it measures what the fused CPU kernels (the ``fast`` extra, Numba) pay.
    """

    name = "npyrnn-arrayops"

    def train(self):
        from npyrnn.nn import kernels

        kernels.set_enabled(False)
        try:
            return super().train()
        finally:
            kernels.set_enabled(None)


class NpyrnnPythonLoops(NpyrnnLM):
    """The same model and loop with the compiled time loops off (``cpu_loops.enabled = False``): each
    step's product and fused kernel called from Python, as before the compiled loops.

    Beside ``NpyrnnLM`` it measures what the compiled loops (``npyrnn.nn.cpu_loops``) pay.
    """

    name = "npyrnn-pyloops"

    def train(self):
        from npyrnn.nn import cpu_loops

        cpu_loops.enabled = False
        try:
            return super().train()
        finally:
            cpu_loops.enabled = True
