"""npyrnn.nn.GRU and LSTM against torch.nn.GRU / nn.LSTM, and every cell against torch autograd twins.

float64: outputs and final states at relative error <= 1e-12, every gradient (parameters, dx,
dh0, dc0) <= 1e-10. The twins are in tests/reference.py.
"""

import itertools
import zlib

import numpy as np
import pytest
import torch

from conftest import record, rel_err
from npyrnn import backend
from npyrnn.nn import GRU, LSTM, RNN
from reference import scratch_stack, to_torch, torch_layer

I, H, P = 5, 6, 3


def case_rng(case):
    """A generator seeded from the case itself, the same in every process (unlike hash())."""
    return np.random.default_rng(zlib.crc32(repr(case).encode()))


def build(kind, L=1, bi=False, bias=True, bf=False, proj=0, reset_after=True, dropout=0.0, seed=1, dtype="float64", **kw):
    """A float64 layer with torch's initialisation; `kind` is 'RNN', 'GRU' or 'LSTM'."""
    if kind == "GRU":
        return GRU(I, H, L, bias, bf, dropout, bi, reset_after, dtype, "uniform", seed, **kw)
    if kind == "LSTM":
        return LSTM(I, H, L, bias, bf, dropout, bi, proj, dtype, "uniform", seed, **kw)
    return RNN(I, H, L, "tanh", bias, bi, bf, dropout, dtype, "uniform", seed, **kw)


def torch_nn(layer):
    """The oracle as a function (x, h0, c0) -> (out, h_n, c_n, params): torch.nn's own layer (no dropout)."""
    net = torch_layer(layer)

    def run(xt, h0t, c0t):
        if isinstance(net, torch.nn.LSTM):
            out, (h_n, c_n) = net(xt, (h0t, c0t))
        else:
            (out, h_n), c_n = net(xt, h0t), None
        return out, h_n, c_n, dict(net.named_parameters())

    return run


def torch_scratch(layer):
    """The oracle as a function: the step-by-step torch autograd twin, with the layer's last dropout masks."""
    masks = None if layer.dropout_masks is None else [to_torch(m) for m in layer.dropout_masks]
    return lambda xt, h0t, c0t: scratch_stack(layer, xt, h0t, c0t, masks)


def host_inputs(layer, rng, T, B, ids):
    """x (token ids or dense), h0, c0, dout, dh_n, dc_n as host float64 arrays."""
    L, D, Hh, Pp = layer.num_layers, layer.num_directions, layer.hidden_size, layer.output_size
    shape = (B, T) if layer.batch_first else (T, B)
    x = rng.integers(0, layer.input_size, size=shape) if ids else rng.standard_normal(shape + (layer.input_size,))
    out_shape = (B, T, D * Pp) if layer.batch_first else (T, B, D * Pp)
    return dict(
        x=x,
        h0=rng.standard_normal((L * D, B, Pp)),
        c0=rng.standard_normal((L * D, B, Hh)),
        dout=rng.standard_normal(out_shape),
        dh_n=rng.standard_normal((L * D, B, Pp)),
        dc_n=rng.standard_normal((L * D, B, Hh)),
    )


def run_npyrnn(layer, xp, v, with_h0, with_dhn):
    """forward and backward of an npyrnn layer; returns out, h_n, c_n, dx, dh0, dc0 (c's None without a cell)."""
    a = {k: xp.asarray(val) for k, val in v.items()}
    if isinstance(layer, LSTM):
        out, (h_n, c_n) = layer.forward(a["x"], (a["h0"], a["c0"]) if with_h0 else None)
        dx, (dh0, dc0) = layer.backward(a["dout"], (a["dh_n"], a["dc_n"]) if with_dhn else None)
    else:
        out, h_n = layer.forward(a["x"], a["h0"] if with_h0 else None)
        dx, dh0 = layer.backward(a["dout"], a["dh_n"] if with_dhn else None)
        c_n = dc0 = None
    return out, h_n, c_n, dx, dh0, dc0


