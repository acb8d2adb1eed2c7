"""npyrnn's split products (`npyrnn.nn.cpu_gemm`, the `fast` extra): correct, the same bits at
every thread count, safe when a helper loses its core, and what they decline.

Each product against numpy.matmul (float64 to 1e-12, float32 to 1e-5 relative to |a| |b|) over
random shapes and layouts (hypothesis); the bits of whole training steps at 0, 1 and 3 helpers;
a helper that claims a block and stalls (its block taken back, its late writes harmless); every
cell's gradients against torch with the products on; the thread counts given back; the switch.
Runs wherever Numba is installed and NumPy's BLAS is OpenBLAS with its 64-bit interface.
"""

import gc
import multiprocessing
import os
import threading
import weakref

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from threadpoolctl import threadpool_limits

pytest.importorskip("numba", reason="the split products need Numba (pip install 'npyrnn[fast]')")

from npyrnn import backend  # noqa: E402
from npyrnn.errors import BackendError  # noqa: E402
from npyrnn.nn import cpu_gemm  # noqa: E402

if cpu_gemm.why_unavailable() is not None:
    pytest.skip(f"split products {cpu_gemm.why_unavailable()}", allow_module_level=True)

from numba import njit  # noqa: E402
from reference import to_torch, torch_layer  # noqa: E402


def numpy_blas_threads():
    return backend.numpy_blas()["num_threads"]


@pytest.fixture(autouse=True)
def _on_numpy(monkeypatch):
    backend.set_backend("numpy")  # the conftest fixtures restore the backend and stop the products
    # tests that need the helper to take part keep it whatever else runs on the machine (tests in
    # parallel, say): no pause for a busy machine, unless a test sets HELPER_SHARE_MIN itself
    monkeypatch.setattr(cpu_gemm, "HELPER_SHARE_MIN", 0.0)
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


@settings(derandomize=True, max_examples=30, deadline=None)
@given(
    k=st.integers(2, 1100), n=st.integers(2, 1100), kinds=st.tuples(st.sampled_from(["C", "T"]), st.sampled_from(["C", "T"])),
    dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**16),
)
def test_one_row_products_are_split_matrix_vector_products(k, n, kinds, dtype, seed):
    """Generation at batch 1: a (1, k) row times op(b) (k, n). A large one (n k >= MATVEC_SPLIT_ITEMS, k >= MATVEC_SPLIT_K)
    is cut by columns into two matrix-vector products, one a thread: the same bits at 0 and 1
    helpers, through `matmul` and through the stepper's planned `matvec(W)` alike; a smaller one
    is declined."""
    rng = np.random.default_rng(seed)
    a = layout(rng, (1, k), kinds[0], dtype)
    b = layout(rng, (k, n), kinds[1], dtype)
    if cpu_gemm.blocks(1, n, k)[1] < 2:
        cpu_gemm.start(1)
        assert not cpu_gemm.matmul(a, b, np.empty((1, n), dtype=dtype))
        return
    assert n * k >= cpu_gemm.MATVEC_SPLIT_ITEMS and k >= cpu_gemm.MATVEC_SPLIT_K and cpu_gemm.blocks(1, n, k)[0] == 1
    alone, shared = product(0, a, b), product(1, a, b)
    assert close(alone, a, b) and alone.tobytes() == shared.tobytes()
    if kinds[1] == "T":  # b = W^T, W C-ordered: also `matvec(W)`, the stepper's planned product
        W = b.T
        for helpers in (0, 1):
            cpu_gemm.start(helpers)
            f = cpu_gemm.matvec(W)
            for _ in range(2):  # called again with the same arrays, as a stepper does
                out = np.full((1, n), np.nan, dtype=dtype)
                f(a, out)
                assert out.tobytes() == alone.tobytes()
            cpu_gemm.stop()
            f(a, out)  # the products off: numpy.dot (whose bits may differ where the cut splits its kernel's rows)
            assert out.tobytes() == np.dot(W, a[0]).tobytes()
        assert cpu_gemm.matvec(W) is None  # off


def tiled(a, b, ldd_extra=3):
    """`cpu_gemm._tiles`' a @ b (row-major a, b), written into rows `ldd_extra` elements wider than
    the product, whose extra elements must come back untouched; (product, what was past its columns)."""
    m, n, k = a.shape[0], b.shape[1], a.shape[1]
    dt = 0 if a.dtype == np.float32 else 1
    d = np.full((m, n + ldd_extra), -7.0, dtype=a.dtype)
    item = a.itemsize
    cpu_gemm._tiles(dt, m, n, k, a.ctypes.data, a.strides[0] // item, b.ctypes.data, b.strides[0] // item,
                    d.ctypes.data, d.shape[1])
    return d[:, :n], d[:, n:]


