"""npyrnn's split products (`npyrnn.nn.cpu_gemm`, the `fast` extra): correct, the same bits at
every thread count, safe when a helper loses its core, and what they decline.

Each product against numpy.matmul (float64 to 1e-12, float32 to 1e-5 relative to |a| |b|) over
random shapes and layouts (hypothesis); the bits of whole training steps at 0, 1 and 3 helpers;
a helper that claims a block and stalls (its block taken back, its late writes harmless); every
cell's gradients against torch with the products on; the thread counts given back; the switch.
Runs wherever Numba is installed and NumPy's BLAS is OpenBLAS with its 64-bit interface.
"""

import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("numba", reason="the split products need Numba (pip install 'npyrnn[fast]')")

from npyrnn import backend  # noqa: E402
from npyrnn.errors import BackendError  # noqa: E402
from npyrnn.nn import cpu_gemm  # noqa: E402

if cpu_gemm.why_unavailable() is not None:
    pytest.skip(f"split products {cpu_gemm.why_unavailable()}", allow_module_level=True)

from numba import njit  # noqa: E402
from reference import to_torch, torch_layer  # noqa: E402
from threadpoolctl import threadpool_info  # noqa: E402


def numpy_blas_threads():
    return next(i["num_threads"] for i in threadpool_info() if i["internal_api"] == "openblas" and "numpy" in i["filepath"])


@pytest.fixture(autouse=True)
def _on_numpy():
    backend.set_backend("numpy")  # the conftest fixtures restore the backend and stop the products
    yield
    cpu_gemm.stop()


def layout(rng, shape, kind, dtype):
    """A (rows, cols) array of `kind`: C order, a transposed view, a slice of wider rows, or of wider columns."""
    rows, cols = shape
    if kind == "C":
        return rng.standard_normal(shape).astype(dtype)
    if kind == "T":
        return rng.standard_normal((cols, rows)).astype(dtype).T
    if kind == "rows":
        return rng.standard_normal((rows, cols + 5)).astype(dtype)[:, 2 : 2 + cols]
    return rng.standard_normal((rows + 3, cols)).astype(dtype)[1 : 1 + rows].T.copy().T  # F order


def product(helpers, a, b):
    """cpu_gemm's a @ b with `helpers` helper threads (asserting it took the product)."""
    cpu_gemm.start(helpers)
    out = np.full((a.shape[0], b.shape[1]), np.nan, dtype=a.dtype)
    assert cpu_gemm.matmul(a, b, out)
    cpu_gemm.stop()
    return out


def close(out, a, b):
    """Within float rounding of the float64 product: 1e-12 (float64) or 1e-5 (float32) of |a| |b|."""
    ref = a.astype(np.float64) @ b.astype(np.float64)
    scale = np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64) + 1e-30
    tol = 1e-12 if a.dtype == np.float64 else 1e-5
    return float(np.max(np.abs(out - ref) / scale)) <= tol


@settings(derandomize=True, max_examples=40, deadline=None)
@given(
    m=st.integers(2, 300), k=st.integers(2, 300), n=st.integers(2, 300),
    kinds=st.tuples(st.sampled_from(["C", "T", "rows", "F"]), st.sampled_from(["C", "T", "rows", "F"])),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**16),
)
def test_products_match_numpy_and_repeat_at_every_thread_count(m, k, n, kinds, dtype, seed):
    rng = np.random.default_rng(seed)
    a, b = layout(rng, (m, k), kinds[0], dtype), layout(rng, (k, n), kinds[1], dtype)
    if 2 * m * n * k < cpu_gemm.MIN_FLOPS:
        cpu_gemm.start(1)
        assert not cpu_gemm.matmul(a, b, np.empty((m, n), dtype=dtype))  # tiny: numpy.matmul's
        return
    alone, shared = product(0, a, b), product(1, a, b)
    assert close(alone, a, b)
    assert np.array_equal(alone, shared)  # the same bits whoever computes which block
    again = product(1, a, b)
    assert np.array_equal(shared, again)  # and the next call: nothing carried over


def test_blocks_depend_on_the_shape_alone_and_cover_it():
    for m, n, k in [(32, 768, 256), (32, 256, 768), (768, 256, 1120), (1120, 28, 256), (33, 300, 100), (2, 2, 2)]:
        axis, count, size = cpu_gemm.blocks(m, n, k)
        length = (m, n, k)[axis]
        if 2 * m * n * k < cpu_gemm.SPLIT_FLOPS:
            assert (axis, count, size) == (1, 1, n)
            continue
        assert length == max(m, n, k) and count == 2
        assert 1 <= count <= cpu_gemm.MAX_BLOCKS and size % cpu_gemm.BLOCK_ALIGN == 0
        assert (count - 1) * size < length <= count * size


