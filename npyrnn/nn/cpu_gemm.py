"""Matrix products split into blocks fixed by their shape and shared between the cores (the `fast` extra, Numba).

Why. NumPy's OpenBLAS splits a product between its threads, and those threads wait for each
other while they work: when another process holds one of the cores, the thread that lost its
core holds up every product, and a training run can keep a quarter of its speed or less
(docs/performance.md, "A busy machine"). One thread is steady but leaves a core idle.

What. `matmul(a, b, out)` computes `out = a @ b` as at most two blocks, each one call of NumPy's
own OpenBLAS at one thread, or, for a block of at most `TILE_M_MAX` rows with neither operand
transposed (a recurrent step's product), npyrnn's own tiles (`_tiles`, below: 1.3 to 1.7 times
OpenBLAS's speed at B = 32 here, which packs both operands again for every call):

- `blocks(m, n, k)` cuts the longest of the product's rows, columns or inner dimension (a
  32-row recurrent step by columns or by k, a weight gradient over all T*B rows by k, whose
  two partial sums are added in a fixed order). The shape alone decides, so a product gives the
  same bits whatever the number of threads and however busy the machine is.
- The calling thread and one helper thread claim blocks with an atomic compare-and-swap: the
  caller from the front, the helper from the back. The helper writes into its scratch array
  and the caller copies its block in.
- A helper that has not finished its block within the time the caller's own block took (at
  least 20 us) after the caller is done has lost its core: the caller takes the block back and
  computes it itself. So a busy machine slows a product to about one thread's speed. The late
  helper's writes land in its own scratch, which nothing reads before it finishes a newer
  block, and the arrays it may still read are kept alive until it says it is done (`_kept`).
- An idle helper spins for a few microseconds, then yields the core for 2 ms, then sleeps in
  steps of 50 us and, after 200 ms, of 1 ms.

`start(helpers)` sets NumPy's OpenBLAS to one thread and starts the helper (0: every block on
the calling thread, the same bits); `stop()` ends it and gives OpenBLAS its count back.
`backend.set_cpu_threads` calls these, and `backend.matmul`, through which the layers ask for
their products, hands the products here while they are on. A forked child starts with them
off.

The threads share one int64 array (`_ctl`); the helper runs compiled code that never takes the
GIL. Needs Numba, NumPy's OpenBLAS with its 64-bit-integer interface (NumPy's wheels), and a C
library with `sched_yield`, `usleep`, `clock_gettime` and `memcpy`.
"""

import atexit
import ctypes
import functools
import os
import platform
import threading
import time

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

def _source_digest(path):
    """sha256 of a module's source as it was imported (`cpu_loops` keys its disk cache to it), or None."""
    import hashlib

    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


SOURCE_DIGEST = _source_digest(__file__)

__all__ = ["start", "stop", "matmul", "run_loop", "loop_product", "one_blas_thread", "blocks", "helpers", "stats",
           "why_unavailable"]

BLOCK_MIN = 128  # rows, columns or k: a thinner block costs more than a second core gains
BLOCK_ALIGN = 16  # block edges on multiples of 16 (64 bytes of float32)
MAX_BLOCKS = 2  # and so one helper: more blocks cost more per product on 2 cores, and `_scratch` relies on one
MIN_FLOPS = 2 * 32 * 64 * 64  # below this a product runs as numpy.matmul
SPLIT_FLOPS = 2 * 32 * 128 * 256  # below this a product is one block: halves of it cost more than they gain
# A one-row product (generation at batch 1: h W^T) reads all of W for 2 flops an element. With W
# of 192K items or more (768 KB of float32, most of a core's 1 MB L2 here: the GRU's (768, 256),
# the LSTM's (1024, 256), the scratch RNN's (512, 512)) its reads, not its flops, are the cost;
# cut by columns it leaves each core its half of W's rows in its own L2, step after step.
# Measured in the compiled greedy loop (`cpu_greedy`), us a character: the GRU 13.1 -> 11.3, the
# LSTM 18.7 -> 14.3; the stepper's Python loop neither gains nor loses (18.8, 18.6; 25.5, 24.9).
# d2l's scratch GRU's (512, 256) and (256, 256) gain nothing compiled and lose 10% in Python
MATVEC_SPLIT_ITEMS = 192 * 1024
MATVEC_SPLIT_K = 256
_JIT = dict(nogil=True, cache=True)

# the shared control block: one int64 array, these indices
(SEQ, STOP, NCH, CS, AXIS, M, N, K, A, LDA, TA, B, LDB, TB, S, DT, POSTS, HELPER_BLOCKS, TAKEOVERS, HDONE, DECLINED,
 READY, MIN_GRACE) = range(23)
STATE = 24  # STATE + i: block i's state, seq * 4 + FREE, HELPER, DONE or CALLER
FREE, HELPER, DONE, CALLER = 0, 1, 2, 3
# a compiled loop shared with the helper (`run_loop(..., halves=True)`): the loop's number, the
# last loop the caller finished and the helper left, the rows half of a step's kernel ((loop << 24
# | t << 2 | FREE, HELPER, DONE or CALLER), halves the helper did, a loop whose helper part failed,
# a stall in ns the helper makes after it claims a half (tests), halves the caller waited for
# past HALF_LATE, and the time until which no half is offered; then the time until which nothing
# is posted to the helper (`_helpers_now`), and the times that was decided
(LOOP_SEQ, LOOP_DONE, LOOP_EXIT, HALF, HALVES, LOOP_FAILED, HALF_STALL, HALVES_LATE,
 HALF_PAUSE_UNTIL, HELPER_PAUSE_UNTIL, HELPER_PAUSES) = range(STATE + MAX_BLOCKS, STATE + MAX_BLOCKS + 11)
# the tiles (below): NO_TILES 1 turns them off for the products posted after (benchmarks flip it
# product by product; 0, the zeros a control block starts with, leaves them on where `TILES`);
# TL: whether the product now posted uses them, for the helper's blocks of it
NO_TILES, TL = HELPER_PAUSES + 1, HELPER_PAUSES + 2
CTL_SIZE = TL + 1
HALF_LATE = 200_000  # ns: a half takes 5-30 us; a wait this long means the helper lost its core inside it
HALF_PAUSE = 500_000_000  # ns without halves after such a wait: the helper keeps to the products, which it cannot hold up
# A busy machine: a helper that got under HELPER_SHARE_MIN of the blocks posted to it over the
# last HELPER_WINDOW products (it did 99.7% of them on a quiet machine, 26% with one busy process
# competing for the 2 cores) gets none for HELPER_PAUSE: the calling thread computes every block
# and the helper sleeps, rather than three threads sharing two cores
HELPER_WINDOW = 64  # products posted: about one minibatch of d2l's job (35 step products each way, then 3 or 4)
HELPER_SHARE_MIN = 0.5
HELPER_PAUSE = 1_000_000_000  # ns
# A helper idle for 2 ms sleeps (in 50 us steps, after 200 ms in 1 ms steps: `_helper`), and the
# products posted while it wakes are the caller's: after 0.5 s idle, 24-45 of 64 products of 25
# us were, on a quiet machine, and it was paused. After a gap of HELPER_WAKE_GAP between two
# calls of `_helpers_now`, its share is looked at again only from its first block on (or once
# HELPER_WINDOW products went by without one, which pauses it)
HELPER_WAKE_GAP = 2_000_000  # ns
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112