@settings(derandomize=True, max_examples=40, deadline=None)
@given(
    m=st.integers(1, cpu_gemm.TILE_M_MAX + 9), k=st.integers(0, 300), n=st.integers(1, 100),
    kinds=st.tuples(st.sampled_from(["C", "rows"]), st.sampled_from(["C", "rows"])),
    dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**16),
)
def test_tiles_compute_every_row_and_column_and_nothing_past_them(m, k, n, kinds, dtype, seed):
    """The tiles (8 rows by 2 vectors of columns, fewer rows last, the columns past the last whole
    tile by a gemm) against an exact product: small integers, whose float32 sums are exact; and
    random numbers within rounding. Wider rows of a, b and the product (leading dimensions)."""
    rng = np.random.default_rng(seed)
    a, b = layout(rng, (m, k), kinds[0], dtype), layout(rng, (k, n), kinds[1], dtype)
    a[...] = rng.integers(-8, 9, a.shape)
    b[...] = rng.integers(-8, 9, b.shape)
    out, past = tiled(a, b)
    assert np.array_equal(out, a.astype(np.int64) @ b.astype(np.int64)) and np.all(past == -7.0)
    a[...], b[...] = rng.standard_normal(a.shape), rng.standard_normal(b.shape)
    out, past = tiled(a, b, ldd_extra=0)
    assert close(out, a, b)


def test_tiles_switch_off_and_on_and_stay_correct():
    """NO_TILES 1: every block OpenBLAS's; 0: the tiles' where `TILES` (this host has AVX-512); both
    the right product, at 0 and 1 helpers, and each the same bits at both."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((32, 512)).astype(np.float32)
    b = rng.standard_normal((512, 1024)).astype(np.float32)
    try:
        results = {}
        for off in (1, 0):
            cpu_gemm._ctl[cpu_gemm.NO_TILES] = off
            alone, shared = product(0, a, b), product(1, a, b)
            assert close(alone, a, b) and np.array_equal(alone, shared)
            results[off] = alone
        # two blocks of 512 columns: off, each OpenBLAS's at one thread; on, each element the tiles'
        # sum over all of k. (Here the two differ in their last bits: OpenBLAS sums k = 512 in two
        # blocks of its own. So each state is told apart from the other.)
        assert cpu_gemm.blocks(32, 1024, 512) == (1, 2, 512)
        with threadpool_limits(1):
            openblas = np.concatenate([a @ b[:, :512], a @ b[:, 512:]], axis=1)
        assert np.array_equal(results[1], openblas)
        if cpu_gemm.TILES:
            assert np.array_equal(results[0], tiled(a, b, ldd_extra=0)[0])
    finally:
        cpu_gemm._ctl[cpu_gemm.NO_TILES] = 0


def test_tiles_follow_the_cpu_numba_compiles_for(monkeypatch):
    """The tiles are on where the code Numba builds has AVX-512: the host's features, or those
    named with NUMBA_CPU_NAME (a cache for `generic` CPUs would turn each tile's fused
    multiply-adds into calls, 100 times slower than OpenBLAS)."""
    import llvmlite.binding as llvm
    import platform
    from numba.core import config

    x86 = platform.machine().lower() in ("x86_64", "amd64")
    host = "+avx512f" in llvm.get_host_cpu_features().flatten().split(",")
    monkeypatch.setattr(config, "CPU_NAME", None)
    assert cpu_gemm._target_has_avx512() == (x86 and host)
    monkeypatch.setattr(config, "CPU_NAME", "generic")
    monkeypatch.setattr(config, "CPU_FEATURES", "")
    assert not cpu_gemm._target_has_avx512()
    monkeypatch.setattr(config, "CPU_NAME", "skylake-avx512")
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx2,+fma,+avx512f")
    assert cpu_gemm._target_has_avx512() == x86


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="the helper's cores are set on Linux only")
def test_the_helper_is_kept_off_the_calling_threads_core():
    """Started again and again (each benchmark measurement does), the helper may run on every
    allowed core but the one the calling thread was on: Linux often put a restarted helper on the
    caller's core, where it claimed no blocks. With one allowed core it is left as it was."""
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("one allowed core: nothing to keep apart")
    for _ in range(3):
        cpu_gemm.start(1)
        helper = cpu_gemm._threads[0]
        assert cpu_gemm._helper_cpus is not None and len(cpu_gemm._helper_cpus) == len(allowed) - 1
        assert cpu_gemm._helper_cpus < allowed and os.sched_getaffinity(helper.native_id) == cpu_gemm._helper_cpus
        cpu_gemm.stop()
    try:
        os.sched_setaffinity(0, {min(allowed)})  # this thread on one CPU (as `taskset -c 0` would put it)
        cpu_gemm.start(1)
        assert cpu_gemm._helper_cpus is None
        assert os.sched_getaffinity(cpu_gemm._threads[0].native_id) == {min(allowed)}
    finally:
        cpu_gemm.stop()
        os.sched_setaffinity(0, allowed)


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


