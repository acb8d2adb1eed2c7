"""npyrnn.nn.RNN against torch.nn.RNN: outputs, and every gradient through autograd."""

import itertools
import zlib

import numpy as np
import pytest
import torch

from conftest import record, rel_err
from npyrnn import backend
from npyrnn.gradcheck import directional_check
from npyrnn.nn import RNN
from reference import rnn_twin as torch_twin

I, H = 5, 6


def make_input(rng, ids, T, B, batch_first, dtype):
    shape = (B, T) if batch_first else (T, B)
    if ids:
        return rng.integers(0, I, size=shape)
    return rng.standard_normal(shape + (I,)).astype(dtype)


def torch_input(x_host, ids, dtype):
    if ids:
        return torch.nn.functional.one_hot(torch.from_numpy(x_host), I).to(getattr(torch, dtype))
    return torch.from_numpy(x_host).clone()


GRID = list(
    itertools.product(
        [1, 2, 3],  # num_layers
        [False, True],  # bidirectional
        ["tanh", "relu"],
        [True, False],  # bias
        [False, True],  # batch_first
        [False, True],  # h0 given
        [1, 7],  # T
        [1, 4],  # B
        [False, True],  # token ids
    )
)


def _id(case):
    L, bi, nl, bias, bf, h0, T, B, ids = case
    return f"L{L}-{'bi' if bi else 'uni'}-{nl}-{'bias' if bias else 'nobias'}-{'bf' if bf else 'tm'}-{'h0' if h0 else 'noh0'}-T{T}-B{B}-{'ids' if ids else 'dense'}"


@pytest.mark.parametrize("case", GRID, ids=[_id(c) for c in GRID])
def test_gradients_match_autograd_float64(case, xp):
    L, bi, nl, bias, bf, with_h0, T, B, ids = case
    rng = np.random.default_rng(zlib.crc32(repr(case).encode()))  # the same in every process
    rnn = RNN(I, H, L, nl, bias, bi, bf, dtype="float64", init="uniform", seed=1)
    D = 2 if bi else 1
    x = make_input(rng, ids, T, B, bf, "float64")
    h0 = rng.standard_normal((L * D, B, H))
    out_shape = (B, T, D * H) if bf else (T, B, D * H)
    dout = rng.standard_normal(out_shape)
    dh_n = rng.standard_normal((L * D, B, H))

    out, h_n = rnn.forward(xp.asarray(x), xp.asarray(h0) if with_h0 else None)
    dx, dh0 = rnn.backward(xp.asarray(dout), xp.asarray(dh_n))

    net = torch_twin(rnn)
    xt = torch_input(x, ids, "float64").requires_grad_(not ids)
    h0t = torch.from_numpy(h0 if with_h0 else np.zeros_like(h0)).requires_grad_(True)
    out_t, h_n_t = net(xt, h0t)
    loss = (out_t * torch.from_numpy(dout)).sum() + (h_n_t * torch.from_numpy(dh_n)).sum()
    loss.backward()

    assert rel_err(out, out_t.detach().numpy()) <= 1e-12, "out"
    assert rel_err(h_n, h_n_t.detach().numpy()) <= 1e-12, "h_n"
    for name, p in net.named_parameters():
        err = rel_err(rnn.grads[name], p.grad.numpy())
        record("RNN parameter gradients vs autograd (float64)", err)
        assert err <= 1e-10, f"d{name}: relative error {err:.2e}"
    err = rel_err(dh0, h0t.grad.numpy())
    record("RNN dh0 vs autograd (float64)", err)
    assert err <= 1e-10, f"dh0: relative error {err:.2e}"
    if ids:
        assert dx is None
    else:
        err = rel_err(dx, xt.grad.numpy())
        record("RNN dx vs autograd (float64)", err)
        assert err <= 1e-10, f"dx: relative error {err:.2e}"


DH_N_NONE_GRID = list(itertools.product([1, 2, 3], [False, True], [False, True], [1, 7], ["tanh", "relu"]))


@pytest.mark.parametrize("L,bi,bf,T,nl", DH_N_NONE_GRID)
def test_gradients_without_dh_n_match_autograd(L, bi, bf, T, nl, xp):
    """backward(dout) alone: the carried gradient starts from nothing, not from dh_n."""
    rng = np.random.default_rng(L * 100 + T)
    B = 3
    rnn = RNN(I, H, L, nl, True, bi, bf, dtype="float64", init="uniform", seed=4)
    D = 2 if bi else 1
    x = make_input(rng, False, T, B, bf, "float64")
    dout = rng.standard_normal((B, T, D * H) if bf else (T, B, D * H))
    out, _ = rnn.forward(xp.asarray(x))
    dx, dh0 = rnn.backward(xp.asarray(dout))
    net = torch_twin(rnn)
    xt = torch.from_numpy(x).requires_grad_(True)
    h0t = torch.zeros(L * D, B, H, dtype=torch.float64, requires_grad=True)
    out_t, _ = net(xt, h0t)
    (out_t * torch.from_numpy(dout)).sum().backward()
    for name, p in net.named_parameters():
        assert rel_err(rnn.grads[name], p.grad.numpy()) <= 1e-10, name
    assert rel_err(dx, xt.grad.numpy()) <= 1e-10
    assert rel_err(dh0, h0t.grad.numpy()) <= 1e-10