def assert_matches(layer, xp, v, with_h0, with_dhn, make_oracle, label):
    """Run npyrnn, then the oracle on the same inputs; check outputs (1e-12) and every gradient (1e-10).

    `make_oracle(layer)` is called after npyrnn's forward, so it may read the dropout masks drawn.
    """
    ids = v["x"].dtype.kind in "iu"
    out, h_n, c_n, dx, dh0, dc0 = run_npyrnn(layer, xp, v, with_h0, with_dhn)
    oracle = make_oracle(layer)

    if ids:
        xt = torch.nn.functional.one_hot(torch.from_numpy(v["x"]), layer.input_size).double()
    else:
        xt = torch.from_numpy(v["x"]).clone().requires_grad_(True)
    h0t = torch.from_numpy(v["h0"] if with_h0 else np.zeros_like(v["h0"])).requires_grad_(True)
    c0t = torch.from_numpy(v["c0"] if with_h0 else np.zeros_like(v["c0"])).requires_grad_(True)
    out_t, h_n_t, c_n_t, params = oracle(xt, h0t, c0t)
    loss = (out_t * torch.from_numpy(v["dout"])).sum()
    if with_dhn:
        loss = loss + (h_n_t * torch.from_numpy(v["dh_n"])).sum()
        if c_n_t is not None:
            loss = loss + (c_n_t * torch.from_numpy(v["dc_n"])).sum()
    loss.backward()

    forward = [("out", out, out_t), ("h_n", h_n, h_n_t)] + ([("c_n", c_n, c_n_t)] if c_n is not None else [])
    for name, mine, theirs in forward:
        err = rel_err(mine, theirs.detach().numpy())
        record(f"{label} outputs vs torch (float64)", err)
        assert err <= 1e-12, f"{name}: relative error {err:.2e}"
    assert set(params) == set(layer.grads)
    grads = [(f"d{n}", layer.grads[n], p.grad) for n, p in params.items()]
    grads.append(("dh0", dh0, h0t.grad))
    if dc0 is not None:
        grads.append(("dc0", dc0, c0t.grad))
    if ids:
        assert dx is None
    else:
        grads.append(("dx", dx, xt.grad))
    for name, mine, theirs in grads:
        err = rel_err(mine, theirs.numpy())
        record(f"{label} gradients vs autograd (float64)", err)
        assert err <= 1e-10, f"{name}: relative error {err:.2e}"


# ------------------------------------------------------------------ the grid, as the RNN's

CELLS = {"GRU": dict(kind="GRU"), "LSTM": dict(kind="LSTM"), "LSTM-proj": dict(kind="LSTM", proj=P)}
STATES = [(1, 1, False, False), (7, 4, True, True)]  # T, B, h0 given, dh_n (and dc_n) given
GRID = list(itertools.product(CELLS, [1, 2, 3], [False, True], [True, False], [False, True], [False, True], STATES))
# every combination of T, B, initial state and final-state gradient, on a 2-layer bidirectional stack
STATE_GRID = list(itertools.product(CELLS, [1, 7], [1, 4], [False, True], [False, True]))


def _id(case):
    cell, L, bi, bias, bf, ids, (T, B, h0, dhn) = case
    return (f"{cell}-L{L}-{'bi' if bi else 'uni'}-{'bias' if bias else 'nobias'}-{'bf' if bf else 'tm'}-"
            f"{'ids' if ids else 'dense'}-T{T}-B{B}-{'h0' if h0 else 'noh0'}-{'dhn' if dhn else 'nodhn'}")


@pytest.mark.parametrize("case", GRID, ids=[_id(c) for c in GRID])
def test_matches_torch_nn_float64(case, xp):
    cell, L, bi, bias, bf, ids, (T, B, with_h0, with_dhn) = case
    layer = build(L=L, bi=bi, bias=bias, bf=bf, **CELLS[cell])
    v = host_inputs(layer, case_rng(case), T, B, ids)
    assert_matches(layer, xp, v, with_h0, with_dhn, torch_nn, cell.split("-")[0])


@pytest.mark.parametrize("cell,T,B,with_h0,with_dhn", STATE_GRID)
def test_states_and_sizes_match_torch_nn(cell, T, B, with_h0, with_dhn, xp):
    case = (cell, T, B, with_h0, with_dhn)
    layer = build(L=2, bi=True, **CELLS[cell])
    v = host_inputs(layer, case_rng(case), T, B, ids=False)
    assert_matches(layer, xp, v, with_h0, with_dhn, torch_nn, cell.split("-")[0])


