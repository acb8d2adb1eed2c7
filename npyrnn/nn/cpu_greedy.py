"""Greedy generation compiled whole: `predict`'s loop at batch 1 in one call (the `fast` extra, Numba).

Why. Greedy `predict` (d2l's `predict_ch8`) calls the model's stepper once a token, and a step
is a dozen Python calls around little work: the input row, the step products, the cell's fused
kernel (Numba converts each of its arrays, 12 for the LSTM: 5 us), the output layer, its bias,
the argmax. For d2l's scratch LSTM at H = 256 that was 15 of 27 us a character, around a 1 MB
matrix-vector product of 11 us.

What. `run(model, state, out, forced)` runs `predict`'s warm-up on the prefix and its greedy
loop (and greedy `generate_stream`'s, a chunk a call) for a unidirectional `RNNLM` at batch 1 as
one compiled loop, statement for statement the stepper's (`Recurrent._stepper` and
each cell's `_step_fn`, then `RNNLM.stepper`'s output layer and `numpy.argmax`): layer 0's
input row from the same table (5.1), layer k's input side, the step products and the output
layer through `cpu_gemm.loop_product` with the plans `cpu_gemm.matvec` and `numpy.dot` follow
(a matrix-vector product, cut in two between the cores where `cpu_gemm.blocks` cuts it), the
same compiled kernels as `cpu_loops`. So it writes the ids the stepper's loop writes and leaves
the state it leaves, bit for bit (`tests/test_cpu_greedy.py`).

Used on NumPy while the split products are on (`backend.set_cpu_threads`, as `npyrnn generate`
calls it) and the cell's fused kernels are on; `run` returns 0, having done nothing, otherwise
(and for a bidirectional model, which has no step-by-step form, a state or an output array of
another shape, dtype or layout than the stepper's, parameters not C-ordered in the model's
dtype), and `predict` runs the stepper. The same bits as the stepper where both get the split
products (the stepper falls back to `numpy.dot` while another thread holds them, which may
differ in the last place where `blocks` cuts a product). A one-layer model's weights are read
where they are; a deeper model's are copied once a call. `enabled = False` turns it off.
"""

import numpy as np
from numba import njit

from npyrnn import backend
from npyrnn.nn import cpu_gemm, kernels
from npyrnn.nn.cpu_gemm import TRANS, loop_product
from npyrnn.nn.cpu_loops import (_gru_after_fwd, _gru_after_fwd_nobias, _gru_before_n, _gru_before_rz, _lstm_fwd,
                                 _rnn_fwd_relu, _rnn_fwd_tanh)

__all__ = ["run"]

enabled = True  # False: `predict` runs the stepper a token at a time
CHUNK = 4096  # tokens a compiled call (40-80 ms): Ctrl-C is seen between calls

_JIT = dict(cache=True, nogil=True, error_model="numpy")
RNN_TANH, RNN_RELU, GRU_AFTER, GRU_BEFORE, LSTM = range(5)  # the loop's `cell`


@njit(**_JIT)
def _argmax(row):
    """`numpy.argmax` of a row: the first largest value, or the first NaN if there is one."""
    best, top = 0, row[0]
    if top != top:
        return 0
    for j in range(1, row.shape[0]):
        v = row[j]
        if v != v:
            return j
        if v > top:
            best, top = j, v
    return best


@njit(**_JIT)
def _add_row(x, b):
    """x[0] += b, one rounding an element (`numpy.add(x, b, out=x)`)."""
    row = x[0]
    for j in range(b.shape[0]):
        row[j] = row[j] + b[j]