# ------------------------------------------------------------------------------ atomics
def _slot(context, builder, sig, args):
    ary = context.make_array(sig.args[0])(context, builder, args[0])
    return cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])


@intrinsic
def _load(typingctx, arr, idx):
    """ctl[idx], read atomically."""

    def codegen(context, builder, sig, args):
        return builder.load_atomic(_slot(context, builder, sig, args), "seq_cst", 8)

    return types.int64(arr, idx), codegen


@intrinsic
def _store(typingctx, arr, idx, val):
    """ctl[idx] = val, written atomically after every earlier write."""

    def codegen(context, builder, sig, args):
        builder.store_atomic(args[2], _slot(context, builder, sig, args), "seq_cst", 8)
        return context.get_dummy_value()

    return types.void(arr, idx, val), codegen


@intrinsic
def _cas(typingctx, arr, idx, old, new):
    """If ctl[idx] == old, set it to new; whether it did (atomic compare-and-swap)."""

    def codegen(context, builder, sig, args):
        pair = builder.cmpxchg(_slot(context, builder, sig, args), args[2], args[3], "seq_cst", "seq_cst")
        return builder.extract_value(pair, 1)

    return types.boolean(arr, idx, old, new), codegen


@intrinsic
def _pause(typingctx):
    """The CPU's spin-wait hint (x86 `pause`; nothing elsewhere)."""

    def codegen(context, builder, sig, args):
        if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


# ------------------------------------------------------------------------------ tiles
# A recurrent step's product has few rows (the batch, 32 in d2l's job) and a weight of up to a
# few MB. OpenBLAS packs both operands into its own layout for every call, which pays when a
# product is large and costs most of the time when it is not: at B = 32, H = 256 its (32, 256)
# by (256, 1024) product ran at 94-132 GFLOP/s on one core here, against 231 for a large one.
# A tile computes `TILE_ROWS` rows by `TILE_VECTORS` vectors of columns of the product straight
# from the operands' rows: each of its accumulators is a register, each step over k loads the
# vectors of b's row once and multiplies them by one element of each of a's rows (a fused
# multiply-add: each element of the product is a's row times b's column, added in the order
# of k, rounded once a term). Measured: 69-73 us for that product, 230-241 GFLOP/s
# (docs/performance.md). Written in LLVM's vector types, so the compiler allocates the registers;
# on for x86-64 with AVX-512 (32 vector registers: 16 accumulators, the vectors of b, the
# broadcasts), where it was measured; elsewhere every block is OpenBLAS's.
TILE_ROWS = 8
TILE_VECTORS = 2
# more rows than this: OpenBLAS's packing pays back (at 2 threads, a (128, 256) by (256, 1024)
# product took 214-216 us tiled and 204-217 us by OpenBLAS, a (96, ...) one 151 and 169, a (64, ...)
# one 98 and 110); a weight gradient's product over all T*B rows has ta TRANS anyway
TILE_M_MAX = 96


def _target_has_avx512():
    """Whether the code Numba compiles here has AVX-512: the host's features, or those named by
    NUMBA_CPU_NAME / NUMBA_CPU_FEATURES where they are set (a cache built for `generic` CPUs, say,
    whose tile would call `fmaf` for each element: 100 times slower than OpenBLAS)."""
    try:
        import llvmlite.binding as llvm
        from numba.core import config

        if platform.machine().lower() not in ("x86_64", "amd64"):
            return False
        if config.CPU_NAME is not None:  # a CPU named for Numba: only features named with it count
            return "+avx512f" in (config.CPU_FEATURES or "").split(",")
        return "+avx512f" in llvm.get_host_cpu_features().flatten().split(",")
    except (ImportError, RuntimeError, AttributeError):  # no way to tell: OpenBLAS, as before
        return False


TILES = _target_has_avx512()
_LANES = {0: 16, 1: 8}  # dt -> elements of a 64-byte vector: float32, float64
TILE_COLS_F32, TILE_COLS_F64 = 16 * TILE_VECTORS, 8 * TILE_VECTORS


def _tile_intrinsic(dt):
    """An intrinsic `tile(a, lda, b, ldb, c, ldc, k, rows)`: c[:rows, :cols] = a[:rows, :k] b[:k, :cols]
    for 1 <= rows <= TILE_ROWS (addresses; leading dimensions in elements). A tile of fewer rows
    computes TILE_ROWS all the same, its missing rows reading a's last row again, and stores its
    own: one body for every row count, whose rows need no branch in the loop over k."""
    lanes = _LANES[dt]

    def codegen(context, builder, sig, args):
        a, lda, b, ldb, c, ldc, k, rows = args
        fty = ir.FloatType() if dt == 0 else ir.DoubleType()
        vty = ir.VectorType(fty, lanes)
        i64, i32 = ir.IntType(64), ir.IntType(32)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty, vty, vty]),
                                             f"llvm.fma.v{lanes}f{32 if dt == 0 else 64}")
        zero = ir.Constant(vty, [0.0] * lanes)
        acc = [[cgutils.alloca_once_value(builder, zero) for _ in range(TILE_VECTORS)] for _ in range(TILE_ROWS)]
        pa, pb, pc = (builder.inttoptr(x, fty.as_pointer()) for x in (a, b, c))
        undef, splat = ir.Constant(vty, ir.Undefined), ir.Constant(ir.VectorType(i32, lanes), [0] * lanes)
        item = 4 if dt == 0 else 8
        last = builder.sub(rows, ir.Constant(i64, 1))
        a_rows = []  # row r of a, or its last row for r >= rows
        for r in range(TILE_ROWS):
            ri = ir.Constant(i64, r)
            ri = builder.select(builder.icmp_signed("<", ri, rows), ri, last)
            a_rows.append(builder.gep(pa, [builder.mul(lda, ri)]))

        def vector(row, q):
            return builder.bitcast(builder.gep(row, [ir.Constant(i64, q * lanes)]), vty.as_pointer())

        with cgutils.for_range(builder, k) as loop:  # the sum over k, in its order
            kk = loop.index
            b_row = builder.gep(pb, [builder.mul(kk, ldb)])
            bv = [builder.load(vector(b_row, q), align=item) for q in range(TILE_VECTORS)]
            for r in range(TILE_ROWS):
                x = builder.load(builder.gep(a_rows[r], [kk]))
                xv = builder.shuffle_vector(builder.insert_element(undef, x, ir.Constant(i32, 0)), undef, splat)
                for q in range(TILE_VECTORS):
                    builder.store(builder.call(fma, [xv, bv[q], builder.load(acc[r][q])]), acc[r][q])
        for r in range(TILE_ROWS):
            with builder.if_then(builder.icmp_signed("<", ir.Constant(i64, r), rows)):
                c_row = builder.gep(pc, [builder.mul(ldc, ir.Constant(i64, r))])
                for q in range(TILE_VECTORS):
                    builder.store(builder.load(acc[r][q]), vector(c_row, q), align=item)
        return context.get_dummy_value()

    def tile(typingctx, a, lda, b, ldb, c, ldc, k, rows):
        return types.void(*([types.int64] * 8)), codegen

    tile.__name__ = f"_tile_{'f32' if dt == 0 else 'f64'}"
    return intrinsic(tile)


