"""The cells' fused time loops compiled whole, their products split (the `fast` extra, Numba).

Why. With the fused kernels and the split products, a step of the Python time loop is two
calls, a product and a kernel, but each call costs Python 10 to 20 us around the work (views
of the step's rows, the product's checks and plan, Numba's conversion of a dozen arrays); at
B = 32 and H = 256 a step's work is 150 to 250 us, so the calls are 5 to 15% of a minibatch.

What. Each loop here is the fused Python loop of its cell (`_scan`, `_scan_back_fused`),
statement for statement, compiled: the product of a step is `cpu_gemm.loop_product` (the same
blocks as `cpu_gemm.matmul`, the same helper, the same bits), the element-wise work a compiled
copy of the same kernel of `cpu_kernels`. So a loop gives the bits its Python twin gives
(`tests/test_cpu_loops.py`), and the equations are tagged where the kernels and the Python
loops tag them.

Used on NumPy while the split products are on (`backend.set_cpu_threads`, as `npyrnn train`
calls it) and the fused kernels are on; each wrapper returns False, having done nothing, where
the split products would not take the step's product (a tiny product, another thread using
them), and the cell then runs its Python loop. Compiled, forward and backward: the Elman RNN
(tanh, relu), the GRU with the reset gate after the product (torch's) or before it (d2l's),
the LSTM with and without a projection.

The gated cells' kernels shared by rows. Between two products the helper thread of the split
products would wait while the calling thread runs the step's kernel (a GRU's forward kernel is
40 to 65 us of a 130 to 150 us step at B = 32, H = 256). With a helper, each loop of the GRU
and the LSTM runs on both threads (`cpu_gemm.run_loop(..., halves=True)`): the calling thread
(part 0) runs the loop and offers the second half of each kernel call's rows; the helper (part
1) serves the products and computes the halves it claims; a half it did not claim in time the
calling thread computes itself. A kernel's rows do not mix, so the bits are the same whoever
computes which rows, at every thread count. Measured at 2 threads, 0.75 to 1.5 ms less a
minibatch (4 to 8.5%; docs/performance.md); `halves = False` turns it off.

Token ids' input side gathered step by step. For token ids the forward loops are handed the
ids and the (V, G*H) input table (`Recurrent._loop_gather`) and write each step's rows of the
input side just before the step's kernel reads them (`_gather_rows`, by whichever thread runs
those rows), instead of the driver gathering all T*B rows before the loop: the table stays in
cache and the rows are read where they were just written. A copy, so the same bits. Measured at
2 threads, 0.14 to 0.23 ms less a minibatch (docs/performance.md); `gather = False` turns it off.
Likewise the backward loops add each step's rows of the input side's gradient to their tokens'
sums (5.2), (5.3) as they finish them, each thread the rows it computed, into the sums of its
half of the rows (`_scatter_rows`, `cpu_kernels.scatter_step`), instead of one pass over all
T*B rows after the loop: the same order of additions as that pass (`cpu_kernels.scatter_rows`),
so the same bits; 0.15 to 0.26 ms less a minibatch at 2 threads; `scatter = False` turns it off.

Each wrapper takes the cell's buffers as the Python loop names them; `reverse` runs the time
loop as the backward direction of a bidirectional layer does. Each loop takes `part` and
`lseq` from `run_loop`; `*_rows` run one kernel call on rows [r0, r1) of the batch.
"""

import numpy as np
from numba import njit

from npyrnn.nn import cpu_gemm, cpu_kernels
from npyrnn.nn.cpu_gemm import NO_TRANS, TRANS, half_done, helper_next_half, loop_product, offer_half, take_half

__all__ = ["rnn_forward", "rnn_backward", "gru_forward", "gru_backward", "gru_before_forward", "gru_before_backward",
           "lstm_forward", "lstm_backward", "lstm_proj_forward", "lstm_proj_backward"]

enabled = True  # False: the cells run their Python loops (benchmarks/bench_train.py --pyloops measures both)
halves = True  # False: a gated cell's kernels run whole on the calling thread, the helper only in the products
gather = True  # False: token ids' input side gathered for all steps before the loop, not step by step in it
scatter = True  # False: the gradient of that gather summed after the backward loop, not step by step in it

_JIT = dict(cache=True, nogil=True, error_model="numpy")


def _kernel(kernel):
    """A compiled copy of a `cpu_kernels` kernel for the loops to call: `cpu_kernels.build` locks the
    kernel's own dispatcher to the one signature Python calls it with (and one dtype)."""
    return njit(nogil=True, error_model="numpy")(kernel.py_func)


_rnn_fwd_tanh, _rnn_fwd_relu, _rnn_bwd_tanh, _rnn_bwd_relu = map(_kernel, (
    cpu_kernels.rnn_fwd_tanh, cpu_kernels.rnn_fwd_relu, cpu_kernels.rnn_bwd_tanh, cpu_kernels.rnn_bwd_relu))
_gru_after_fwd, _gru_after_fwd_nobias, _gru_after_bwd = map(_kernel, (
    cpu_kernels.gru_after_fwd, cpu_kernels.gru_after_fwd_nobias, cpu_kernels.gru_after_bwd))
