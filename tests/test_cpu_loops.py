"""The cells' time loops compiled whole (`npyrnn.nn.cpu_loops`, the `fast` extra): the bits of
their Python twins, at 0 and 1 helper, safe when the helper loses its core, and declined where
the split products would decline the step's product.

Each case runs a layer twice from the same weights and inputs, with the compiled loops and with
`cpu_loops.enabled = False` (the fused Python loops, whose products go through the same split
products), and asserts every output and gradient equal bit for bit. The Python loops are
checked against torch (tests/test_cells.py, test_cpu_gemm.py), so the compiled ones are too.
Runs wherever Numba is installed and NumPy's BLAS is OpenBLAS with its 64-bit interface.
"""

import gc
import os
import subprocess
import sys
import threading
import weakref

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("numba", reason="the compiled loops need Numba (pip install 'npyrnn[fast]')")

from npyrnn import backend  # noqa: E402
from npyrnn.nn import GRU, LSTM, RNN, cpu_gemm, kernels  # noqa: E402

if cpu_gemm.why_unavailable() is not None:
    pytest.skip(f"split products {cpu_gemm.why_unavailable()}", allow_module_level=True)

from npyrnn.nn import cpu_loops  # noqa: E402
from test_cpu_gemm import patient_caller, with_fake_helper  # noqa: E402,F401 (a fixture)

CELLS = {  # every cell and variant, each with its compiled loops
    "rnn tanh": (RNN, {}),
    "rnn relu": (RNN, {"nonlinearity": "relu"}),
    "gru": (GRU, {}),
    "gru no bias": (GRU, {"bias": False}),
    "gru reset before": (GRU, {"reset_after": False}),
    "gru reset before, no bias": (GRU, {"reset_after": False, "bias": False}),
    "lstm": (LSTM, {}),
    "lstm proj": (LSTM, {"proj_size": 96}),
}
# hidden sizes at which the step products of B = 32 come in one block and in two (by columns and
# by k; `cpu_gemm.blocks`), so that a loop that took one product's plan for another's would differ
HIDDEN = {RNN: 256, GRU: 160, LSTM: 160}


@pytest.fixture(autouse=True)
def _on_numpy(monkeypatch):
    backend.set_backend("numpy")  # the conftest fixtures restore the backend and stop the products
    kernels.set_enabled(True)  # whatever NPYRNN_FUSED says: these tests are about the compiled kernels' loops
    monkeypatch.setattr(cpu_gemm, "HELPER_SHARE_MIN", 0.0)  # the helper takes part, however busy the machine
    yield
    kernels.set_enabled(None)
    backend.set_cpu_threads(None, split=False)


def split(helpers):
    """The split products on with `helpers` helpers, as `npyrnn train --threads` turns them on."""
    backend.set_cpu_threads(helpers + 1, split=True)
    assert backend.split_products() == helpers + 1


@pytest.fixture
def ran(monkeypatch):
    """A list of (loop name, whether it ran) for every call of a compiled loop's wrapper."""
    calls = []
    for name in cpu_loops.__all__:
        wrapped = getattr(cpu_loops, name)

        def spy(*args, _wrapped=wrapped, _name=name):
            result = _wrapped(*args)
            calls.append((_name, result))
            return result

        monkeypatch.setattr(cpu_loops, name, spy)
    return calls


