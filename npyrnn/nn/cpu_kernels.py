"""The fused kernels of `kernels.py` compiled for the CPU with Numba (the optional `fast` extra).

On NumPy a cell's step is several passes over its (B, H) blocks, each a separate call: an add,
a `tanh` over all gates, the scale and shift of the sigmoids, the products of the cell state.
`tanh` alone costs about 3 ns an element there, single-threaded. Here each kernel of
`kernels.py` is one compiled loop over the elements, reading its inputs once and writing its
outputs once, with the same formulas in the same order as its array-op twin (the CUDA body
beside it in `kernels.py`); `kernels.get` hands these to the cells on NumPy exactly as it hands
the CUDA kernels to them on CuPy, after the same one-time probe against the array operations.

Numerics:

- float64: `tanh` is the C library's (NumPy's may differ from it in the last ulp); every
  product and sum is rounded on its own (no fused multiply-add, no reassociation), so results
  agree with the array operations within a few ulps (tested to 1e-13 relative).
- float32: `tanh` is the rational approximation that Eigen, and through it XLA and JAX, use
  for float32 (`_tanh32`, an odd polynomial of degree 13 over an even one of degree 6 on
  [-7.9, 7.9], clamped outside, and x itself below 4e-4), which vectorises. Measured against
  float64 `tanh` over every 61st float32 in [-10, 10] it is within 3.5e-7 absolute and 6 float32
  ulps (NumPy's float32 `tanh`: 1.4 ulps; `tests/test_cpu_kernels.py`); NaN stays NaN and
  +-inf give +-1. The sigmoid is
  0.5 tanh(0.5 a) + 0.5 as everywhere else (8.13).

Each kernel takes (B, H) arrays whose rows are contiguous (the gate slices of a C-ordered
buffer, as the cells pass them) and (H,) biases; outputs may be the same arrays as inputs.
Numba compiles a kernel the first time it is needed for a dtype (about a second; cached on
disk afterwards) and runs it without the GIL.
"""

import math

import numpy as np
from llvmlite import ir
from numba import literal_unroll, njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload
from numba.np.arrayobj import make_array, populate_array

__all__ = ["build"]

try:  # sha256 of this source as imported: `cpu_loops` keys its disk cache to it
    import hashlib

    with open(__file__, "rb") as _f:
        SOURCE_DIGEST = hashlib.sha256(_f.read()).hexdigest()
except OSError:
    SOURCE_DIGEST = None

_JIT = dict(cache=True, nogil=True, error_model="numpy")  # no fastmath: every operation rounded as written


# ------------------------------------------------------------------------------ rows
@intrinsic
def _row(typingctx, a, b):
    """Row b of a 2-D array whose rows are contiguous (`_check`), as a C-ordered 1-D array: no copy,
    and a pointer the compiler cannot follow from row to row.

    Why. The gate blocks the cells pass are column slices of one (B, G*H) buffer. Numba's
    `np.ascontiguousarray(a[b])` of such a row checks its strides at run time and keeps a copy
    branch: measured 4.9 us a kernel call on 32 rows against 1.9 for separate C-ordered arrays.
    A plain view of the row is worse: the compiler sees the rows of r, z and n as one buffer at
    fixed offsets, cannot prove a row's writes miss the other blocks' rows, and runs the scalar
    loop (26 us). An empty `asm` hands each row's address over as an opaque value, so the
    compiler checks the row's arrays for overlap once a row, finds none, and runs the vector
    loop (1.8 us). Nothing is reference-counted: the caller holds the array.
    """
    if not (isinstance(a, types.Array) and a.ndim == 2 and isinstance(b, types.Integer)):
        return None
    row_type = types.Array(a.dtype, 1, "C")

    def codegen(context, builder, sig, args):
        array_type = sig.args[0]
        array = make_array(array_type)(context, builder, value=args[0])
        shape = cgutils.unpack_tuple(builder, array.shape, 2)
        strides = cgutils.unpack_tuple(builder, array.strides, 2)
        index = context.cast(builder, args[1], sig.args[1], types.intp)
        zero = context.get_constant(types.intp, 0)
        ptr = cgutils.get_item_pointer2(context, builder, array.data, shape, strides, array_type.layout, [index, zero])
        ptr = builder.asm(ir.FunctionType(ptr.type, [ptr.type]), "", "=r,0", [ptr], side_effect=False)
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(context.get_data_type(array_type.dtype)))
        row = make_array(row_type)(context, builder)
        populate_array(row, data=ptr, shape=cgutils.pack_array(builder, [shape[1]]),
                       strides=cgutils.pack_array(builder, [itemsize]), itemsize=itemsize, meminfo=None, parent=None)
        return row._getvalue()

    return row_type(a, b), codegen


# ------------------------------------------------------------------------------ scalars
def tanh_(x):
    """tanh of one float32 or float64 (implemented below for Numba only)."""
    raise NotImplementedError("tanh_ runs inside Numba-compiled kernels only")


