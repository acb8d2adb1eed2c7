"""RNNLM(cell='gru'|'lstm') against d2l's chapter 9 models in torch: scratch and concise, one step and 60.

d2l's scratch GRU and LSTM (``get_gru_params``/``gru``, ``get_lstm_params``/``lstm`` with
``RNNModelScratch`` and ``train_epoch_ch8``, in tests/reference.py) hold one bias per gate
where npyrnn holds torch's two. The one-step test loads ``b_ih + b_hh`` into d2l's bias
(the same function; d2l's bias gradient is each of npyrnn's). The training test keeps npyrnn's
two biases as separate leaves, added into d2l's bias before d2l's ``gru``/``lstm`` run unchanged
(``scratch_cell_twin(biases='two')``): with one leaf, SGD would move the sum half as far as
npyrnn's two and clipping would count its gradient once instead of twice, so the runs would
part after the first step for a reason that is not a bug.
"""

import numpy as np
import pytest
import torch

from conftest import record, rel_err
from npyrnn import backend
from npyrnn.data import SeqDataLoader, load_corpus
from npyrnn.models import RNNLM
from npyrnn.optim import SGD
from npyrnn.train import train_epoch
from reference import (concise_twin, get_gru_params, get_lstm_params, scratch_cell_as_npyrnn, scratch_cell_twin, sgd,
                       train_epoch_ch8)

SCRATCH = [dict(cell="gru", reset_after=False), dict(cell="lstm")]


def cfg_id(c):
    return "-".join(f"{k}={v}" for k, v in c.items())


@pytest.fixture(scope="module")
def timemachine():
    return load_corpus("timemachine")


@pytest.mark.parametrize("cfg", SCRATCH, ids=cfg_id)
def test_d2l_scratch_params_have_the_books_shapes(cfg):
    params = (get_gru_params if cfg["cell"] == "gru" else get_lstm_params)(28, 8)
    assert len(params) == (11 if cfg["cell"] == "gru" else 14)
    assert all(p.requires_grad for p in params)
    assert [tuple(p.shape) for p in params[:3]] == [(28, 8), (8, 8), (8,)] and tuple(params[-2].shape) == (8, 28)
    net = scratch_cell_twin(RNNLM(28, 8, seed=0, **cfg))
    state = net.begin_state(3)
    assert len(state) == (1 if cfg["cell"] == "gru" else 2) and state[0].shape == (3, 8)


@pytest.mark.parametrize("biases", ["one", "two"])
@pytest.mark.parametrize("cfg", SCRATCH, ids=cfg_id)
def test_d2l_scratch_cell_equals_rnnlm(cfg, biases, timemachine, xp):
    """One forward and backward from a random state: logits, state and every gradient, float64."""
    corpus, vocab = timemachine
    model = RNNLM(len(vocab), 12, dtype="float64", init="uniform", seed=3, **cfg)
    X = corpus[300:348].reshape(4, 12)
    rng = np.random.default_rng(3)
    state = model.begin_state(4)
    state = tuple(rng.standard_normal(s.shape) for s in state) if isinstance(state, tuple) else rng.standard_normal(
        state.shape)
    dlogits = rng.standard_normal((48, len(vocab)))
    logits, new_state = model.forward(xp.asarray(X), tuple(map(xp.asarray, state)) if isinstance(state, tuple)
                                      else xp.asarray(state))
    model.backward(xp.asarray(dlogits))

    net = scratch_cell_twin(model, biases=biases)
    parts = state if isinstance(state, tuple) else (state,)
    ref, ref_state = net(torch.from_numpy(X), tuple(torch.from_numpy(s[0]) for s in parts))
    (ref * torch.from_numpy(dlogits)).sum().backward()
    assert rel_err(logits, ref.detach().numpy()) <= 1e-12
    for ours, theirs in zip(new_state if isinstance(new_state, tuple) else (new_state,), ref_state):
        assert rel_err(backend.to_numpy(ours)[0], theirs.detach().numpy()) <= 1e-12
    grads = scratch_cell_as_npyrnn(model, [p.grad.numpy() for p in net.params], biases)
    assert set(grads) == set(model.grads)
    for name, grad in grads.items():
        err = rel_err(model.grads[name], grad)
        record("RNNLM gradients vs d2l's scratch GRU/LSTM (float64)", err)
        assert err <= 1e-10, name