def run_layer(cls, kwargs, *, compiled, dtype="float32", T=9, B=32, H=96, I=12, ids=False, layers=2,
              bidirectional=True, batch_first=False, states=True, seed=0, calls=2):
    """Forward and backward of a fresh layer `calls` times; every result of the last call, copied."""
    cpu_loops.enabled = compiled
    try:
        layer = cls(I, H, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, dtype=dtype,
                    init="uniform", seed=seed, **kwargs)
        rng = np.random.default_rng(seed + 1)
        shape = (B, T) if batch_first else (T, B)
        x = rng.integers(0, I, shape) if ids else rng.standard_normal(shape + (I,)).astype(dtype)
        D, P = 2 if bidirectional else 1, kwargs.get("proj_size") or H
        h0 = rng.standard_normal((layers * D, B, P)).astype(dtype) if states else None
        c0 = rng.standard_normal((layers * D, B, H)).astype(dtype) if states else None
        cell_state = cls is LSTM
        dout = rng.standard_normal(shape + (D * P,)).astype(dtype)
        for _ in range(calls):
            layer.zero_grad()
            out, hn = layer.forward(x, (h0, c0) if cell_state and states else h0)
            dh_n = hn if not cell_state else (hn[0], hn[1])  # any gradient of the final state
            dx, dh0 = layer.backward(dout, dh_n if states else None)
        flat = [out, dx] + (list(hn) if cell_state else [hn]) + (list(dh0) if cell_state else [dh0])
        return [None if a is None else a.copy() for a in flat] + [layer.grads[k].copy() for k in sorted(layer.grads)]
    finally:
        cpu_loops.enabled = True


def same_bits(a, b):
    """Every array the same bit for bit (-0.0 is not 0.0, a NaN equals the same NaN)."""
    def bits(x):
        return None if x is None else (x.shape, x.dtype, np.ascontiguousarray(x).tobytes())

    return len(a) == len(b) and all(bits(x) == bits(y) for x, y in zip(a, b))


@pytest.mark.parametrize("helpers", [0, 1])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cell", CELLS)
def test_compiled_loops_give_the_python_loops_bits(cell, dtype, helpers, ran):
    cls, kwargs = CELLS[cell]
    split(helpers)
    posted = cpu_gemm.stats()["posted"]
    compiled = run_layer(cls, kwargs, compiled=True, dtype=dtype, H=HIDDEN[cls])
    assert ran and all(result for _, result in ran)  # every loop of both layers, both directions, ran compiled
    assert (cpu_gemm.stats()["posted"] > posted) == (helpers == 1)  # blocks offered to the helper
    assert {name.rsplit("_", 1)[1] for name, _ in ran} == {"forward", "backward"}
    python = run_layer(cls, kwargs, compiled=False, dtype=dtype, H=HIDDEN[cls])
    assert same_bits(compiled, python)


@pytest.mark.parametrize("cls, kwargs, H, dtype", [
    (LSTM, {}, 64, "float64"),  # W_hh^T's rows 4 * 64 * 8 = 2 KiB
    (LSTM, {"proj_size": 256}, 320, "float32"),  # W_hh^T's rows 5 KiB, W_hr^T's 1 KiB
    (GRU, {"reset_after": False}, 256, "float32"),  # 3 KiB, its two column blocks
], ids=["lstm", "lstm proj", "gru reset before"])
def test_padded_copies_of_w_transposed_in_the_compiled_loops(cls, kwargs, H, dtype, ran, monkeypatch):
    """Where a row of W^T is a multiple of 1 KiB its copy's rows are padded: the loops read the
    padded copy (the same bits as the Python loops) and keep its buffer for a late helper."""
    from npyrnn.nn import recurrent

    monkeypatch.setattr(recurrent, "transposed_copies", True)  # whatever this machine's kernels
    split(1)
    compiled = run_layer(cls, kwargs, compiled=True, dtype=dtype, H=H, T=4, layers=1)
    assert ran and all(result for _, result in ran)
    python = run_layer(cls, kwargs, compiled=False, dtype=dtype, H=H, T=4, layers=1)
    assert same_bits(compiled, python)
    layer = cls(12, H, dtype=dtype, **kwargs)
    layer.forward(np.zeros((3, 32, 12), dtype))
    copies = {k: v.shape for k, v in layer._workspace.items() if k.startswith(("weight_hhT", "weight_hrT"))}
    pad = 64 // np.dtype(dtype).itemsize
    G, P = cls.GATES, kwargs.get("proj_size") or H
    assert copies["weight_hhT0"] == (P, G * H + pad)
    if "proj_size" in kwargs:
        assert copies["weight_hrT0"] == (H, P + pad)


