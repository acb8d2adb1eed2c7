"""d2l chapter 8 in PyTorch, from ``tests/reference.py``: the scratch model and the concise ``RNNModel``.

Training is d2l's ``train_epoch_ch8`` (state carried, its gradient cut with ``detach_``;
d2l's ``grad_clipping``), generation d2l's ``predict_ch8`` under ``torch.no_grad``.
"""

import itertools
import time

from benchmarks.peers.npyrnn_peer import make_loader, num_batches


class _TorchLM:
    """A d2l model with its updater, timed over one measurement's minibatches."""

    name = "torch"

    def __init__(self, cfg, vocab, corpus, net, updater):
        self.cfg, self.vocab, self.net, self.updater = cfg, vocab, net, updater
        self.loader = make_loader(cfg, corpus)

    def num_batches(self):
        return num_batches(self.loader, self.cfg)

    def train_epoch(self):
        """Train one measurement; return (seconds, tokens, perplexity)."""
        from tests.reference import train_epoch_ch8

        batches = itertools.islice(iter(self.loader), self.num_batches())
        start = time.perf_counter()
        ppl, tokens = train_epoch_ch8(self.net, batches, self.updater, clip=self.cfg.clip)
        return time.perf_counter() - start, tokens, ppl

    def generate(self):
        """d2l's ``predict_ch8``; return (seconds, text)."""
        import torch

        from tests.reference import predict_ch8

        start = time.perf_counter()
        with torch.no_grad():
            text = predict_ch8(self.cfg.prefix, self.cfg.num_preds, self.net, self.vocab)
        return time.perf_counter() - start, text


class TorchScratch(_TorchLM):
    """d2l's ``RNNModelScratch`` under autograd with d2l's ``sgd``.

    From an npyrnn model's weights (``scratch_twin``), or, without one, from d2l's ``get_params``.
    """

    def __init__(self, cfg, vocab, corpus, hidden, init_from=None):
        from tests.reference import RNNModelScratch, scratch_twin, sgd

        net = RNNModelScratch(len(vocab), hidden) if init_from is None else scratch_twin(init_from)
        super().__init__(cfg, vocab, corpus, net, lambda batch_size: sgd(net.params, cfg.lr, batch_size))


class TorchConcise(_TorchLM):
    """d2l's ``RNNModel(nn.RNN(V, H), V)`` with ``torch.optim.SGD``.

    From an npyrnn model's weights (``concise_twin``), or, without one, with torch's initialisation.
    """

    def __init__(self, cfg, vocab, corpus, hidden, init_from=None):
        import torch
        from torch import nn

        from tests.reference import RNNModel, concise_twin

        net = RNNModel(nn.RNN(len(vocab), hidden), len(vocab)) if init_from is None else concise_twin(init_from)
        super().__init__(cfg, vocab, corpus, net, torch.optim.SGD(net.parameters(), lr=cfg.lr))
