"""Long short-term memory, optionally projected: the cell's time loop forward and backward, one step.

Stacking, directions, the input side and dropout are the shared driver's
(`npyrnn/nn/recurrent.py`). Equation numbers (9.x) refer to `docs/derivations/lstm.md`.
Gate rows are torch's (i, f, g, o).

```text
a_t = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh = [a_i, a_f, a_g, a_o]     (9.1)
i, f, o = sigma(a_i), sigma(a_f), sigma(a_o);  g = tanh(a_g)                (9.2)
c_t = f * c_{t-1} + i * g                                                   (9.3)
m_t = o * tanh(c_t)                                                         (9.4)
h_t = m_t W_hr^T  (proj_size > 0), else h_t = m_t                           (9.5)
```

One matrix product per step serves all four gates, as in cuDNN.
"""

from npyrnn import backend
from npyrnn.nn import kernels
from npyrnn.nn.recurrent import Recurrent, hidden_product


class LSTM(Recurrent):
    """Multi-layer long short-term memory, like `torch.nn.LSTM` (with `proj_size`).

    Parameters
    ----------
    input_size : int
        Features per step I (for token-id input: the vocabulary size).
    hidden_size : int
        Hidden units H (the size of the cell state c).
    num_layers : int, default 1
    bias : bool, default True
    batch_first : bool, default False
        Input and output are (B, T, ...); the states stay (num_layers*D, B, ...).
    dropout : float, default 0.0
        Probability of zeroing each output of every layer but the last, in training mode only.
    bidirectional : bool, default False
    proj_size : int, default 0
        P > 0 projects every h_t to P features with `weight_hr_l{k}` (P, H) (9.5): then h,
        `out` and `h_n` have P features, `weight_hh` is (4H, P), layer k > 0 reads D*P
        features; `c_n` keeps H. Must be smaller than `hidden_size`, as in torch.
    dtype : {'float32', 'float64'}, default 'float32'
    init : {'normal', 'uniform'}, default 'normal'
        'normal': weights N(0, 0.01^2), biases 0 (d2l's scratch LSTM);
        'uniform': every parameter U(-1/sqrt(H), 1/sqrt(H)) (torch's default).
    seed : int or None
        Seeds the host generators that draw the parameters and the dropout masks.
    reuse_buffers : bool, default False, keyword only
        As for `RNN`: `out` lives in the layer's workspace and is overwritten by the next call.

    Attributes
    ----------
    params : dict
        `weight_ih_l{k}` (4H, I_k), `weight_hh_l{k}` (4H, P), `bias_ih_l{k}`, `bias_hh_l{k}`
        (4H,), rows (i, f, g, o), and `weight_hr_l{k}` (P, H) when projecting; suffix
        `_reverse` for the backward direction. P = proj_size or H.
    grads : dict
        Same keys and shapes as `params`.
    dropout_masks : list of arrays or None
        As for `RNN`, each (T, B, D*P).
    """

    GATES = 4
    _has_cell_state = True

    def __init__(
        self,
        input_size,
        hidden_size,
        num_layers=1,
        bias=True,
        batch_first=False,
        dropout=0.0,
        bidirectional=False,
        proj_size=0,
        dtype="float32",
        init="normal",
        seed=None,
        *,
        reuse_buffers=False,
    ):
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            dtype, init, seed, proj_size=proj_size, reuse_buffers=reuse_buffers,
        )

    def _repr_extra(self):
        return (("proj_size", self.proj_size),) if self.proj_size else ()

    def _activation_constants(self, xp):
        """Scale s and shift u with sigma(a) = s tanh(s a) + u for i, f, o and tanh(a) for g (8.13)."""
        H = self.hidden_size
        s = xp.full((4 * H,), 0.5, dtype=self.dtype)
        s[2 * H : 3 * H] = 1.0
        u = s.copy()
        u[2 * H : 3 * H] = 0.0
        return s, u

    # ----------------------------------------------------------------- forward
    def forward(self, x, hc0=None):
        """Run the LSTM over a whole sequence and cache what backward needs.

        Parameters
        ----------
        x : array, shape (T, B, I) float, or (T, B) integer token ids
            (B, T, ...) when `batch_first`.
        hc0 : tuple (h0, c0), optional
            h0 (num_layers*D, B, P), c0 (num_layers*D, B, H); None (or a None entry) means zeros.

        Returns
        -------
        out : array, shape (T, B, D*P)  ((B, T, D*P) when `batch_first`)
        (h_n, c_n) : arrays, shapes (num_layers*D, B, P) and (num_layers*D, B, H)
        """
        out, h_n, c_n = self._forward(x, hc0)
        return out, (h_n, c_n)

    __call__ = forward

    def _alloc_cell(self, rec, xp):
        T, B, H, key = rec.T, rec.B, self.hidden_size, rec.key
        rec.gx = self._buffer(f"gates{key}", (T, B, 4 * H), xp)  # input side, then [i, f, g, o]
        rec.C = self._buffer(f"C{key}", (T + 1, B, H), xp)  # c_0 and c_t, laid out like Hs
        rec.TC = self._buffer(f"TC{key}", (T, B, H), xp)  # tanh(c_t)
        # m_t = o * tanh(c_t): the input of the projection; without one, m_t is h_t itself
        rec.M = self._buffer(f"M{key}", (T, B, H), xp) if self.proj_size else rec.Hs[rec.o : rec.o + T]

    def _scan(self, rec, c0):
        xp = self.xp
        H = self.hidden_size
        Hs, C, G, o, p = rec.Hs, rec.C, rec.gx, rec.o, rec.p
        C[p * rec.T] = 0 if c0 is None else c0  # c_0 sits at index 0 or T
        W_hhT = self._step_weight("weight_hh", rec, xp)  # (P, 4H)
        W_hrT = self._step_weight("weight_hr", rec, xp) if self.proj_size else None  # (H, P)
        s, u = self._activation_constants(xp)
        gh = self._padded_buffer("gh", (rec.B, 4 * H), xp)  # rows 4H + 16 apart where 4H floats are 4 KiB
        tmp = self._buffer("tmp", (rec.B, H), xp)
        fused = kernels.get(xp, "lstm_fwd", self.dtype)  # None when the fused kernels are off or unavailable
        loops = self._cpu_loops(xp) if fused is not None else None
        if loops is not None and (loops.lstm_forward(G, gh, Hs, C, rec.TC, W_hhT, o, p, rec.reverse,
                                                     *self._loop_gather(rec, loops)) if W_hrT is None
                                  else loops.lstm_proj_forward(G, gh, Hs, C, rec.TC, rec.M, W_hhT, W_hrT, o, p,
                                                               rec.reverse, *self._loop_gather(rec, loops))):
            return  # the fused loop below, compiled whole
        self._input_rows(rec)  # token ids' input side, all steps at once                      (5.1)
        for t in range(rec.T - 1, -1, -1) if rec.reverse else range(rec.T):
            a = G[t]
            backend.matmul(Hs[p + t], W_hhT, out=gh)  # h_{t-1} W_hh^T, all four gates         (9.1)
            if fused is not None:  # the element-wise lines below in one fused kernel      (9.1)-(9.4)
                fused(*_gates(gh, H), C[p + t], *_gates(a, H), C[o + t], rec.TC[t], rec.M[t])
                if W_hrT is not None:
                    backend.matmul(rec.M[t], W_hrT, out=Hs[o + t])  # h_t = m_t W_hr^T         (9.5)
                continue
            a += gh  # a_t                                                                 (9.1)
            a *= s  # sigma for i, f, o and tanh for g in four passes over all gates       (9.2)
            xp.tanh(a, out=a)
            a *= s
            a += u
            i, f, g, og = a[:, :H], a[:, H : 2 * H], a[:, 2 * H : 3 * H], a[:, 3 * H :]
            c = C[o + t]
            xp.multiply(f, C[p + t], out=c)
            xp.multiply(i, g, out=tmp)
            c += tmp  # c_t = f * c_{t-1} + i * g                                          (9.3)
            xp.tanh(c, out=rec.TC[t])
            xp.multiply(og, rec.TC[t], out=rec.M[t])  # m_t = o * tanh(c_t)               (9.4)
            if W_hrT is not None:
                backend.matmul(rec.M[t], W_hrT, out=Hs[o + t])  # h_t = m_t W_hr^T             (9.5)

    def stepper(self, state):
        """A function that advances the LSTM by one time step, for generation.

        Parameters
        ----------
        state : tuple (h, c)
            h (num_layers, B, P), c (num_layers, B, H); both updated in place by every call.

        Returns
        -------
        step : callable
            `step(x_t) -> h_t`, x_t token ids (B,) or dense (B, I); returns the top layer's
            new h (B, P), a view of `h`. Nothing is allocated or checked per step.
        """
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise TypeError(f"LSTM.stepper: state must be a tuple (h, c) of two arrays, got {type(state).__name__}")
        return self._stepper(state[0], state[1])

    def _step_fn(self, k, h, c, xw):
        xp = self.xp
        H, B = self.hidden_size, h.shape[1]
        s, u = self._activation_constants(xp)
        gh = xp.empty((B, 4 * H), dtype=self.dtype)
        tmp = xp.empty((B, H), dtype=self.dtype)
        m = xp.empty((B, H), dtype=self.dtype) if self.proj_size else None
        recur = hidden_product(self._p("weight_hh", k, ""), B, xp)
        project = hidden_product(self._p("weight_hr", k, ""), B, xp) if self.proj_size else None
        i, f, g, og = xw[:, :H], xw[:, H : 2 * H], xw[:, 2 * H : 3 * H], xw[:, 3 * H :]
        fused = kernels.get(xp, "lstm_fwd", self.dtype) if self._rows_contiguous(h, c) else None

        def step():  # names from the enclosing function are updated with out=, never rebound
            recur(h[k], gh)  # (9.1)
            if fused is not None:  # the element-wise lines below in one fused kernel       (9.2)-(9.4)
                fused(*_gates(gh, H), c[k], i, f, g, og, c[k], tmp, h[k] if project is None else m)
                if project is not None:
                    project(m, h[k])  # (9.5)
                return
            xp.add(xw, gh, out=xw)
            xp.multiply(xw, s, out=xw)  # (9.2)
            xp.tanh(xw, out=xw)
            xp.multiply(xw, s, out=xw)
            xp.add(xw, u, out=xw)
            xp.multiply(f, c[k], out=c[k])
            xp.multiply(i, g, out=tmp)
            xp.add(c[k], tmp, out=c[k])  # (9.3)
            xp.tanh(c[k], out=tmp)
            if project is None:
                xp.multiply(og, tmp, out=h[k])  # (9.4)
            else:
                xp.multiply(og, tmp, out=m)  # (9.4)
                project(m, h[k])  # (9.5)

        return step

    # ---------------------------------------------------------------- backward
    def backward(self, dout, dhc_n=None):
        """Backpropagate through time; accumulate every parameter's gradient.

        Parameters
        ----------
        dout : array, shape (T, B, D*P) ((B, T, D*P) when `batch_first`), or None
        dhc_n : tuple (dh_n, dc_n), optional
            Gradients w.r.t. h_n (num_layers*D, B, P) and c_n (num_layers*D, B, H); None
            (or a None entry) means zeros.

        Returns
        -------
        dx : array, shape of x, or None for token-id input
        (dh0, dc0) : arrays, shapes (num_layers*D, B, P) and (num_layers*D, B, H)
        """
        xp = self.xp
        dout, B = self._check_backward(dout, xp)
        dh_n, dc_n = self._check_pair("dhc_n", dhc_n, B, xp)
        dx, dh0, dc0 = self._run_backward(dout, dh_n, dc_n)
        return dx, (dh0, dc0)

    def _scan_back(self, rec, dY, dh_n, dc_n):
        """The backward time loop of one (layer, direction); returns (dgx, dh0, dc0)."""
        xp = self.xp
        T, B, H, P = rec.T, rec.B, self.hidden_size, self.output_size
        Hs, C, G, p = rec.Hs, rec.C, rec.gx, rec.p
        W_hh = self._p("weight_hh", rec.k, rec.suffix)  # (4H, P)
        W_hr = self._p("weight_hr", rec.k, rec.suffix) if self.proj_size else None  # (P, H)
        f = G[:, :, H : 2 * H]  # the forget gate of every step, for (9.12)
        TC = rec.TC
        fused = kernels.get(xp, "lstm_bwd" if W_hr is not None else "lstm_bwd_noproj", self.dtype)  # None when the fused kernels are off or unavailable

        # the slopes of every step at once, from the cached gates and cell states:
        # dc_t times S_i, S_f, S_g gives dL/da_i, da_f, da_g (9.11); dm_t times S_o gives
        # dL/da_o (9.9); dm_t times K is the part of dc_t that comes through m_t (9.10)
        if fused is None:  # (with fused kernels each step computes its own slopes)
            S = self._buffer("slopes", (T, B, 4 * H), xp)
            S4 = S.reshape(T, B, 4, H)
            K = self._buffer("K", (T, B, H), xp)
            self._slopes(S, K, G, C[p : p + T], TC)

        dG = self._buffer("dG", (T, B, 4 * H), xp)  # dL/da_t for every t: [da_i, da_f, da_g, da_o]
        dG4 = dG.reshape(T, B, 4, H)
        # with a projection dh_t is kept for every t: dW_hr is one product after the loop (9.8)
        dHs = self._buffer("dHs", (T, B, P), xp) if W_hr is not None else None
        dh_step = self._buffer("dh", (B, P), xp)
        dm = self._buffer("dm", (B, H), xp) if W_hr is not None else None
        dc = self._buffer("dc", (B, H), xp)
        carry_h = self._buffer("carry_h", (B, P), xp)
        carry_c = self._buffer("carry_c", (B, H), xp)
        has_h, has_c = dh_n is not None, dc_n is not None
        if has_h:
            carry_h[...] = dh_n  # dL/dh_T from outside
        if has_c:
            carry_c[...] = dc_n  # dL/dc_T from outside
        if fused is not None:  # the kernels always add the carries: 0 at the last step
            if not has_h:
                carry_h[...] = 0
            if not has_c:
                carry_c[...] = 0
            has_h = has_c = True
        loops = self._cpu_loops(xp) if fused is not None else None
        scatter = self._loop_scatter(rec, loops, xp)  # (ids, sums, with_sum): the gather's gradient in the loop
        compiled = loops is not None and (
            loops.lstm_backward(dY, carry_h, carry_c, G, TC, C, dG, W_hh, p, rec.reverse, *scatter) if W_hr is None
            else loops.lstm_proj_backward(dY, carry_h, carry_c, dHs, dm, G, TC, C, dG, W_hh, W_hr, p, rec.reverse,
                                          *scatter))
        if compiled:
            rec.scattered = scatter[1]  # (5.2), (5.3)
        if not compiled:  # the loop below, unless its compiled twin just ran it
            for t in range(T) if rec.reverse else range(T - 1, -1, -1):
                if fused is not None and W_hr is None:  # (9.6), (9.9)-(9.12) in one fused kernel
                    fused(dY[t], carry_h, *_gates(G[t], H), TC[t], C[p + t], *_gates(dG[t], H), carry_c)
                    backend.matmul(dG[t], W_hh, out=carry_h)  # c^h_{t-1} = da_t W_hh              (9.13)
                    continue
                dh = dh_step if dHs is None else dHs[t]
                if has_h:
                    xp.add(dY[t], carry_h, out=dh)  # dh_t = dout_t + c^h_t                       (9.6)
                else:
                    dh[...] = dY[t]  # (9.6)
                if W_hr is not None:
                    backend.matmul(dh, W_hr, out=dm)  # dm_t = dh_t W_hr                           (9.7)
                    dm_t = dm
                else:
                    dm_t = dh  # h_t = m_t
                if fused is not None:  # (9.9)-(9.12) in one fused kernel
                    fused(dm_t, *_gates(G[t], H), TC[t], C[p + t], *_gates(dG[t], H), carry_c)
                    backend.matmul(dG[t], W_hh, out=carry_h)  # c^h_{t-1} = da_t W_hh              (9.13)
                    continue
                xp.multiply(dm_t, S[t, :, 3 * H :], out=dG[t, :, 3 * H :])  # dL/da_o        (9.9)
                xp.multiply(dm_t, K[t], out=dc)
                if has_c:
                    dc += carry_c  # dc_t = c^c_t + dm_t o (1 - tanh^2(c_t))                 (9.10)
                xp.multiply(dc[:, None, :], S4[t, :, :3], out=dG4[t, :, :3])  # da_i, da_f, da_g (9.11)
                xp.multiply(dc, f[t], out=carry_c)  # c^c_{t-1} = dc_t * f                    (9.12)
                backend.matmul(dG[t], W_hh, out=carry_h)  # c^h_{t-1} = da_t W_hh                  (9.13)
                has_h = has_c = True
        prev = Hs[p : p + T].reshape(T * B, P)  # h_{t-1} for every t, in time order
        dW = self._buffer("dW_hh", W_hh.shape, xp)
        self._g("weight_hh", rec.k, rec.suffix)[...] += backend.matmul(dG.reshape(T * B, 4 * H).T, prev, out=dW)  # (9.14)
        if W_hr is not None:  # sum_t dh_t^T m_t                                            (9.8)
            dW = self._buffer("dW_hr", W_hr.shape, xp)
            self._g("weight_hr", rec.k, rec.suffix)[...] += backend.matmul(
                dHs.reshape(T * B, P).T, rec.M.reshape(T * B, H), out=dW
            )
        return dG, carry_h, carry_c

    def _slopes(self, S, K, G, C_prev, TC):
        """The slopes of every step at once (9.9)-(9.11), into S (T, B, 4H) and K (T, B, H)."""
        xp, H = self.xp, self.hidden_size
        i, f, g, og = G[:, :, :H], G[:, :, H : 2 * H], G[:, :, 2 * H : 3 * H], G[:, :, 3 * H :]
        xp.subtract(1, i, out=S[:, :, :H])
        S[:, :, :H] *= i
        S[:, :, :H] *= g  # g i (1 - i)                                                   (9.11)
        xp.subtract(1, f, out=S[:, :, H : 2 * H])
        S[:, :, H : 2 * H] *= f
        S[:, :, H : 2 * H] *= C_prev  # c_{t-1} f (1 - f)                            (9.11)
        xp.multiply(g, g, out=S[:, :, 2 * H : 3 * H])
        xp.subtract(1, S[:, :, 2 * H : 3 * H], out=S[:, :, 2 * H : 3 * H])
        S[:, :, 2 * H : 3 * H] *= i  # i (1 - g^2)                                        (9.11)
        xp.subtract(1, og, out=S[:, :, 3 * H :])
        S[:, :, 3 * H :] *= og
        S[:, :, 3 * H :] *= TC  # tanh(c_t) o (1 - o)                                      (9.9)
        xp.multiply(TC, TC, out=K)
        xp.subtract(1, K, out=K)
        K *= og  # o (1 - tanh^2(c_t))                                                     (9.10)


def _gates(a, H):
    """The four gate blocks (i, f, g, o) of a (B, 4H) array, as views."""
    return a[:, :H], a[:, H : 2 * H], a[:, 2 * H : 3 * H], a[:, 3 * H :]