FORWARD_GRID = list(itertools.product([1, 2], [False, True], ["tanh", "relu"], [False, True], ["float32", "float64"]))


@pytest.mark.parametrize("L,bi,nl,ids,dtype", FORWARD_GRID)
def test_forward_matches_torch(L, bi, nl, ids, dtype, xp):
    rng = np.random.default_rng(7)
    T, B = 9, 3
    rnn = RNN(I, H, num_layers=L, nonlinearity=nl, bidirectional=bi, dtype=dtype, init="uniform", seed=3)
    x = make_input(rng, ids, T, B, False, dtype)
    D = 2 if bi else 1
    h0 = rng.standard_normal((L * D, B, H)).astype(dtype)
    out, h_n = rnn.forward(xp.asarray(x), xp.asarray(h0))
    assert out.shape == (T, B, D * H) and h_n.shape == (L * D, B, H)
    assert out.dtype == dtype and h_n.dtype == dtype
    with torch.no_grad():
        out_t, h_n_t = torch_twin(rnn)(torch_input(x, ids, dtype), torch.from_numpy(h0))
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(backend.to_numpy(out), out_t.numpy(), rtol=tol, atol=tol, err_msg="out")
    np.testing.assert_allclose(backend.to_numpy(h_n), h_n_t.numpy(), rtol=tol, atol=tol, err_msg="h_n")


@pytest.mark.parametrize("bi", [False, True])
@pytest.mark.parametrize("nl", ["tanh", "relu"])
def test_finite_differences_without_torch(bi, nl, xp):
    rng = np.random.default_rng(11)
    T, B, L = 6, 3, 2
    rnn = RNN(I, H, num_layers=L, nonlinearity=nl, bidirectional=bi, dtype="float64", init="uniform", seed=5)
    D = 2 if bi else 1
    x = xp.asarray(rng.standard_normal((T, B, I)))
    h0 = xp.asarray(rng.standard_normal((L * D, B, H)))
    G = xp.asarray(rng.standard_normal((T, B, D * H)))
    Gh = xp.asarray(rng.standard_normal((L * D, B, H)))

    def loss():
        out, h_n = rnn.forward(x, h0)
        return float((out * G).sum() + (h_n * Gh).sum())

    rnn.forward(x, h0)
    dx, dh0 = rnn.backward(G, Gh)
    errors = directional_check(loss, rnn.params, rnn.grads, num_directions=3)
    errors.update(directional_check(loss, {"x": x, "h0": h0}, {"x": dx, "h0": dh0}, num_directions=3))
    worst = max(errors.values())
    record("RNN finite differences (float64)", worst)
    assert worst < 1e-6, errors


def test_finite_difference_check_catches_a_wrong_gradient(xp):
    rnn = RNN(I, H, dtype="float64", init="uniform", seed=0)
    x = xp.asarray(np.random.default_rng(0).standard_normal((4, 2, I)))

    def loss():
        return float(rnn.forward(x)[0].sum())

    out, _ = rnn.forward(x)
    rnn.backward(xp.ones_like(out))
    rnn.grads["weight_hh_l0"] *= 1.001  # a 0.1% error must show up
    errors = directional_check(loss, rnn.params, rnn.grads)
    assert errors["weight_hh_l0"] > 1e-4
    assert errors["weight_ih_l0"] < 1e-6