GATED = {name: case for name, case in CELLS.items() if case[0] is not RNN}  # their loops share the kernels' rows


def halves_done():
    """Kernel halves the helper has computed in the life of the process."""
    return int(cpu_gemm._ctl[cpu_gemm.HALVES])


@pytest.mark.parametrize("cell", GATED)
def test_the_helper_computes_halves_of_the_kernels_with_the_same_bits(cell, ran):
    """At 1 helper a gated cell's loops share each kernel call's rows; the bits are the Python loops',
    and the same with the sharing off (`cpu_loops.halves = False`)."""
    cls, kwargs = GATED[cell]
    split(1)
    expected = run_layer(cls, kwargs, compiled=False, H=HIDDEN[cls])
    cpu_loops.halves = False
    try:
        assert same_bits(run_layer(cls, kwargs, compiled=True, H=HIDDEN[cls]), expected)
    finally:
        cpu_loops.halves = True
    for _ in range(30):  # until the helper, which the machine may not schedule at once, claims a half
        before, blocks = halves_done(), cpu_gemm.stats()["helper_blocks"]
        assert same_bits(run_layer(cls, kwargs, compiled=True, H=HIDDEN[cls]), expected)
        assert ran and all(result for _, result in ran)
        if halves_done() > before and cpu_gemm.stats()["helper_blocks"] > blocks:  # and served the products
            return
    pytest.fail("the helper never computed both a half of a kernel call and a block of a product in one run")


@pytest.mark.parametrize("B", [2, 3])
@pytest.mark.parametrize("cell", ["gru", "gru reset before", "lstm"])
def test_halves_of_two_and_three_rows(cell, B, ran):
    """Halves of one row, and of one and two (a single row is a product the split products decline)."""
    cls, kwargs = CELLS[cell]
    split(1)
    args = dict(B=B, H=256, T=50, calls=2)
    expected = run_layer(cls, kwargs, compiled=False, **args)
    for _ in range(40):  # until the helper, not only the calling thread, computed a half
        before = halves_done()
        assert same_bits(run_layer(cls, kwargs, compiled=True, **args), expected)
        assert ran and all(result for _, result in ran)
        if halves_done() > before:
            return
    pytest.fail("the helper never computed a half of a kernel call")


def test_a_helper_that_stalls_inside_a_half_is_waited_for_then_offered_none_for_a_while(ran):
    """A half once claimed is never taken back (it writes in place): the calling thread waits for it,
    then offers no half for `HALF_PAUSE` (a busy machine), and the bits stay the same throughout."""
    split(1)
    args = dict(H=HIDDEN[GRU], T=8, calls=1)
    expected = run_layer(GRU, {}, compiled=False, **args)
    cpu_gemm._ctl[cpu_gemm.HALF_STALL] = 2_000_000  # 2 ms after each claim, as if it had lost its core
    try:
        for _ in range(60):  # (a helper that does not get a core in time claims nothing: try again)
            before, late = halves_done(), cpu_gemm.stats()["halves_waited_for"]
            cpu_gemm._ctl[cpu_gemm.HALF_PAUSE_UNTIL] = 0
            assert same_bits(run_layer(GRU, {}, compiled=True, **args), expected)
            if halves_done() > before and cpu_gemm.stats()["halves_waited_for"] > late:  # 2 ms > HALF_LATE
                break  # (on a busy machine the calling thread, itself held up, may find the half done)
        else:
            pytest.fail("the calling thread never waited for a half the helper stalled in")
        cpu_gemm._ctl[cpu_gemm.HALF_STALL] = 0
        cpu_gemm._ctl[cpu_gemm.HALF_PAUSE_UNTIL] = np.iinfo(np.int64).max  # a pause that does not end here
        before = halves_done()
        assert same_bits(run_layer(GRU, {}, compiled=True, **args), expected)
        assert halves_done() == before  # none offered: the calling thread ran every row
    finally:
        cpu_gemm._ctl[cpu_gemm.HALF_STALL] = 0
        cpu_gemm._ctl[cpu_gemm.HALF_PAUSE_UNTIL] = 0