_gru_before_rz, _gru_before_n, _gru_before_bwd_a, _gru_before_bwd_b = map(_kernel, (
    cpu_kernels.gru_before_rz, cpu_kernels.gru_before_n, cpu_kernels.gru_before_bwd_a, cpu_kernels.gru_before_bwd_b))
_lstm_fwd, _lstm_bwd, _lstm_bwd_noproj = map(_kernel, (cpu_kernels.lstm_fwd, cpu_kernels.lstm_bwd, cpu_kernels.lstm_bwd_noproj))


def _step_operand(WT):
    """The operand of `loop_product` for a step product h W^T, from W^T (C, R): (W^T, NO_TRANS, its
    buffer) when its rows are contiguous (the copy `Recurrent._step_weight` makes, whose rows may be
    padded: its C-contiguous buffer is what `run_loop` keeps), else (W, TRANS, W) (the view)."""
    if WT.strides[1] == WT.itemsize and WT.strides[0] >= WT.shape[1] * WT.itemsize:
        return WT, NO_TRANS, _buffer_of(WT)
    return WT.T, TRANS, WT.T


def _gather_args(ids, table, dtype):
    """The (ids, table) a forward loop takes: token ids (T, B) as C-ordered intp and the (V, G*H)
    input table, for the loop to gather each step's rows itself (5.1); empty when there is nothing
    to gather (dense input, or gathered already), which the same compiled loop reads as none."""
    if ids is None:
        return np.empty((0, 0), dtype=np.intp), np.empty((0, 0), dtype=dtype)
    return np.ascontiguousarray(ids, dtype=np.intp), table


@njit(**_JIT)
def _gather_rows(ids, table, dst, t, r0, r1):
    """dst[b] = table[ids[t, b]] for the rows b in [r0, r1) of step t (5.1), unless ids is empty.

    The gather of token ids' input side, step by step inside a forward loop: a step's rows are
    written just before its kernel reads them, from a (V, G*H) table that stays in cache, instead
    of all T*B rows (3.4 MB for a GRU at H = 256) in one pass before the loop. A copy: the bits
    of `backend.take_rows`."""
    if ids.shape[0] == 0:
        return
    for b in range(r0, r1):
        row, src = dst[b], table[ids[t, b]]
        for j in range(src.shape[0]):
            row[j] = src[j]


def _scatter_args(ids, sums, with_sum, dtype):
    """The (ids, sums, with_sum) a backward loop takes: token ids (T, B) as C-ordered intp and the
    (2, V [+ 1], G*H) sums of the input side's gradient rows per token (and all, with_sum), one per
    half of the rows, for the loop to add each step's rows as it finishes them (5.2), (5.3); empty:
    nothing to sum."""
    if ids is None:
        return np.empty((0, 0), dtype=np.intp), np.empty((0, 0, 0), dtype=dtype), False
    return np.ascontiguousarray(ids, dtype=np.intp), sums, bool(with_sum)


@njit(**_JIT)
def _scatter_rows(ids, sums, with_sum, src, t, r0, r1):
    """Add step t's rows [r0, r1) of the input side's gradient, src (B, G*H), to their tokens' rows of
    sums (5.2) (and to its last row, with_sum (5.3)), unless ids is empty: `cpu_kernels.scatter_step`,
    called by the thread that just wrote the rows, each half of the rows into its own sums, in the
    order of `cpu_kernels.scatter_rows` (the steps as the loop finishes them, rows in order), so
    the bits of the scatter after the Python loops."""
    if ids.shape[0] != 0:
        cpu_kernels.scatter_step(ids, src, sums, with_sum, t, r0, r1)


def _buffer_of(a):
    """The C-ordered 2-D buffer a row-padded view `a` (`Recurrent._padded_buffer`) was cut from,
    for `run_loop` to keep; `a` itself otherwise."""
    base = a.base
    if base is not None and base.ndim == 2 and base.flags.c_contiguous and base.shape[0] == a.shape[0] \
            and a.strides[0] == base.strides[0] and a.strides[1] == a.itemsize:
        return base
    return a


# ------------------------------------------------------------------------------ RNN
# The Elman RNN's kernel (one tanh a step) is too short to share: with halves its loops took
# 0.1-0.2 ms longer a minibatch at H = 512 (docs/performance.md), so they run part 0 alone.
@njit(**_JIT)
def _rnn_forward(ctl, ts, hs, ps, helpers, plans, part, lseq, Hs, W_hh, tb, tmp, o, p, reverse, relu, ids, table):
    """`RNN._scan`: step t reads h_{t-1} from Hs[p+t] and turns Hs[o+t] into h_t; W_hh, tb: `_step_operand`;
    ids, table: `_gather_args`."""
    T = Hs.shape[0] - 1
    took = 1
    for s in range(T):
        t = T - 1 - s if reverse else s
        h = Hs[o + t]  # holds x_t W_ih^T + b_ih + b_hh, or gets it now
        took = max(took, loop_product(ctl, ts, Hs[p + t], W_hh, tmp, hs, ps, tb, plans[0], helpers))  # (2.1)
        _gather_rows(ids, table, h, t, 0, h.shape[0])  # (5.1)
        if relu:
            _rnn_fwd_relu(h, tmp, h)  # (2.1), (2.2)
        else:
            _rnn_fwd_tanh(h, tmp, h)  # (2.1), (2.2)
    return took