_tile_f32, _tile_f64 = _tile_intrinsic(0), _tile_intrinsic(1)


# ------------------------------------------------------------------------------ C functions
# The compiled code calls these by fixed names that `_register` binds, in every process, to the
# functions found here: NumPy's own OpenBLAS (its 64-bit-integer interface, as NumPy's wheels
# ship it) and the C library. Fixed names let Numba cache the compiled code on disk.
I32, I64, F32, F64 = types.int32, types.int64, types.float32, types.float64
_SIGNATURES = {  # pointers are passed as int64 addresses
    "sgemm": types.void(I32, I32, I32, I64, I64, I64, F32, I64, I64, I64, I64, F32, I64, I64),
    "dgemm": types.void(I32, I32, I32, I64, I64, I64, F64, I64, I64, I64, I64, F64, I64, I64),
    "sgemv": types.void(I32, I32, I64, I64, F32, I64, I64, I64, I64, F32, I64, I64),
    "dgemv": types.void(I32, I32, I64, I64, F64, I64, I64, I64, I64, F64, I64, I64),
    "openblas_get_num_threads": types.int32(),
    "sched_yield": types.int32(),
    "usleep": types.int32(types.uint32),
    "clock_gettime": types.int32(I32, I64),
    "memcpy": types.int64(I64, I64, I64),
}


def _register():
    """Bind `npyrnn_gemm_<name>` to each C function; return NumPy's OpenBLAS (ctypes) for its thread count."""
    import llvmlite.binding as llvm

    from npyrnn import backend

    blas = backend.numpy_blas()
    if blas is None or blas.get("internal_api") != "openblas" or blas.get("filepath") is None:
        raise OSError("NumPy's BLAS is not OpenBLAS (or threadpoolctl is missing)")
    lib = ctypes.CDLL(blas["filepath"])
    prefix = next((p for p in ("scipy_", "") if hasattr(lib, f"{p}cblas_sgemm64_")), None)
    if prefix is None:
        raise OSError("NumPy's OpenBLAS has no 64-bit-integer cblas_sgemm")
    libc = ctypes.CDLL(None)
    for name in _SIGNATURES:
        if name in ("sched_yield", "usleep", "clock_gettime", "memcpy"):
            fn = getattr(libc, name)
        elif name.startswith("openblas"):
            fn = getattr(lib, f"{prefix}{name}64_")
        else:
            fn = getattr(lib, f"{prefix}cblas_{name}64_")
        llvm.add_symbol(f"npyrnn_gemm_{name}", ctypes.cast(fn, ctypes.c_void_p).value)
    return lib, prefix


try:
    _lib, _prefix = _register()
    _why = None
except (OSError, AttributeError, ImportError, TypeError) as exc:  # (TypeError: CDLL(None) on Windows)
    _why = f"unavailable ({exc})"
_sgemm, _dgemm, _sgemv, _dgemv, _get_threads, _yield, _usleep, _clock_gettime, _memcpy = (
    types.ExternalFunction(f"npyrnn_gemm_{name}", sig) for name, sig in _SIGNATURES.items()
)


def _set_blas_threads(n):
    getattr(_lib, f"{_prefix}openblas_set_num_threads64_")(ctypes.c_int(int(n)))


def _blas_thread_count():
    fn = getattr(_lib, f"{_prefix}openblas_get_num_threads64_")
    fn.restype = ctypes.c_int
    return fn()


CLOCK_MONOTONIC = 1


# ------------------------------------------------------------------------------ compiled
# Compiled at the first call, then cached on disk (never called where _why says unavailable).

@njit(**_JIT)
def _now(ts):
    """Nanoseconds of the monotonic clock; ts: the calling thread's int64 (2,) array, a struct timespec."""
    _clock_gettime(np.int32(CLOCK_MONOTONIC), np.int64(ts.ctypes.data))
    return ts[0] * 1_000_000_000 + ts[1]

@njit(**_JIT)
def _tiles(dt, m, n, k, a, lda, b, ldb, d, ldd):
    """d = a b for row-major a (m, k), b (k, n), d (m, n) (addresses, leading dimensions in elements):
    tiles of TILE_ROWS rows (the last one fewer) by TILE_COLS_F32 (float32) or TILE_COLS_F64 columns, a
    column of tiles at a time (its part of b stays in cache for all rows); the columns past the last
    whole tile one gemm."""
    item = 4 if dt == 0 else 8
    cols = TILE_COLS_F32 if dt == 0 else TILE_COLS_F64
    n_tiles = n - n % cols
    for j in range(0, n_tiles, cols):
        for i in range(0, m, TILE_ROWS):
            a0, b0, d0, rows = a + item * i * lda, b + item * j, d + item * (i * ldd + j), np.int64(min(TILE_ROWS, m - i))
            if dt == 0:
                _tile_f32(a0, lda, b0, ldb, d0, ldd, k, rows)
            else:
                _tile_f64(a0, lda, b0, ldb, d0, ldd, k, rows)
    if n_tiles < n and k == 0:  # an empty sum: zeros (OpenBLAS left a (1, 0) by (0, 1) product unwritten here)
        zeros = np.zeros(item * (n - n_tiles), dtype=np.uint8)
        for i in range(m):
            _memcpy(d + item * (i * ldd + n_tiles), np.int64(zeros.ctypes.data), np.int64(zeros.size))
    elif n_tiles < n:
        a0, b0, d0 = a, b + item * n_tiles, d + item * n_tiles
        if dt == 0:
            _sgemm(np.int32(ROW_MAJOR), np.int32(NO_TRANS), np.int32(NO_TRANS), m, n - n_tiles, k, np.float32(1.0),
                   a0, lda, b0, ldb, np.float32(0.0), d0, ldd)
        else:
            _dgemm(np.int32(ROW_MAJOR), np.int32(NO_TRANS), np.int32(NO_TRANS), m, n - n_tiles, k, 1.0,
                   a0, lda, b0, ldb, 0.0, d0, ldd)