def test_the_half_protocol_step_by_step():
    """`offer_half`, `take_half` and `_finish_loop` on a control block of their own, without threads."""
    ctl, ts = np.zeros(cpu_gemm.CTL_SIZE, np.int64), np.zeros(2, np.int64)
    word = lambda lseq, i, state: (lseq << 24) | (i << 2) | state  # noqa: E731
    assert cpu_gemm.offer_half(ctl, ts, 0, 3, 32) == 32  # no helper: every row the caller's
    assert cpu_gemm.offer_half(ctl, ts, 7, 3, 32) == 16 and ctl[cpu_gemm.HALF] == word(7, 3, cpu_gemm.FREE)
    assert cpu_gemm.take_half(ctl, ts, 7, 3) and ctl[cpu_gemm.HALF] == word(7, 3, cpu_gemm.CALLER)
    ctl[cpu_gemm.HALF_PAUSE_UNTIL] = np.iinfo(np.int64).max  # in a pause: nothing offered mid-loop either
    assert cpu_gemm.offer_half(ctl, ts, 7, 4, 32) == 32 and ctl[cpu_gemm.HALF] == word(7, 3, cpu_gemm.CALLER)
    ctl[cpu_gemm.HALF_PAUSE_UNTIL] = 0
    cpu_gemm.offer_half(ctl, ts, 7, 5, 32)  # the caller raises before take_half: the half is closed
    cpu_gemm._finish_loop(ctl, 7)
    assert ctl[cpu_gemm.HALF] == word(7, 5, cpu_gemm.CALLER) and ctl[cpu_gemm.LOOP_DONE] == 7
    assert cpu_gemm.helper_next_half(ctl, ts, 7, np.zeros(1, np.int64)) == -1  # the helper's part leaves
    ctl[cpu_gemm.HALF] = word(8, 6, cpu_gemm.HELPER)  # claimed by a helper whose part then failed
    ctl[cpu_gemm.LOOP_FAILED] = 8
    cpu_gemm._finish_loop(ctl, 8)  # does not wait for ever
    assert ctl[cpu_gemm.LOOP_DONE] == 8
    ctl[cpu_gemm.STOP] = 1  # stop() while a part waits for a loop that never said it was done
    assert cpu_gemm.helper_next_half(ctl, ts, 9, np.zeros(1, np.int64)) == -1


def test_a_loop_part_that_fails_on_the_helper_is_reported_not_waited_for(monkeypatch, ran):
    """A bug in the helper's part ends the helper thread; a caller waiting for a half it had claimed
    raises instead of spinning for ever, and the next start gives a working helper."""
    split(1)
    failures = []
    monkeypatch.setattr(threading, "excepthook", lambda args: failures.append(args.exc_type))
    helper = cpu_gemm._threads[0]

    def broken(*args):
        raise ValueError("a bug in a loop's helper part")

    lseq = int(cpu_gemm._ctl[cpu_gemm.LOOP_SEQ]) + 1
    cpu_gemm._loop_job = (lseq, broken, ())
    cpu_gemm._ctl[cpu_gemm.LOOP_SEQ] = lseq
    helper.join(timeout=30)
    assert not helper.is_alive() and failures == [ValueError]
    assert cpu_gemm._ctl[cpu_gemm.LOOP_FAILED] == lseq == cpu_gemm._ctl[cpu_gemm.LOOP_EXIT]
    cpu_gemm._ctl[cpu_gemm.HALF] = (lseq << 24) | (5 << 2) | cpu_gemm.HELPER  # call 5's half, claimed
    with pytest.raises(RuntimeError, match="the helper thread failed inside a compiled loop"):
        cpu_gemm.take_half(cpu_gemm._ctl, np.zeros(2, np.int64), lseq, 5)
    cpu_gemm._ctl[cpu_gemm.HALF] = 0
    assert cpu_gemm.helpers() == 0  # the dead helper is not counted, and gets no more work:
    posted, expected = cpu_gemm.stats()["posted"], run_layer(GRU, {}, compiled=False, H=HIDDEN[GRU])
    assert same_bits(run_layer(GRU, {}, compiled=True, H=HIDDEN[GRU]), expected)
    assert cpu_gemm.stats()["posted"] == posted and cpu_gemm._ctl[cpu_gemm.LOOP_SEQ] == lseq
    split(1)
    assert cpu_gemm._threads[0].is_alive()
    expected = run_layer(GRU, {}, compiled=False, H=HIDDEN[GRU])
    assert same_bits(run_layer(GRU, {}, compiled=True, H=HIDDEN[GRU]), expected)


