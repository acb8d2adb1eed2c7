"""d2l chapters 8 and 9 in PyTorch, from ``tests/reference.py``: the scratch models and the concise ``RNNModel``.

Training is d2l's ``train_epoch_ch8`` (state carried, its gradient cut with ``detach_``;
d2l's ``grad_clipping``), generation d2l's ``predict_ch8`` under ``torch.no_grad``.
"""

import itertools
import time

from benchmarks.peers.npyrnn_peer import make_loader, num_batches


class _TorchLM:
    """A d2l model with its updater, timed over one measurement's minibatches."""

    name = "torch"

    def __init__(self, cfg, vocab, corpus, initial, cell="rnn"):
        self.cfg, self.vocab, self.corpus, self.initial, self.cell = cfg, vocab, corpus, initial, cell
        self.reset()

    def reset(self):
        """Back to the initial weights and a fresh loader: the next measurement is a run from the start."""
        self.net, self.updater = self.build(None if self.initial is None else self.initial())
        self.loader = make_loader(self.cfg, self.corpus)

    def num_batches(self):
        return num_batches(self.loader, self.cfg)

    def train(self):
        """Train one measurement, ``cfg.epochs`` epochs; return (seconds, tokens, last perplexity, CPU seconds)."""
        from tests.reference import train_epoch_ch8

        cpu, start, tokens = time.process_time(), time.perf_counter(), 0
        for _ in range(self.cfg.epochs):
            batches = itertools.islice(iter(self.loader), self.num_batches())
            ppl, n = train_epoch_ch8(self.net, batches, self.updater, clip=self.cfg.clip)
            tokens += n
        return time.perf_counter() - start, tokens, ppl, time.process_time() - cpu

    def generate(self):
        """d2l's ``predict_ch8``; return (seconds, text)."""
        import torch

        from tests.reference import predict_ch8

        start = time.perf_counter()
        with torch.no_grad():
            text = predict_ch8(self.cfg.prefix, self.cfg.num_preds, self.net, self.vocab)
        return time.perf_counter() - start, text


class TorchScratch(_TorchLM):
    """d2l's ``RNNModelScratch`` under autograd with d2l's ``sgd``: chapter 8's ``rnn``, or chapter 9's
    ``gru`` or ``lstm`` (``cell``).

    ``initial``: a callable returning the npyrnn model whose weights to start from
    (``scratch_twin``, or ``scratch_cell_twin`` with d2l's one bias per gate); None: d2l's
    ``get_params`` / ``get_lstm_params``.
    """

    def __init__(self, cfg, vocab, corpus, hidden, initial=None, cell="rnn"):
        self.hidden = hidden
        super().__init__(cfg, vocab, corpus, initial, cell)

    def build(self, model):
        from tests import reference as ref

        if model is not None:
            net = ref.scratch_twin(model) if self.cell == "rnn" else ref.scratch_cell_twin(model, biases="one")
        else:
            get_params, init_state, forward_fn = {
                "rnn": (ref.get_params, ref.init_rnn_state, ref.rnn),
                "gru": (ref.get_gru_params, ref.init_gru_state, ref.gru),
                "lstm": (ref.get_lstm_params, ref.init_lstm_state, ref.lstm),
            }[self.cell]
            net = ref.RNNModelScratch(len(self.vocab), self.hidden, get_params, init_state, forward_fn)
        return net, lambda batch_size: ref.sgd(net.params, self.cfg.lr, batch_size)


class TorchConcise(_TorchLM):
    """d2l's ``RNNModel(nn.RNN(V, H), V)`` (or ``nn.GRU``, ``nn.LSTM``: ``cell``) with ``torch.optim.SGD``.

    ``initial``: a callable returning the npyrnn model whose weights to start from
    (``concise_twin``); None: torch's initialisation.
    """

    def __init__(self, cfg, vocab, corpus, hidden, initial=None, cell="rnn"):
        self.hidden = hidden
        super().__init__(cfg, vocab, corpus, initial, cell)

    def build(self, model):
        import torch
        from torch import nn

        from tests.reference import RNNModel, concise_twin

        layer = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[self.cell]
        net = RNNModel(layer(len(self.vocab), self.hidden), len(self.vocab)) if model is None else concise_twin(model)
        return net, torch.optim.SGD(net.parameters(), lr=self.cfg.lr)