@njit(**_JIT)
def _block(dt, ta, tb, m, n, k, a, lda, b, ldb, dst, ldd, i, cs, axis, tiles):
    """Block i of op(a) op(b), one single-threaded gemm into dst (leading dimension ldd).

    axis 0: rows [i cs, (i + 1) cs) of the product, at their place in dst; axis 1: its
    columns; axis 2: the whole (m, n) product over k in [i cs, (i + 1) cs) only, at dst's
    start (a partial sum). The last block is cut at m, n or k. tiles: a block of at most
    TILE_M_MAX rows with neither operand transposed is `_tiles`' rather than OpenBLAS's.
    """
    item = 4 if dt == 0 else 8
    a0, b0, d0 = a, b, dst
    if m == 1 and axis == 1:  # one row: columns [n0, n0 + n) of a op(b) as a matrix-vector product
        n0 = i * cs
        n = min(n - n0, cs)
        inc = np.int64(1) if ta == NO_TRANS else lda  # a's k elements
        if tb == TRANS:  # op(b) = W^T: the rows [n0, n0 + n) of W (ldb apart) times a
            b0 = b + item * n0 * ldb
            tv, rows, cols = NO_TRANS, n, k
        else:  # op(b) = b (k, n): its columns [n0, n0 + n), transposed, times a
            b0 = b + item * n0
            tv, rows, cols = TRANS, k, n
        d0 = dst + item * n0
        if dt == 0:
            _sgemv(np.int32(ROW_MAJOR), np.int32(tv), rows, cols, np.float32(1.0), b0, ldb, a, inc, np.float32(0.0), d0, np.int64(1))
        else:
            _dgemv(np.int32(ROW_MAJOR), np.int32(tv), rows, cols, 1.0, b0, ldb, a, inc, 0.0, d0, np.int64(1))
        return
    if axis == 0:
        r0 = i * cs
        a0 = a + item * (r0 * lda if ta == NO_TRANS else r0)  # row r0 of op(a)
        d0 = dst + item * r0 * ldd
        m = min(m - r0, cs)
    elif axis == 1:
        n0 = i * cs
        b0 = b + item * (n0 * ldb if tb == TRANS else n0)  # column n0 of op(b)
        d0 = dst + item * n0
        n = min(n - n0, cs)
    else:
        k0 = i * cs
        a0 = a + item * (k0 if ta == NO_TRANS else k0 * lda)  # column k0 of op(a)
        b0 = b + item * (k0 * ldb if tb == NO_TRANS else k0)  # row k0 of op(b)
        k = min(k - k0, cs)
    if tiles and ta == NO_TRANS and tb == NO_TRANS and m <= TILE_M_MAX:
        _tiles(dt, m, n, k, a0, lda, b0, ldb, d0, ldd)
    elif dt == 0:
        _sgemm(np.int32(ROW_MAJOR), np.int32(ta), np.int32(tb), m, n, k, np.float32(1.0), a0, lda, b0, ldb, np.float32(0.0), d0, ldd)
    else:
        _dgemm(np.int32(ROW_MAJOR), np.int32(ta), np.int32(tb), m, n, k, 1.0, a0, lda, b0, ldb, 0.0, d0, ldd)

@njit(**_JIT)
def _target(axis, i, c, ldc, hs, ps, m, n, item, helper):
    """Where block i goes, and its leading dimension.

    The caller's blocks go into c, the helper's into its scratch hs at the same place (rows of
    n). A partial sum over k (axis 2) goes into (m, n) region i of hs when the helper computes
    it, of ps (the caller's partial sums, which no helper writes) when the caller does, block
    0's into c. So memory the caller reads or writes is never memory a helper that lost its
    core may still be writing.
    """
    if helper:
        return (hs + item * i * m * n if axis == 2 else hs), n
    if axis == 2 and i > 0:
        return ps + item * i * m * n, n
    return c, ldc


@njit(**_JIT)
def _copy_block(dt, m, n, s, c, ldc, i, cs, axis):
    """A helper's block i from the scratch into c, row by row (axis 2: block 0's partial sum)."""
    item = 4 if dt == 0 else 8
    r0, r1, n0, width = 0, m, 0, n
    if axis == 0:
        r0, r1 = i * cs, min(m, (i + 1) * cs)
    elif axis == 1:
        n0, width = i * cs, min(n - i * cs, cs)
    for r in range(r0, r1):
        _memcpy(c + item * (r * ldc + n0), s + item * (r * n + n0), np.int64(item * width))

@njit(**_JIT)
def _product(ctl, ts, a_arr, b_arr, c_arr, hs_arr, ps_arr, ta, lda, tb, ldb, ldc, nch, cs, axis, helpers):
    """c = op(a) op(b) in nch blocks, shared with the helper.

    Returns 0 (nothing done) if OpenBLAS is not at one thread, else what `_blocks_of` returns.
    """
    if _get_threads() != 1:
        return 0
    return _blocks_of(ctl, ts, a_arr, b_arr, c_arr, hs_arr, ps_arr, ta, lda, tb, ldb, ldc, nch, cs, axis, helpers)