def test_token_ids_batch_first_and_no_states(ran):
    split(1)
    for cls, kwargs in CELLS.values():
        args = dict(ids=True, batch_first=True, states=False, layers=1, bidirectional=False, I=28, H=HIDDEN[cls])
        assert same_bits(run_layer(cls, kwargs, compiled=True, **args), run_layer(cls, kwargs, compiled=False, **args))
    assert len(ran) == 2 * len(CELLS) * 2 and all(result for _, result in ran)


@pytest.mark.parametrize("helpers", [0, 1])
@pytest.mark.parametrize("cell", CELLS)
def test_the_loops_gather_token_ids_and_sum_their_gradient_step_by_step_with_the_same_bits(cell, helpers, ran,
                                                                                         monkeypatch):
    """Token ids: the compiled forward loops write each step's rows of the input table themselves
    (`cpu_loops.gather`: `backend.take_rows` is not called), the backward loops add each step's rows
    of its gradient to their tokens' sums as they finish them, each thread its own rows
    (`cpu_loops.scatter`: `_scatter_columns` is not called); the bits are those of the gather
    before the loop and the scatter after it, and of the Python loops. Both directions of layer 0
    read one table buffer in turn."""
    from npyrnn.nn import recurrent

    cls, kwargs = CELLS[cell]
    split(helpers)
    gathers, scatters = [], []
    take_rows, scatter_columns = backend.take_rows, recurrent._scatter_columns
    monkeypatch.setattr(backend, "take_rows", lambda *a, **k: gathers.append(a[1].shape) or take_rows(*a, **k))
    monkeypatch.setattr(recurrent, "_scatter_columns", lambda *a: scatters.append(a[0].shape) or scatter_columns(*a))
    args = dict(ids=True, I=28, H=HIDDEN[cls], calls=2)
    in_loop = run_layer(cls, kwargs, compiled=True, **args)
    assert gathers == [] and scatters == [] and ran and all(result for _, result in ran)
    monkeypatch.setattr(cpu_loops, "gather", False)
    monkeypatch.setattr(cpu_loops, "scatter", False)
    around = run_layer(cls, kwargs, compiled=True, **args)
    assert gathers == scatters == [(9, 32)] * 4  # two directions, two calls
    assert same_bits(in_loop, around)
    assert same_bits(in_loop, run_layer(cls, kwargs, compiled=False, **args))