def half(x):
    """0.5 in the type of x (for Numba: a float64 literal would promote float32 arithmetic)."""
    raise NotImplementedError("half runs inside Numba-compiled kernels only")


def one(x):
    """1 in the type of x."""
    raise NotImplementedError("one runs inside Numba-compiled kernels only")


def zero(x):
    """0 in the type of x."""
    raise NotImplementedError("zero runs inside Numba-compiled kernels only")


def _constant(value):
    """The Numba implementation of a constant in the float type of its argument."""

    def typed(x):
        if isinstance(x, types.Float) and x.bitwidth == 32:
            c = np.float32(value)
        else:
            c = np.float64(value)
        return lambda x: c

    return typed


overload(half)(_constant(0.5))
overload(one)(_constant(1.0))
overload(zero)(_constant(0.0))

# Eigen's float32 tanh (generic_fast_tanh_float), as XLA uses it
_CLAMP = np.float32(7.90531110763549805)
_TINY = np.float32(0.0004)
_P = [np.float32(c) for c in (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11,
                              5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04,
                              4.89352455891786e-03)]
_Q = [np.float32(c) for c in (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03,
                              4.89352518554385e-03)]
P13, P11, P9, P7, P5, P3, P1 = _P
Q6, Q4, Q2, Q0 = _Q


@njit(**_JIT)
def _tanh32(x):
    """float32 tanh, Eigen's rational approximation: vectorisable, within 6 float32 ulps."""
    y = min(max(x, -_CLAMP), _CLAMP)  # outside [-7.9, 7.9] tanh rounds to +-1 in float32
    y2 = y * y
    p = P13 * y2 + P11
    p = p * y2 + P9
    p = p * y2 + P7
    p = p * y2 + P5
    p = p * y2 + P3
    p = p * y2 + P1
    p = p * y
    q = Q6 * y2 + Q4
    q = q * y2 + Q2
    q = q * y2 + Q0
    r = p / q
    r = x if abs(x) < _TINY else r  # tanh(x) = x to float32 precision; p underflows for subnormal x
    return r if x == x else x  # NaN stays NaN (min and max would have clamped it)