@pytest.mark.parametrize("kind", ["int", "mixed", "big-endian", "1-D", "overlap", "read-only out", "out F order", "out strided",
                                  "negative strides", "zero strides", "size 1", "not started"])
def test_declines_what_it_does_not_take_and_leaves_out_alone(kind):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((64, 64)), rng.standard_normal((64, 64))
    out = np.full((64, 64), 7.0)
    cpu_gemm.start(1)
    if kind == "int":
        a, b, out = a.astype(np.int64), b.astype(np.int64), out.astype(np.int64)
    elif kind == "mixed":
        b = b.astype(np.float32)
    elif kind == "big-endian":
        a, b, out = a.astype(">f8"), b.astype(">f8"), out.astype(">f8")
    elif kind == "read-only out":
        out.flags.writeable = False
    elif kind == "negative strides":
        a = a[::-1]
    elif kind == "zero strides":
        b = np.broadcast_to(b[:1], b.shape)
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


def test_a_helper_that_gets_few_blocks_is_paused_then_tried_again(monkeypatch):
    """A busy machine: over a window of HELPER_WINDOW posted products the helper computed under
    HELPER_SHARE_MIN of the blocks (here: a window of products whose blocks the caller did), so
    nothing is posted to it for HELPER_PAUSE; the products then run on the calling thread alone,
    with the same bits. After the pause it gets work again, and a window in which it did its
    share pauses nothing."""
    import time

    monkeypatch.setattr(cpu_gemm, "HELPER_SHARE_MIN", 0.5)  # the default, which the fixture turned off
    monkeypatch.setattr(cpu_gemm, "HELPER_WAKE_GAP", 60 * 10**9)  # a slow test is no sleeping helper
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((32, 512)).astype(np.float32), rng.standard_normal((512, 768)).astype(np.float32)
    with_helper = product(1, a, b)
    cpu_gemm.start(1)
    try:
        assert cpu_gemm._helpers_now() == 1
        stats = cpu_gemm.stats()
        cpu_gemm._ctl[cpu_gemm.POSTS] += cpu_gemm.HELPER_WINDOW  # posted; the helper did none of their blocks
        assert cpu_gemm._helpers_now() == 0
        assert cpu_gemm.stats()["helper_pauses"] == stats["helper_pauses"] + 1
        posted = cpu_gemm.stats()["posted"]
        out = np.full_like(with_helper, np.nan)
        assert cpu_gemm.matmul(a, b, out)
        assert cpu_gemm.stats()["posted"] == posted  # computed here, none posted
        assert out.tobytes() == with_helper.tobytes()
        cpu_gemm._ctl[cpu_gemm.HELPER_PAUSE_UNTIL] = time.monotonic_ns() - 1  # the pause is over
        assert cpu_gemm._helpers_now() == 1
        cpu_gemm._ctl[cpu_gemm.POSTS] += cpu_gemm.HELPER_WINDOW
        cpu_gemm._ctl[cpu_gemm.HELPER_BLOCKS] += cpu_gemm.HELPER_WINDOW  # the helper did its share
        assert cpu_gemm._helpers_now() == 1
        assert cpu_gemm.stats()["helper_pauses"] == stats["helper_pauses"] + 1
        posted = cpu_gemm.stats()["posted"]
        assert cpu_gemm.matmul(a, b, out) and cpu_gemm.stats()["posted"] == posted + 1
    finally:
        cpu_gemm.stop()