@njit(**_JIT)
def _layer_step(ctl, ts, hs, ps, helpers, plans, cell, k, h, c, W_hh, W_n, W_hr, b_hn, has_bias, xw, gh, tmp, rh, m):
    """Layer k's step, xw holding its input side (`_step_fn` of each cell); h, c (L, 1, *) updated in place."""
    H = tmp.shape[1]
    took = 1
    if cell == RNN_TANH or cell == RNN_RELU:
        took = loop_product(ctl, ts, h[k], W_hh[k], tmp, hs, ps, TRANS, plans[2], helpers)  # (2.1)
        if cell == RNN_TANH:
            _rnn_fwd_tanh(xw, tmp, h[k])  # (2.1), (2.2)
        else:
            _rnn_fwd_relu(xw, tmp, h[k])  # (2.1), (2.2)
    elif cell == GRU_AFTER:
        took = loop_product(ctl, ts, h[k], W_hh[k], gh, hs, ps, TRANS, plans[2], helpers)  # (8.1)-(8.3a)
        if has_bias:  # (8.1), (8.2), (8.3a), (8.4)
            _gru_after_fwd(gh[:, :H], gh[:, H : 2 * H], h[k], b_hn[k],
                           xw[:, :H], xw[:, H : 2 * H], xw[:, 2 * H :], gh[:, 2 * H :], h[k])
        else:
            _gru_after_fwd_nobias(gh[:, :H], gh[:, H : 2 * H], h[k],
                                  xw[:, :H], xw[:, H : 2 * H], xw[:, 2 * H :], gh[:, 2 * H :], h[k])
    elif cell == GRU_BEFORE:
        ghrz = gh[:, : 2 * H]
        took = loop_product(ctl, ts, h[k], W_hh[k], ghrz, hs, ps, TRANS, plans[2], helpers)  # (8.1, 8.2)
        _gru_before_rz(ghrz[:, :H], ghrz[:, H:], h[k], xw[:, :H], xw[:, H : 2 * H], rh)
        took = max(took, loop_product(ctl, ts, rh, W_n[k], tmp, hs, ps, TRANS, plans[3], helpers))  # (8.3b)
        _gru_before_n(tmp, xw[:, H : 2 * H], h[k], xw[:, 2 * H :], h[k])  # (8.3b), (8.4)
    else:
        took = loop_product(ctl, ts, h[k], W_hh[k], gh, hs, ps, TRANS, plans[2], helpers)  # (9.1)
        if W_hr.shape[0] == 0:
            _lstm_fwd(gh[:, :H], gh[:, H : 2 * H], gh[:, 2 * H : 3 * H], gh[:, 3 * H :], c[k],  # (9.1)-(9.4)
                      xw[:, :H], xw[:, H : 2 * H], xw[:, 2 * H : 3 * H], xw[:, 3 * H :], c[k], tmp, h[k])
        else:
            _lstm_fwd(gh[:, :H], gh[:, H : 2 * H], gh[:, 2 * H : 3 * H], gh[:, 3 * H :], c[k],  # (9.1)-(9.4)
                      xw[:, :H], xw[:, H : 2 * H], xw[:, 2 * H : 3 * H], xw[:, 3 * H :], c[k], tmp, m)
            took = max(took, loop_product(ctl, ts, m, W_hr[k], h[k], hs, ps, TRANS, plans[3], helpers))  # (9.5)
    return took


@njit(**_JIT)
def _greedy(ctl, ts, hs, ps, helpers, plans, part, lseq, out, forced, table, W_ih, b_ih, has_bias, cell, h, c, W_hh,
            W_n, W_hr, b_hn, xw, gh, tmp, rh, m, W_out, b_out, has_out_bias, logits):
    """Feed token out[t, 0] for every t; from t = forced on, out[t + 1, 0] = the argmax of the
    logits after it: `predict`'s warm-up on the prefix, then its greedy loop.

    Layer 0's input side is row out[t, 0] of table (5.1); layer k's is h_{k-1} W_ih[k-1]^T (+
    b_ih[k-1]) (2.1). plans: the layers' input product, the output layer's, then the cell's.
    """
    L = h.shape[0]
    took = 1
    for t in range(out.shape[0] - 1):
        for k in range(L):
            if k == 0:
                row, src = xw[0], table[out[t, 0]]  # onehot(x_t) W_ih^T + b                 (5.1)
                for j in range(src.shape[0]):
                    row[j] = src[j]
            else:
                took = max(took, loop_product(ctl, ts, h[k - 1], W_ih[k - 1], xw, hs, ps, TRANS, plans[0], helpers))  # (2.1)
                if has_bias:
                    _add_row(xw, b_ih[k - 1])
            took = max(took, _layer_step(ctl, ts, hs, ps, helpers, plans, cell, k, h, c, W_hh, W_n, W_hr, b_hn,
                                         has_bias, xw, gh, tmp, rh, m))
        if t < forced:  # the prefix: the next token is given
            continue
        top = h[L - 1]
        took = max(took, loop_product(ctl, ts, top, W_out, logits, hs, ps, TRANS, plans[1], helpers))  # (2.12)
        if has_out_bias:
            _add_row(logits, b_out)
        out[t + 1, 0] = _argmax(logits[0])
    return took


def _fused(rnn, dtype):
    """The cell's code for `_greedy` where its forward kernels are on for `dtype` (as the stepper
    would use them), else None."""
    name = type(rnn).__name__
    if name == "RNN":
        ok = kernels.get(np, f"rnn_fwd_{rnn.nonlinearity}", dtype) is not None
        return (RNN_TANH if rnn.nonlinearity == "tanh" else RNN_RELU) if ok else None
    if name == "GRU":
        return (GRU_AFTER if rnn.reset_after else GRU_BEFORE) if rnn._fused_forward(np) is not None else None
    if name == "LSTM":
        return LSTM if kernels.get(np, "lstm_fwd", dtype) is not None else None
    return None


