"""npyrnn's RNNLM trained with ``npyrnn.train.train_epoch`` (SGD, global-norm clipping)."""

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
    """npyrnn's ``RNNLM(V, hidden, init=init, dtype='float32', seed=cfg.seed)`` with ``npyrnn.optim.SGD``."""

    name = "npyrnn"

    def __init__(self, cfg, vocab, corpus, hidden, init):
        from npyrnn.models import RNNLM
        from npyrnn.optim import SGD

        self.cfg, self.vocab = cfg, vocab
        self.model = RNNLM(len(vocab), hidden, init=init, dtype="float32", seed=cfg.seed)
        self.loader = make_loader(cfg, corpus)
        self.optimizer = SGD(self.model.params, cfg.lr)

    def num_batches(self):
        return num_batches(self.loader, self.cfg)

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