@njit(**_JIT)
def _blocks_of(ctl, ts, a_arr, b_arr, c_arr, hs_arr, ps_arr, ta, lda, tb, ldb, ldc, nch, cs, axis, helpers):
    """`_product` past its check of OpenBLAS's thread count (a compiled loop checks once, first).

    Returns 1 when done, 2 when done and a block was taken back from the helper (which may
    still be reading a and b). For axis 2, c holds block 0's partial sum on return and
    `_target`'s regions the others, for the caller to add in order.
    """
    m, k, n = c_arr.shape[0], a_arr.shape[1], c_arr.shape[1]
    a, b, c = np.int64(a_arr.ctypes.data), np.int64(b_arr.ctypes.data), np.int64(c_arr.ctypes.data)
    hs, ps = np.int64(hs_arr.ctypes.data), np.int64(ps_arr.ctypes.data)
    item = a_arr.itemsize
    dt = 0 if item == 4 else 1
    tiles = TILES and ctl[NO_TILES] == 0
    if helpers == 0 or nch == 1:
        for i in range(nch):
            dst, ldd = _target(axis, i, c, ldc, hs, ps, m, n, item, False)
            _block(dt, ta, tb, m, n, k, a, lda, b, ldb, dst, ldd, i, cs, axis, tiles)
        return 1
    seq = ctl[SEQ] + 1
    ctl[NCH] = nch
    ctl[CS] = cs
    ctl[AXIS] = axis
    ctl[M] = m
    ctl[N] = n
    ctl[K] = k
    ctl[A] = a
    ctl[LDA] = lda
    ctl[TA] = ta
    ctl[B] = b
    ctl[LDB] = ldb
    ctl[TB] = tb
    ctl[S] = hs
    ctl[DT] = dt
    ctl[TL] = tiles
    for i in range(nch):
        _store(ctl, STATE + i, seq * 4 + FREE)
    _store(ctl, SEQ, seq)  # the helper may start: every field above is written
    ctl[POSTS] += 1
    start = _now(ts)
    mine = 0
    for i in range(nch):  # the caller's blocks, from the front
        if _cas(ctl, STATE + i, seq * 4 + FREE, seq * 4 + CALLER):
            dst, ldd = _target(axis, i, c, ldc, hs, ps, m, n, item, False)
            _block(dt, ta, tb, m, n, k, a, lda, b, ldb, dst, ldd, i, cs, axis, tiles)
            mine += 1
    grace = max((_now(ts) - start) // max(mine, 1), ctl[MIN_GRACE])  # as long as one block took here, at least 20 us
    result = 1
    for i in range(nch):  # the helper's blocks: copy in, or take back if it lost its core
        if _load(ctl, STATE + i) == seq * 4 + CALLER:
            continue
        deadline = _now(ts) + grace
        spins = 0
        while _load(ctl, STATE + i) == seq * 4 + HELPER:
            _pause()
            spins += 1
            if spins % 64 == 0 and _now(ts) > deadline:
                break
        if _cas(ctl, STATE + i, seq * 4 + HELPER, seq * 4 + CALLER):  # taken back
            dst, ldd = _target(axis, i, c, ldc, hs, ps, m, n, item, False)
            _block(dt, ta, tb, m, n, k, a, lda, b, ldb, dst, ldd, i, cs, axis, tiles)
            ctl[TAKEOVERS] += 1
            result = 2
        else:  # DONE, in the helper's scratch
            if axis != 2 or i == 0:
                _copy_block(dt, m, n, hs, c, ldc, i, cs, axis)
            ctl[HELPER_BLOCKS] += 1
    return result

@njit(**_JIT)
def _serve(ctl, seq):
    """The helper's part of product seq: claim blocks from the back, compute them into the scratch."""
    if seq <= 0:  # no product yet: the state words' initial zeros would read as seq 0's open blocks
        return
    # the fields belong to seq if a claim below succeeds: seq's blocks are open until then
    nch, cs, axis, m, n, k = ctl[NCH], ctl[CS], ctl[AXIS], ctl[M], ctl[N], ctl[K]
    a, lda, ta, b, ldb, tb = ctl[A], ctl[LDA], ctl[TA], ctl[B], ctl[LDB], ctl[TB]
    s, dt, tiles = ctl[S], ctl[DT], ctl[TL] != 0
    for i in range(nch - 1, -1, -1):
        if _cas(ctl, STATE + i, seq * 4 + FREE, seq * 4 + HELPER):
            dst, ldd = _target(axis, i, 0, 0, s, 0, m, n, 4 if dt == 0 else 8, True)
            _block(dt, ta, tb, m, n, k, a, lda, b, ldb, dst, ldd, i, cs, axis, tiles)
            _cas(ctl, STATE + i, seq * 4 + HELPER, seq * 4 + DONE)  # fails if the caller took it back
    _store(ctl, HDONE, seq)  # done with seq's memory: what the caller kept alive for it may go


@njit(**_JIT)
def _helper(ctl, ts):
    """A helper thread's life: wait for a product, claim blocks from the back, compute them into the scratch.

    Returns 0 when told to stop, 1 when a compiled loop wants the helper's part (`_helper_main`
    runs it and comes back).
    """
    seen = _load(ctl, SEQ) - 1  # back from a loop's part: the product posted meanwhile may still be open
    _store(ctl, READY, 1)
    idle_since = _now(ts)
    spins = 0
    while _load(ctl, STOP) == 0:
        if _load(ctl, LOOP_SEQ) > _load(ctl, LOOP_EXIT):
            return 1
        seq = _load(ctl, SEQ)
        if seq == seen:  # nothing new: spin, then yield, then sleep, the longer the idler
            spins += 1
            if spins < 2000:
                _pause()
                continue
            now = _now(ts)
            idle = now - idle_since
            if now < _load(ctl, HELPER_PAUSE_UNTIL):  # paused for a busy machine: nothing comes for a while
                _usleep(np.uint32(1000))
            elif idle < 2_000_000:  # 2 ms
                _yield()
            elif idle < 200_000_000:  # 200 ms
                _usleep(np.uint32(50))
            else:
                _usleep(np.uint32(1000))
            continue
        seen = seq
        _serve(ctl, seq)
        spins = 0
        idle_since = _now(ts)
    return 0


def _helper_main(ctl, ts):
    """The helper thread: products in `_helper`; a compiled loop's helper part when one is posted (`run_loop`)."""
    while _helper(ctl, ts):
        job = _loop_job
        seq = job[0]
        if seq > ctl[LOOP_EXIT]:
            try:
                job[1](*job[2])  # the loop's helper part, until the caller finishes the loop (LOOP_DONE)
            except BaseException:  # a bug: the caller waiting in `take_half` raises instead of spinning
                ctl[LOOP_FAILED] = seq
                raise
            finally:
                ctl[LOOP_EXIT] = seq


@njit(**_JIT)
def helper_next_half(ctl, ts, lseq, seen):
    """The helper's part of compiled loop lseq: serve the products the caller posts, until it can
    claim the second half of a kernel call's rows (returns the call's number i, `offer_half`) or
    the caller has finished the loop (returns -1). seen: int64 (1,), the last product served."""
    stall = ctl[HALF_STALL]
    while _load(ctl, LOOP_DONE) < lseq and _load(ctl, STOP) == 0:
        seq = _load(ctl, SEQ)
        if seq != seen[0]:
            seen[0] = seq
            _serve(ctl, seq)
            continue
        half = _load(ctl, HALF)
        if half >> 24 == lseq and half & 3 == FREE and _cas(ctl, HALF, half, half + HELPER):
            if stall:  # tests: a helper that loses its core inside a half
                until = _now(ts) + stall
                while _now(ts) < until:
                    _pause()
            return (half >> 2) & 0x3FFFFF
        _pause()
    return -1


@njit(**_JIT)
def offer_half(ctl, ts, lseq, i, rows):
    """Offer the second half of kernel call i's rows to the helper, whose inputs are complete; return
    where the caller's first half ends: all rows without a helper (lseq 0) and for HALF_PAUSE after
    the caller waited for a half past HALF_LATE (a busy machine: see `take_half`)."""
    if lseq == 0 or (ctl[HALF_PAUSE_UNTIL] and _now(ts) < ctl[HALF_PAUSE_UNTIL]):
        return rows
    _store(ctl, HALF, (lseq << 24) | (i << 2) | FREE)
    return rows // 2


@njit(**_JIT)
def take_half(ctl, ts, lseq, i):
    """Whether the caller got call i's second half (the helper had not claimed it); else wait for the
    helper to finish it. A half once claimed is never taken back: it writes in place, over its
    inputs. So a helper that loses its core inside a half holds the caller up until it runs
    again; after such a wait (HALF_LATE) no half is offered for HALF_PAUSE."""
    half = (lseq << 24) | (i << 2)
    if _cas(ctl, HALF, half + FREE, half + CALLER):
        return True
    start = _now(ts)
    spins = 0
    while _load(ctl, HALF) != half + DONE:
        if _load(ctl, LOOP_FAILED) == lseq:
            raise RuntimeError("npyrnn's split products: the helper thread failed inside a compiled loop")
        _pause()
        spins += 1
    if spins > 64:
        now = _now(ts)
        if now - start > HALF_LATE:
            ctl[HALVES_LATE] += 1
            ctl[HALF_PAUSE_UNTIL] = now + HALF_PAUSE
    return False


@njit(**_JIT)
def half_done(ctl, lseq, i):
    """The helper finished call i's second half."""
    ctl[HALVES] += 1
    _store(ctl, HALF, (lseq << 24) | (i << 2) | DONE)


@njit(**_JIT)
def _finish_loop(ctl, lseq):
    """The caller is done with loop lseq (or raised inside it): close a half still offered (the caller
    raised between `offer_half` and `take_half`), wait out one the helper is still in, then say so."""
    half = _load(ctl, HALF)
    if half >> 24 == lseq and half & 3 == FREE:
        _cas(ctl, HALF, half, half - FREE + CALLER)
        half = _load(ctl, HALF)
    while half >> 24 == lseq and half & 3 == HELPER and _load(ctl, LOOP_FAILED) != lseq:
        _pause()
        half = _load(ctl, HALF)
    _store(ctl, LOOP_DONE, lseq)


@njit(**_JIT)
def one_blas_thread():
    """Whether NumPy's OpenBLAS is at one thread, as every block needs (`run_loop` checks before a loop starts)."""
    return _get_threads() == 1


@njit(**_JIT)
def loop_product(ctl, ts, a, b, c, hs, ps, tb, plan, helpers):
    """`matmul` inside a compiled time loop (`npyrnn.nn.cpu_loops`): c = a op(b), the same blocks, the same bits.

    a (m, k) and c (m, n) with contiguous rows; b is (k, n) with tb NO_TRANS, or (n, k) with
    tb TRANS (a weight used as W^T), rows contiguous either way; plan: int64 (3,), `blocks(m,
    n, k)`. Partial sums over k are added in order, as `matmul` adds them. Returns 2 when a
    block was taken back from the helper (which may still read a and b: `run_loop` keeps them),
    else 1. The loop holds `_lock`, and `run_loop` checked `one_blas_thread` before it began
    (should another thread change OpenBLAS's count meanwhile, each block still computes the
    right product, with OpenBLAS's threads inside it).
    """
    item = a.itemsize
    axis, nch, cs = plan[0], plan[1], plan[2]
    done = _blocks_of(ctl, ts, a, b, c, hs, ps, NO_TRANS, a.strides[0] // item, tb, b.strides[0] // item,
                      c.strides[0] // item, nch, cs, axis, helpers)
    if axis == 2:  # the partial sums over k, added in order, from where `_target` put them
        m, n = c.shape
        seq = _load(ctl, SEQ)
        for i in range(1, nch):
            by_helper = helpers > 0 and _load(ctl, STATE + i) == seq * 4 + DONE
            region = (hs if by_helper else ps)[i * m * n : (i + 1) * m * n]
            for r in range(m):
                for j in range(n):
                    c[r, j] += region[r * n + j]
    return done


# ------------------------------------------------------------------------------ Python side
_ctl = np.zeros(CTL_SIZE, dtype=np.int64)
_ctl[MIN_GRACE] = 20_000  # ns
_NO_SCRATCH = {"f": np.zeros(1, dtype=np.float32), "d": np.zeros(1, dtype=np.float64)}
_clock = np.zeros(2, dtype=np.int64)  # the calling thread's struct timespec (products run one at a time)
_threads = []  # the running helper (at most one)
_helper_clock = np.zeros(2, dtype=np.int64)  # the helper thread's struct timespec
_loop_job = (0, None, ())  # (loop number, compiled loop, its arguments for the helper's part): `run_loop`
_lock = threading.Lock()  # one product at a time shares the control block
_helper_scratch = {}  # dtype char -> 1-D array the helper writes its blocks into
_partials = {}  # dtype char -> 1-D array of the caller's partial sums over k (no helper writes it)
_kept = []  # (seq, arrays): memory a helper that lost its core may still touch, kept until it is done with seq
_blas_threads = None  # NumPy's OpenBLAS thread count before start(), restored by stop()
_window = [0, 0]  # posts and helper blocks when `_helpers_now` last looked at the helper's share
_waking = [-1, 0]  # posts and helper blocks when the helper was last found asleep (-1: awake)
_last_look = [0]  # when `_helpers_now` last let products go to the helper (ns)
_started = False
_helper_cpus = None  # the cores the helper may run on (`_keep_apart`), or None where it was left as it was
try:
    _sched_getcpu = ctypes.CDLL(None).sched_getcpu  # glibc and musl; -1 on failure
    _sched_getcpu.restype = ctypes.c_int
except (OSError, AttributeError, TypeError):
    _sched_getcpu = None


def tiles_on():
    """Whether the products posted from now on compute their blocks of few rows in the tiles:
    `TILES` (this machine), and not turned off (`_ctl[NO_TILES]`)."""
    return bool(TILES) and int(_ctl[NO_TILES]) == 0


def why_unavailable():
    """None when the split products can run here; else why not, in words."""
    return _why


def _live_helpers():
    """The helper threads alive: a helper ended by a bug in a loop's part (its traceback printed)
    gets no more blocks or halves, so the products run on the calling thread alone."""
    return sum(thread.is_alive() for thread in _threads)


def _drop_kept():
    """Let go of the memory kept alive for a helper that lost its core, once it is done with it."""
    if _kept:
        done = int(_ctl[HDONE])
        _kept[:] = [entry for entry in _kept if entry[0] > done]


def _helpers_now():
    """The helpers the next product or loop may post to: `_live_helpers()`, or 0 while the helper is
    paused. Every HELPER_WINDOW products posted, the share of their blocks the helper computed is
    looked at; under HELPER_SHARE_MIN (the helper mostly did not get a core in time: another
    process wants it), nothing is posted for HELPER_PAUSE, so the calling thread runs at one
    thread's speed on a core of its own instead of sharing two cores three ways. The blocks are
    the same whoever computes them, so the bits do not change."""
    live = _live_helpers()
    if not live:
        return 0
    now = time.monotonic_ns()  # CLOCK_MONOTONIC, as the compiled code's `_now`
    if now < _ctl[HELPER_PAUSE_UNTIL]:
        return 0
    posts, done = int(_ctl[POSTS]), int(_ctl[HELPER_BLOCKS])
    if now - _last_look[0] > HELPER_WAKE_GAP:  # the helper is asleep: what it misses while it wakes is no busy machine
        _waking[:] = [posts, done]
    _last_look[0] = now
    if _waking[0] >= 0:
        if done > _waking[1]:  # awake again: its share counts from here
            _waking[0] = -1
            _window[:] = [posts, done]
        elif posts - _waking[0] >= HELPER_WINDOW:  # a window's products and not one block: not asleep, without a core
            _waking[0] = -1
            _window[:] = [posts - HELPER_WINDOW, done]
        else:
            return live
    if posts - _window[0] >= HELPER_WINDOW:
        share = (done - _window[1]) / (posts - _window[0])
        _window[:] = [posts, done]
        if share < HELPER_SHARE_MIN:
            _ctl[HELPER_PAUSE_UNTIL] = now + HELPER_PAUSE
            _ctl[HELPER_PAUSES] += 1
            for thread in _threads:  # (the calling thread may have come to the helper's CPU since)
                if thread.is_alive():
                    _keep_apart(thread)
            return 0
    return live


def helpers():
    """The number of helper threads running, or None when the split products are off."""
    return _live_helpers() if _started else None


def start(num_helpers):
    """Split products with a helper thread (num_helpers >= 1) or without (0: every block on the calling thread).

    A product has at most two blocks, so one helper is all there is work for, and the scratch
    arrays are safe for exactly one (see `_scratch`). Sets NumPy's OpenBLAS to one thread
    (each block is a single-threaded product); `stop()` gives it its count back. Calling it
    again changes the number of helpers.
    """
    global _started, _blas_threads
    if _why is not None:
        raise RuntimeError(f"npyrnn's split products are {_why}")
    stop()
    if _blas_threads is None:
        _blas_threads = _blas_thread_count()
    _set_blas_threads(1)
    _ctl[STOP] = 0
    _ctl[HELPER_PAUSE_UNTIL] = 0  # a new helper starts with a clean slate (`_helpers_now`)
    _window[:] = [int(_ctl[POSTS]), int(_ctl[HELPER_BLOCKS])]
    _waking[0] = -1
    _last_look[0] = time.monotonic_ns()  # (and awake: it spins first)
    if int(num_helpers) > 0:
        thread = threading.Thread(target=_helper_main, args=(_ctl, _helper_clock), name="npyrnn-gemm-helper",
                                  daemon=True)
        thread.start()
        _threads.append(thread)
        deadline = time.monotonic() + 10.0
        while _ctl[READY] == 0 and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.0005)  # lets the helper take the GIL once, to enter its compiled loop
        _keep_apart(thread)
    _started = True


def _keep_apart(thread):
    """Keep the helper off the CPU the calling thread is on now: its allowed CPUs less that one
    (a logical CPU: with two threads a core, the helper may still share the caller's core).

    Linux places a new thread by the cores' recent load. A helper started again soon after the
    last one stopped (`set_cpu_threads` called again: each measurement of the benchmark, a
    notebook's second run) was often put on the calling thread's core, the other core's load
    still counting the old helper; both threads then shared one core, each handing it to the
    other in its waits, and the balancer left them there: the helper claimed none of its blocks,
    and after 64 products was paused for being on a busy machine. Measured: 70 products of (32,
    256) by (256, 1024) took 7.1-8.5 ms with the helper started a second time, 4.1-4.6 with
    this (docs/performance.md). The calling thread is left free to move; should it come to the
    helper's CPU later, the helper's share of the blocks falls, and `_helpers_now` keeps it
    apart again (as it pauses it). One allowed CPU, or no `sched_setaffinity`: left as it is."""
    global _helper_cpus
    _helper_cpus = None
    cpu = _sched_getcpu() if _sched_getcpu is not None else -1
    try:
        others = os.sched_getaffinity(0) - {cpu}
        if cpu >= 0 and others and thread.native_id is not None:
            os.sched_setaffinity(thread.native_id, others)
            _helper_cpus = frozenset(others)
    except (AttributeError, OSError):  # no sched_*affinity here, or the thread just ended
        pass


def stop():
    """End the helper and give NumPy's OpenBLAS its thread count back; products go to numpy.matmul again."""
    global _started, _blas_threads, _helper_cpus
    if not _started:
        return
    with _lock:  # after the product or compiled loop in progress, if any
        _ctl[STOP] = 1  # (a loop's part 1 leaves on it too, should the loop have ended without LOOP_DONE)
        for thread in _threads:
            thread.join()  # after any block it was still computing: nothing it touches is in use any more
        _threads.clear()
        _kept.clear()
        _ctl[STOP] = 0
        _ctl[READY] = 0
        _helper_cpus = None
        _ctl[LOOP_EXIT] = _ctl[LOOP_SEQ]  # a loop the helper never joined: not for the next helper
        _drop_loop_job()
        _started = False
        if _blas_threads is not None:
            _set_blas_threads(_blas_threads)
            _blas_threads = None


def _drop_loop_job():
    global _loop_job
    _loop_job = (0, None, ())


def _forget_after_fork():
    """In a forked child: no helper thread exists there, so the products are off; OpenBLAS gets its count back."""
    global _started, _blas_threads, _lock, _helper_cpus
    _helper_cpus = None
    _threads.clear()
    _kept.clear()
    _drop_loop_job()
    _lock = threading.Lock()
    _ctl[:] = 0
    _ctl[MIN_GRACE] = 20_000
    _started = False
    if _blas_threads is not None and _why is None:
        _set_blas_threads(_blas_threads)
    _blas_threads = None


atexit.register(stop)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def stats():
    """Counters since the process began: products posted to the helper, blocks the helper did, blocks taken
    back from it, products declined because OpenBLAS was not at one thread or another thread was in, halves
    of kernel calls the helper did in compiled loops, halves the caller waited for past HALF_LATE, and the
    times the helper was paused for a busy machine (`_helpers_now`)."""
    return {"posted": int(_ctl[POSTS]), "helper_blocks": int(_ctl[HELPER_BLOCKS]), "taken_back": int(_ctl[TAKEOVERS]),
            "declined": int(_ctl[DECLINED]), "helper_halves": int(_ctl[HALVES]), "halves_waited_for": int(_ctl[HALVES_LATE]),
            "helper_pauses": int(_ctl[HELPER_PAUSES])}


@functools.lru_cache(maxsize=1024)
def blocks(m, n, k):
    """(axis, number of blocks, size of a block) for an (m, k) by (k, n) product: the shape alone decides.

    The longest of m, n and k is cut: rows (axis 0), columns (axis 1), or the sum over k
    (axis 2: partial products added in order), into at most MAX_BLOCKS blocks of at least
    BLOCK_MIN, on multiples of BLOCK_ALIGN; a product under SPLIT_FLOPS is one block. A
    recurrent step's product (32 rows) is cut by columns or by k, a weight gradient over all
    T*B rows by k (each thread reads half of both operands), an output layer over all rows by
    rows.
    """
    axis, length = max(((0, m), (1, n), (2, k)), key=lambda pair: (pair[1], -pair[0]))
    if m == 1 and k >= MATVEC_SPLIT_K and n * k >= MATVEC_SPLIT_ITEMS and n >= 2 * BLOCK_MIN:
        axis, length = 1, n  # a large matrix-vector product: by columns (MATVEC_SPLIT_ITEMS)
    elif 2 * m * n * k < SPLIT_FLOPS:
        return 1, 1, n
    nch = max(1, min(MAX_BLOCKS, length // BLOCK_MIN))
    size = -(-length // nch)
    size = -(-size // BLOCK_ALIGN) * BLOCK_ALIGN
    return axis, -(-length // size), size


def _operand(x):
    """(transposed, leading dimension) of a 2-D array for a row-major gemm, or None."""
    item = x.itemsize
    rows, cols = x.shape
    s0, s1 = x.strides
    if s1 == item and s0 % item == 0 and s0 >= cols * item:
        return NO_TRANS, s0 // item
    if s0 == item and s1 % item == 0 and s1 >= rows * item:
        return TRANS, s1 // item
    return None


def _scratch(arrays, dt, need):
    """The array in `arrays` for `dt`, at least `need` elements long (a placeholder when nothing is needed).

    An outgrown array the helper writes into is kept (in `_kept`) until the helper is done with
    the product now posted: a helper that lost its core may still be writing into it. Nothing
    reads the helper's part before the helper finishes a newer block there, and with one helper
    that is the same thread, done with the old one.
    """
    if not need:
        return _NO_SCRATCH[dt.char]
    scratch = arrays.get(dt.char)
    if scratch is None or scratch.size < need:
        if scratch is not None and arrays is _helper_scratch:
            _kept.append((int(_ctl[SEQ]), (scratch,)))
        scratch = arrays[dt.char] = np.empty(max(need, 1 << 16), dtype=dt)
    return scratch


def run_loop(loop, shapes, dtype, keep, *args, halves=False, small=False):
    """Run a compiled time loop whose step products go through `loop_product`; whether it ran.

    `loop(ctl, ts, hs, ps, helpers, plans, part, lseq, *args)` returns 2 if any block was taken
    back from the helper, else 1; its products are `shapes`, (m, n, k) each, and `plans[j]` is
    `blocks(*shapes[j])`. The loop holds the products for its whole run. False (nothing run)
    when the products are off, in use by another thread, or would decline one of these products
    or `dtype`, or OpenBLAS is not at one thread (the caller then runs its Python loop, whose
    products go to numpy.matmul). `keep`: the arrays the loop's products read or write,
    C-contiguous, kept alive for a helper that lost its core.

    `halves` (with a helper): the loop also shares each step's kernel by rows with the helper.
    It runs as part 0 on this thread and part 1 on the helper thread (`_helper_main`), lseq
    its number (0 without halves: part 0 alone, every row its own). Part 0 offers the second
    half of each kernel call's rows (`offer_half`), computes the first, then the second too
    unless the helper claimed it (`take_half`); part 1 serves the products and computes the
    halves it claims (`helper_next_half`, `half_done`) until part 0 is done. The rows of a
    kernel do not mix, so the bits are the same whoever computes them.

    `small`: take products of any size (generation at batch 1, `cpu_greedy`): one of a single
    row is a matrix-vector product, each one block on the calling thread unless `blocks` cuts it.
    """
    if not _started or dtype.char not in "fd" or not dtype.isnative:
        return False
    if not small and any(min(m, n, k) < 2 or 2 * m * n * k < MIN_FLOPS for m, n, k in shapes):
        return False
    if not all(x.flags.c_contiguous and x.dtype == dtype for x in keep):  # strides the loop's products assume
        return False
    if not _lock.acquire(blocking=False):
        _ctl[DECLINED] += 1
        return False
    try:
        if not _started:  # stopped while this thread waited for nothing: `stop` holds the lock to stop
            return False
        if not one_blas_thread():  # every block is a single-threaded product (another thread changed the count)
            _ctl[DECLINED] += 1
            return False
        _drop_kept()
        plans = np.array([blocks(m, n, k) for m, n, k in shapes], dtype=np.int64)  # (axis, nch, cs) each
        helpers_now = _helpers_now()
        hs_need = max((nch * m * n if axis == 2 else m * n) if helpers_now and nch > 1 else 0
                      for (m, n, _), (axis, nch, _) in zip(shapes, plans))
        ps_need = max(nch * m * n if axis == 2 else 0 for (m, n, _), (axis, nch, _) in zip(shapes, plans))
        hs = _scratch(_helper_scratch, dtype, hs_need)
        ps = _scratch(_partials, dtype, ps_need)
        global _loop_job
        lseq = 0
        if halves and helpers_now and time.monotonic_ns() >= _ctl[HALF_PAUSE_UNTIL]:  # (CLOCK_MONOTONIC, as _now)
            lseq = int(_ctl[LOOP_SEQ]) + 1
            _loop_job = (lseq, loop, (_ctl, _helper_clock, hs, ps, helpers_now, plans, 1, lseq) + args)
            _ctl[LOOP_SEQ] = lseq  # the helper leaves its idle loop for the job
        try:
            done = loop(_ctl, _clock, hs, ps, helpers_now, plans, 0, lseq, *args)
        except BaseException:  # (a kernel's check, say) a block may have been taken back before it
            _kept.append((int(_ctl[SEQ]), tuple(keep) + (hs,)))
            raise
        finally:
            if lseq:
                _finish_loop(_ctl, lseq)  # after a half the helper is still in: it writes in place
        if done == 2:  # the helper may still be reading the loop's inputs (and writing hs): keep them alive for it
            _kept.append((int(_ctl[SEQ]), tuple(keep) + (hs,)))
        return True
    finally:
        _lock.release()


def matvec(W):
    """A function `f(h, out)`: out = h W^T for one row, h (1, C) and out (1, R) with contiguous rows,
    W (R, C) C-ordered; the product `matmul(h, W.T, out)` computes for a large W (cut by rows of W
    into two matrix-vector products, one a thread: `MATVEC_SPLIT_ITEMS`, `MATVEC_SPLIT_K`), planned once, without
    `matmul`'s checks each call (a stepper calls it once a step with the same arrays). None where
    the split products would not cut it. Where the products are off or in use by another thread
    when called, `numpy.dot(W, h[0])`, whose bits are the same where the cut falls between its
    kernel's blocks of rows (at H = 256 and 512, tried) and may differ in the last place
    elsewhere."""
    if not _started or W.ndim != 2 or W.dtype.char not in "fd" or not W.dtype.isnative or not W.flags.c_contiguous:
        return None
    R, C = W.shape
    axis, nch, cs = blocks(1, R, C)
    if nch < 2 or axis != 1:
        return None
    WT, item = W.T, W.itemsize

    def f(h, out):
        if not (_started and h.strides[1] == item and out.strides[1] == item
                and _locked_product(h, WT, out, NO_TRANS, h.strides[0] // item, TRANS, C, out.strides[0] // item,
                                    1, R, (axis, nch, cs))):
            np.dot(W, h[0], out=out[0])

    return f


def matmul(a, b, out):
    """out = a @ b for 2-D float32 or float64 NumPy arrays through the split products; whether it did.

    False (and nothing written) when the products are off, or the arrays are not ones this
    takes: other dtypes or byte orders, other ranks, strides that are not a row or column
    layout, a read-only out, a size-1 or tiny product, out overlapping an input, OpenBLAS not
    at one thread, another thread using the products. The caller then uses numpy.matmul (whose
    float32 bits may differ).
    """
    if not _started or a.ndim != 2 or b.ndim != 2 or out.ndim != 2:
        return False
    dt = a.dtype
    if dt != b.dtype or dt != out.dtype or dt.char not in "fd" or not dt.isnative or not out.flags.writeable:
        return False
    m, k = a.shape
    n = b.shape[1]
    if b.shape[0] != k or out.shape != (m, n) or min(n, k) < 2 or 2 * m * n * k < MIN_FLOPS:
        return False
    if m < 2 and blocks(m, n, k)[1] < 2:  # one row: only a large matrix-vector product, cut in two
        return False
    pa, pb, pc = _operand(a), _operand(b), _operand(out)
    if pa is None or pb is None or pc is None or pc[0] != NO_TRANS:
        return False
    if np.may_share_memory(out, a) or np.may_share_memory(out, b):
        return False
    return _locked_product(a, b, out, pa[0], pa[1], pb[0], pb[1], pc[1], m, n, blocks(m, n, k))


def _locked_product(a, b, out, ta, lda, tb, ldb, ldc, m, n, plan):
    """`matmul`'s and `matvec`'s product once its operands are checked: out = op(a) op(b) in the blocks
    of `plan` (`blocks`), shared with the helper; whether it ran (False, nothing written: another
    thread has the products, they were stopped meanwhile, or OpenBLAS is not at one thread)."""
    if not _lock.acquire(blocking=False):
        _ctl[DECLINED] += 1
        return False
    try:
        if not _started:  # stopped while this thread waited for nothing: `stop` holds the lock to stop
            return False
        _drop_kept()
        axis, nch, cs = plan
        dt = a.dtype
        helpers_now = _helpers_now()
        hs = _scratch(_helper_scratch, dt, (nch * m * n if axis == 2 else m * n) if helpers_now and nch > 1 else 0)
        ps = _scratch(_partials, dt, nch * m * n if axis == 2 else 0)
        done = _product(_ctl, _clock, a, b, out, hs, ps, ta, lda, tb, ldb, ldc, nch, cs, axis, helpers_now)
        if not done:
            _ctl[DECLINED] += 1
            return False
        seq = int(_ctl[SEQ])
        if done == 2:  # the helper may still be reading a and b (and writing hs): keep them alive for it
            _kept.append((seq, (a, b, hs)))
        if axis == 2:  # the partial sums over k, added in order, from where `_target` put them
            for i in range(1, nch):
                by_helper = helpers_now and int(_ctl[STATE + i]) == seq * 4 + DONE
                region = (hs if by_helper else ps)[i * m * n : (i + 1) * m * n]
                np.add(out, region.reshape(m, n), out=out)
        return True
    finally:
        _lock.release()