@pytest.mark.parametrize("kind", ["int", "mixed", "1-D", "overlap", "out F order", "out strided", "size 1", "not started"])
def test_declines_what_it_does_not_take_and_leaves_out_alone(kind):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((64, 64)), rng.standard_normal((64, 64))
    out = np.full((64, 64), 7.0)
    cpu_gemm.start(1)
    if kind == "int":
        a, b, out = a.astype(np.int64), b.astype(np.int64), out.astype(np.int64)
    elif kind == "mixed":
        b = b.astype(np.float32)
    elif kind == "1-D":
        b = b[:, 0]
    elif kind == "overlap":
        out = a
    elif kind == "out F order":
        out = np.asfortranarray(out)
    elif kind == "out strided":
        out = np.full((64, 128), 7.0)[:, ::2]
    elif kind == "size 1":
        a, out = a[:1], out[:1]
    else:
        cpu_gemm.stop()
    before = out.copy()
    assert not cpu_gemm.matmul(a, b, out)
    assert np.array_equal(out, before)


def test_declines_while_another_thread_uses_it():
    cpu_gemm.start(1)
    a = np.ones((64, 64))
    with cpu_gemm._lock:  # as if another thread's product were running
        assert not cpu_gemm.matmul(a, a, np.empty((64, 64)))
    assert cpu_gemm.matmul(a, a, np.empty((64, 64)))


def test_backend_matmul_hands_over_and_falls_back():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((40, 300)), rng.standard_normal((300, 400))
    backend.set_cpu_threads(2, split=True)
    assert backend.split_products() == 2
    posted = cpu_gemm.stats()["posted"]
    got = backend.matmul(a, b)  # out=None: made here
    assert close(got, a, b) and cpu_gemm.stats()["posted"] == posted + 1
    assert np.array_equal(backend.matmul(a[:, :3], b[:3, :1]), a[:, :3] @ b[:3, :1])  # tiny: numpy's
    ints = np.arange(12).reshape(3, 4)
    assert np.array_equal(backend.matmul(ints, ints.T), ints @ ints.T)


def test_thread_counts_given_back(monkeypatch):
    before = numpy_blas_threads()
    backend.set_cpu_threads(None, split=True)
    assert numpy_blas_threads() == 1  # every block is a single-threaded product
    assert backend.split_products() == len(backend._split._threads) + 1
    assert sum(t.name.startswith("npyrnn-gemm-helper") for t in threading.enumerate()) == backend.split_products() - 1
    backend.set_cpu_threads(None, split=False)
    assert numpy_blas_threads() == before and backend.split_products() is None
    assert not any(t.name.startswith("npyrnn-gemm-helper") for t in threading.enumerate())
    monkeypatch.setenv(backend.SPLIT_ENV, "0")
    backend.set_cpu_threads(None)
    assert backend.split_products() is None
    monkeypatch.setenv(backend.SPLIT_ENV, "sometimes")
    with pytest.raises(BackendError, match="NPYRNN_SPLIT_PRODUCTS must be 0"):
        backend.set_cpu_threads(None)