@settings(derandomize=True, max_examples=30, deadline=None)
@given(
    cell=st.sampled_from(sorted(CELLS)),
    T=st.integers(1, 5),
    B=st.sampled_from([1, 2, 17, 32]),
    H=st.sampled_from([1, 3, 40, 64, 130]),
    layers=st.integers(1, 2),
    bidirectional=st.booleans(),
    batch_first=st.booleans(),
    states=st.booleans(),
    ids=st.booleans(),
    helpers=st.integers(0, 1),
)
def test_any_shape_gives_the_python_loops_bits(cell, T, B, H, layers, bidirectional, batch_first, states, ids, helpers):
    """Size-1 and tiny shapes (declined: the Python loop runs) and two calls in a row on one layer."""
    cls, kwargs = CELLS[cell]
    if "proj_size" in kwargs:
        kwargs = {**kwargs, "proj_size": H // 2}  # (H = 1: none)
    split(helpers)
    args = dict(T=T, B=B, H=H, I=5, layers=layers, bidirectional=bidirectional, batch_first=batch_first,
                states=states, ids=ids, calls=2)
    ran, run_loop = [], cpu_gemm.run_loop
    cpu_gemm.run_loop = lambda *a, **k: ran.append(run_loop(*a, **k)) or ran[-1]
    try:
        compiled = run_layer(cls, kwargs, compiled=True, **args)
    finally:
        cpu_gemm.run_loop = run_loop
    if B == 32 and H >= 64 and "proj_size" not in kwargs:  # every step product at least 0.26 MFLOP
        assert ran and all(ran)
    assert same_bits(compiled, run_layer(cls, kwargs, compiled=False, **args))


def test_declined_where_the_split_products_would_decline(ran):
    split(1)
    run_layer(RNN, {}, compiled=True, H=8, B=4)  # 2*4*8*8 flops: a product for numpy.matmul
    assert ran and not any(result for _, result in ran)
    backend.set_cpu_threads(2, split=False)
    ran.clear()
    run_layer(GRU, {}, compiled=True)  # the split products off: the compiled loops are not asked
    assert ran == []
    split(1)
    kernels.set_enabled(False)
    run_layer(GRU, {}, compiled=True)  # the fused kernels off: the array operations' loops
    assert ran == []


def test_declined_for_strides_it_does_not_assume_and_while_another_thread_has_the_products():
    split(1)
    rng = np.random.default_rng(0)
    T, B, H = 4, 32, 64
    G, GH = rng.standard_normal((T, B, 3 * H)).astype(np.float32), np.empty((T, B, 3 * H), np.float32)
    Hs = np.zeros((T + 1, B, H), np.float32)
    W = rng.standard_normal((3 * H, H)).astype(np.float32)
    strided = np.zeros((2 * H, 6 * H), np.float32)[::2, ::2]  # W^T with neither rows nor columns contiguous
    strided[...] = W.T
    assert not cpu_loops.gru_forward(G, GH, Hs, strided, None, 1, 0, False)
    assert not cpu_loops.gru_forward(G, GH, Hs, W.T.astype(np.float64), None, 1, 0, False)
    with cpu_gemm._lock:  # another thread's product in progress
        assert not cpu_loops.gru_forward(G, GH, Hs, W.T, None, 1, 0, False)
    G0 = G.copy()  # the loop turns G into the gates
    assert cpu_loops.gru_forward(G, GH, Hs, W.T, None, 1, 0, False)  # the view W.T: a product with W transposed
    view = Hs.copy()
    G[...], Hs[1:] = G0, np.nan
    assert cpu_loops.gru_forward(G, GH, Hs, np.ascontiguousarray(W.T), None, 1, 0, False)  # a C-ordered W^T
    np.testing.assert_allclose(Hs, view, rtol=1e-5, atol=1e-6)  # the same product (its bits may differ by kernel)


def test_declined_when_openblas_is_not_at_one_thread_and_the_python_loop_gives_the_same(ran):
    """Another thread gave NumPy's OpenBLAS two threads (threadpoolctl, say): every block must be a
    single-threaded product, so the loops decline, and the Python loops (numpy.matmul) run."""
    expected = run_layer(GRU, {}, compiled=False)
    split(1)
    declined = cpu_gemm.stats()["declined"]
    cpu_gemm._set_blas_threads(2)
    try:
        got = run_layer(GRU, {}, compiled=True)
    finally:
        cpu_gemm._set_blas_threads(1)
    assert ran and not any(result for _, result in ran)
    assert cpu_gemm.stats()["declined"] >= declined + len(ran)
    for a, b in zip(got, expected):  # numpy.matmul at OpenBLAS's two threads: the same values, not the same bits
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    ran.clear()
    run_layer(GRU, {}, compiled=True)  # one thread again: the loops run
    assert ran and all(result for _, result in ran)


FAKE_HELPER_CASES = {  # the first product each loop posts: split by columns, by k, the second of two products
    "gru forward": (GRU, {}, "forward"),
    "gru backward": (GRU, {}, "backward"),
    "gru reset before, backward": (GRU, {"reset_after": False}, "backward"),
    "lstm proj backward": (LSTM, {"proj_size": 96}, "backward"),
}


def fake_helper_case(cls, kwargs, direction, stall_us):
    """The loop's outputs with a helper played by the test, which claims the loop's first posted
    block and computes it (stall_us 0) or stalls scribbling over its scratch; and the same at 0
    helpers. Returns (got, expected, the layer's W_hh kept for the helper, its weakref)."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 12, (9, 32))  # token ids: no input-side product posts before the loop's
    dout = rng.standard_normal((9, 32, kwargs.get("proj_size") or 160)).astype(np.float32)

    def make():
        layer = cls(12, 160, init="uniform", seed=0, **kwargs)
        out, _ = layer.forward(x)
        return layer, out

    def results(layer, out):
        if direction == "forward":
            return [out.copy()]
        layer.zero_grad()
        _, dh0 = layer.backward(dout)
        return [a.copy() for a in (dh0 if isinstance(dh0, tuple) else (dh0,))] + [layer.grads["weight_hh_l0"].copy()]

    split(0)
    expected = results(*make())
    layer, out = make()  # the forward outside the fake helper's reach: it claims from the backward's loop
    kept = {}

    def run():
        real_run_loop, taken = cpu_gemm.run_loop, []

        def spy(*args, **kwargs):  # the blocks taken back inside the compiled loop
            before = cpu_gemm.stats()["taken_back"]
            result = real_run_loop(*args, **kwargs)
            taken.append(cpu_gemm.stats()["taken_back"] - before)
            return result

        cpu_gemm.run_loop = spy
        try:
            got = results(*(make() if direction == "forward" else (layer, out)))
        finally:
            cpu_gemm.run_loop = real_run_loop
        if stall_us and sum(taken):  # (a late fake helper may claim a product after the loop instead)
            shape = (cls.GATES * 160, kwargs.get("proj_size") or 160)  # W_hh; the forward's copy of W_hh^T: transposed
            W = [a for _, arrays in cpu_gemm._kept for a in arrays if a.shape in (shape, shape[::-1])]
            assert W, "the weight the stalled helper may read is not kept"
            kept["W"] = weakref.ref(W[0])
        return got

    for _ in range(20):  # until the fake helper claimed a block inside the compiled loop
        split(0)
        got = with_fake_helper(stall_us, np.full(32 * 640 * 2, np.nan, np.float32), run,
                               "taken_back" if stall_us else "helper_blocks")
        if not stall_us or "W" in kept:
            return got, expected, kept
    pytest.fail("the fake helper never stalled inside the compiled loop")


@pytest.mark.parametrize("case", FAKE_HELPER_CASES)
def test_a_block_the_helper_computes_in_a_compiled_loop(case, patient_caller):
    got, expected, _ = fake_helper_case(*FAKE_HELPER_CASES[case], stall_us=0)
    assert same_bits(got, expected)


@pytest.mark.parametrize("case", FAKE_HELPER_CASES)
def test_a_stalled_helper_during_a_compiled_loop(case):
    """The loop takes the stalled block back, finishes with the same bits, and keeps what the helper
    may still read until a helper says it is done."""
    got, expected, kept = fake_helper_case(*FAKE_HELPER_CASES[case], stall_us=200_000)
    assert same_bits(got, expected)
    split(1)  # a real helper and one more product: what was kept for the fake one goes
    assert cpu_gemm.matmul(np.ones((300, 1000), np.float32), np.ones((1000, 200), np.float32),
                           np.empty((300, 200), np.float32))
    gc.collect()
    assert kept["W"]() is None or kept["W"]() is not None and not any(
        kept["W"]() is a for _, arrays in cpu_gemm._kept for a in arrays)


def test_a_read_only_broadcast_dout(ran):
    split(1)
    for cls, kwargs in CELLS.values():
        layer_args = dict(init="uniform", seed=0, bidirectional=True, batch_first=True, **kwargs)
        x = np.random.default_rng(0).standard_normal((32, 6, 8)).astype(np.float32)
        outs = []
        for compiled in (True, False):
            cpu_loops.enabled = compiled
            try:
                layer = cls(8, HIDDEN[cls], **layer_args)
                out, _ = layer.forward(x)
                dout = np.broadcast_to(np.linspace(-1, 1, out.shape[-1], dtype=np.float32), out.shape)  # read-only
                dx, _ = layer.backward(dout)
                outs.append([out.copy(), dx.copy()] + [layer.grads[k].copy() for k in sorted(layer.grads)])
            finally:
                cpu_loops.enabled = True
        assert same_bits(*outs)
    assert ran and all(result for _, result in ran)


def test_the_disk_cache_is_keyed_to_the_kernels_and_products_sources(tmp_path):
    """A loop cached by one process loads in the next, unless cpu_kernels.py (or cpu_gemm.py) differs."""
    code = (
        "import sys, numpy as np\n"
        "from npyrnn.nn import cpu_kernels\n"
        "if sys.argv[1] == 'changed':\n"
        "    cpu_kernels.SOURCE_DIGEST = 'another'  # as if the file had changed\n"
        "from npyrnn import backend\n"
        "from npyrnn.nn import cpu_loops\n"
        "backend.set_cpu_threads(1, split=True)\n"
        "f = np.float32\n"
        "Y, dA, W, carry = np.ones((3, 32, 64), f), np.ones((3, 32, 64), f), np.ones((64, 64), f), np.zeros((32, 64), f)\n"
        "assert cpu_loops.rnn_backward(Y, dA, W, carry, False, False)\n"
        "stats = cpu_loops._rnn_backward.stats\n"
        "print(sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))\n"
    )
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), NPYRNN_BACKEND="numpy")

    def hits_misses(kind):
        result = subprocess.run([sys.executable, "-c", code, kind], env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        return tuple(int(v) for v in result.stdout.split())

    assert hits_misses("same") == (0, 1)  # compiled, saved
    assert hits_misses("same") == (1, 0)  # loaded
    assert hits_misses("changed") == (0, 1)  # compiled again
    assert hits_misses("changed") == (1, 0)


def test_two_threads_each_with_a_layer(ran):
    """Two Python threads training at once: one holds the products, the other's loops run in Python
    (numpy.matmul); both get their own right answers."""
    split(1)
    expected = {seed: run_layer(GRU, {}, compiled=False, seed=seed, layers=1, calls=1) for seed in (1, 2)}
    results, errors = {}, []

    def work(seed):
        try:
            for _ in range(5):
                results[seed] = run_layer(GRU, {}, compiled=True, seed=seed, layers=1, calls=1)
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    ran.clear()
    threads = [threading.Thread(target=work, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert any(result for _, result in ran)  # (while the other thread's products went to numpy.matmul)
    for seed in (1, 2):  # float32: numpy.matmul's bits may differ from the split products' in the last place
        assert all(np.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(results[seed], expected[seed])
                   if a is not None)


def test_compiles_whatever_the_kernels_were_built_for(tmp_path):
    """`cpu_kernels.build` locks a kernel's dispatcher to the signatures Python asked for: a loop
    compiled afterwards (in a fresh process, with an empty Numba cache) for a dtype the kernel was
    not built for still compiles, as it calls its own copy of the kernel."""
    code = (
        "import numpy as np\n"
        "from npyrnn import backend\n"
        "from npyrnn.nn import cpu_gemm, cpu_kernels, cpu_loops, kernels\n"
        "cpu_kernels.build(kernels.SPECS['rnn_bwd_tanh'], 'float64')  # locked to float64\n"
        "backend.set_cpu_threads(2, split=True)\n"
        "f = np.float32\n"
        "Y, dA, W, carry = np.ones((3, 32, 64), f), np.ones((3, 32, 64), f), np.ones((64, 64), f), np.zeros((32, 64), f)\n"
        "assert cpu_loops.rnn_backward(Y, dA, W, carry, False, False)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), NPYRNN_BACKEND="numpy")  # (CI runs a pass on CuPy's stand-in)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
