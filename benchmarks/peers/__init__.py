"""The implementations a benchmark compares, each with ``train()`` (one measurement) and ``generate()``.

``npyrnn_peer``: npyrnn's RNNLM. ``torch_peers``: d2l's scratch model and concise ``RNNModel``
from ``tests/reference.py``, started from the npyrnn model's initial weights.
"""


def make_pair(cfg, vocab, corpus, kind):
    """(npyrnn, torch) twins with the same initial weights, for 'scratch' or 'concise'."""
    from benchmarks.peers.npyrnn_peer import NpyrnnLM
    from benchmarks.peers.torch_peers import TorchConcise, TorchScratch

    if kind == "scratch":
        ours = NpyrnnLM(cfg, vocab, corpus, cfg.hidden_scratch, init="normal")
        return ours, TorchScratch(cfg, vocab, corpus, cfg.hidden_scratch, initial=ours.initial_model)
    ours = NpyrnnLM(cfg, vocab, corpus, cfg.hidden_concise, init="uniform")
    return ours, TorchConcise(cfg, vocab, corpus, cfg.hidden_concise, initial=ours.initial_model)