# ------------------------------------------------------------------------------ a helper that stalls
@njit(nogil=True)
def _stalling_helper(ctl, seen, stall_us, garbage):
    """A helper that claims the last block of the next product, stalls, then scribbles over its scratch."""
    while cpu_gemm._load(ctl, cpu_gemm.SEQ) == seen:
        cpu_gemm._pause()
    seq = cpu_gemm._load(ctl, cpu_gemm.SEQ)
    i = ctl[cpu_gemm.NCH] - 1
    s = ctl[cpu_gemm.S]
    claimed = cpu_gemm._cas(ctl, cpu_gemm.STATE + i, seq * 4 + cpu_gemm.FREE, seq * 4 + cpu_gemm.HELPER)
    if claimed:  # it has lost its core, yet writes now and then: the caller takes the block back meanwhile
        for _ in range(stall_us // 1000):
            cpu_gemm._memcpy(s, np.int64(garbage.ctypes.data), np.int64(garbage.nbytes))  # over its scratch
            cpu_gemm._usleep(np.uint32(1000))
        cpu_gemm._cas(ctl, cpu_gemm.STATE + i, seq * 4 + cpu_gemm.HELPER, seq * 4 + cpu_gemm.DONE)
    return claimed


@pytest.mark.parametrize("shape", [(32, 512, 768), (768, 1120, 256)], ids=["by columns", "by k"])
def test_a_stalled_helper_is_overtaken_and_its_late_writes_land_nowhere(shape):
    m, k, n = shape
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
    expected = product(0, a, b)
    garbage = np.full((2 if k > n else 1) * m * n, np.nan, dtype=np.float32)  # the helpers' part of the scratch
    cpu_gemm.start(0)
    cpu_gemm._threads.append(threading.current_thread())  # the products now count one helper: ours below
    try:
        for _ in range(20):  # until our helper wins the claim (it nearly always does at once)
            taken = cpu_gemm.stats()["taken_back"]
            result = {}
            seen = int(cpu_gemm._ctl[cpu_gemm.SEQ])
            stall = threading.Thread(target=lambda: result.update(claimed=_stalling_helper(cpu_gemm._ctl, seen, 200_000, garbage)))
            stall.start()
            out = np.full((m, n), np.nan, dtype=np.float32)
            assert cpu_gemm.matmul(a, b, out)
            assert np.array_equal(out, expected)  # the caller computed the stalled block itself
            again = np.full((m, n), np.nan, dtype=np.float32)
            assert cpu_gemm.matmul(a, b, again)  # while the stalled helper still writes
            stall.join()
            assert np.array_equal(again, expected)  # its late writes landed where nothing reads
            if result["claimed"]:
                assert cpu_gemm.stats()["taken_back"] == taken + 1
                break
        else:
            pytest.fail("the stalling helper never claimed a block")
    finally:
        cpu_gemm._threads.clear()


# ------------------------------------------------------------------------------ layers and training
def _train_steps(cell, dtype, steps=3):
    from npyrnn.models import RNNLM
    from npyrnn.optim import SGD
    from npyrnn.train import train_step

    rng = np.random.default_rng(3)
    model = RNNLM(28, 160, cell=cell, num_layers=2, dtype=dtype, init="uniform", seed=4)
    opt = SGD(model.params, 1.0)
    state = model.begin_state(16)
    for _ in range(steps):
        X, Y = rng.integers(0, 28, (16, 20)), rng.integers(0, 28, (16, 20))
        _, state = train_step(model, X, Y, state, opt, 1.0)
    return {name: p.copy() for name, p in model.params.items()}


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_training_repeats_bit_for_bit_at_every_thread_count(cell):
    runs = []
    for threads in (1, 2, 4):  # backend.set_cpu_threads, as `npyrnn train --threads` calls it
        backend.set_cpu_threads(threads, split=True)
        posted = cpu_gemm.stats()["posted"]
        runs.append(_train_steps(cell, "float32"))
        assert (cpu_gemm.stats()["posted"] > posted) == (threads > 1)  # the helper took part
    for other in runs[1:]:
        assert all(np.array_equal(runs[0][name], other[name]) for name in runs[0])
    backend.set_cpu_threads(None, split=False)
    plain = _train_steps(cell, "float64")  # numpy.matmul
    backend.set_cpu_threads(2, split=True)
    split = _train_steps(cell, "float64")
    assert all(np.allclose(split[name], plain[name], rtol=1e-12, atol=1e-14) for name in plain)


@pytest.mark.parametrize("cls_name", ["RNN", "GRU", "LSTM"])
def test_layer_gradients_match_torch_with_split_products(cls_name):
    from npyrnn import nn

    layer = getattr(nn, cls_name)(96, 160, num_layers=2, bidirectional=True, dtype="float64", init="uniform", seed=5)
    rng = np.random.default_rng(6)
    x, dout = rng.standard_normal((30, 24, 96)), rng.standard_normal((30, 24, 320))
    net = torch_layer(layer)
    backend.set_cpu_threads(2, split=True)
    posted = cpu_gemm.stats()["posted"]
    out, _ = layer.forward(x)
    dx, _ = layer.backward(dout)
    assert cpu_gemm.stats()["posted"] > posted  # the layer's products went through the split products
    xt = to_torch(x).requires_grad_(True)
    ot, _ = net(xt)
    ot.backward(to_torch(dout))
    assert np.allclose(out, ot.detach().numpy(), rtol=1e-12, atol=1e-13)
    assert np.allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    for name, p in net.named_parameters():
        scale = float(torch.abs(p.grad).max())
        assert float(np.max(np.abs(layer.grads[name] - p.grad.numpy()))) <= 1e-10 * scale, name