def test_a_helper_waking_from_its_sleep_is_judged_from_its_first_block(monkeypatch):
    """After a gap of HELPER_WAKE_GAP the helper sleeps, and the products posted while it wakes are
    the caller's: they do not pause it. Its share counts again from its first block; a window of
    products without one pauses it (a busy machine, not sleep)."""
    import time

    monkeypatch.setattr(cpu_gemm, "HELPER_SHARE_MIN", 0.5)
    monkeypatch.setattr(cpu_gemm, "HELPER_WAKE_GAP", 60 * 10**9)  # only the gaps made below count
    cpu_gemm.start(1)
    ctl, window = cpu_gemm._ctl, cpu_gemm.HELPER_WINDOW
    try:
        pauses = cpu_gemm.stats()["helper_pauses"]
        cpu_gemm._last_look[0] = time.monotonic_ns() - 120 * 10**9  # two minutes without products
        assert cpu_gemm._helpers_now() == 1
        ctl[cpu_gemm.POSTS] += window - 1  # posted while it woke: the caller did them all
        assert cpu_gemm._helpers_now() == 1
        ctl[cpu_gemm.POSTS] += 1
        ctl[cpu_gemm.HELPER_BLOCKS] += 1  # awake: its first block
        assert cpu_gemm._helpers_now() == 1
        ctl[cpu_gemm.POSTS] += window
        ctl[cpu_gemm.HELPER_BLOCKS] += window  # its share of the window after
        assert cpu_gemm._helpers_now() == 1 and cpu_gemm.stats()["helper_pauses"] == pauses
        cpu_gemm._last_look[0] = time.monotonic_ns() - 120 * 10**9  # asleep again, and then no block at all
        assert cpu_gemm._helpers_now() == 1
        ctl[cpu_gemm.POSTS] += window
        assert cpu_gemm._helpers_now() == 0 and cpu_gemm.stats()["helper_pauses"] == pauses + 1
    finally:
        cpu_gemm.stop()


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
    assert sum(t.name.startswith("npyrnn-gemm-helper") for t in threading.enumerate()) == backend.split_products() - 1
    backend.set_cpu_threads(None, split=False)
    assert numpy_blas_threads() == before and backend.split_products() is None
    assert not any(t.name.startswith("npyrnn-gemm-helper") for t in threading.enumerate())
    monkeypatch.setenv(backend.SPLIT_ENV, "0")
    backend.set_cpu_threads(None)
    assert backend.split_products() is None
    backend.set_cpu_threads(None, split=True)  # asked for in so many words: on whatever the variable says
    assert backend.split_products() is not None
    backend.set_cpu_threads(None, split=False)
    monkeypatch.setenv(backend.SPLIT_ENV, "sometimes")
    with pytest.raises(BackendError, match="NPYRNN_SPLIT_PRODUCTS must be 0"):
        backend.set_cpu_threads(None)


