"""RNNLM against d2l's torch RNNModel, and training parity with a torch autograd loop."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import record, rel_err
from npyrnn import backend
from npyrnn.data import SeqDataLoader, load_corpus
from npyrnn.models import RNNLM
from npyrnn.optim import SGD
from npyrnn.train import predict, train, train_epoch
from reference import concise_twin, grad_clipping, predict_ch8, scratch_twin, sgd, train_epoch_ch8


@pytest.fixture(scope="module")
def timemachine():
    return load_corpus("timemachine")


CONFIGS = [
    dict(num_layers=1, bidirectional=False, nonlinearity="tanh"),
    dict(num_layers=2, bidirectional=False, nonlinearity="relu"),
    dict(num_layers=2, bidirectional=True, nonlinearity="tanh"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"L{c['num_layers']}-{'bi' if c['bidirectional'] else 'uni'}-{c['nonlinearity']}")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_logits_equal_d2l_rnn_model(cfg, dtype, timemachine, xp):
    corpus, vocab = timemachine
    model = RNNLM(len(vocab), 24, dtype=dtype, init="uniform", seed=0, **cfg)
    X = corpus[:60].reshape(4, 15)
    state = np.random.default_rng(0).standard_normal(model.begin_state(4).shape).astype(dtype)
    logits, new_state = model.forward(xp.asarray(X), xp.asarray(state))
    assert logits.shape == (15 * 4, len(vocab))
    with torch.no_grad():
        ref, ref_state = concise_twin(model)(torch.from_numpy(X), torch.from_numpy(state))
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(backend.to_numpy(logits), ref.numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(backend.to_numpy(new_state), ref_state.numpy(), rtol=tol, atol=tol)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"L{c['num_layers']}-{'bi' if c['bidirectional'] else 'uni'}-{c['nonlinearity']}")
def test_rnnlm_gradients_match_autograd(cfg, timemachine, xp):
    corpus, vocab = timemachine
    model = RNNLM(len(vocab), 16, dtype="float64", init="uniform", seed=1, **cfg)
    X = corpus[100:148].reshape(4, 12)
    rng = np.random.default_rng(1)
    state = rng.standard_normal(model.begin_state(4).shape)
    dstate = rng.standard_normal(state.shape)
    logits, new_state = model.forward(xp.asarray(X), xp.asarray(state))
    dlogits = rng.standard_normal(logits.shape)
    dstate0 = model.backward(xp.asarray(dlogits), xp.asarray(dstate))

    net = concise_twin(model)
    st = torch.from_numpy(state).requires_grad_(True)
    out, new_st = net(torch.from_numpy(X), st)
    ((out * torch.from_numpy(dlogits)).sum() + (new_st * torch.from_numpy(dstate)).sum()).backward()
    for name, p in net.named_parameters():
        err = rel_err(model.grads[name], p.grad.numpy())
        record("RNNLM gradients vs autograd (float64)", err)
        assert err <= 1e-10, name
    assert rel_err(dstate0, st.grad.numpy()) <= 1e-10
    assert set(model.grads) == set(dict(net.named_parameters()))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_scratch_twin_equals_rnnlm(dtype, timemachine, xp):
    """d2l's scratch model holding an RNNLM's weights: the same logits, state and gradients."""
    corpus, vocab = timemachine
    model = RNNLM(len(vocab), 20, dtype=dtype, init="uniform", seed=5)
    X = corpus[200:248].reshape(4, 12)
    rng = np.random.default_rng(5)
    state = rng.standard_normal(model.begin_state(4).shape).astype(dtype)
    dlogits = rng.standard_normal((48, len(vocab))).astype(dtype)
    logits, new_state = model.forward(xp.asarray(X), xp.asarray(state))
    model.backward(xp.asarray(dlogits))

    net = scratch_twin(model)
    ref, (ref_state,) = net(torch.from_numpy(X), (torch.from_numpy(state[0]),))
    (ref * torch.from_numpy(dlogits)).sum().backward()
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(backend.to_numpy(logits), ref.detach().numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(backend.to_numpy(new_state)[0], ref_state.detach().numpy(), rtol=tol, atol=tol)
    if dtype == "float64":
        W_xh, W_hh, b_h, W_hq, b_q = (p.grad.numpy() for p in net.params)
        pairs = {"rnn.weight_ih_l0": W_xh.T, "rnn.weight_hh_l0": W_hh.T, "rnn.bias_ih_l0": b_h,
                 "rnn.bias_hh_l0": b_h, "linear.weight": W_hq.T, "linear.bias": b_q}
        for name, grad in pairs.items():
            err = rel_err(model.grads[name], grad)
            record("RNNLM gradients vs d2l's scratch model (float64)", err)
            assert err <= 1e-10, name


@pytest.mark.parametrize("clip,tol", [(1e9, 1e-10), (0.3, 1e-6)], ids=["no-clipping", "clipping"])
def test_d2l_training_loop_follows_rnnlm(clip, tol, timemachine, xp):
    """d2l's train_epoch_ch8 with torch.optim.SGD on the concise twin: npyrnn's perplexity and weights.

    Exact without clipping. With clipping active (the gradient norms here are about 0.4, so 0.3
    clips every step), d2l's grad_clipping divides by the norm where npyrnn (as torch's
    clip_grad_norm_) divides by norm + 1e-6: the perplexities differ by about 1e-7.
    """
    corpus, vocab = timemachine
    loader = SeqDataLoader(corpus[:4000], 8, 10, rng=np.random.default_rng(1))
    batches = [(backend.to_numpy(X), backend.to_numpy(Y)) for X, Y in loader][:30]
    model = RNNLM(len(vocab), 24, dtype="float64", init="uniform", seed=6)
    net = concise_twin(model)
    ref_ppl, tokens = train_epoch_ch8(net, batches, torch.optim.SGD(net.parameters(), lr=1.0), clip=clip)
    ppl, _ = train_epoch(model, [(xp.asarray(X), xp.asarray(Y)) for X, Y in batches], SGD(model.params, 1.0),
                         clip=clip)
    assert tokens == 30 * 8 * 10
    assert abs(ppl - ref_ppl) <= tol * ref_ppl, (ppl, ref_ppl)
    for name, p in net.named_parameters():
        assert rel_err(model.params[name], p.detach().numpy()) <= 10 * tol, name


def test_scratch_twin_sgd_step_equals_rnnlm(timemachine, xp):
    """One step of d2l's sgd on the scratch twin moves the weights as npyrnn's SGD does.

    d2l's scratch model has one hidden bias b_h where npyrnn (torch's layout) has two, each with
    b_h's gradient: the sum of npyrnn's biases moves twice as far, so only one step is compared
    and the biases through that relation. No clipping (it would count the bias gradient twice).
    """
    corpus, vocab = timemachine
    X, Y = corpus[:40].reshape(4, 10), corpus[1:41].reshape(4, 10)
    model = RNNLM(len(vocab), 24, dtype="float64", init="uniform", seed=7)
    net = scratch_twin(model)
    b_h0 = net.params[2].detach().clone().numpy()
    ref_ppl, _ = train_epoch_ch8(net, [(X, Y)], lambda batch_size: sgd(net.params, 1.0, batch_size), clip=1e9)
    ppl, _ = train_epoch(model, [(xp.asarray(X), xp.asarray(Y))], SGD(model.params, 1.0), clip=None)
    assert abs(ppl - ref_ppl) <= 1e-12 * ref_ppl
    W_xh, W_hh, b_h, W_hq, b_q = (p.detach().numpy() for p in net.params)
    for name, ref in {"rnn.weight_ih_l0": W_xh.T, "rnn.weight_hh_l0": W_hh.T, "linear.weight": W_hq.T,
                      "linear.bias": b_q}.items():
        assert rel_err(model.params[name], ref) <= 1e-12, name
    db_h = b_h0 - b_h  # lr * grad, lr = 1
    assert np.abs(db_h).max() > 1e-4, "the bias did not move; the check would be empty"
    both = backend.to_numpy(model.params["rnn.bias_ih_l0"] + model.params["rnn.bias_hh_l0"])
    assert rel_err(both, b_h0 - 2 * db_h) <= 1e-12


def test_d2l_grad_clipping_rescales_only_above_theta():
    net = scratch_twin(RNNLM(28, 8, dtype="float64", seed=0))
    for p, scale in zip(net.params, (3.0, 4.0, 0.0, 0.0, 0.0)):
        p.grad = torch.full_like(p, 0.0)
        p.grad.view(-1)[0] = scale  # global norm 5
    grad_clipping(net, 10.0)
    assert float(net.params[1].grad.view(-1)[0]) == 4.0
    grad_clipping(net, 1.0)
    assert abs(float(net.params[0].grad.view(-1)[0]) - 0.6) < 1e-15
    assert abs(float(net.params[1].grad.view(-1)[0]) - 0.8) < 1e-15


def test_scratch_twin_rejects_what_d2l_cannot_express():
    with pytest.raises(ValueError, match="one layer, one direction and tanh"):
        scratch_twin(RNNLM(28, 8, num_layers=2))


def torch_train(net, batches, lr, clip, use_random_iter):
    """d2l's train_epoch_ch8 with torch.optim.SGD and clip_grad_norm_; per-step losses."""
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    state, losses = None, []
    for X, Y in batches:
        if state is None or use_random_iter:
            state = torch.zeros(net.rnn.num_layers * net.num_directions, X.shape[0], net.num_hiddens,
                                dtype=net.linear.weight.dtype)
        else:
            state = state.detach()
        y = torch.from_numpy(Y.T.reshape(-1))
        y_hat, state = net(torch.from_numpy(X), state)
        loss = F.cross_entropy(y_hat, y)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("use_random_iter", [False, True], ids=["sequential", "random"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"L{c['num_layers']}-{'bi' if c['bidirectional'] else 'uni'}-{c['nonlinearity']}")
def test_training_parity_with_torch(cfg, use_random_iter, timemachine, xp):
    """Same weights and batches: equal losses step after step for 60 steps, float64, clipping active."""
    corpus, vocab = timemachine
    loader = SeqDataLoader(corpus[:5000], 8, 10, use_random_iter=use_random_iter, rng=np.random.default_rng(3))
    batches = [(backend.to_numpy(X), backend.to_numpy(Y)) for X, Y in loader][:60]
    assert len(batches) == 60
    model = RNNLM(len(vocab), 32, dtype="float64", init="uniform", seed=2, **cfg)
    net = concise_twin(model)
    ref = torch_train(net, batches, lr=1.0, clip=1.0, use_random_iter=use_random_iter)

    ours = []
    dev_batches = [(xp.asarray(X), xp.asarray(Y)) for X, Y in batches]
    train_epoch(model, dev_batches, SGD(model.params, 1.0), clip=1.0, use_random_iter=use_random_iter,
                on_step=ours.append)
    ours, ref = np.array(ours), np.array(ref)
    assert ref[-10:].mean() < ref[:10].mean() - 0.2, "the reference did not learn; the test would be weak"
    err = float(np.max(np.abs(ours - ref) / np.abs(ref)))
    record("training losses vs torch loop, 60 steps (float64)", err)
    assert err <= 1e-10, f"largest relative loss difference {err:.2e}"
    for name, p in net.named_parameters():
        assert rel_err(model.params[name], p.detach().numpy()) <= 1e-9, name


def test_state_carry_matters_for_sequential(timemachine):
    """Carrying the state differs from resetting it: the parity above is not vacuous."""
    corpus, vocab = timemachine
    loader = SeqDataLoader(corpus[:3000], 8, 10, rng=np.random.default_rng(0))
    batches = list(loader)[:15]
    losses = {}
    for reset in (False, True):
        model = RNNLM(len(vocab), 32, dtype="float64", init="uniform", seed=2)
        steps = []
        train_epoch(model, batches, SGD(model.params, 1.0), use_random_iter=reset, on_step=steps.append)
        losses[reset] = steps
    assert losses[False][0] == losses[True][0]
    assert abs(losses[False][-1] - losses[True][-1]) > 1e-6


def test_predict_matches_d2l_greedy(timemachine):
    corpus, vocab = timemachine
    model = RNNLM(len(vocab), 32, dtype="float64", init="uniform", seed=4)
    loader = SeqDataLoader(corpus[:3000], 8, 10, rng=np.random.default_rng(0))
    train(model, loader, vocab, lr=1.0, num_epochs=2, progress=False)
    prefix, num_preds = "time traveller ", 30
    with torch.no_grad():
        expected = predict_ch8(prefix, num_preds, concise_twin(model), vocab)
    assert predict(prefix, num_preds, model, vocab) == expected


def test_predict_sampling_and_errors(timemachine):
    _, vocab = timemachine
    model = RNNLM(len(vocab), 16, init="uniform", seed=0)
    a = predict("time", 40, model, vocab, temperature=1.0, seed=7)
    b = predict("time", 40, model, vocab, temperature=1.0, seed=7)
    c = predict("time", 40, model, vocab, temperature=1.0, seed=8)
    assert a == b and a != c and len(a.replace('<unk>', '?')) == 44 and a.startswith("time")
    top1 = predict("time", 20, model, vocab, temperature=5.0, top_k=1, seed=1)
    assert top1 == predict("time", 20, model, vocab), "top_k=1 sampling must equal greedy"
    with pytest.raises(ValueError, match="prefix is empty"):
        predict("", 10, model, vocab)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        predict("a", 10, model, vocab, temperature=-1)
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        predict("a", 10, model, vocab, temperature=1, top_k=0)
    with pytest.raises(ValueError, match="top_k applies only when sampling"):
        predict("a", 10, model, vocab, top_k=3)
    with pytest.warns(UserWarning, match="map to <unk>: 'T', '!'"):
        out = predict("Time!", 5, model, vocab)
    assert out.startswith("Time!") and len(out.replace('<unk>', '?')) == 10


def test_top_k_keeps_exactly_k_even_with_ties():
    from npyrnn.generate import choose as _choose

    logits = np.array([3.0, 1.0, 1.0, 1.0, 0.0])  # k=2 must keep index 0 and ONE of the tied 1.0s
    rng = np.random.default_rng(0)
    seen = {_choose(logits, 1.0, 2, rng) for _ in range(400)}
    assert 0 in seen and len(seen) == 2 and seen <= {0, 1, 2, 3}


def test_failed_forward_leaves_no_stale_state():
    backend.set_backend("numpy")  # RNNLM.forward checks token ids on NumPy only (docs/backends.md)
    model = RNNLM(28, 8, dtype="float64", seed=0)
    X = np.zeros((2, 3), dtype=np.int64)
    logits, _ = model.forward(X)
    with pytest.raises(ValueError, match="token ids must lie in"):
        model.forward(np.full((2, 3), 99, dtype=np.int64))
    with pytest.raises(RuntimeError, match="before forward"):
        model.backward(np.ones_like(logits))
    assert all(not g.any() for g in model.grads.values()), "a failed forward's backward touched the gradients"


def test_rnnlm_bad_input():
    model = RNNLM(28, 8)
    with pytest.raises(ValueError, match=r"expected integer token ids X of shape \(B, T\), got \(2, 3, 4\)"):
        model.forward(np.zeros((2, 3, 4), dtype=np.int64))
    with pytest.raises(ValueError, match=r"got \(2, 3\) float32"):
        model.forward(np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(RuntimeError, match="before forward"):
        RNNLM(28, 8).backward(np.zeros((6, 28), np.float32))


def test_rnnlm_init_matches_d2l_scratch_model():
    model = RNNLM(28, 512, seed=0)
    for name in ("rnn.weight_ih_l0", "rnn.weight_hh_l0", "linear.weight"):
        w = model.params[name]
        assert abs(float(w.std()) - 0.01) < 5e-4, name
    for name in ("rnn.bias_ih_l0", "rnn.bias_hh_l0", "linear.bias"):
        assert not model.params[name].any(), name
    assert list(model.params) == [
        "rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0", "linear.weight", "linear.bias",
    ]
    other = RNNLM(28, 512, seed=0)
    assert all(np.array_equal(backend.to_numpy(model.params[k]), backend.to_numpy(other.params[k])) for k in model.params)
    # the RNN and the output layer draw from independent streams
    assert not np.allclose(backend.to_numpy(model.params["rnn.weight_ih_l0"][:28, :28]),
                       backend.to_numpy(model.params["linear.weight"][:28, :28]))