@njit(**_JIT)
def _rnn_backward(ctl, ts, hs, ps, helpers, plans, part, lseq, Y, dA, W_hh, carry, reverse, relu, ids, sums,
                  with_sum):
    """`RNN._scan_back` with its fused kernel: dA holds dout, carry dL/dh_T (or 0); ids, sums, with_sum:
    `_scatter_args`."""
    T = Y.shape[0]
    took = 1
    for s in range(T):
        t = s if reverse else T - 1 - s
        if relu:
            _rnn_bwd_relu(Y[t], carry, dA[t])  # (2.3)-(2.5b)
        else:
            _rnn_bwd_tanh(Y[t], carry, dA[t])  # (2.3)-(2.5a)
        _scatter_rows(ids, sums, with_sum, dA[t], t, 0, dA.shape[1])  # (5.2), (5.3)
        took = max(took, loop_product(ctl, ts, dA[t], W_hh, carry, hs, ps, NO_TRANS, plans[0], helpers))  # (2.6)
    return took


def rnn_forward(Hs, W_hhT, tmp, o, p, reverse, relu, ids=None, table=None):
    """The Elman RNN's forward loop over Hs (T+1, B, H); W_hhT (H, H) W_hh^T, tmp (B, H); ids (T, B) and
    table (V, H), or None: `_gather_args`. Whether it ran."""
    B, H = tmp.shape
    W, tb, W_buffer = _step_operand(W_hhT)
    return cpu_gemm.run_loop(_rnn_forward, [(B, H, H)], Hs.dtype, (Hs, W_buffer, tmp),
                             Hs, W, tb, tmp, o, p, reverse, relu, *_gather_args(ids, table, Hs.dtype))


def rnn_backward(Y, dA, W_hh, carry, reverse, relu, ids=None, sums=None, with_sum=False):
    """The Elman RNN's backward loop: Y (T, B, H) the outputs, dA (T, B, H) dout in, dL/da_t out; carry (B, H);
    ids, sums, with_sum: `_scatter_args`."""
    B, H = carry.shape
    return cpu_gemm.run_loop(_rnn_backward, [(B, H, H)], Y.dtype, (Y, dA, W_hh, carry),
                             Y, dA, W_hh, carry, reverse, relu, *_scatter_args(ids, sums, with_sum, Y.dtype))


# ------------------------------------------------------------------------------ GRU
@njit(**_JIT)
def _gru_forward_rows(G, GH, Hs, b_hn, has_bias, o, p, t, r0, r1, ids, table):
    H = Hs.shape[2]
    _gather_rows(ids, table, G[t], t, r0, r1)  # (5.1)
    gh, g, h_prev = GH[t, r0:r1], G[t, r0:r1], Hs[p + t, r0:r1]
    if has_bias:  # (8.1), (8.2), (8.3a), (8.4)
        _gru_after_fwd(gh[:, :H], gh[:, H : 2 * H], h_prev, b_hn,
                       g[:, :H], g[:, H : 2 * H], g[:, 2 * H :], gh[:, 2 * H :], Hs[o + t, r0:r1])
    else:
        _gru_after_fwd_nobias(gh[:, :H], gh[:, H : 2 * H], h_prev,
                              g[:, :H], g[:, H : 2 * H], g[:, 2 * H :], gh[:, 2 * H :], Hs[o + t, r0:r1])