SCRATCH_GRID = list(itertools.product([1, 2, 3], [False, True], [True, False], [False, True], [(1, 1), (7, 4)]))


@pytest.mark.parametrize("L,bi,bias,ids,TB", SCRATCH_GRID)
def test_gru_reset_before_matches_d2l_scratch_gru(L, bi, bias, ids, TB, xp):
    """reset_after=False is d2l's chapter 9.1 GRU: (r * h) W_hn^T, against its torch autograd twin."""
    T, B = TB
    case = ("reset-before", L, bi, bias, ids, TB)
    layer = build("GRU", L=L, bi=bi, bias=bias, reset_after=False)
    v = host_inputs(layer, case_rng(case), T, B, ids)
    assert_matches(layer, xp, v, True, True, torch_scratch, "GRU reset_after=False")


def test_reset_variants_differ_and_scratch_twin_matches_torch(xp):
    """The twin itself: with reset_after it equals nn.GRU; the two variants give different outputs."""
    rng = np.random.default_rng(0)
    after = build("GRU", L=2, bi=True)
    before = build("GRU", L=2, bi=True, reset_after=False)
    x = rng.standard_normal((4, 3, I))
    with torch.no_grad():
        out_nn, _ = torch_layer(after)(torch.from_numpy(x))
        out_twin = scratch_stack(after, torch.from_numpy(x))[0]
    assert rel_err(out_twin.detach().numpy(), out_nn.numpy()) <= 1e-13
    x = xp.asarray(x)
    assert rel_err(after.forward(x)[0], backend.to_numpy(before.forward(x)[0])) > 1e-3


# ------------------------------------------------------------------------------ dropout


@pytest.mark.parametrize("kind,extra", [("RNN", {}), ("GRU", {}), ("GRU", {"reset_after": False}),
                                        ("LSTM", {}), ("LSTM", {"proj": P})])
@pytest.mark.parametrize("bi", [False, True])
def test_dropout_matches_autograd_given_the_same_masks(kind, extra, bi, xp):
    rng = np.random.default_rng(3)
    layer = build(kind, L=3, bi=bi, dropout=0.4, seed=5, **extra)
    v = host_inputs(layer, rng, 6, 4, ids=False)
    assert_matches(layer, xp, v, True, True, torch_scratch, f"{kind} dropout")  # torch replays layer.dropout_masks
    masks = [backend.to_numpy(m) for m in layer.dropout_masks]
    D = layer.num_directions
    assert len(masks) == 2 and all(m.shape == (6, 4, D * layer.output_size) for m in masks)
    assert set(np.unique(np.concatenate([m.ravel() for m in masks]))) == {0.0, 1 / 0.6}


def test_dropout_only_in_training_mode_and_reproducible(xp):
    rng = np.random.default_rng(4)
    x = xp.asarray(rng.standard_normal((5, 3, I)))
    a, b = build("GRU", L=2, dropout=0.5, seed=9), build("GRU", L=2, dropout=0.5, seed=9)
    out_a1, _ = a.forward(x)
    out_b1, _ = b.forward(x)
    assert np.array_equal(backend.to_numpy(out_a1), backend.to_numpy(out_b1)), "same seed, same masks"
    out_a2, _ = a.forward(x)
    assert not np.allclose(backend.to_numpy(out_a1), backend.to_numpy(out_a2)), "each call draws new masks"
    assert a.eval() is a and not a.training
    out_eval, _ = a.forward(x)
    assert a.dropout_masks is None
    with torch.no_grad():
        net = torch_layer(a)
        net.dropout = 0.5
        out_t, _ = net.eval()(to_torch(x))
    assert rel_err(out_eval, out_t.numpy()) <= 1e-12, "eval mode: torch's layer without dropout"
    assert a.train().training
    big = build("RNN", L=2, dropout=0.3, seed=0)
    big.forward(xp.zeros((50, 40, I)))
    zeros = (backend.to_numpy(big.dropout_masks[0]) == 0).mean()
    assert abs(zeros - 0.3) < 0.02, zeros
    none = build("RNN", L=2, dropout=0.0)
    none.forward(x)
    assert none.dropout_masks is None


# ------------------------------------------------------------------ stepper, states, buffers


