"""The fused kernels compiled for the CPU by Numba (`npyrnn.nn.cpu_kernels`, the `fast` extra).

Every cell with the compiled kernels against the same cell on array operations (forward,
backward, the stepper; float64 to a few ulps, float32 within the probe's tolerance); float32's
tanh against float64's over a dense sweep of float32; NaN and infinities; arrays the kernels
refuse; and a property test over random kernels, shapes (size 1 included) and in-place calls.
Runs wherever Numba is installed (`pip install -e ".[test,fast]"`, as CI does).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("numba", reason="the fused CPU kernels need Numba (pip install 'npyrnn[fast]')")

from npyrnn import backend  # noqa: E402
from npyrnn.nn import LSTM, kernels  # noqa: E402
from test_kernels import CONFIGS, IDS, _compare, _fresh_kernels, _run  # noqa: E402,F401  (a fixture)

from npyrnn.nn import cpu_kernels  # noqa: E402  (imports numba)


@pytest.fixture(autouse=True)
def _on_numpy(_fresh_kernels):
    """NumPy, after test_kernels' fixture: no probe done yet, the switch left to the environment."""
    backend.set_backend("numpy")  # the conftest fixture restores the previous backend


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("with_final_grads", [False, True], ids=["no-dh_n", "dh_n"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_compiled_kernels_match_array_ops(cfg, with_final_grads, dtype):
    _, cls, kwargs, used = cfg
    kernels.set_enabled(False)
    plain = _run(cls, kwargs, dtype, with_final_grads)
    kernels.set_enabled(True)
    fused = _run(cls, kwargs, dtype, with_final_grads)
    status = kernels.status(np)
    assert all(f"{name} {dtype}" in status for name in used), status
    # float64: the C library's tanh and every operation rounded as written; float32: Eigen's tanh
    _compare(fused, plain, 1e-13 if dtype == "float64" else 1e-5, f"fused CPU kernels, {dtype}")


def test_cells_use_the_compiled_kernels_by_default():
    """With Numba installed and NPYRNN_FUSED unset, `get` hands out the compiled kernel."""
    kernel = kernels.get(np, "lstm_fwd", "float32")
    assert kernel is cpu_kernels.lstm_fwd
    assert kernels.status() == "on (probed: lstm_fwd float32)"


def _tanh(x):
    """float32 tanh through the compiled kernel rnn_fwd_tanh (h = tanh(x + 0)), any shape."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(1, -1)
    h = np.empty_like(x)
    kernels.get(np, "rnn_fwd_tanh", "float32")(x, np.zeros_like(x), h)
    return h.ravel()


def test_float32_tanh_is_within_a_few_float32_ulps_of_float64_tanh():
    """Every 61st float32 in [0, 10] (about 18 million values, subnormals included) and their negatives."""
    bits = np.arange(0, np.float32(10).view(np.int32) + 1, 61, dtype=np.int32)
    x = bits.view(np.float32)
    x = np.concatenate([x, -x])
    exact = np.tanh(x.astype(np.float64))
    err = np.abs(_tanh(x).astype(np.float64) - exact)
    ulps = err / np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    assert err.max() <= 3.5e-7, f"max absolute error {err.max():.3e}"
    assert ulps.max() <= 6.5, f"max error {ulps.max():.1f} float32 ulps at x = {x[ulps.argmax()]!r}"


def test_float32_tanh_special_values():
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 8.0, -8.0, 100.0, 1e-30, -1e-30], dtype=np.float32)
    y = _tanh(x)
    assert np.isnan(y[0])
    np.testing.assert_array_equal(y[1:], np.array([1, -1, 0, -0.0, 1, -1, 1, 1e-30, -1e-30], dtype=np.float32))
    assert np.all(np.abs(_tanh(np.linspace(-30, 30, 10001))) <= 1)


def test_relu_keeps_nan_like_numpy():
    x = np.array([[np.nan, -1.0, 2.0, -np.inf]], dtype=np.float32)
    h = np.empty_like(x)
    kernels.get(np, "rnn_fwd_relu", "float32")(x, np.zeros_like(x), h)
    np.testing.assert_array_equal(h, np.maximum(x, 0))


def test_rows_must_be_contiguous():
    """A view whose last axis is strided would be copied by Numba and its outputs lost: refused instead."""
    kernel = kernels.get(np, "rnn_fwd_tanh", "float64")
    x = np.ones((3, 8))
    with pytest.raises(ValueError, match="rows must be contiguous"):
        kernel(x[:, ::2], np.ones((3, 4)), np.empty((3, 4)))
    out = np.ones((3, 8))
    with pytest.raises(ValueError, match="rows must be contiguous"):
        kernel(np.ones((3, 4)), np.ones((3, 4)), out[:, ::2])


def test_one_compiled_version_per_dtype():
    """Contiguous arrays and gate slices, every cell: each kernel holds at most one signature per dtype."""
    for _, cls, kwargs, _ in CONFIGS:
        for dtype in ("float32", "float64"):
            _run(cls, kwargs, dtype, True)
    for name in kernels.SPECS:
        signatures = getattr(cpu_kernels, name).signatures
        assert len(signatures) <= 2 and len({sig[0].dtype for sig in signatures}) == len(signatures), (name, signatures)


def _kernel_args(spec, shape, data, dtype):
    """Arguments for one kernel: gate-like views of wider arrays, values from hypothesis."""
    B, H = shape
    args = []
    for name in kernels._names(spec.inputs) + kernels._names(spec.outputs):
        if name.startswith("b_"):
            args.append(np.asarray(data.draw(st.lists(_values, min_size=H, max_size=H)), dtype=dtype))
            continue
        flat = data.draw(st.lists(_values, min_size=B * H, max_size=B * H))
        wide = np.zeros((B, H + 2), dtype=dtype)
        wide[:, 1 : H + 1] = np.asarray(flat, dtype=dtype).reshape(B, H)
        args.append(wide[:, 1 : H + 1])
    return args


_values = st.floats(-6, 6, allow_nan=False, width=32)


# the in-place calls the cells make: (input, output) that are one array
IN_PLACE = {"rnn_fwd_tanh": ("x", "h"), "rnn_fwd_relu": ("x", "h"),  # the training loop
            "gru_after_fwd": ("h_prev", "h"), "gru_after_fwd_nobias": ("h_prev", "h"),  # the steppers
            "gru_before_n": ("h_prev", "h"), "lstm_fwd": ("c_prev", "c")}


@settings(derandomize=True, max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(kernels.SPECS)), B=st.integers(1, 4), H=st.integers(1, 9),
       dtype=st.sampled_from(["float32", "float64"]), in_place=st.booleans(), data=st.data())
def test_any_kernel_any_shape_matches_its_twin(name, B, H, dtype, in_place, data):
    """Random kernels and sizes (1 included), and the in-place calls the cells make, against the twins."""
    spec = kernels.SPECS[name]
    names = kernels._names(spec.inputs) + kernels._names(spec.outputs)
    n_in = len(kernels._names(spec.inputs))
    args = _kernel_args(spec, (B, H), data, dtype)
    ref = [a.copy() for a in args]
    if in_place and name in IN_PLACE:
        src, dst = (names.index(n) for n in IN_PLACE[name])
        args[dst], ref[dst] = args[src], ref[src]
    kernels.get(np, name, dtype)(*args)
    spec.reference(np, *ref)
    for got, want in zip(args[n_in:], ref[n_in:]):
        np.testing.assert_allclose(got, want, rtol=1e-12 if dtype == "float64" else 2e-6,
                                   atol=1e-12 if dtype == "float64" else 1e-6)


def test_wrong_shapes_are_refused_not_read_past():
    """Numba checks no bounds: every argument is checked against the outputs' (B, H) first."""
    kernel = kernels.get(np, "rnn_bwd_tanh", "float64")
    with pytest.raises(ValueError, match=r"must be \(B, H\)"):
        kernel(np.ones((3, 4)), np.ones((3, 5)), np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"must be \(B, H\)"):
        kernel(np.ones((2, 4)), np.ones((3, 4)), np.ones((3, 4)))
    gru = kernels.get(np, "gru_after_fwd", "float64")
    a = [np.ones((2, 3)) for _ in range(8)]
    with pytest.raises(ValueError, match=r"\(H,\) for a bias"):
        gru(a[0], a[1], a[2], np.ones(4), *a[3:])


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_read_only_and_fortran_arrays_from_the_caller(cfg):
    """A read-only dout (broadcast) and Fortran-ordered stepper states work as with the array operations."""
    _, cls, kwargs, _ = cfg
    layer = cls(4, 6, dtype="float64", init="uniform", seed=3, **kwargs)
    x = np.random.default_rng(0).standard_normal((5, 3, 4))
    out, _ = layer.forward(x)
    dout = np.broadcast_to(np.linspace(-1, 1, out.shape[-1]), out.shape)  # read-only, zero strides
    assert not dout.flags.writeable
    dx_fused, _ = layer.backward(dout)
    kernels.set_enabled(False)
    dx_plain, _ = layer.backward(np.array(dout))
    np.testing.assert_allclose(dx_fused, dx_plain, rtol=1e-13, atol=1e-13)
    if layer.bidirectional:
        return
    results = []
    for flag in (True, False):
        kernels.set_enabled(flag)
        L, P, H = layer.num_layers, layer.output_size, layer.hidden_size
        h = np.asfortranarray(np.full((L, 3, P), 0.1))
        state = (h, np.asfortranarray(np.full((L, 3, H), -0.2))) if cls is LSTM else h
        step = layer.stepper(state)
        results.append([step(np.array([0, 1, 2])).copy() for _ in range(3)])
    np.testing.assert_allclose(results[0], results[1], rtol=1e-13, atol=1e-13)


# ------------------------------------------------------------------------------ the gather's gradient
@settings(max_examples=80, deadline=None, derandomize=True)
@given(T=st.integers(1, 8), B=st.integers(1, 9), V=st.integers(1, 140), GH=st.integers(1, 20),
       with_sum=st.booleans(), reverse=st.booleans(), dtype=st.sampled_from(["float64", "float32"]),
       seed=st.integers(0, 2**32 - 1))
def test_compiled_gather_gradient_is_the_sum_of_each_tokens_rows(T, B, V, GH, with_sum, reverse, dtype, seed):
    """`_scatter_columns` through `cpu_kernels.scatter_rows` (any vocabulary: the one-hot product's
    sizes and the sorted scatter's; B = 1, whose one half of the rows is empty) against np.add.at
    in float64; twice in a row, the same bits; and the bits of `scatter_step` called step by step
    in the backward loop's order, each step's rows in two parts, as a compiled loop calls it."""
    from npyrnn.nn.recurrent import _halves_sums, _scatter_columns

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, min(V, 1 + T * B // 2), (T, B))  # repeated tokens: their rows must add up
    dG = rng.standard_normal((T, B, GH)).astype(dtype)
    expected = np.zeros((V, GH))
    np.add.at(expected, ids.reshape(-1), dG.reshape(-1, GH).astype(np.float64))
    kernels.set_enabled(True)
    assert kernels.scatter_rows(np) is cpu_kernels.scatter_rows
    dW, db = _scatter_columns(ids, dG, V, np, with_sum, reverse)
    assert dW.shape == (GH, V) and dW.dtype == dtype and (db is None) == (not with_sum)
    tol = dict(rtol=1e-12, atol=1e-12 * T * B) if dtype == "float64" else dict(rtol=1e-5, atol=1e-5 * T * B)
    np.testing.assert_allclose(dW, expected.T, **tol)
    if with_sum:
        assert db.shape == (GH,) and db.dtype == dtype
        np.testing.assert_allclose(db, dG.reshape(-1, GH).astype(np.float64).sum(axis=0), **tol)
    again = _scatter_columns(ids, dG, V, np, with_sum, reverse)
    assert dW.tobytes() == again[0].tobytes() and (db is None or db.tobytes() == again[1].tobytes())
    sums = np.zeros((2, V + int(with_sum), GH), dtype)
    for t in (range(T) if reverse else range(T - 1, -1, -1)):
        for r0, r1 in ((0, B // 2), (B // 2, B)):
            cpu_kernels.scatter_step(ids.astype(np.intp), dG[t], sums, with_sum, t, r0, r1)
    by_step = _halves_sums(sums, V, with_sum)
    assert by_step[0].tobytes() == dW.tobytes() and (db is None or by_step[1].tobytes() == db.tobytes())


def test_token_id_layers_take_the_compiled_gather_gradient_unless_the_kernels_are_off(monkeypatch):
    from npyrnn.nn import GRU

    calls = []
    compiled = cpu_kernels.scatter_rows

    def spy(ids, src, sums, with_sum, reverse):
        calls.append((src.shape, sums.shape, with_sum, reverse))
        return compiled(ids, src, sums, with_sum, reverse)

    monkeypatch.setattr(cpu_kernels, "scatter_rows", spy)
    rng = np.random.default_rng(0)
    ids, dout = rng.integers(0, 11, (7, 3)), rng.standard_normal((7, 3, 8))

    def grads(fused):
        kernels.set_enabled(fused)
        gru = GRU(11, 4, num_layers=2, bidirectional=True, dtype="float64", seed=0)
        gru.forward(ids)
        gru.backward(dout)
        return gru.grads

    fused, plain = grads(True), grads(False)
    assert calls == [((7, 3, 12), (2, 12, 12), True, False), ((7, 3, 12), (2, 12, 12), True, True)]  # layer 0, both
    # directions (the reverse one sums its steps in its backward loop's order); with the bias row
    for name in plain:
        np.testing.assert_allclose(fused[name], plain[name], rtol=1e-12, atol=1e-13, err_msg=name)
    kernels.set_enabled(False)
    assert kernels.scatter_rows(np) is None


# ------------------------------------------------------------------------------ W^T for the step products
@settings(max_examples=60, deadline=None, derandomize=True)
@given(R=st.integers(1, 70), C=st.integers(1, 70), dtype=st.sampled_from(["float64", "float32"]),
       row_gap=st.integers(0, 3), dst_gap=st.sampled_from([0, 1, 16]), seed=st.integers(0, 2**32 - 1))
def test_compiled_transpose_copies_every_value(R, C, dtype, row_gap, dst_gap, seed):
    """`cpu_kernels.transpose_into` for any shape (the squares in registers, the rows and columns left over),
    from a source whose rows are a slice of wider ones, into rows padded as the layers pad them; the bits
    of numpy's transpose, and nothing written past a row."""
    rng = np.random.default_rng(seed)
    src = rng.standard_normal((R, C + row_gap)).astype(dtype)[:, :C]
    padded = np.full((C, R + dst_gap), np.nan, dtype)
    dst = padded[:, :R]
    cpu_kernels.transpose_into(src, dst)
    assert dst.tobytes() == np.ascontiguousarray(src.T).tobytes()
    assert np.isnan(padded[:, R:]).all()
    with pytest.raises(ValueError, match="shape of src transposed"):
        cpu_kernels.transpose_into(src, np.empty((C, R + 1), dtype))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compiled_transpose_of_reversed_strided_and_transposed_views(dtype):
    """Rows read or written backwards, every other row, a transposed (column-ordered) source or
    destination: the squares in registers where the rows are contiguous, one value at a time
    elsewhere; numpy's transpose either way."""
    W = np.random.default_rng(0).standard_normal((40, 50)).astype(dtype)
    for src in (W, W[::-1], W[:, ::-1], W[::2], W.T):
        R, C = src.shape
        for dst in (np.empty((C, R), dtype), np.empty((C, R + 5), dtype)[:, :R], np.empty((C, R), dtype)[::-1],
                    np.empty((R, C), dtype).T):
            cpu_kernels.transpose_into(src, dst)
            assert dst.tobytes() == np.ascontiguousarray(src.T).tobytes(), (src.strides, dst.strides)


def test_step_products_read_the_compiled_transpose_unless_the_kernels_are_off(monkeypatch):
    from npyrnn.nn import GRU, recurrent

    monkeypatch.setattr(recurrent, "transposed_copies", True)  # whatever this machine's kernels

    calls = []
    compiled = cpu_kernels.transpose_into
    monkeypatch.setattr(cpu_kernels, "transpose_into", lambda src, dst: calls.append(src.shape) or compiled(src, dst))
    x = np.random.default_rng(0).standard_normal((5, 3, 4))
    outs = []
    for fused in (True, False):
        kernels.set_enabled(fused)
        outs.append(GRU(4, 6, num_layers=2, bidirectional=True, dtype="float64", seed=0).forward(x)[0])
    assert calls == [(18, 6)] * 4  # two layers, two directions
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-13, atol=1e-13)
    assert kernels.transpose_into(np) is None


# ------------------------------------------------------------------------------ the loss
def _exp32(z):
    """`cpu_kernels._exp32_nonpositive` over an array (through the loss kernel's own helper)."""
    from numba import njit

    @njit
    def run(z, out):
        for i in range(z.size):
            out[i] = cpu_kernels._exp32_nonpositive(z[i])

    out = np.empty_like(z)
    run(z, out)
    return out


def test_float32_exp_is_within_one_float32_ulp_on_the_softmax_range():
    """Every 97th float32 in [-87.3, 0] (about 11 million values) against float64's exp."""
    hi = np.float32(87.33).view(np.int32)
    x = -np.arange(0, hi + 1, 97, dtype=np.int32).view(np.float32)
    exact = np.exp(x.astype(np.float64))
    ulps = np.abs(_exp32(x) - exact) / np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert ulps.max() <= 1.0, f"max error {ulps.max():.2f} float32 ulps at x = {x[ulps.argmax()]!r}"


def test_float32_exp_special_values():
    x = np.array([0.0, -0.0, -87.33, -88.0, -1e30, -np.inf, np.nan], dtype=np.float32)
    e = _exp32(x)
    assert e[0] == 1 and e[1] == 1
    tiny = np.finfo(np.float32).tiny
    assert np.all((e[2:6] >= tiny) & (e[2:6] <= 1.01 * tiny)), e  # below ln(FLT_MIN): FLT_MIN-sized
    assert np.isnan(e[6])


@settings(max_examples=80, deadline=None, derandomize=True)
@given(N=st.integers(1, 40), V=st.integers(1, 70), scale=st.sampled_from([1e-3, 1.0, 10.0, 1e4]),
       seed=st.integers(0, 2**32 - 1))
def test_compiled_loss_matches_the_array_operations(N, V, scale, seed):
    """`losses.softmax_cross_entropy` with the kernel against its array operations (NPYRNN_FUSED=0),
    any shape (one row, one class, V not a multiple of four); called twice, the same bits."""
    from npyrnn.losses import softmax_cross_entropy

    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((N, V)) * scale).astype(np.float32)
    targets = rng.integers(0, V, N)
    kernels.set_enabled(False)
    loss0, d0 = softmax_cross_entropy(logits, targets)
    kernels.set_enabled(True)
    loss, d = softmax_cross_entropy(logits, targets)
    again = softmax_cross_entropy(logits, targets)
    assert type(loss) is np.float32 and d.dtype == np.float32 and d.shape == (N, V)
    assert abs(float(loss) - float(loss0)) <= 2e-6 * max(1.0, abs(float(loss0)))
    np.testing.assert_allclose(d, d0, rtol=0, atol=4e-7 * max(np.abs(d0).max(), 1 / N))
    assert again[0].tobytes() == loss.tobytes() and again[1].tobytes() == d.tobytes()


def test_the_training_step_takes_the_compiled_loss_unless_the_kernels_are_off(monkeypatch):
    from npyrnn import losses

    calls = []
    compiled = cpu_kernels.softmax_xent32
    monkeypatch.setattr(cpu_kernels, "softmax_xent32", lambda *a: calls.append(a[0].shape) or compiled(*a))
    logits = np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32)
    losses.softmax_cross_entropy(logits, np.arange(6) % 5)
    losses.softmax_cross_entropy(logits.astype(np.float64), np.arange(6) % 5)  # float64: the array ops
    assert calls == [(6, 5)]
    kernels.set_enabled(False)
    losses.softmax_cross_entropy(logits, np.arange(6) % 5)
    assert calls == [(6, 5)] and kernels.softmax_xent(np, "float32") is None


@pytest.mark.parametrize("fused", [True, False])
def test_loss_of_nonfinite_logits_is_nan(fused):
    from npyrnn.losses import softmax_cross_entropy

    kernels.set_enabled(fused)
    logits = np.zeros((3, 4), np.float32)
    for bad in (np.nan, np.inf):
        logits[1, 2] = bad
        loss, d = softmax_cross_entropy(logits, np.array([0, 1, 2]))
        assert np.isnan(loss) and np.isnan(d[1]).all() and np.isfinite(d[[0, 2]]).all()


@pytest.mark.parametrize("split", [False, True], ids=["scatter after the loop", "compiled loops"])
def test_token_ids_changed_between_forward_and_backward_are_refused_not_scattered_out_of_bounds(split):
    """The compiled scatter adds rows at the ids' indices without bounds checks: ids a caller changed
    in place after forward (out of range now) raise a ValueError before the input side's gradients
    are written (or anything, where the compiled loop would have summed them)."""
    from npyrnn.nn import GRU

    kernels.set_enabled(True)
    if split:
        backend.set_cpu_threads(2, split=True)
    try:
        gru = GRU(11, 64, dtype="float32", seed=0)
        ids = np.random.default_rng(0).integers(0, 11, (35, 32))
        out, _ = gru.forward(ids)
        before = {k: g.copy() for k, g in gru.grads.items()}
        ids[3, 4] = 11
        with pytest.raises(ValueError, match=r"token ids changed since forward \(now from 0 to 11, outside \[0, 11\)\)"):
            gru.backward(np.ones_like(out))
        assert all(np.array_equal(gru.grads[k], before[k]) for k in ("weight_ih_l0", "bias_ih_l0"))
    finally:
        backend.set_cpu_threads(None, split=False)