# ------------------------------------------------------------------------------ helpers played by the test
@njit(nogil=True)
def _fake_helper(ctl, seen, stall_us, garbage):
    """The helper's part, played for a test: claim the last block of the next product, then either
    compute it as the helper does (stall_us 0) or stall, scribbling over the helper's scratch."""
    while cpu_gemm._load(ctl, cpu_gemm.SEQ) == seen:
        cpu_gemm._pause()
    seq = cpu_gemm._load(ctl, cpu_gemm.SEQ)
    nch, cs, axis, m, n, k = ctl[cpu_gemm.NCH], ctl[cpu_gemm.CS], ctl[cpu_gemm.AXIS], ctl[cpu_gemm.M], ctl[cpu_gemm.N], ctl[cpu_gemm.K]
    s, dt = ctl[cpu_gemm.S], ctl[cpu_gemm.DT]
    i = nch - 1
    if not cpu_gemm._cas(ctl, cpu_gemm.STATE + i, seq * 4 + cpu_gemm.FREE, seq * 4 + cpu_gemm.HELPER):
        return False
    if stall_us == 0:
        dst, ldd = cpu_gemm._target(axis, i, 0, 0, s, 0, m, n, 4 if dt == 0 else 8, True)
        cpu_gemm._block(dt, ctl[cpu_gemm.TA], ctl[cpu_gemm.TB], m, n, k, ctl[cpu_gemm.A], ctl[cpu_gemm.LDA],
                        ctl[cpu_gemm.B], ctl[cpu_gemm.LDB], dst, ldd, i, cs, axis, ctl[cpu_gemm.TL] != 0)
    for _ in range(stall_us // 1000):  # it has lost its core, yet writes now and then
        cpu_gemm._memcpy(s, np.int64(garbage.ctypes.data), np.int64(garbage.nbytes))
        cpu_gemm._usleep(np.uint32(1000))
    cpu_gemm._cas(ctl, cpu_gemm.STATE + i, seq * 4 + cpu_gemm.HELPER, seq * 4 + cpu_gemm.DONE)  # fails if taken back
    cpu_gemm._store(ctl, cpu_gemm.HDONE, seq)
    return True


def with_fake_helper(stall_us, garbage, run, counter):
    """`run()` while the test plays the helper, again until the fake helper has claimed a block and
    `stats()[counter]` has grown by one (the first try may find the fake helper still compiling)."""
    cpu_gemm.start(0)
    cpu_gemm._threads.append(threading.current_thread())  # the products now count one helper: the fake one
    try:
        for _ in range(200):  # a fake helper that lost its core for a moment misses the product (the caller takes it)
            before = cpu_gemm.stats()[counter]
            result = {}
            seen = int(cpu_gemm._ctl[cpu_gemm.SEQ])
            fake = threading.Thread(target=lambda: result.update(claimed=_fake_helper(cpu_gemm._ctl, seen, stall_us, garbage)))
            fake.start()
            try:
                value = run()
            finally:
                fake.join(timeout=10)
                if fake.is_alive():  # run() posted no product (it raised, say): release the fake helper
                    cpu_gemm._ctl[cpu_gemm.SEQ] += 1  # a product with no open block: it claims nothing
                    fake.join()
            if result["claimed"] and cpu_gemm.stats()[counter] == before + 1:
                return value
        pytest.fail(f"the fake helper never claimed a block with {counter} counted")
    finally:
        cpu_gemm._threads.clear()


SHAPES = {"by rows": (1120, 256, 128), "by columns": (32, 1024, 1536), "by k": (768, 1120, 256)}  # blocks of 1 ms or more


@pytest.fixture
def patient_caller():
    """The caller waits up to 10 s for the helper's block: the helper's path is tested, not a busy machine's."""
    cpu_gemm._ctl[cpu_gemm.MIN_GRACE] = 10_000_000_000
    yield
    cpu_gemm._ctl[cpu_gemm.MIN_GRACE] = 20_000


@pytest.mark.parametrize("transposed", [False, True], ids=["a, b", "a.T, b.T"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_a_block_the_helper_computes_is_copied_in_right(shape, transposed, patient_caller):
    m, k, n = shape
    rng = np.random.default_rng(7)
    a = rng.standard_normal((k, m)).T if transposed else rng.standard_normal((m, k))
    b = rng.standard_normal((n, k)).T if transposed else rng.standard_normal((k, n))
    expected = product(0, a, b)
    out = np.full((m, n), np.nan)
    with_fake_helper(0, np.zeros(1), lambda: cpu_gemm.matmul(a, b, out), "helper_blocks")
    assert np.array_equal(out, expected)  # block 0 the caller's, the last the helper's, copied in


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_a_stalled_helper_is_overtaken_and_what_it_touches_late_is_safe(shape):
    m, k, n = shape
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
    c, d = rng.standard_normal((300, 1000)).astype(np.float32), rng.standard_normal((1000, 200)).astype(np.float32)
    expected, other = product(0, a, b), product(0, c, d)
    axis, count, _ = cpu_gemm.blocks(m, n, k)
    garbage = np.full((count if axis == 2 else 1) * m * n, np.nan, dtype=np.float32)  # all the helper's scratch holds
    kept = {}

    def run():
        taken = cpu_gemm.stats()["taken_back"]
        a_, b_ = a.copy(), b.copy()
        kept["a"], kept["b"] = weakref.ref(a_), weakref.ref(b_)
        out = np.full((m, n), np.nan, dtype=np.float32)
        assert cpu_gemm.matmul(a_, b_, out)
        del a_, b_  # the caller lets go: the stalled helper may still read them
        gc.collect()
        if cpu_gemm.stats()["taken_back"] > taken:
            assert kept["a"]() is not None and kept["b"]() is not None  # kept for it
        assert np.array_equal(out, expected)  # the caller computed the stalled block itself
        again = np.full((300, 200), np.nan, dtype=np.float32)
        assert cpu_gemm.matmul(c, d, again)  # another shape, split by k, while the helper still scribbles
        assert np.array_equal(again, other)
        return True

    with_fake_helper(200_000, garbage, run, "taken_back")
    cpu_gemm.start(1)  # a real helper, and one more product: what was kept for the fake one goes
    assert cpu_gemm.matmul(c, d, np.empty((300, 200), dtype=np.float32))
    gc.collect()
    assert kept["a"]() is None and kept["b"]() is None


def test_a_forked_child_starts_with_the_products_off():
    backend.set_cpu_threads(2, split=True)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        child = pool.apply(_in_child)
    assert child == (None, None, True)
    assert backend.split_products() == 2  # the parent's are untouched


def _in_child():
    a = np.random.default_rng(0).standard_normal((200, 300))
    return backend.split_products(), cpu_gemm.helpers(), bool(np.array_equal(backend.matmul(a, a.T), a @ a.T))


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