@pytest.mark.parametrize("B", [1, 3], ids=["one-sequence-gemv", "batch"])
@pytest.mark.parametrize("kind,extra,L,ids", [
    ("GRU", {}, 1, True), ("GRU", {"reset_after": False}, 3, True), ("GRU", {"bias": False}, 2, False),
    ("LSTM", {}, 1, True), ("LSTM", {"proj": P}, 3, True), ("LSTM", {"bias": False}, 2, False),
])
def test_stepper_equals_forward(kind, extra, L, ids, B, xp):
    rng = np.random.default_rng(6)
    T = 7
    layer = build(kind, L=L, **extra)
    v = host_inputs(layer, rng, T, B, ids)
    state0 = layer.begin_state(B)
    if kind == "LSTM":
        h0, c0 = xp.asarray(v["h0"]), xp.asarray(v["c0"])
        out, (h_n, c_n) = layer.forward(xp.asarray(v["x"]), (h0, c0))
        state = (h0.copy(), c0.copy())
        assert state0[0].shape == h0.shape and state0[1].shape == c0.shape and not state0[0].any()
    else:
        h0 = xp.asarray(v["h0"])
        out, h_n = layer.forward(xp.asarray(v["x"]), h0)
        state = h0.copy()
        assert state0.shape == h0.shape and not state0.any()
    step = layer.stepper(state)
    for t in range(T):
        top = step(xp.asarray(v["x"][t]))
        np.testing.assert_allclose(backend.to_numpy(top), backend.to_numpy(out[t]), rtol=1e-12, atol=1e-13)
    h = state[0] if kind == "LSTM" else state
    np.testing.assert_allclose(backend.to_numpy(h), backend.to_numpy(h_n), rtol=1e-12, atol=1e-13)
    if kind == "LSTM":
        np.testing.assert_allclose(backend.to_numpy(state[1]), backend.to_numpy(c_n), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
def test_stepper_rejects_bidirectional_and_bad_states(kind, xp):
    layer = build(kind, L=2, bi=True)
    state = layer.begin_state(1)
    with pytest.raises(ValueError, match=f"bidirectional {kind} cannot run one step at a time"):
        layer.stepper(state)
    uni = build(kind, L=2)
    bad = xp.zeros((1, 1, H))
    with pytest.raises((ValueError, TypeError), match=r"expected h of shape \(2, 1, 6\)|tuple \(h, c\)"):
        uni.stepper((bad, bad) if kind == "LSTM" else bad)
    if kind == "LSTM":
        with pytest.raises(TypeError, match=r"state must be a tuple \(h, c\)"):
            uni.stepper(xp.zeros((2, 1, H)))


def test_begin_state_shapes_and_backend(xp):
    for layer, shapes in [
        (GRU(I, H, 2, bidirectional=True), [(4, 3, H)]),
        (LSTM(I, H, 3), [(3, 3, H), (3, 3, H)]),
        (LSTM(I, H, 2, bidirectional=True, proj_size=P), [(4, 3, P), (4, 3, H)]),
        (RNN(I, H), [(1, 3, H)]),
    ]:
        state = layer.begin_state(3)
        arrays = state if isinstance(state, tuple) else (state,)
        assert [a.shape for a in arrays] == shapes
        assert all(isinstance(a, xp.ndarray) and a.dtype == np.float32 and not a.any() for a in arrays)
        assert layer.xp is xp
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        GRU(I, H).begin_state(0)


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
def test_reuse_buffers_overwrites_out_and_plain_forward_does_not(kind, xp):
    rng = np.random.default_rng(8)
    x1, x2 = (xp.asarray(rng.integers(0, I, size=(4, 2))) for _ in range(2))
    plain, reusing = build(kind, L=2), build(kind, L=2, reuse_buffers=True)
    first = plain.forward(x1)[0]
    kept = backend.to_numpy(first).copy()
    plain.forward(x2)
    assert np.array_equal(backend.to_numpy(first), kept), "a plain forward returns new arrays"
    r1 = reusing.forward(x1)[0]
    assert np.array_equal(backend.to_numpy(r1), kept), "the same results either way"
    r2 = reusing.forward(x2)[0]
    assert np.shares_memory(r1, r2) if xp is np else r1.data.ptr == r2.data.ptr
    assert not np.array_equal(backend.to_numpy(r1), kept), "reuse_buffers: the next call overwrites out"


def test_parameter_names_shapes_and_init():
    lstm = LSTM(I, H, 2, bidirectional=True, proj_size=P, init="uniform", seed=0)
    net = torch.nn.LSTM(I, H, 2, bidirectional=True, proj_size=P)
    assert [(n, tuple(p.shape)) for n, p in net.named_parameters()] == [(n, p.shape) for n, p in lstm.params.items()]
    gru = GRU(I, H, 3, bias=False)
    net = torch.nn.GRU(I, H, 3, bias=False)
    assert [(n, tuple(p.shape)) for n, p in net.named_parameters()] == [(n, p.shape) for n, p in gru.params.items()]
    k = 1 / H**0.5
    assert all(abs(p).max() <= k for p in lstm.params.values())
    normal = GRU(20, 400, dtype="float64", seed=0)
    assert abs(normal.params["weight_hh_l0"].std() - 0.01) < 5e-4 and not normal.params["bias_ih_l0"].any()
    again = GRU(20, 400, dtype="float64", seed=0)
    assert all(np.array_equal(backend.to_numpy(normal.params[n]), backend.to_numpy(again.params[n])) for n in normal.params)
    assert "reset_after=False" in repr(GRU(I, H, reset_after=False)) and "proj_size=3" in repr(lstm)


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kwargs,match", [
    ({"proj_size": 6}, r"proj_size must be an integer in \[0, hidden_size\) = \[0, 6\), got 6"),
    ({"proj_size": -1}, r"proj_size must be an integer in \[0, hidden_size\)"),
    ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\), got 1.0"),
    ({"dropout": "0.5"}, r"dropout must be a number in \[0, 1\), got '0.5'"),
    ({"hidden_size": 0}, "hidden_size must be a positive integer, got 0"),
])
def test_bad_constructor_arguments(kwargs, match):
    args = {"input_size": I, "hidden_size": H, **kwargs}
    with pytest.raises(ValueError, match=match):
        LSTM(**args)
    if "proj_size" not in kwargs:
        with pytest.raises(ValueError, match=match):
            GRU(**args)