@njit(**_JIT)
def _gru_forward(ctl, ts, hs, ps, helpers, plans, part, lseq, G, GH, Hs, W_hh, tb, b_hn, has_bias, o, p, reverse,
                 ids, table):
    """`GRU._scan` with `reset_after=True` and its fused kernel: G the input side, then [r, z, n]."""
    T, B = G.shape[0], G.shape[1]
    if part == 1:  # the helper's side
        seen = np.full(1, ctl[cpu_gemm.SEQ] - 1)
        t = helper_next_half(ctl, ts, lseq, seen)
        while t >= 0:
            _gru_forward_rows(G, GH, Hs, b_hn, has_bias, o, p, t, B // 2, B, ids, table)
            half_done(ctl, lseq, t)
            t = helper_next_half(ctl, ts, lseq, seen)
        return 1
    took = 1
    for s in range(T):
        t = T - 1 - s if reverse else s
        took = max(took, loop_product(ctl, ts, Hs[p + t], W_hh, GH[t], hs, ps, tb, plans[0], helpers))  # (8.1)-(8.3a)
        mid = offer_half(ctl, ts, lseq, t, B)
        _gru_forward_rows(G, GH, Hs, b_hn, has_bias, o, p, t, 0, mid, ids, table)
        if mid < B and take_half(ctl, ts, lseq, t):
            _gru_forward_rows(G, GH, Hs, b_hn, has_bias, o, p, t, mid, B, ids, table)
    return took


@njit(**_JIT)
def _gru_backward_rows(dY, carry, zdh, G, Hs, GH, dGH, dgx, p, t, r0, r1, ids, sums, with_sum):
    H = Hs.shape[2]
    g, d, x = G[t, r0:r1], dGH[t, r0:r1], dgx[t, r0:r1]
    _gru_after_bwd(dY[t, r0:r1], carry[r0:r1], g[:, :H], g[:, H : 2 * H], g[:, 2 * H :], Hs[p + t, r0:r1],  # (8.5)-(8.9a)
                   GH[t, r0:r1, 2 * H :], d[:, :H], d[:, H : 2 * H], x[:, 2 * H :], d[:, 2 * H :], zdh[r0:r1])
    for b in range(r1 - r0):  # r and z: the same on both sides                             (8.12)
        x_, d_ = x[b], d[b]  # a loop over each row: 5 times a 2-D slice assignment's speed in Numba
        for j in range(2 * H):
            x_[j] = d_[j]
    _scatter_rows(ids, sums, with_sum, dgx[t], t, r0, r1)  # the rows just written              (5.2), (5.3)


@njit(**_JIT)
def _gru_backward(ctl, ts, hs, ps, helpers, plans, part, lseq, dY, carry, zdh, G, Hs, GH, dGH, dgx, W_hh, p, reverse,
                  ids, sums, with_sum):
    """`GRU._scan_back_fused` with `reset_after=True`: carry dL/dh_T (or 0) and zdh 0 in."""
    T, B = G.shape[0], G.shape[1]
    if part == 1:  # the helper's side
        seen = np.full(1, ctl[cpu_gemm.SEQ] - 1)
        t = helper_next_half(ctl, ts, lseq, seen)
        while t >= 0:
            _gru_backward_rows(dY, carry, zdh, G, Hs, GH, dGH, dgx, p, t, B // 2, B, ids, sums, with_sum)
            half_done(ctl, lseq, t)
            t = helper_next_half(ctl, ts, lseq, seen)
        return 1
    took = 1
    for s in range(T):
        t = s if reverse else T - 1 - s
        mid = offer_half(ctl, ts, lseq, t, B)
        _gru_backward_rows(dY, carry, zdh, G, Hs, GH, dGH, dgx, p, t, 0, mid, ids, sums, with_sum)
        if mid < B and take_half(ctl, ts, lseq, t):
            _gru_backward_rows(dY, carry, zdh, G, Hs, GH, dGH, dgx, p, t, mid, B, ids, sums, with_sum)
        took = max(took, loop_product(ctl, ts, dGH[t], W_hh, carry, hs, ps, NO_TRANS, plans[0], helpers))  # (8.10a)
    return took


def gru_forward(G, GH, Hs, W_hhT, b_hn, o, p, reverse, ids=None, table=None):
    """The GRU's forward loop (reset_after): G, GH (T, B, 3H), Hs (T+1, B, H), W_hhT (H, 3H), b_hn (H,) or None;
    ids, table: `_gather_args`."""
    B, H = Hs.shape[1], W_hhT.shape[0]
    b = np.zeros(1, dtype=Hs.dtype) if b_hn is None else b_hn
    W, tb, W_buffer = _step_operand(W_hhT)
    return cpu_gemm.run_loop(_gru_forward, [(B, 3 * H, H)], Hs.dtype, (Hs, W_buffer, GH),
                             G, GH, Hs, W, tb, b, b_hn is not None, o, p, reverse, *_gather_args(ids, table, Hs.dtype),
                             halves=halves)


def gru_backward(dY, carry, zdh, G, Hs, GH, dGH, dgx, W_hh, p, reverse, ids=None, sums=None, with_sum=False):
    """The GRU's backward loop (reset_after), into dGH and dgx (T, B, 3H); carry, zdh (B, H); ids, sums,
    with_sum: `_scatter_args`."""
    B, H = carry.shape
    return cpu_gemm.run_loop(_gru_backward, [(B, H, 3 * H)], Hs.dtype, (dGH, W_hh, carry),
                             dY, carry, zdh, G, Hs, GH, dGH, dgx, W_hh, p, reverse,
                             *_scatter_args(ids, sums, with_sum, Hs.dtype), halves=halves)


@njit(**_JIT)
def _gru_before_forward_rows(k, G, ghrz, tmp, RH, Hs, o, p, t, r0, r1, ids, table):
    """Kernel k (0: r and z, 1: n and h_t) of step t on rows [r0, r1)."""
    H = Hs.shape[2]
    g, h_prev = G[t, r0:r1], Hs[p + t, r0:r1]
    if k == 0:
        _gather_rows(ids, table, G[t], t, r0, r1)  # (5.1)
        _gru_before_rz(ghrz[r0:r1, :H], ghrz[r0:r1, H:], h_prev, g[:, :H], g[:, H : 2 * H], RH[t, r0:r1])  # (8.1), (8.2)
    else:
        _gru_before_n(tmp[r0:r1], g[:, H : 2 * H], h_prev, g[:, 2 * H :], Hs[o + t, r0:r1])  # (8.3b), (8.4)


@njit(**_JIT)
def _gru_before_forward(ctl, ts, hs, ps, helpers, plans, part, lseq, G, ghrz, tmp, RH, Hs, W_hh, tb, o, p, reverse,
                        ids, table):
    """`GRU._scan` with `reset_after=False` (d2l's GRU) and its two fused kernels, calls 2t and 2t + 1."""
    T, B, H = G.shape[0], G.shape[1], Hs.shape[2]
    if part == 1:  # the helper's side
        seen = np.full(1, ctl[cpu_gemm.SEQ] - 1)
        i = helper_next_half(ctl, ts, lseq, seen)
        while i >= 0:
            _gru_before_forward_rows(i % 2, G, ghrz, tmp, RH, Hs, o, p, i // 2, B // 2, B, ids, table)
            half_done(ctl, lseq, i)
            i = helper_next_half(ctl, ts, lseq, seen)
        return 1
    if tb == TRANS:  # W_hh (3H, H): rows (r, z, n)
        W_rz, W_hn = W_hh[: 2 * H], W_hh[2 * H :]
    else:  # W_hh^T (H, 3H): columns (r, z, n)
        W_rz, W_hn = W_hh[:, : 2 * H], W_hh[:, 2 * H :]
    took = 1
    for s in range(T):
        t = T - 1 - s if reverse else s
        took = max(took, loop_product(ctl, ts, Hs[p + t], W_rz, ghrz, hs, ps, tb, plans[0], helpers))  # (8.1, 8.2)
        for k in range(2):
            if k == 1:
                took = max(took, loop_product(ctl, ts, RH[t], W_hn, tmp, hs, ps, tb, plans[1], helpers))  # (8.3b)
            mid = offer_half(ctl, ts, lseq, 2 * t + k, B)
            _gru_before_forward_rows(k, G, ghrz, tmp, RH, Hs, o, p, t, 0, mid, ids, table)
            if mid < B and take_half(ctl, ts, lseq, 2 * t + k):
                _gru_before_forward_rows(k, G, ghrz, tmp, RH, Hs, o, p, t, mid, B, ids, table)
    return took


@njit(**_JIT)
def _gru_before_backward_rows(k, dY, carry, zdh, rdh, drh, G, Hs, dgx, p, t, r0, r1, ids, sums, with_sum):
    """Kernel k (0: (8.5)-(8.7), 1: (8.9b)) of step t on rows [r0, r1); after kernel 1 the rows are complete."""
    H = Hs.shape[2]
    g, d, h_prev = G[t, r0:r1], dgx[t, r0:r1], Hs[p + t, r0:r1]
    if k == 0:
        _gru_before_bwd_a(dY[t, r0:r1], carry[r0:r1], rdh[r0:r1], g[:, H : 2 * H], g[:, 2 * H :], h_prev,  # (8.5)-(8.7)
                          d[:, H : 2 * H], d[:, 2 * H :], zdh[r0:r1])
    else:
        _gru_before_bwd_b(drh[r0:r1], g[:, :H], h_prev, d[:, :H], rdh[r0:r1])  # (8.9b)
        _scatter_rows(ids, sums, with_sum, dgx[t], t, r0, r1)  # the rows just completed        (5.2), (5.3)


@njit(**_JIT)
def _gru_before_backward(ctl, ts, hs, ps, helpers, plans, part, lseq, dY, carry, zdh, rdh, drh, G, Hs, dgx, W_hh, p,
                         reverse, ids, sums, with_sum):
    """`GRU._scan_back_fused` with `reset_after=False`: carry dL/dh_T (or 0), zdh and rdh 0 in."""
    T, B, H = G.shape[0], G.shape[1], W_hh.shape[1]
    if part == 1:  # the helper's side
        seen = np.full(1, ctl[cpu_gemm.SEQ] - 1)
        i = helper_next_half(ctl, ts, lseq, seen)
        while i >= 0:
            _gru_before_backward_rows(i % 2, dY, carry, zdh, rdh, drh, G, Hs, dgx, p, i // 2, B // 2, B, ids, sums,
                                      with_sum)
            half_done(ctl, lseq, i)
            i = helper_next_half(ctl, ts, lseq, seen)
        return 1
    W_rz, W_hn = W_hh[: 2 * H], W_hh[2 * H :]
    took = 1
    for s in range(T):
        t = s if reverse else T - 1 - s
        d = dgx[t]
        for k in range(2):
            mid = offer_half(ctl, ts, lseq, 2 * t + k, B)
            _gru_before_backward_rows(k, dY, carry, zdh, rdh, drh, G, Hs, dgx, p, t, 0, mid, ids, sums, with_sum)
            if mid < B and take_half(ctl, ts, lseq, 2 * t + k):
                _gru_before_backward_rows(k, dY, carry, zdh, rdh, drh, G, Hs, dgx, p, t, mid, B, ids, sums, with_sum)
            if k == 0:
                took = max(took, loop_product(ctl, ts, d[:, 2 * H :], W_hn, drh, hs, ps, NO_TRANS, plans[0], helpers))  # (8.8b)
        took = max(took, loop_product(ctl, ts, d[:, : 2 * H], W_rz, carry, hs, ps, NO_TRANS, plans[1], helpers))  # (8.10b)
    return took


def gru_before_forward(G, ghrz, tmp, RH, Hs, W_hhT, o, p, reverse, ids=None, table=None):
    """d2l's GRU's forward loop (reset before): G (T, B, 3H), ghrz (B, 2H), tmp (B, H), RH (T, B, H),
    W_hhT (H, 3H); ids, table: `_gather_args`."""
    B, H = Hs.shape[1], W_hhT.shape[0]
    W, tb, W_buffer = _step_operand(W_hhT)
    return cpu_gemm.run_loop(_gru_before_forward, [(B, 2 * H, H), (B, H, H)], Hs.dtype, (Hs, W_buffer, ghrz, RH, tmp),
                             G, ghrz, tmp, RH, Hs, W, tb, o, p, reverse, *_gather_args(ids, table, Hs.dtype),
                             halves=halves)


def gru_before_backward(dY, carry, zdh, rdh, drh, G, Hs, dgx, W_hh, p, reverse, ids=None, sums=None, with_sum=False):
    """d2l's GRU's backward loop (reset before), into dgx (T, B, 3H); carry, zdh, rdh, drh (B, H); ids, sums,
    with_sum: `_scatter_args`."""
    B, H = carry.shape
    return cpu_gemm.run_loop(_gru_before_backward, [(B, H, H), (B, H, 2 * H)], Hs.dtype, (dgx, W_hh, drh, carry),
                             dY, carry, zdh, rdh, drh, G, Hs, dgx, W_hh, p, reverse,
                             *_scatter_args(ids, sums, with_sum, Hs.dtype), halves=halves)


# ------------------------------------------------------------------------------ LSTM
@njit(**_JIT)
def _lstm_forward_rows(G, gh, C, TC, out, o, p, t, r0, r1, ids, table):
    """Step t's kernel on rows [r0, r1): m_t into out (Hs[o+t] without a projection, M[t] with one)."""
    H = C.shape[2]
    _gather_rows(ids, table, G[t], t, r0, r1)  # (5.1)
    a, g = G[t, r0:r1], gh[r0:r1]
    _lstm_fwd(g[:, :H], g[:, H : 2 * H], g[:, 2 * H : 3 * H], g[:, 3 * H :], C[p + t, r0:r1],  # (9.1)-(9.4)
              a[:, :H], a[:, H : 2 * H], a[:, 2 * H : 3 * H], a[:, 3 * H :], C[o + t, r0:r1], TC[t, r0:r1], out[r0:r1])


@njit(**_JIT)
def _lstm_forward(ctl, ts, hs, ps, helpers, plans, part, lseq, G, gh, Hs, C, TC, W_hh, tb, o, p, reverse, ids, table):
    """`LSTM._scan` without a projection and with its fused kernel: h_t = m_t goes to Hs[o+t]."""
    T, B = G.shape[0], G.shape[1]
    if part == 1:  # the helper's side
        seen = np.full(1, ctl[cpu_gemm.SEQ] - 1)
        t = helper_next_half(ctl, ts, lseq, seen)
        while t >= 0:
            _lstm_forward_rows(G, gh, C, TC, Hs[o + t], o, p, t, B // 2, B, ids, table)
            half_done(ctl, lseq, t)
            t = helper_next_half(ctl, ts, lseq, seen)
        return 1
    took = 1
    for s in range(T):
        t = T - 1 - s if reverse else s
        took = max(took, loop_product(ctl, ts, Hs[p + t], W_hh, gh, hs, ps, tb, plans[0], helpers))  # (9.1)
        mid = offer_half(ctl, ts, lseq, t, B)
        _lstm_forward_rows(G, gh, C, TC, Hs[o + t], o, p, t, 0, mid, ids, table)
        if mid < B and take_half(ctl, ts, lseq, t):
            _lstm_forward_rows(G, gh, C, TC, Hs[o + t], o, p, t, mid, B, ids, table)
    return took


@njit(**_JIT)
def _lstm_backward_rows(dY, carry_h, carry_c, dm, G, TC, C, dG, p, t, r0, r1, ids, sums, with_sum):
    """Step t's kernel on rows [r0, r1): with dm (B, H), the projection's (9.9)-(9.12); else dm_t = dout_t + c^h_t (9.6) too."""
    H = C.shape[2]
    a, d = G[t, r0:r1], dG[t, r0:r1]
    if dm.shape[0] == 0:  # no projection
        _lstm_bwd_noproj(dY[t, r0:r1], carry_h[r0:r1], a[:, :H], a[:, H : 2 * H], a[:, 2 * H : 3 * H], a[:, 3 * H :],  # (9.6), (9.9)-(9.12)
                         TC[t, r0:r1], C[p + t, r0:r1], d[:, :H], d[:, H : 2 * H], d[:, 2 * H : 3 * H], d[:, 3 * H :],
                         carry_c[r0:r1])
    else:
        _lstm_bwd(dm[r0:r1], a[:, :H], a[:, H : 2 * H], a[:, 2 * H : 3 * H], a[:, 3 * H :], TC[t, r0:r1],  # (9.9)-(9.12)
                  C[p + t, r0:r1], d[:, :H], d[:, H : 2 * H], d[:, 2 * H : 3 * H], d[:, 3 * H :], carry_c[r0:r1])
    _scatter_rows(ids, sums, with_sum, dG[t], t, r0, r1)  # the rows just written               (5.2), (5.3)


@njit(**_JIT)
def _lstm_backward(ctl, ts, hs, ps, helpers, plans, part, lseq, dY, carry_h, carry_c, G, TC, C, dG, W_hh, p, reverse,
                   ids, sums, with_sum):
    """`LSTM._scan_back` without a projection and with its fused kernel: carries dL/dh_T, dL/dc_T (or 0) in."""
    T, B = G.shape[0], G.shape[1]
    no_dm = carry_c[:0]
    if part == 1:  # the helper's side
        seen = np.full(1, ctl[cpu_gemm.SEQ] - 1)
        t = helper_next_half(ctl, ts, lseq, seen)
        while t >= 0:
            _lstm_backward_rows(dY, carry_h, carry_c, no_dm, G, TC, C, dG, p, t, B // 2, B, ids, sums, with_sum)
            half_done(ctl, lseq, t)
            t = helper_next_half(ctl, ts, lseq, seen)
        return 1
    took = 1
    for s in range(T):
        t = s if reverse else T - 1 - s
        mid = offer_half(ctl, ts, lseq, t, B)
        _lstm_backward_rows(dY, carry_h, carry_c, no_dm, G, TC, C, dG, p, t, 0, mid, ids, sums, with_sum)
        if mid < B and take_half(ctl, ts, lseq, t):
            _lstm_backward_rows(dY, carry_h, carry_c, no_dm, G, TC, C, dG, p, t, mid, B, ids, sums, with_sum)
        took = max(took, loop_product(ctl, ts, dG[t], W_hh, carry_h, hs, ps, NO_TRANS, plans[0], helpers))  # (9.13)
    return took


def lstm_forward(G, gh, Hs, C, TC, W_hhT, o, p, reverse, ids=None, table=None):
    """The LSTM's forward loop (no projection): G (T, B, 4H), gh (B, 4H), Hs and C (T+1, B, H), TC (T, B, H),
    W_hhT (H, 4H); ids, table: `_gather_args`."""
    B, H = Hs.shape[1], W_hhT.shape[0]
    W, tb, W_buffer = _step_operand(W_hhT)
    return cpu_gemm.run_loop(_lstm_forward, [(B, 4 * H, H)], Hs.dtype, (Hs, W_buffer, _buffer_of(gh)),
                             G, gh, Hs, C, TC, W, tb, o, p, reverse, *_gather_args(ids, table, Hs.dtype), halves=halves)


def lstm_backward(dY, carry_h, carry_c, G, TC, C, dG, W_hh, p, reverse, ids=None, sums=None, with_sum=False):
    """The LSTM's backward loop (no projection), into dG (T, B, 4H); carries (B, H); ids, sums, with_sum:
    `_scatter_args`."""
    B, H = carry_h.shape
    return cpu_gemm.run_loop(_lstm_backward, [(B, H, 4 * H)], G.dtype, (dG, W_hh, carry_h),
                             dY, carry_h, carry_c, G, TC, C, dG, W_hh, p, reverse,
                             *_scatter_args(ids, sums, with_sum, G.dtype), halves=halves)


@njit(**_JIT)
def _lstm_proj_forward(ctl, ts, hs, ps, helpers, plans, part, lseq, G, gh, Hs, C, TC, M, W_hh, tb, W_hr, tbr, o, p,
                       reverse, ids, table):
    """`LSTM._scan` with a projection: m_t goes to M[t], h_t = m_t W_hr^T to Hs[o+t]."""
    T, B = G.shape[0], G.shape[1]
    if part == 1:  # the helper's side
        seen = np.full(1, ctl[cpu_gemm.SEQ] - 1)
        t = helper_next_half(ctl, ts, lseq, seen)
        while t >= 0:
            _lstm_forward_rows(G, gh, C, TC, M[t], o, p, t, B // 2, B, ids, table)
            half_done(ctl, lseq, t)
            t = helper_next_half(ctl, ts, lseq, seen)
        return 1
    took = 1
    for s in range(T):
        t = T - 1 - s if reverse else s
        took = max(took, loop_product(ctl, ts, Hs[p + t], W_hh, gh, hs, ps, tb, plans[0], helpers))  # (9.1)
        mid = offer_half(ctl, ts, lseq, t, B)
        _lstm_forward_rows(G, gh, C, TC, M[t], o, p, t, 0, mid, ids, table)
        if mid < B and take_half(ctl, ts, lseq, t):
            _lstm_forward_rows(G, gh, C, TC, M[t], o, p, t, mid, B, ids, table)
        took = max(took, loop_product(ctl, ts, M[t], W_hr, Hs[o + t], hs, ps, tbr, plans[1], helpers))  # (9.5)
    return took


@njit(**_JIT)
def _lstm_proj_backward(ctl, ts, hs, ps, helpers, plans, part, lseq, dY, carry_h, carry_c, dHs, dm, G, TC, C, dG, W_hh,
                        W_hr, p, reverse, ids, sums, with_sum):
    """`LSTM._scan_back` with a projection and its fused kernel: carries dL/dh_T, dL/dc_T (or 0) in."""
    T, B = G.shape[0], G.shape[1]
    if part == 1:  # the helper's side
        seen = np.full(1, ctl[cpu_gemm.SEQ] - 1)
        t = helper_next_half(ctl, ts, lseq, seen)
        while t >= 0:
            _lstm_backward_rows(dY, carry_h, carry_c, dm, G, TC, C, dG, p, t, B // 2, B, ids, sums, with_sum)
            half_done(ctl, lseq, t)
            t = helper_next_half(ctl, ts, lseq, seen)
        return 1
    took = 1
    for s in range(T):
        t = s if reverse else T - 1 - s
        dh, dy = dHs[t], dY[t]
        for b in range(dh.shape[0]):
            for j in range(dh.shape[1]):
                dh[b, j] = dy[b, j] + carry_h[b, j]  # dh_t = dout_t + c^h_t                    (9.6)
        took = max(took, loop_product(ctl, ts, dh, W_hr, dm, hs, ps, NO_TRANS, plans[0], helpers))  # (9.7)
        mid = offer_half(ctl, ts, lseq, t, B)
        _lstm_backward_rows(dY, carry_h, carry_c, dm, G, TC, C, dG, p, t, 0, mid, ids, sums, with_sum)
        if mid < B and take_half(ctl, ts, lseq, t):
            _lstm_backward_rows(dY, carry_h, carry_c, dm, G, TC, C, dG, p, t, mid, B, ids, sums, with_sum)
        took = max(took, loop_product(ctl, ts, dG[t], W_hh, carry_h, hs, ps, NO_TRANS, plans[1], helpers))  # (9.13)
    return took


def lstm_proj_forward(G, gh, Hs, C, TC, M, W_hhT, W_hrT, o, p, reverse, ids=None, table=None):
    """The LSTM's forward loop with a projection: Hs (T+1, B, P), M and TC (T, B, H), W_hhT (P, 4H), W_hrT (H, P);
    ids, table: `_gather_args`."""
    B, H, P = Hs.shape[1], W_hrT.shape[0], W_hrT.shape[1]
    W, tb, W_buffer = _step_operand(W_hhT)
    Wr, tbr, Wr_buffer = _step_operand(W_hrT)
    return cpu_gemm.run_loop(_lstm_proj_forward, [(B, 4 * H, P), (B, P, H)], Hs.dtype, (Hs, W_buffer, Wr_buffer, _buffer_of(gh), M),
                             G, gh, Hs, C, TC, M, W, tb, Wr, tbr, o, p, reverse, *_gather_args(ids, table, Hs.dtype),
                             halves=halves)


def lstm_proj_backward(dY, carry_h, carry_c, dHs, dm, G, TC, C, dG, W_hh, W_hr, p, reverse, ids=None, sums=None,
                       with_sum=False):
    """The LSTM's backward loop with a projection, into dG (T, B, 4H) and dHs (T, B, P); ids, sums, with_sum:
    `_scatter_args`."""
    B, P, H = carry_h.shape[0], W_hr.shape[0], W_hr.shape[1]
    return cpu_gemm.run_loop(_lstm_proj_backward, [(B, H, P), (B, P, 4 * H)], G.dtype,
                             (dHs, W_hr, dm, dG, W_hh, carry_h),
                             dY, carry_h, carry_c, dHs, dm, G, TC, C, dG, W_hh, W_hr, p, reverse,
                             *_scatter_args(ids, sums, with_sum, G.dtype), halves=halves)


# ------------------------------------------------------------------------------ the disk cache
def _key_cache_to_sources(loops):
    """Numba keys a cached function to its own file's stamp, so a loop cached before `cpu_gemm.py`
    or `cpu_kernels.py` changed would run their old code. Fold their sources, as this process
    imported them, into each loop's stamp: a loop cached with other sources is compiled again."""
    sources = (cpu_gemm.SOURCE_DIGEST, cpu_kernels.SOURCE_DIGEST)
    for loop in loops:
        try:
            index = loop._cache._cache_file  # Numba's IndexDataCacheFile (internal)
            index._source_stamp = (index._source_stamp, sources)
        except AttributeError:  # another Numba's internals: its own stamp alone
            pass


_key_cache_to_sources((_rnn_forward, _rnn_backward, _gru_forward, _gru_backward, _gru_before_forward,
                       _gru_before_backward, _lstm_forward, _lstm_backward, _lstm_proj_forward, _lstm_proj_backward))