@overload(tanh_)
def _tanh_impl(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x: _tanh32(x)
    return lambda x: math.tanh(x)


@njit(**_JIT)
def sigmoid_(a):
    """sigma(a) = 0.5 tanh(0.5 a) + 0.5 (8.13), as `recurrent.sigmoid_`."""
    a = a * half(a)
    a = tanh_(a)
    a = a * half(a)
    return a + half(a)


@njit(**_JIT)
def _check(a, B, H):
    """Raise unless a is (B, H) (or (H,), a bias) with contiguous rows.

    Numba checks no bounds, so a wrong shape would read or write past the array; and `_row`
    reads a row as contiguous.
    """
    if a.shape[a.ndim - 1] != H or (a.ndim == 2 and a.shape[0] != B):
        raise ValueError("npyrnn fused CPU kernel: every array must be (B, H) like the outputs, or (H,) for a bias")
    if H > 1 and a.strides[a.ndim - 1] != a.itemsize:
        raise ValueError("npyrnn fused CPU kernel: rows must be contiguous; pass np.ascontiguousarray(a)")


# ------------------------------------------------------------------------------ RNN
# Each kernel: check every argument, then for each row b, contiguous views of row b (`_row`), then one
# pass over its H elements that reads every input before writing any output.
@njit(**_JIT)
def rnn_fwd_tanh(x, gh, h):
    """h = tanh(x + gh) (2.1), (2.2); x, gh, h (B, H), h may be x."""
    for a in literal_unroll((x, gh, h)):
        _check(a, h.shape[0], h.shape[1])
    in_place = x.ctypes.data == h.ctypes.data and x.strides[0] == h.strides[0]  # the training loop: h_t in place
    for b in range(h.shape[0]):
        x_, gh_, h_ = _row(x, b), _row(gh, b), _row(h, b)
        if in_place:  # the same loop with one name for x and h, which the compiler can vectorise
            for j in range(h.shape[1]):
                h_[j] = tanh_(h_[j] + gh_[j])  # (2.1), (2.2)
        else:
            for j in range(h.shape[1]):
                a = x_[j] + gh_[j]  # a_t (2.1)
                h_[j] = tanh_(a)  # (2.2)


@njit(**_JIT)
def _relu(a):
    """max(a, 0), NaN kept."""
    return a if (a > zero(a) or a != a) else zero(a)  # (2.2), NaN kept as numpy.maximum does


@njit(**_JIT)
def rnn_fwd_relu(x, gh, h):
    """h = relu(x + gh) (2.1), (2.2); x, gh, h (B, H), h may be x."""
    for a in literal_unroll((x, gh, h)):
        _check(a, h.shape[0], h.shape[1])
    in_place = x.ctypes.data == h.ctypes.data and x.strides[0] == h.strides[0]
    for b in range(h.shape[0]):
        x_, gh_, h_ = _row(x, b), _row(gh, b), _row(h, b)
        if in_place:
            for j in range(h.shape[1]):
                h_[j] = _relu(h_[j] + gh_[j])  # (2.1), (2.2)
        else:
            for j in range(h.shape[1]):
                h_[j] = _relu(x_[j] + gh_[j])  # (2.1), (2.2)


@njit(**_JIT)
def rnn_bwd_tanh(y, carry, da):
    """da = (da + carry) (1 - y^2) (2.3)-(2.5a); y = h_t, carry, da (B, H)."""
    for a in literal_unroll((y, carry, da)):
        _check(a, da.shape[0], da.shape[1])
    for b in range(da.shape[0]):
        y_, c_, da_ = _row(y, b), _row(carry, b), _row(da, b)
        for j in range(da.shape[1]):
            s = y_[j] * y_[j]
            s = one(s) - s  # tanh'(a_t) = 1 - h_t^2 (2.5a)
            d = da_[j] + c_[j]  # (2.3)
            da_[j] = d * s  # (2.4)


@njit(**_JIT)
def rnn_bwd_relu(y, carry, da):
    """da = (da + carry) 1[y > 0] (2.3)-(2.5b); y = h_t, carry, da (B, H)."""
    for a in literal_unroll((y, carry, da)):
        _check(a, da.shape[0], da.shape[1])
    for b in range(da.shape[0]):
        y_, c_, da_ = _row(y, b), _row(carry, b), _row(da, b)
        for j in range(da.shape[1]):
            s = one(y_[j]) if y_[j] > zero(y_[j]) else zero(y_[j])  # relu'(a_t) = 1[h_t > 0] (2.5b)
            d = da_[j] + c_[j]  # (2.3)
            da_[j] = d * s  # (2.4)


# ------------------------------------------------------------------------------ GRU
@njit(**_JIT)
def gru_after_fwd(ghr, ghz, h_prev, b_hn, r, z, n, ghn, h):
    """One GRU step with the reset gate after the product (8.1), (8.2), (8.3a), (8.4); all (B, H), b_hn (H,).

    Two passes over each row, r and z, then n and h, as `lstm_fwd` (n_t's tanh waits for r_t's):
    the same operations in the same order, the same bits; 32 rows at H = 256: 9.3 us in one pass,
    7.4 in two (docs/performance.md).
    """
    for a in literal_unroll((ghr, ghz, h_prev, b_hn, r, z, n, ghn, h)):
        _check(a, h.shape[0], h.shape[1])
    b_hn_ = np.ascontiguousarray(b_hn)
    for b in range(h.shape[0]):
        ghr_, ghz_, hp_ = _row(ghr, b), _row(ghz, b), _row(h_prev, b)
        r_, z_, n_ = _row(r, b), _row(z, b), _row(n, b)
        ghn_, h_ = _row(ghn, b), _row(h, b)
        for j in range(h.shape[1]):
            r_[j] = sigmoid_(r_[j] + ghr_[j])  # r_t (8.1)
            z_[j] = sigmoid_(z_[j] + ghz_[j])  # z_t (8.2)
        for j in range(h.shape[1]):
            hn = ghn_[j] + b_hn_[j]  # h_{t-1} W_hn^T + b_hn, kept for backward
            an = r_[j] * hn
            an = n_[j] + an
            nt = tanh_(an)  # n_t (8.3a)
            d = hp_[j] - nt
            d = d * z_[j]
            n_[j], ghn_[j] = nt, hn
            h_[j] = nt + d  # h_t = n_t + z_t (h_{t-1} - n_t) (8.4)


@njit(**_JIT)
def gru_after_fwd_nobias(ghr, ghz, h_prev, r, z, n, ghn, h):
    """`gru_after_fwd` without b_hn (its two passes)."""
    for a in literal_unroll((ghr, ghz, h_prev, r, z, n, ghn, h)):
        _check(a, h.shape[0], h.shape[1])
    for b in range(h.shape[0]):
        ghr_, ghz_, hp_ = _row(ghr, b), _row(ghz, b), _row(h_prev, b)
        r_, z_, n_ = _row(r, b), _row(z, b), _row(n, b)
        ghn_, h_ = _row(ghn, b), _row(h, b)
        for j in range(h.shape[1]):
            r_[j] = sigmoid_(r_[j] + ghr_[j])  # r_t (8.1)
            z_[j] = sigmoid_(z_[j] + ghz_[j])  # z_t (8.2)
        for j in range(h.shape[1]):
            an = r_[j] * ghn_[j]  # r_t * h_{t-1} W_hn^T
            an = n_[j] + an
            nt = tanh_(an)  # n_t (8.3a)
            d = hp_[j] - nt
            d = d * z_[j]
            n_[j] = nt
            h_[j] = nt + d  # h_t = n_t + z_t (h_{t-1} - n_t) (8.4)


@njit(**_JIT)
def gru_before_rz(ghr, ghz, h_prev, r, z, rh):
    """d2l's GRU, first half of a step: r, z (8.1), (8.2) and r * h_{t-1}; all (B, H)."""
    for a in literal_unroll((ghr, ghz, h_prev, r, z, rh)):
        _check(a, r.shape[0], r.shape[1])
    for b in range(r.shape[0]):
        ghr_, ghz_, hp_ = _row(ghr, b), _row(ghz, b), _row(h_prev, b)
        r_, z_, rh_ = _row(r, b), _row(z, b), _row(rh, b)
        for j in range(r.shape[1]):
            ar = sigmoid_(r_[j] + ghr_[j])  # r_t (8.1)
            az = sigmoid_(z_[j] + ghz_[j])  # z_t (8.2)
            hp = hp_[j]
            r_[j] = ar
            z_[j] = az
            rh_[j] = ar * hp  # r_t * h_{t-1}, the input of W_hn (8.3b)


@njit(**_JIT)
def gru_before_n(ghn, z, h_prev, n, h):
    """d2l's GRU, second half: n (8.3b) and h_t (8.4); all (B, H), h may be h_prev."""
    for a in literal_unroll((ghn, z, h_prev, n, h)):
        _check(a, h.shape[0], h.shape[1])
    for b in range(h.shape[0]):
        ghn_, z_, hp_ = _row(ghn, b), _row(z, b), _row(h_prev, b)
        n_, h_ = _row(n, b), _row(h, b)
        for j in range(h.shape[1]):
            nt = tanh_(n_[j] + ghn_[j])  # n_t (8.3b)
            d = hp_[j] - nt
            d = d * z_[j]
            n_[j] = nt
            h_[j] = nt + d  # (8.4)


@njit(**_JIT)
def _gru_slopes(z, n, h_prev):
    """S_n = (1 - n^2)(1 - z) (8.6), S_z = z (1 - z)(h_{t-1} - n) (8.7)."""
    sn = n * n
    sn = one(sn) - sn
    omz = one(z) - z
    sn = sn * omz  # (8.6)
    sz = z * omz
    hmn = h_prev - n
    return sn, sz * hmn  # (8.7)


@njit(**_JIT)
def gru_after_bwd(dy, carry, r, z, n, h_prev, ghn, da_r, da_z, da_n, dghn, zdh):
    """One backward GRU step, reset gate after (8.5)-(8.10a); all (B, H); zdh in and out."""
    for a in literal_unroll((dy, carry, r, z, n, h_prev, ghn, da_r, da_z, da_n, dghn, zdh)):
        _check(a, zdh.shape[0], zdh.shape[1])
    for b in range(zdh.shape[0]):
        dy_, c_, r_, z_ = (_row(dy, b), _row(carry, b), _row(r, b), _row(z, b))
        n_, hp_, ghn_ = _row(n, b), _row(h_prev, b), _row(ghn, b)
        dar_, daz_, dan_ = _row(da_r, b), _row(da_z, b), _row(da_n, b)
        dghn_, zdh_ = _row(dghn, b), _row(zdh, b)
        for j in range(zdh.shape[1]):
            rj, zj = r_[j], z_[j]
            sn, sz = _gru_slopes(zj, n_[j], hp_[j])
            sr = one(rj) - rj
            sr = sr * rj
            sr = sr * ghn_[j]  # S_r (8.9a)
            c = c_[j] + zdh_[j]  # (8.10a)
            dh = dy_[j] + c  # (8.5)
            dan = dh * sn  # (8.6)
            dan_[j] = dan
            daz_[j] = dh * sz  # (8.7)
            dghn_[j] = dan * rj  # (8.8a)
            dar_[j] = dan * sr  # (8.9a)
            zdh_[j] = dh * zj  # via z_t * h_{t-1} (8.10a)


@njit(**_JIT)
def gru_before_bwd_a(dy, carry, rdh, z, n, h_prev, da_z, da_n, zdh):
    """d2l's GRU backward, first half (8.5)-(8.7), (8.10b); all (B, H); zdh in and out."""
    for a in literal_unroll((dy, carry, rdh, z, n, h_prev, da_z, da_n, zdh)):
        _check(a, zdh.shape[0], zdh.shape[1])
    for b in range(zdh.shape[0]):
        dy_, c_, rdh_ = _row(dy, b), _row(carry, b), _row(rdh, b)
        z_, n_, hp_ = _row(z, b), _row(n, b), _row(h_prev, b)
        daz_, dan_, zdh_ = _row(da_z, b), _row(da_n, b), _row(zdh, b)
        for j in range(zdh.shape[1]):
            zj = z_[j]
            sn, sz = _gru_slopes(zj, n_[j], hp_[j])
            c = c_[j] + rdh_[j]  # (8.10b)
            c = c + zdh_[j]  # (8.10b)
            dh = dy_[j] + c  # (8.5)
            dan_[j] = dh * sn  # (8.6)
            daz_[j] = dh * sz  # (8.7)
            zdh_[j] = dh * zj


@njit(**_JIT)
def gru_before_bwd_b(drh, r, h_prev, da_r, rdh):
    """d2l's GRU backward, second half (8.9b), (8.10b); all (B, H)."""
    for a in literal_unroll((drh, r, h_prev, da_r, rdh)):
        _check(a, rdh.shape[0], rdh.shape[1])
    for b in range(rdh.shape[0]):
        drh_, r_, hp_ = _row(drh, b), _row(r, b), _row(h_prev, b)
        dar_, rdh_ = _row(da_r, b), _row(rdh, b)
        for j in range(rdh.shape[1]):
            rj, d = r_[j], drh_[j]
            sr = one(rj) - rj
            sr = sr * rj
            sr = sr * hp_[j]  # S_r (8.9b)
            dar_[j] = d * sr  # (8.9b)
            rdh_[j] = d * rj  # via r_t * h_{t-1} (8.10b)


# ------------------------------------------------------------------------------ LSTM
@njit(**_JIT)
def lstm_fwd(ghi, ghf, ghg, gho, c_prev, gi, gf, gg, go, c, tc, m):
    """One LSTM step (9.1)-(9.4): gates in place, c, tanh(c), m; all (B, H), c may be c_prev.

    Two passes over each row, the gates, then c, tanh(c) and m: in one pass an element's five
    tanh follow one another (tanh(c_t) needs the gates' four), a chain of some 115 cycles for
    200 instructions, and the processor overlaps few elements' chains; apart, each pass's
    elements overlap freely. The same operations in the same order, so the same bits; 16 rows
    at H = 256: 10 us in one pass, 6.1 in two (docs/performance.md).
    """
    for a in literal_unroll((ghi, ghf, ghg, gho, c_prev, gi, gf, gg, go, c, tc, m)):
        _check(a, c.shape[0], c.shape[1])
    for b in range(c.shape[0]):
        ghi_, ghf_, ghg_, gho_ = (_row(ghi, b), _row(ghf, b), _row(ghg, b), _row(gho, b))
        gi_, gf_, gg_, go_ = (_row(gi, b), _row(gf, b), _row(gg, b), _row(go, b))
        cp_, c_, tc_, m_ = (_row(c_prev, b), _row(c, b), _row(tc, b), _row(m, b))
        for j in range(c.shape[1]):
            gi_[j] = sigmoid_(gi_[j] + ghi_[j])  # a_t (9.1), gates (9.2)
            gf_[j] = sigmoid_(gf_[j] + ghf_[j])
            gg_[j] = tanh_(gg_[j] + ghg_[j])
            go_[j] = sigmoid_(go_[j] + gho_[j])
        for j in range(c.shape[1]):
            ct = gf_[j] * cp_[j]
            ig = gi_[j] * gg_[j]
            ct = ct + ig  # c_t = f * c_{t-1} + i * g (9.3)
            tct = tanh_(ct)
            c_[j] = ct
            tc_[j] = tct
            m_[j] = go_[j] * tct  # m_t = o * tanh(c_t) (9.4)


@njit(**_JIT)
def _lstm_step_back(dm, gi, gf, gg, go, tc, c_prev, cc):
    """(9.9)-(9.12) for one element; returns da_i, da_f, da_g, da_o and the new carry of dL/dc."""
    k = tc * tc
    k = one(k) - k
    k = k * go  # o (1 - tanh^2(c_t)) (9.10)
    so = one(go) - go
    so = so * go
    so = so * tc  # tanh(c_t) o (1 - o) (9.9)
    si = one(gi) - gi
    si = si * gi
    si = si * gg  # (9.11)
    sf = one(gf) - gf
    sf = sf * gf
    sf = sf * c_prev  # (9.11)
    sg = gg * gg
    sg = one(sg) - sg
    sg = sg * gi  # (9.11)
    da_o = dm * so  # (9.9)
    dc = dm * k
    dc = dc + cc  # (9.10)
    return dc * si, dc * sf, dc * sg, da_o, dc * gf  # (9.11), (9.12)


@njit(**_JIT)
def lstm_bwd(dm, gi, gf, gg, go, tc, c_prev, da_i, da_f, da_g, da_o, cc):
    """One backward LSTM step from dm (9.9)-(9.12); all (B, H); cc, the carry of dL/dc, in and out."""
    for a in literal_unroll((dm, gi, gf, gg, go, tc, c_prev, da_i, da_f, da_g, da_o, cc)):
        _check(a, cc.shape[0], cc.shape[1])
    for b in range(cc.shape[0]):
        dm_, tc_, cp_, cc_ = (_row(dm, b), _row(tc, b), _row(c_prev, b), _row(cc, b))
        gi_, gf_, gg_, go_ = (_row(gi, b), _row(gf, b), _row(gg, b), _row(go, b))
        di_, df_, dg_, do_ = (_row(da_i, b), _row(da_f, b), _row(da_g, b), _row(da_o, b))
        for j in range(cc.shape[1]):
            di_[j], df_[j], dg_[j], do_[j], cc_[j] = _lstm_step_back(
                dm_[j], gi_[j], gf_[j], gg_[j], go_[j], tc_[j], cp_[j], cc_[j])


@njit(**_JIT)
def lstm_bwd_noproj(dy, ch, gi, gf, gg, go, tc, c_prev, da_i, da_f, da_g, da_o, cc):
    """`lstm_bwd` with dm = dy + ch (9.6), no projection; all (B, H)."""
    for a in literal_unroll((dy, ch, gi, gf, gg, go, tc, c_prev, da_i, da_f, da_g, da_o, cc)):
        _check(a, cc.shape[0], cc.shape[1])
    for b in range(cc.shape[0]):
        dy_, ch_ = _row(dy, b), _row(ch, b)
        tc_, cp_, cc_ = _row(tc, b), _row(c_prev, b), _row(cc, b)
        gi_, gf_, gg_, go_ = (_row(gi, b), _row(gf, b), _row(gg, b), _row(go, b))
        di_, df_, dg_, do_ = (_row(da_i, b), _row(da_f, b), _row(da_g, b), _row(da_o, b))
        for j in range(cc.shape[1]):
            dm = dy_[j] + ch_[j]  # without a projection dm_t = dh_t = dout_t + c^h_t (9.6)
            di_[j], df_[j], dg_[j], do_[j], cc_[j] = _lstm_step_back(
                dm, gi_[j], gf_[j], gg_[j], go_[j], tc_[j], cp_[j], cc_[j])


# ------------------------------------------------------------------------------ the gather's gradient
@njit(**_JIT)
def scatter_step(ids, src, sums, with_sum, t, r0, r1):
    """sums[h][ids[t, b]] += src[b] for b = r0, ..., r1 - 1 in order (5.2); with_sum, sums[h][V] += src[b]
    too (5.3); h = 0 for the rows b < B // 2, 1 for the others.

    ids (T, B) intp in [0, V); src (B, G*H), step t's rows of the input side's gradient; sums
    (2, V [+ 1], G*H) C-contiguous. Each half of a step's rows has its own sums: the two threads
    of a compiled backward loop (`cpu_loops`), each adding the rows it just computed, never add
    into the same row, and the bits do not depend on which thread took which rows. The caller
    adds the two halves' sums at the end.
    """
    half = ids.shape[1] // 2
    V = sums.shape[1] - 1 if with_sum else sums.shape[1]
    for b in range(r0, r1):
        out = sums[0] if b < half else sums[1]
        row, src_ = out[ids[t, b]], src[b]
        for j in range(src_.shape[0]):
            row[j] += src_[j]  # sum over the rows of token ids[t, b]                   (5.2)
        if with_sum:
            total = out[V]
            for j in range(src_.shape[0]):
                total[j] += src_[j]  # sum over every row                             (5.3)


@njit(**_JIT)
def scatter_rows(ids, src, sums, with_sum, reverse):
    """The gradient of a row gather over all steps: `scatter_step` for t = T-1, ..., 0 (0, ..., T-1
    with reverse), the order in which a backward time loop finishes them; sums[0] + sums[1] is it.

    ids (T, B) intp in [0, V); src (T, B, G*H) with contiguous rows; sums (2, V [+ 1], G*H)
    C-contiguous, zeros. The gradient of a row gather read once, row by row, as the backward
    pass left it, instead of a product with a (T B, V + 1) one-hot matrix
    (`recurrent._scatter_columns`): 2 T B G*H additions (T B G*H without the bias) instead of
    2 T B (V + 1) G*H flops, and no one-hot matrix. The sums run in the backward loop's order of
    steps, rows in order within a step, so the bits depend on nothing but the inputs and are
    those of a compiled backward loop that adds each step's rows as it finishes them.
    """
    T = ids.shape[0]
    for s in range(T):
        t = s if reverse else T - 1 - s
        scatter_step(ids, src[t], sums, with_sum, t, 0, ids.shape[1])


# ------------------------------------------------------------------------------ W^T for the step products
def _square_transpose(dt):
    """An intrinsic `square(src, lds, dst, ldd)`: the L by L block at dst = the one at src, transposed
    (addresses; leading dimensions in elements; L = 16 float32 or 8 float64, one 64-byte vector a
    row). The L rows are loaded as vectors and swapped in registers in log2(L) stages, each
    exchanging the off-diagonal blocks of every 2s by 2s block (s = L/2, ..., 1) with two-vector
    shuffles, then stored as L rows: L^2 values for 2 L memory operations and L log2(L) shuffles,
    where a loop of scalar copies makes 2 L^2."""
    lanes = 16 if dt == 0 else 8

    def codegen(context, builder, sig, args):
        src, lds, dst, ldd = args
        fty = ir.FloatType() if dt == 0 else ir.DoubleType()
        vty, i32, i64 = ir.VectorType(fty, lanes), ir.IntType(32), ir.IntType(64)
        item = 4 if dt == 0 else 8
        ps, pd = builder.inttoptr(src, fty.as_pointer()), builder.inttoptr(dst, fty.as_pointer())

        def row(base, ld, r):
            return builder.bitcast(builder.gep(base, [builder.mul(ld, ir.Constant(i64, r))]), vty.as_pointer())

        rows = [builder.load(row(ps, lds, r), align=item) for r in range(lanes)]
        s = lanes // 2
        while s:
            low = ir.Constant(ir.VectorType(i32, lanes), [j + lanes - s if j & s else j for j in range(lanes)])
            high = ir.Constant(ir.VectorType(i32, lanes), [j + lanes if j & s else j + s for j in range(lanes)])
            swapped = list(rows)
            for i in range(lanes):
                if not i & s:
                    swapped[i] = builder.shuffle_vector(rows[i], rows[i + s], low)
                    swapped[i + s] = builder.shuffle_vector(rows[i], rows[i + s], high)
            rows, s = swapped, s // 2
        for r in range(lanes):
            builder.store(rows[r], row(pd, ldd, r), align=item)
        return context.get_dummy_value()

    def square(typingctx, src, lds, dst, ldd):
        return types.void(types.int64, types.int64, types.int64, types.int64), codegen

    square.__name__ = f"_square_transpose_{'f32' if dt == 0 else 'f64'}"
    return intrinsic(square)


_square_f32, _square_f64 = _square_transpose(0), _square_transpose(1)


@njit(**_JIT)
def transpose_into(src, dst):
    """dst = src^T: src (R, C) and dst (C, R).

    The C-ordered copy of a weight that the step products read (`Recurrent._step_weight`).
    Squares of 16 by 16 float32 values (8 by 8 float64) transposed in the vector registers
    (`_square_transpose`) where both arrays' rows are contiguous; the rows and columns past the
    last whole square, and any other strides, one value at a time.
    (1024, 256) float32, the LSTM's W_hh at H = 256, in cache: 35-45 us, against 60 copied eight
    rows at a time as before (itself 3 to 7 times faster than `numpy.copyto(dst, src.T)`); in a
    training step, W just updated, the eight-row copy took 150 (docs/performance.md). A copy:
    the bits of src.
    """
    R, C = src.shape
    if dst.shape[0] != C or dst.shape[1] != R:
        raise ValueError("npyrnn transpose_into: dst must have the shape of src transposed")
    item = src.itemsize
    L = 16 if item == 4 else 8
    R0, C0 = R - R % L, C - C % L
    if src.strides[1] != item or dst.strides[1] != item or src.strides[0] % item or dst.strides[0] % item:
        R0 = C0 = 0  # (rows not contiguous, or not a whole number of items apart: every value one at a time)
    if R0 and C0:
        s, d = np.int64(src.ctypes.data), np.int64(dst.ctypes.data)
        lds, ldd = np.int64(src.strides[0] // item), np.int64(dst.strides[0] // item)
        for i0 in range(0, R0, L):
            for j0 in range(0, C0, L):
                if item == 4:
                    _square_f32(s + item * (i0 * lds + j0), lds, d + item * (j0 * ldd + i0), ldd)
                else:
                    _square_f64(s + item * (i0 * lds + j0), lds, d + item * (j0 * ldd + i0), ldd)
    else:
        R0 = C0 = 0
    for i in range(R0):  # the columns past the last whole square
        for j in range(C0, C):
            dst[j, i] = src[i, j]
    for i in range(R0, R):  # the rows past it
        for j in range(C):
            dst[j, i] = src[i, j]


# ------------------------------------------------------------------------------ the loss
# exp of a float32 z <= 0, vectorisable: Cephes' expf (z = n ln 2 + r, |r| <= ln 2 / 2, a degree-7
# polynomial for e^r; 2^n exact from a table, which the compiler gathers); within 2 float32 ulps
_LOG2E = np.float32(1.44269504088896341)
_LN2_HI, _LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)  # ln 2 = hi + lo, hi exact in 9 bits
_EXP_MIN = np.float32(-87.33654)  # ln of the smallest normal float32: below it, e^z is taken as e^-87.34
_X6, _X5, _X4, _X3, _X2 = (np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                                   4.1665795894e-2, 1.6666665459e-1))
_X1 = np.float32(5.0000001201e-1)
_POW2 = np.ldexp(np.float32(1.0), np.arange(-126, 1)).astype(np.float32)  # 2^n for n = -126, ..., 0