def test_bad_lstm_states_raise(xp):
    lstm = LSTM(I, H, 2, proj_size=P)
    x = xp.zeros((3, 2, I), "float32")
    with pytest.raises(TypeError, match=r"LSTM: hc0 must be None or a tuple \(h, c\) of two arrays, got ndarray"):
        lstm.forward(x, xp.zeros((2, 2, P), "float32"))
    with pytest.raises(ValueError, match=r"expected hc0\[1\] of shape \(2, 2, 6\).*got \(2, 2, 3\)"):
        lstm.forward(x, (None, xp.zeros((2, 2, P), "float32")))
    with pytest.raises(ValueError, match=r"expected hc0\[0\] of dtype float32, got float64"):
        lstm.forward(x, (xp.zeros((2, 2, P)), None))
    out, _ = lstm.forward(x)
    with pytest.raises(ValueError, match=r"expected dhc_n\[0\] of shape \(2, 2, 3\)"):
        lstm.backward(xp.zeros_like(out), (xp.zeros((2, 2, H), "float32"), None))
    with pytest.raises(ValueError, match=r"expected dout of shape \(3, 2, 3\)"):
        lstm.backward(xp.zeros((3, 2, H), "float32"))


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
def test_token_ids_with_hidden_size_1_never_change_a_parameter(kind, xp):
    """With H = 1, W_ih.T of a (G, V) weight is contiguous: the lookup table must still be a copy."""
    layer = {"RNN": RNN, "GRU": GRU, "LSTM": LSTM}[kind](4, 1, init="uniform", seed=0)
    before = {n: p.copy() for n, p in layer.params.items()}
    ids = xp.asarray(np.array([[0, 1], [2, 3], [3, 0]]))
    first = backend.to_numpy(layer.forward(ids)[0]).copy()
    second = backend.to_numpy(layer.forward(ids)[0])
    assert np.array_equal(first, second)
    assert all(np.array_equal(backend.to_numpy(before[n]), backend.to_numpy(layer.params[n])) for n in before)


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
def test_a_torch_tensor_gets_a_clear_message(kind, xp):
    layer = build(kind)
    with pytest.raises(ValueError, match=rf"x must be a {xp.__name__} array \(the backend of the parameters\), got Tensor"):
        layer.forward(torch.zeros(3, 2, I, dtype=torch.float64))
    out = layer.forward(xp.zeros((3, 2, I)))[0]
    with pytest.raises(ValueError, match=f"dout must be a {xp.__name__} array"):
        layer.backward(torch.zeros(out.shape, dtype=torch.float64))