def test_scratch_cell_twin_rejects_what_d2l_cannot_express():
    for kwargs in (dict(cell="gru"), dict(cell="rnn"), dict(cell="lstm", num_layers=2), dict(cell="lstm", proj_size=2),
                   dict(cell="gru", reset_after=False, bidirectional=True)):
        with pytest.raises(ValueError, match="d2l's scratch GRU/LSTM has one layer"):
            scratch_cell_twin(RNNLM(28, 8, **kwargs))
    with pytest.raises(ValueError, match="torch.nn.GRU has only reset_after=True"):
        concise_twin(RNNLM(28, 8, cell="gru", reset_after=False))


def batches_for(corpus, use_random_iter, n=60):
    loader = SeqDataLoader(corpus[:5000], 8, 10, use_random_iter=use_random_iter, rng=np.random.default_rng(3))
    batches = [(backend.to_numpy(X), backend.to_numpy(Y)) for X, Y in loader][:n]
    assert len(batches) == n
    return batches


@pytest.mark.parametrize("use_random_iter", [False, True], ids=["sequential", "random"])
@pytest.mark.parametrize("cfg", SCRATCH, ids=cfg_id)
def test_training_parity_with_d2l_scratch_loop(cfg, use_random_iter, timemachine, xp):
    """d2l's train_epoch_ch8 with its sgd and grad_clipping on the scratch GRU/LSTM, and npyrnn's
    train_epoch with SGD and clipping: the same loss step after step for 60 steps (float64).

    Clipping at theta 0.2 is active on a third of the steps or more (counted: after d2l's grad_clipping the global norm
    is theta). d2l divides by the norm, npyrnn (as torch's clip_grad_norm_) by norm + 1e-6: the
    losses differ by about 1e-7 relative.
    """
    corpus, vocab = timemachine
    batches = batches_for(corpus, use_random_iter)
    model = RNNLM(len(vocab), 32, dtype="float64", init="uniform", seed=2, **cfg)
    net = scratch_cell_twin(model, biases="two")
    ref, norms = [], []

    def updater(batch_size):  # d2l's sgd, after noting the global norm that grad_clipping left
        norms.append(float(torch.sqrt(sum((p.grad ** 2).sum() for p in net.params))))
        sgd(net.params, 1.0, batch_size)

    ref_ppl, _ = train_epoch_ch8(net, batches, updater, clip=0.2, use_random_iter=use_random_iter, on_step=ref.append)
    clipped = sum(abs(n - 0.2) < 1e-12 for n in norms)
    assert clipped >= 20, f"clipping was active on {clipped} of 60 steps only; the test would be weak"
    ours = []
    ppl, _ = train_epoch(model, [(xp.asarray(X), xp.asarray(Y)) for X, Y in batches], SGD(model.params, 1.0),
                         clip=0.2, use_random_iter=use_random_iter, on_step=ours.append)
    ours, ref = np.array(ours), np.array(ref)
    assert ref[-10:].mean() < ref[:10].mean() - 0.2, "the reference did not learn; the test would be weak"
    err = float(np.max(np.abs(ours - ref) / np.abs(ref)))
    record("training losses vs d2l's scratch GRU/LSTM loop, 60 steps (float64)", err)
    assert err <= 1e-6, f"largest relative loss difference {err:.2e}"
    assert abs(ppl - ref_ppl) <= 1e-6 * ref_ppl
    weights = scratch_cell_as_npyrnn(model, [p.detach().numpy() for p in net.params], "two")
    for name, w in weights.items():
        assert rel_err(model.params[name], w) <= 1e-5, name


CONCISE = [
    dict(cell="gru"),
    dict(cell="lstm"),
    dict(cell="gru", num_layers=2, dropout=0.3),
    dict(cell="lstm", num_layers=2, dropout=0.3, bidirectional=True),
    dict(cell="lstm", proj_size=5),
    dict(cell="lstm", num_layers=2, proj_size=5, dropout=0.5),
]