@njit(**_JIT)
def _exp32_nonpositive(z):
    """exp(z) for a float32 z <= 0 (a softmax's shifted logit): Cephes' expf, vectorisable.

    Below ln(FLT_MIN) = -87.34 the result is FLT_MIN-sized instead of smaller or 0: against a
    sum of at least 1 (the row's maximum contributes e^0) that is below float32's resolution.
    NaN stays NaN.
    """
    y = max(z, _EXP_MIN)
    n = np.floor(y * _LOG2E + half(y))  # in [-126, 0]
    r = y - n * _LN2_HI
    r = r - n * _LN2_LO
    p = _X6 * r + _X5
    p = p * r + _X4
    p = p * r + _X3
    p = p * r + _X2
    p = p * r + _X1
    p = p * (r * r) + r + one(r)  # e^r
    e = p * _POW2[np.int64(n) + 126]  # e^r 2^n
    return e if z == z else z


@njit(**_JIT)
def softmax_xent32(logits, targets, dlogits):
    """The mean cross-entropy of softmax(logits) against targets and its gradient, float32, in one pass.

    `losses.softmax_cross_entropy`'s array operations, row by row: the row's maximum (1.1), the
    exponentials of the shifted logits and their sum, -log p_y = log s - z_y (1.2), then
    dlogits = (e / s - onehot(y)) / N (1.3), (1.4), with the same divisions. logits and dlogits
    (N, V) float32 C-contiguous, targets (N,) integers. Returns the loss, the float64 sum of
    the float32 terms over N (NumPy's mean sums them in float32, pairwise), or -1 - n for the
    first row n whose target is outside [0, V), having written nothing past the arrays.

    The exponential is `_exp32_nonpositive` (within 1 ulp; NumPy's SIMD exp within 2.4 here)
    and a row's sum is four running sums added at the end, so the bits differ from the array
    operations' in the last place here and there (`tests/test_cpu_kernels.py`). A NaN or
    infinite logit makes its row's loss and gradient NaN, as there.
    """
    N, V = logits.shape
    total = 0.0
    n_ = np.float32(N)
    for n in range(N):
        y = targets[n]
        if y < 0 or y >= V:
            return -1.0 - n
        row, d = logits[n], dlogits[n]
        m0 = m1 = m2 = m3 = row[0]  # four running maxima, as the sums below
        for j in range(0, V - 3, 4):
            m0 = max(m0, row[j])
            m1 = max(m1, row[j + 1])
            m2 = max(m2, row[j + 2])
            m3 = max(m3, row[j + 3])
        for j in range(V - V % 4, V):
            m0 = max(m0, row[j])
        m = max(max(m0, m1), max(m2, m3))  # (1.1); a NaN is caught by the exponential below
        for j in range(V):
            d[j] = _exp32_nonpositive(row[j] - m)  # e^(z - max z), vectorised             (1.1)
        s0 = s1 = s2 = s3 = zero(m)  # four running sums: a quarter of one sum's latency
        for j in range(0, V - 3, 4):
            s0 += d[j]
            s1 += d[j + 1]
            s2 += d[j + 2]
            s3 += d[j + 3]
        for j in range(V - V % 4, V):
            s0 += d[j]
        s = (s0 + s1) + (s2 + s3)
        e_y = d[y]
        total += np.float64(np.log(s) - (row[y] - m))  # -log p_y = log sum exp z - z_y      (1.2)
        for j in range(V):
            d[j] = d[j] / s / n_  # softmax(logits), over the N rows                (1.3), (1.4)
        d[y] = (e_y / s - one(s)) / n_  # p - onehot(y), over the N rows                    (1.4)
    return total / N