def _stack(arrays, shape, dtype):
    """The arrays stacked into one C-ordered (len, *shape) array: a copy of the weights as they are
    now, or a view of the one array of a one-layer model (a copy of 1 MB takes 70 us)."""
    if len(arrays) == 1 and arrays[0].flags.c_contiguous and arrays[0].dtype == dtype:
        return arrays[0].reshape((1,) + tuple(shape))
    out = np.empty((len(arrays),) + tuple(shape), dtype=dtype)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def run(model, state, out, forced=0):
    """Feed the ids out[:forced + 1, 0] a step at a time, then fill out[forced + 1:, 0] greedily, as
    `predict` does with the stepper; the number of ids fed.

    model: an `RNNLM` in evaluation mode; state: its state at batch 1, (L, 1, P) or the LSTM's
    (h, c), updated in place; out: (N, 1) int64, N > forced. Runs in calls of `CHUNK` tokens,
    between which Python can raise KeyboardInterrupt. Returns N - 1 when done; 0, with nothing
    done, where the loop cannot run here (see the module's docstring); fewer when the products
    were taken by another thread between two calls: out[:fed + 1] is then written and the state
    is the state after out[:fed], for the stepper to go on from.
    """
    rnn, linear = model.rnn, model.linear
    dtype = np.dtype(rnn.dtype)
    if not enabled or backend.split_products() is None or rnn.bidirectional or rnn._dropping():
        return 0
    L, H, P = rnn.num_layers, rnn.hidden_size, rnn.output_size
    h, c = state if isinstance(state, tuple) and len(state) == 2 else (state, None)
    states = [(h, (L, 1, P))] + ([(c, (L, 1, H))] if rnn._has_cell_state else [])
    if (rnn._has_cell_state and not isinstance(state, tuple)) or (not rnn._has_cell_state and c is not None):
        return 0
    if not all(isinstance(a, np.ndarray) and a.shape == shape and a.dtype == dtype and a.flags.c_contiguous
               and a.flags.writeable for a, shape in states):  # the loop reads and writes them without bounds
        return 0
    params = list(rnn.params.values()) + list(linear.params.values())
    if not all(p.dtype == dtype and p.flags.c_contiguous for p in params):  # the stepper's products read them as they are
        return 0
    if not (isinstance(out, np.ndarray) and out.dtype == np.int64 and out.ndim == 2 and out.shape[1] == 1
            and out.flags.c_contiguous and out.flags.writeable and 0 <= forced < out.shape[0]
            and linear.params["weight"].shape == (rnn.input_size, P)):  # each id chosen is the next input
        return 0
    given = out[: forced + 1, 0]
    if given.min() < 0 or given.max() >= rnn.input_size:  # the loop's gather reads no bounds
        return 0
    cell = _fused(rnn, rnn.dtype)
    if cell is None:
        return 0
    GH, V = rnn.GATES * H, rnn.input_size
    table = rnn._input_table(0, "", np.empty((rnn.input_size, GH), dtype=dtype))  # (5.1)
    W_ih = _stack([rnn._p("weight_ih", k, "") for k in range(1, L)], (GH, P), dtype)
    b_ih = _stack([rnn._input_bias(k, "") for k in range(1, L)] if rnn.bias else [], (GH,), dtype)
    W_hh = [rnn._p("weight_hh", k, "") for k in range(L)]
    W_n = np.empty((0, H, H), dtype=dtype)
    W_hr = np.empty((0, P, H), dtype=dtype)
    b_hn = np.empty((0, H), dtype=dtype)
    shapes = [(1, GH, P), (1, V, P), (1, GH, P)]
    if cell == GRU_BEFORE:
        W_n = _stack([W[2 * H :] for W in W_hh], (H, H), dtype)
        W_hh = [W[: 2 * H] for W in W_hh]
        shapes[2:] = [(1, 2 * H, H), (1, H, H)]
    elif cell == GRU_AFTER and rnn.bias:
        b_hn = _stack([rnn._p("bias_hh", k, "")[2 * H :] for k in range(L)], (H,), dtype)
    elif cell == LSTM and rnn.proj_size:
        W_hr = _stack([rnn._p("weight_hr", k, "") for k in range(L)], (P, H), dtype)
        shapes.append((1, P, H))
    W_hh = _stack(W_hh, W_hh[0].shape, dtype)
    if c is None:
        c = np.empty((L, 1, 0), dtype=dtype)
    W_out = linear.params["weight"]
    has_out_bias = bool(linear.bias)
    b_out = linear.params["bias"] if has_out_bias else np.empty(0, dtype=dtype)
    xw, gh = np.empty((1, GH), dtype=dtype), np.empty((1, GH), dtype=dtype)
    tmp, rh, m = (np.empty((1, H), dtype=dtype) for _ in range(3))
    logits = np.empty((1, V), dtype=dtype)
    if any(cpu_gemm.blocks(*shape)[0] != 1 for shape in shapes):  # a cut over k: `numpy.dot`'s bits are not its
        return 0
    keep = (W_ih, h, W_hh, W_n, W_hr, xw, gh, tmp, rh, m, W_out, logits)  # what the products read or write
    fed, n = 0, out.shape[0] - 1
    while fed < n:
        end = min(n, fed + CHUNK)
        if not cpu_gemm.run_loop(_greedy, shapes, dtype, keep, out[fed : end + 1], max(forced - fed, 0), table, W_ih,
                                 b_ih, bool(rnn.bias), cell, h, c, W_hh, W_n, W_hr, b_hn, xw, gh, tmp, rh, m, W_out,
                                 b_out, has_out_bias, logits, small=True):
            break
        fed = end
    return fed