@pytest.mark.parametrize("L,bi,bf", [(1, False, False), (2, True, False), (3, True, True)])
def test_token_ids_equal_dense_one_hot(L, bi, bf, xp):
    rng = np.random.default_rng(2)
    T, B = 5, 4
    a = RNN(I, H, num_layers=L, bidirectional=bi, batch_first=bf, dtype="float64", init="uniform", seed=9)
    b = RNN(I, H, num_layers=L, bidirectional=bi, batch_first=bf, dtype="float64", init="uniform", seed=9)
    ids = rng.integers(0, I, size=(B, T) if bf else (T, B))
    dense = np.eye(I)[ids]
    out_a, hn_a = a.forward(xp.asarray(ids))
    out_b, hn_b = b.forward(xp.asarray(dense))
    np.testing.assert_allclose(backend.to_numpy(out_a), backend.to_numpy(out_b), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(backend.to_numpy(hn_a), backend.to_numpy(hn_b), rtol=1e-13, atol=1e-14)
    dout = xp.asarray(rng.standard_normal(out_a.shape))
    dx_a, dh0_a = a.backward(dout)
    dx_b, dh0_b = b.backward(dout)
    assert dx_a is None and dx_b.shape == dense.shape
    for name in a.params:
        assert rel_err(a.grads[name], backend.to_numpy(b.grads[name])) <= 1e-13, name
    assert rel_err(dh0_a, backend.to_numpy(dh0_b)) <= 1e-13


def test_backward_accumulates_and_zero_grad_clears(xp):
    rnn = RNN(I, H, dtype="float64", init="uniform", seed=0)
    x = xp.asarray(np.random.default_rng(0).standard_normal((3, 2, I)))
    out, _ = rnn.forward(x)
    rnn.backward(xp.ones_like(out))
    once = {k: backend.to_numpy(g).copy() for k, g in rnn.grads.items()}
    rnn.backward(xp.ones_like(out))
    for k in once:
        np.testing.assert_allclose(backend.to_numpy(rnn.grads[k]), 2 * once[k], rtol=1e-14, atol=0)
    rnn.zero_grad()
    assert all(not backend.to_numpy(g).any() for g in rnn.grads.values())
    assert set(rnn.grads) == set(rnn.params)


def test_init_schemes():
    big = RNN(20, 400, dtype="float64", init="normal", seed=0)
    w = big.params["weight_hh_l0"]
    assert abs(w.std() - 0.01) < 5e-4 and abs(w.mean()) < 5e-4
    assert not big.params["bias_ih_l0"].any() and not big.params["bias_hh_l0"].any()
    uni = RNN(20, 400, dtype="float64", init="uniform", seed=0)
    k = 1 / 400**0.5
    for name, p in uni.params.items():
        assert p.min() >= -k and p.max() <= k, name
        assert p.max() > 0.9 * k, name
    again = RNN(20, 400, dtype="float64", init="uniform", seed=0)
    assert all(np.array_equal(backend.to_numpy(uni.params[n]), backend.to_numpy(again.params[n])) for n in uni.params)
    assert RNN(20, 8).params["weight_ih_l0"].dtype == np.float32


def test_state_dict_round_trip_and_errors():
    a = RNN(I, H, num_layers=2, seed=0)
    b = RNN(I, H, num_layers=2, seed=1)
    b.load_state_dict(a.state_dict())
    assert all(np.array_equal(backend.to_numpy(a.params[n]), backend.to_numpy(b.params[n])) for n in a.params)
    bad = dict(a.state_dict())
    bad.pop("bias_hh_l1")
    bad["weight_hh_l0"] = np.zeros((H, H + 1))
    bad["extra"] = np.zeros(1)
    with pytest.raises(ValueError) as err:
        b.load_state_dict(bad)
    msg = str(err.value)
    assert "missing keys bias_hh_l1" in msg and "unexpected keys extra" in msg
    assert f"weight_hh_l0: expected ({H}, {H}), got ({H}, {H + 1})" in msg


@pytest.mark.parametrize(
    "kwargs,x,match",
    [
        ({}, np.zeros((3, 2, I + 1), "float32"), r"expected x of shape \(T, B, 5\).*got \(3, 2, 6\)"),
        ({}, np.zeros((3, I), "float32"), r"expected x of shape \(T, B, 5\).*got \(3, 5\)"),
        ({"batch_first": True}, np.zeros((2, 3, 4), "float32"), r"expected x of shape \(B, T, 5\).*got \(2, 3, 4\)"),
        ({}, np.zeros((3, 2, I), "float64"), r"expected x of dtype float32, got float64"),
        ({}, np.zeros((3, 2, 1), "int64"), r"token ids must have shape \(T, B\), got \(3, 2, 1\)"),
        ({}, np.full((3, 2), I, "int64"), r"token ids must lie in \[0, 5\).*got values in \[5, 5\]"),
        ({}, np.full((3, 2), -1, "int64"), r"token ids must lie in \[0, 5\).*got values in \[-1, -1\]"),
        ({}, np.zeros((0, 2), "int64"), r"at least one step"),
        ({}, [[1, 2]], r"must be a {backend} array"),
    ],
)
def test_bad_input_raises_value_error(kwargs, x, match, xp):
    rnn = RNN(I, H, **kwargs)
    x = xp.asarray(x) if isinstance(x, np.ndarray) else x  # the list stays a list: not an array at all
    with pytest.raises(ValueError, match=match.replace("{backend}", xp.__name__)):
        rnn.forward(x)


def test_bad_states_and_gradients_raise_value_error(xp):
    rnn = RNN(I, H, num_layers=2, bidirectional=True)
    x = xp.zeros((3, 2, I), "float32")
    with pytest.raises(ValueError, match=r"expected h0 of shape \(4, 2, 6\).*got \(2, 2, 6\)"):
        rnn.forward(x, xp.zeros((2, 2, H), "float32"))
    with pytest.raises(ValueError, match=r"expected h0 of dtype float32, got float64"):
        rnn.forward(x, xp.zeros((4, 2, H)))
    with pytest.raises(RuntimeError, match="before forward"):
        RNN(I, H).backward(xp.zeros((3, 2, H), "float32"))
    out, _ = rnn.forward(x)
    with pytest.raises(ValueError, match=r"expected dout of shape \(3, 2, 12\).*got \(3, 2, 6\)"):
        rnn.backward(xp.zeros((3, 2, H), "float32"))
    with pytest.raises(ValueError, match=r"expected dh_n of shape \(4, 2, 6\)"):
        rnn.backward(xp.zeros_like(out), xp.zeros((1, 2, H), "float32"))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"input_size": 0}, "input_size must be a positive integer, got 0"),
        ({"hidden_size": 2.5}, "hidden_size must be a positive integer, got 2.5"),
        ({"num_layers": 0}, "num_layers must be a positive integer, got 0"),
        ({"nonlinearity": "sigmoid"}, "nonlinearity must be one of 'tanh', 'relu', got 'sigmoid'"),
        ({"dtype": "float16"}, "dtype must be one of float32, float64, got 'float16'"),
        ({"init": "xavier"}, "init must be one of 'normal', 'uniform', got 'xavier'"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    args = {"input_size": I, "hidden_size": H, **kwargs}
    with pytest.raises(ValueError, match=match):
        RNN(**args)


@pytest.mark.parametrize("vocab", [5, 300], ids=["one-hot-product", "sorted-scatter"])
def test_both_scatter_paths_match_autograd(vocab, xp):
    """Token ids take a one-hot product for small vocabularies and a sorted scatter for large ones."""
    from npyrnn.nn import rnn as rnn_module

    assert (vocab <= rnn_module.ONE_HOT_MAX) == (vocab == 5)
    rng = np.random.default_rng(4)
    T, B = 6, 5
    rnn = RNN(vocab, H, dtype="float64", init="uniform", seed=2)
    ids = rng.integers(0, min(vocab, 40), size=(T, B))  # repeated ids: the scatter must sum them
    dout = rng.standard_normal((T, B, H))
    out, _ = rnn.forward(xp.asarray(ids))
    rnn.backward(xp.asarray(dout))
    net = torch.nn.RNN(vocab, H, dtype=torch.float64)
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(torch.from_numpy(backend.to_numpy(rnn.params[n])))
    out_t, _ = net(torch.nn.functional.one_hot(torch.from_numpy(ids), vocab).double())
    (out_t * torch.from_numpy(dout)).sum().backward()
    for n, p in net.named_parameters():
        assert rel_err(rnn.grads[n], p.grad.numpy()) <= 1e-10, n


@pytest.mark.parametrize("B", [1, 3], ids=["one-sequence-gemv", "batch"])
@pytest.mark.parametrize("L,nl,ids,bias", [(1, "tanh", True, True), (3, "relu", True, False), (2, "tanh", False, True)])
def test_stepper_equals_forward(L, nl, ids, bias, B, xp):
    rng = np.random.default_rng(6)
    T = 7
    rnn = RNN(I, H, num_layers=L, nonlinearity=nl, bias=bias, dtype="float64", init="uniform", seed=8)
    x = make_input(rng, ids, T, B, False, "float64")
    h0 = rng.standard_normal((L, B, H))
    out, h_n = rnn.forward(xp.asarray(x), xp.asarray(h0))
    h = xp.asarray(h0.copy())
    step = rnn.stepper(h)
    for t in range(T):
        top = step(xp.asarray(x[t]))
        np.testing.assert_allclose(backend.to_numpy(top), backend.to_numpy(out[t]), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(backend.to_numpy(h), backend.to_numpy(h_n), rtol=1e-12, atol=1e-13)


def test_stepper_rejects_bidirectional_and_bad_state(xp):
    with pytest.raises(ValueError, match="bidirectional RNN cannot run one step at a time"):
        RNN(I, H, bidirectional=True).stepper(xp.zeros((2, 1, H), "float32"))
    with pytest.raises(ValueError, match=r"expected h of shape \(2, 1, 6\)"):
        RNN(I, H, num_layers=2).stepper(xp.zeros((1, 1, H), "float32"))