# ------------------------------------------------------------------------------ clipping and SGD
@njit(**_JIT)
def clipped_sgd(params, grads, coef, lr):
    """g <- g coef (6.2), then p <- p - g lr (6.3), for each (p, g) pair, in one pass.

    params and grads: tuples of 1-D C-contiguous arrays of one dtype (the parameters and
    gradients raveled), coef and lr scalars of that dtype. Each product is rounded in the
    dtype, as `clip_grad_norm`'s `g *= coef` and `SGD`'s `multiply(g, lr)` then `p -= ...`
    round them: the same bits, without the gradient scaled into a scratch array in between.
    """
    for k in range(len(params)):
        p, g = params[k], grads[k]
        for i in range(p.shape[0]):
            gi = g[i] * coef  # (6.2)
            g[i] = gi
            p[i] = p[i] - gi * lr  # (6.3)


# ------------------------------------------------------------------------------ lookup
KERNELS = {f.__name__: f for f in (
    rnn_fwd_tanh, rnn_fwd_relu, rnn_bwd_tanh, rnn_bwd_relu,
    gru_after_fwd, gru_after_fwd_nobias, gru_before_rz, gru_before_n,
    gru_after_bwd, gru_before_bwd_a, gru_before_bwd_b,
    lstm_fwd, lstm_bwd, lstm_bwd_noproj,
)}


def build(spec, dtype):
    """The compiled kernel for `spec` (a `kernels.SPECS` entry) and dtype: one signature, any strides.

    Every argument is typed as a strided array, (H,) for the parameters named `b_*` and (B, H)
    for the others, so contiguous arrays and gate slices share one compiled version; inputs are
    typed read-only, so read-only arrays (a broadcast `dout`, say) are accepted too.
    """
    kernel = KERNELS[spec.name]
    scalar = types.float32 if str(dtype) == "float32" else types.float64
    inputs = [p.split()[-1] for p in spec.inputs.split(",")]
    outputs = [p.split()[-1] for p in spec.outputs.split(",")]
    signature = tuple(types.Array(scalar, 1 if n.startswith("b_") else 2, "A", readonly=n in inputs)
                      for n in inputs + outputs)  # inputs read-only: the caller's dout may be
    kernel.disable_compile(False)
    kernel.compile(signature)
    kernel.disable_compile(True)  # later calls convert to a compiled signature, never compile another
    return kernel
