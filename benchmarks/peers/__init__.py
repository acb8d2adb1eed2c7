"""The implementations a benchmark compares, each with ``train()`` (one measurement) and ``generate()``.

``npyrnn_peer``: npyrnn's RNNLM. ``torch_peers``: d2l's scratch models and concise ``RNNModel``
from ``tests/reference.py``, started from the npyrnn model's initial weights.

A *kind* is one comparison: a cell and a style. ``scratch`` and ``concise`` are chapter 8's
Elman RNN (d2l's scratch model at ``hidden_scratch``, ``RNNModel(nn.RNN)`` at
``hidden_concise``); ``gru-scratch``, ``gru-concise``, ``lstm-scratch`` and ``lstm-concise`` are
chapter 9's, all at ``hidden_concise`` as in the book (256): d2l's scratch ``gru`` (reset gate
before the product, npyrnn's ``reset_after=False``) and ``lstm`` under autograd, and
``RNNModel(nn.GRU)`` / ``RNNModel(nn.LSTM)`` (npyrnn's ``reset_after=True``, torch's GRU).
"""

CELLS = ("rnn", "gru", "lstm")
KINDS = {  # kind: (cell, style)
    "scratch": ("rnn", "scratch"),
    "concise": ("rnn", "concise"),
    "gru-scratch": ("gru", "scratch"),
    "gru-concise": ("gru", "concise"),
    "lstm-scratch": ("lstm", "scratch"),
    "lstm-concise": ("lstm", "concise"),
}


def kinds(cells):
    """The kinds of the given cells, in ``KINDS``' order."""
    return [kind for kind, (cell, _) in KINDS.items() if cell in cells]


def hidden(cfg, kind):
    """Hidden size of a kind: ``hidden_scratch`` for chapter 8's scratch model, else ``hidden_concise``."""
    return cfg.hidden_scratch if kind == "scratch" else cfg.hidden_concise


def npyrnn_options(kind):
    """``NpyrnnLM`` keyword arguments of a kind: init (d2l's normal for scratch, torch's uniform), cell, GRU variant."""
    cell, style = KINDS[kind]
    return dict(init="normal" if style == "scratch" else "uniform", cell=cell,
                reset_after=not (cell == "gru" and style == "scratch"))


def torch_peer(cfg, vocab, corpus, kind, initial=None):
    """The torch peer of a kind; ``initial`` as in ``TorchScratch`` / ``TorchConcise``."""
    from benchmarks.peers.torch_peers import TorchConcise, TorchScratch

    cell, style = KINDS[kind]
    cls = TorchScratch if style == "scratch" else TorchConcise
    return cls(cfg, vocab, corpus, hidden(cfg, kind), initial=initial, cell=cell)


def make_pair(cfg, vocab, corpus, kind):
    """(npyrnn, torch) twins with the same initial weights, for one of ``KINDS``."""
    from benchmarks.peers.npyrnn_peer import NpyrnnLM

    ours = NpyrnnLM(cfg, vocab, corpus, hidden(cfg, kind), **npyrnn_options(kind))
    return ours, torch_peer(cfg, vocab, corpus, kind, initial=ours.initial_model)