def random_state(model, B, rng):
    state = model.begin_state(B)
    if isinstance(state, tuple):
        return tuple(rng.standard_normal(s.shape) for s in state)
    return rng.standard_normal(state.shape)


@pytest.mark.parametrize("cfg", CONCISE, ids=cfg_id)
def test_concise_model_logits_and_gradients(cfg, timemachine, xp):
    """d2l's RNNModel(nn.GRU / nn.LSTM) holding an RNNLM's weights, both in evaluation mode: logits <= 1e-12,
    every gradient (parameters and initial state) <= 1e-10, float64."""
    corpus, vocab = timemachine
    model = RNNLM(len(vocab), 12, dtype="float64", init="uniform", seed=4, **cfg)
    model.eval()
    X = corpus[500:548].reshape(4, 12)
    rng = np.random.default_rng(4)
    state = random_state(model, 4, rng)
    on = (lambda s: tuple(map(xp.asarray, s))) if isinstance(state, tuple) else xp.asarray
    logits, new_state = model.forward(xp.asarray(X), on(state))
    dlogits = rng.standard_normal(logits.shape)
    dstate = random_state(model, 4, rng)
    dstate0 = model.backward(xp.asarray(dlogits), on(dstate))

    net = concise_twin(model)
    net.eval()
    as_t = (lambda s: tuple(torch.from_numpy(a).requires_grad_(True) for a in s)) if isinstance(state, tuple) \
        else (lambda a: torch.from_numpy(a).requires_grad_(True))
    st = as_t(state)
    out, new_st = net(torch.from_numpy(X), st)
    pairs = zip(new_st, dstate) if isinstance(state, tuple) else [(new_st, dstate)]
    loss = (out * torch.from_numpy(dlogits)).sum() + sum((s * torch.from_numpy(d)).sum() for s, d in pairs)
    loss.backward()
    assert rel_err(logits, out.detach().numpy()) <= 1e-12
    for name, p in net.named_parameters():
        err = rel_err(model.grads[name], p.grad.numpy())
        record("RNNLM(gru/lstm) gradients vs d2l's RNNModel (float64)", err)
        assert err <= 1e-10, name
    assert set(model.grads) == set(dict(net.named_parameters()))
    pairs = zip(dstate0 if isinstance(state, tuple) else (dstate0,), st if isinstance(st, tuple) else (st,))
    for ours, theirs in pairs:
        assert rel_err(ours, theirs.grad.numpy()) <= 1e-10


@pytest.mark.parametrize("use_random_iter", [False, True], ids=["sequential", "random"])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_training_parity_with_concise_model(cell, use_random_iter, timemachine, xp):
    """d2l's train_epoch_ch8 with torch.optim.SGD on RNNModel(nn.GRU / nn.LSTM): 60 steps, clipping at 0.2."""
    corpus, vocab = timemachine
    batches = batches_for(corpus, use_random_iter)
    model = RNNLM(len(vocab), 32, dtype="float64", init="uniform", seed=2, cell=cell)
    net = concise_twin(model)
    ref, ours = [], []
    train_epoch_ch8(net, batches, torch.optim.SGD(net.parameters(), lr=1.0), clip=0.2,
                    use_random_iter=use_random_iter, on_step=ref.append)
    train_epoch(model, [(xp.asarray(X), xp.asarray(Y)) for X, Y in batches], SGD(model.params, 1.0), clip=0.2,
                use_random_iter=use_random_iter, on_step=ours.append)
    ours, ref = np.array(ours), np.array(ref)
    assert ref[-10:].mean() < ref[:10].mean() - 0.2, "the reference did not learn; the test would be weak"
    err = float(np.max(np.abs(ours - ref) / np.abs(ref)))
    record("training losses vs d2l's concise GRU/LSTM loop, 60 steps (float64)", err)
    assert err <= 1e-6, f"largest relative loss difference {err:.2e}"