@pytest.mark.parametrize("B", [1, 2, 32])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind, extra", [("RNN", {}), ("GRU", {}), ("GRU", {"reset_after": False}), ("LSTM", {}),
                                         ("LSTM", {"proj": 4})])
def test_step_products_with_a_copy_of_w_transposed_give_the_views_results(kind, extra, dtype, B, monkeypatch):
    """On NumPy the step products may read a C-ordered copy of W^T made each forward pass (faster
    with OpenBLAS's AVX-512 kernels); forward and backward give the views' results (the same bits
    at the shapes timed, but a small product may be summed in another order by another kernel),
    and a weight changed between two calls is read again (the copy is never stale)."""
    from npyrnn.nn import recurrent

    backend.set_backend("numpy")  # a NumPy-only layout (the conftest fixtures restore the backend)
    rng = np.random.default_rng(B)
    x = rng.standard_normal((7, B, I)).astype(dtype)
    dout = rng.standard_normal((7, B, 2 * (extra.get("proj") or H))).astype(dtype)
    results = []
    for copies in (True, False):
        monkeypatch.setattr(recurrent, "transposed_copies", copies)
        layer = build(kind, L=2, bi=True, dtype=dtype, **extra)
        outs = []
        for _ in range(2):
            out, _ = layer.forward(x)
            layer.zero_grad()
            layer.backward(dout)
            outs += [out.copy()] + [layer.grads[k].copy() for k in sorted(layer.grads)]
            for k in layer.params:
                if k.startswith(("weight_hh", "weight_hr")):
                    layer.params[k] *= 0.5  # read again by the next call
        results.append(outs)
        names = [k for k in layer._workspace if k.startswith(("weight_hhT", "weight_hrT"))]
        assert bool(names) == (copies and B > 1)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=1e-12, atol=1e-13)
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, **tol)


@pytest.mark.parametrize("blas, pay", [
    ({"internal_api": "openblas", "architecture": "SkylakeX"}, True),
    ({"internal_api": "openblas", "architecture": "SapphireRapids"}, True),
    ({"internal_api": "openblas", "architecture": "Haswell"}, False),
    ({"internal_api": "openblas", "architecture": "Zen"}, False),
    ({"internal_api": "mkl"}, False),
    (None, False),
])
def test_transposed_copies_where_openblas_runs_its_avx512_kernels(blas, pay, monkeypatch):
    """The layout is decided once from the kernels OpenBLAS reports, never from a timing."""
    monkeypatch.setattr(backend, "numpy_blas", lambda: blas)
    monkeypatch.setattr(backend, "_copies_pay", None)
    assert backend.transposed_copies_pay() is pay
    monkeypatch.setattr(backend, "numpy_blas", lambda: pytest.fail("asked twice"))
    assert backend.transposed_copies_pay() is pay


@pytest.mark.parametrize("tiles", [True, False])
def test_the_split_products_tiles_read_a_copy_of_w_transposed(tiles, monkeypatch):
    """Where OpenBLAS's kernels would not pay for the copy (Haswell), the split products' tiles still
    take it: the forward pass copies W^T while they are on (and tiled), the view otherwise."""
    cpu_gemm = pytest.importorskip("npyrnn.nn.cpu_gemm")
    if cpu_gemm.why_unavailable() is not None:
        pytest.skip(f"split products {cpu_gemm.why_unavailable()}")
    backend.set_backend("numpy")
    monkeypatch.setattr(backend, "_copies_pay", False)  # as with OpenBLAS's Haswell kernels
    monkeypatch.setattr(cpu_gemm, "TILES", tiles)
    x = np.random.default_rng(0).standard_normal((5, 32, 8)).astype(np.float32)
    for split in (False, True):  # (the conftest fixture stops the split products after)
        if split:
            backend.set_cpu_threads(1, split=True)
        layer = GRU(8, 64, init="uniform", seed=0)
        layer.forward(x)
        assert any(k.startswith("weight_hhT") for k in layer._workspace) == (split and tiles)
        assert backend.split_products_tiled() == (split and tiles)
