"""Gated recurrent unit: the cell's time loop forward and backward, and one step.

Stacking, directions, the input side and dropout are the shared driver's
(`npyrnn/nn/recurrent.py`). Equation numbers (8.x) refer to `docs/derivations/gru.md`,
which puts the two variants side by side. Gate rows are torch's (r, z, n).

```text
r_t = sigma(x_t W_ir^T + b_ir + h_{t-1} W_hr^T + b_hr)                      (8.1)
z_t = sigma(x_t W_iz^T + b_iz + h_{t-1} W_hz^T + b_hz)                      (8.2)
n_t = tanh(x_t W_in^T + b_in + r_t * (h_{t-1} W_hn^T + b_hn))   reset_after  (8.3a)
n_t = tanh(x_t W_in^T + b_in + (r_t * h_{t-1}) W_hn^T + b_hn)   reset before (8.3b)
h_t = (1 - z_t) * n_t + z_t * h_{t-1} = n_t + z_t * (h_{t-1} - n_t)          (8.4)
```

Per step one matrix product serves all three gates, as in cuDNN (reset_after), or one for
r and z and one for n (reset before: r_t must be known before the product for n).
"""

from npyrnn import backend
from npyrnn.nn import kernels
from npyrnn.nn.recurrent import Recurrent, hidden_product, sigmoid_


class GRU(Recurrent):
    """Multi-layer gated recurrent unit, like `torch.nn.GRU`.

    Parameters
    ----------
    input_size : int
        Features per step I (for token-id input: the vocabulary size).
    hidden_size : int
        Hidden units H.
    num_layers : int, default 1
    bias : bool, default True
    batch_first : bool, default False
        Input and output are (B, T, ...); `h0` and `h_n` stay (num_layers*D, B, H).
    dropout : float, default 0.0
        Probability of zeroing each output of every layer but the last, in training mode only.
    bidirectional : bool, default False
    reset_after : bool, default True
        True: torch's and cuDNN's GRU, the reset gate multiplies `h W_hn^T + b_hn` (8.3a).
        False: d2l's scratch GRU (chapter 9.1) and the original paper's, the reset gate
        multiplies h before the product, `(r * h) W_hn^T + b_hn` (8.3b). The parameters have
        torch's names and shapes either way.
    dtype : {'float32', 'float64'}, default 'float32'
    init : {'normal', 'uniform'}, default 'normal'
        'normal': weights N(0, 0.01^2), biases 0 (d2l's scratch GRU);
        'uniform': every parameter U(-1/sqrt(H), 1/sqrt(H)) (torch's default).
    seed : int or None
        Seeds the host generators that draw the parameters and the dropout masks.
    reuse_buffers : bool, default False, keyword only
        As for `RNN`: `out` lives in the layer's workspace and is overwritten by the next call.

    Attributes
    ----------
    params : dict
        `weight_ih_l{k}` (3H, I_k), `weight_hh_l{k}` (3H, H), `bias_ih_l{k}`, `bias_hh_l{k}`
        (3H,), rows (r, z, n); suffix `_reverse` for the backward direction.
    grads : dict
        Same keys and shapes as `params`.
    dropout_masks : list of arrays or None
        As for `RNN`.
    """

    GATES = 3

    def __init__(
        self,
        input_size,
        hidden_size,
        num_layers=1,
        bias=True,
        batch_first=False,
        dropout=0.0,
        bidirectional=False,
        reset_after=True,
        dtype="float32",
        init="normal",
        seed=None,
        *,
        reuse_buffers=False,
    ):
        self.reset_after = bool(reset_after)
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            dtype, init, seed, reuse_buffers=reuse_buffers,
        )

    def _repr_extra(self):
        return (("reset_after", self.reset_after),)

    def _input_bias(self, k, suffix):
        """b_ih + b_hh, except b_hn with reset_after: it sits inside r * (...) (8.3a)."""
        b = self._p("bias_ih", k, suffix) + self._p("bias_hh", k, suffix)
        if self.reset_after:
            b[2 * self.hidden_size :] = self._p("bias_ih", k, suffix)[2 * self.hidden_size :]
        return b

    def _bias_hh_grad(self, rec, db_ih):
        """reset_after: b_hn's gradient is that of h W_hn^T + b_hn (8.11a); else that of b_ih."""
        if not self.reset_after:
            return db_ih  # (8.11b)
        T, B, H = rec.T, rec.B, self.hidden_size
        return self.xp.concatenate((db_ih[: 2 * H], rec.dGH[:, :, 2 * H :].reshape(T * B, H).sum(axis=0)))

    # ----------------------------------------------------------------- forward
    def forward(self, x, h0=None):
        """Run the GRU over a whole sequence and cache what backward needs.

        Parameters
        ----------
        x : array, shape (T, B, I) float, or (T, B) integer token ids
            (B, T, ...) when `batch_first`.
        h0 : array, shape (num_layers*D, B, H), optional
            Initial states; zeros when omitted.

        Returns
        -------
        out : array, shape (T, B, D*H)  ((B, T, D*H) when `batch_first`)
        h_n : array, shape (num_layers*D, B, H)
        """
        out, h_n, _ = self._forward(x, h0)
        return out, h_n

    __call__ = forward

    def _alloc_cell(self, rec, xp):
        T, B, H = rec.T, rec.B, self.hidden_size
        # gx: the input side, then the gates' activations [r, z, n] in place
        rec.gx = self._buffer(f"gates{rec.key}", (T, B, 3 * H), xp)
        if self.reset_after:  # h_{t-1} W_hh^T (+ b_hn in the n columns) for every t
            rec.GH = self._buffer(f"GH{rec.key}", (T, B, 3 * H), xp)
        else:  # r_t * h_{t-1} for every t: the input of W_hn
            rec.RH = self._buffer(f"RH{rec.key}", (T, B, H), xp)

    def _scan(self, rec, c0):
        xp = self.xp
        H = self.hidden_size
        Hs, o, p, G = rec.Hs, rec.o, rec.p, rec.gx
        W_hhT = self._step_weight("weight_hh", rec, xp)  # (H, 3H), columns (r, z, n)
        tmp = self._buffer("tmp", (rec.B, H), xp)
        if self.reset_after:
            b_hn = self._p("bias_hh", rec.k, rec.suffix)[2 * H :] if self.bias else None
        else:
            W_rzT, W_hnT = W_hhT[:, : 2 * H], W_hhT[:, 2 * H :]
            ghrz = self._buffer("ghrz", (rec.B, 2 * H), xp)
        fused = self._fused_forward(xp)  # None when the fused kernels are off or unavailable
        bias = (b_hn,) if self.reset_after and b_hn is not None else ()
        loops = self._cpu_loops(xp) if fused is not None else None
        if loops is not None and (loops.gru_forward(G, rec.GH, Hs, W_hhT, b_hn, o, p, rec.reverse,
                                                    *self._loop_gather(rec, loops)) if self.reset_after
                                  else loops.gru_before_forward(G, ghrz, tmp, rec.RH, Hs, W_hhT, o, p, rec.reverse,
                                                                *self._loop_gather(rec, loops))):
            return  # the fused loop below, compiled whole
        self._input_rows(rec)  # token ids' input side, all steps at once                      (5.1)
        for t in range(rec.T - 1, -1, -1) if rec.reverse else range(rec.T):
            h_prev = Hs[p + t]
            rz, n = G[t, :, : 2 * H], G[t, :, 2 * H :]
            if fused is not None:  # the element-wise work below in one or two fused kernels
                r, z = rz[:, :H], rz[:, H:]
                if self.reset_after:
                    gh = rec.GH[t]
                    backend.matmul(h_prev, W_hhT, out=gh)  # (8.1)-(8.3a)
                    fused[0](gh[:, :H], gh[:, H : 2 * H], h_prev, *bias, r, z, n, gh[:, 2 * H :], Hs[o + t])  # (8.4)
                else:
                    backend.matmul(h_prev, W_rzT, out=ghrz)  # (8.1, 8.2)
                    fused[0](ghrz[:, :H], ghrz[:, H:], h_prev, r, z, rec.RH[t])
                    backend.matmul(rec.RH[t], W_hnT, out=tmp)  # (8.3b)
                    fused[1](tmp, z, h_prev, n, Hs[o + t])  # (8.4)
                continue
            if self.reset_after:
                gh = rec.GH[t]
                backend.matmul(h_prev, W_hhT, out=gh)  # h_{t-1} W_hh^T, all three gates      (8.1)-(8.3a)
                rz += gh[:, : 2 * H]
                sigmoid_(rz, xp)  # r_t, z_t                                             (8.1, 8.2)
                hn = gh[:, 2 * H :]
                if b_hn is not None:
                    hn += b_hn  # h_{t-1} W_hn^T + b_hn
                xp.multiply(rz[:, :H], hn, out=tmp)  # r_t * (h_{t-1} W_hn^T + b_hn)
                n += tmp
            else:
                backend.matmul(h_prev, W_rzT, out=ghrz)  # h_{t-1} [W_hr; W_hz]^T             (8.1, 8.2)
                rz += ghrz
                sigmoid_(rz, xp)  # r_t, z_t                                             (8.1, 8.2)
                rh = rec.RH[t]
                xp.multiply(rz[:, :H], h_prev, out=rh)  # r_t * h_{t-1}
                backend.matmul(rh, W_hnT, out=tmp)  # (r_t * h_{t-1}) W_hn^T                  (8.3b)
                n += tmp
            xp.tanh(n, out=n)  # n_t                                                     (8.3a, 8.3b)
            xp.subtract(h_prev, n, out=tmp)
            tmp *= rz[:, H:]
            xp.add(n, tmp, out=Hs[o + t])  # h_t = n_t + z_t * (h_{t-1} - n_t)           (8.4)

    def _fused_forward(self, xp):
        """The fused kernels of one forward step (one with reset_after, else two), or None."""
        if self.reset_after:
            kernel = kernels.get(xp, "gru_after_fwd" if self.bias else "gru_after_fwd_nobias", self.dtype)
            return None if kernel is None else (kernel,)
        rz, n = kernels.get(xp, "gru_before_rz", self.dtype), kernels.get(xp, "gru_before_n", self.dtype)
        return None if rz is None or n is None else (rz, n)

    def stepper(self, h):
        """A function that advances the GRU by one time step, for generation.

        Parameters
        ----------
        h : array, shape (num_layers, B, H)
            The state; updated in place by every call.

        Returns
        -------
        step : callable
            `step(x_t) -> h_t`, x_t token ids (B,) or dense (B, I); returns the top layer's
            new state (B, H), a view of `h`. Nothing is allocated or checked per step.
        """
        return self._stepper(h, None)

    def _step_fn(self, k, h, c, xw):
        xp = self.xp
        H, B = self.hidden_size, h.shape[1]
        W_hh = self._p("weight_hh", k, "")
        rz, n = xw[:, : 2 * H], xw[:, 2 * H :]
        tmp = xp.empty((B, H), dtype=self.dtype)
        if self.reset_after:
            gh = xp.empty((B, 3 * H), dtype=self.dtype)
            recur = hidden_product(W_hh, B, xp)
            hn = gh[:, 2 * H :]
            b_hn = self._p("bias_hh", k, "")[2 * H :] if self.bias else None
        else:
            ghrz = xp.empty((B, 2 * H), dtype=self.dtype)
            rh = xp.empty((B, H), dtype=self.dtype)
            recur_rz = hidden_product(W_hh[: 2 * H], B, xp)
            recur_n = hidden_product(W_hh[2 * H :], B, xp)
        fused = self._fused_forward(xp) if self._rows_contiguous(h) else None
        r, z = rz[:, :H], rz[:, H:]

        def step():  # names from the enclosing function are updated with out=, never rebound
            if fused is not None:  # the element-wise work below in one or two fused kernels
                if self.reset_after:
                    recur(h[k], gh)  # (8.1)-(8.3a)
                    bias = () if b_hn is None else (b_hn,)
                    fused[0](gh[:, :H], gh[:, H : 2 * H], h[k], *bias, r, z, n, hn, h[k])  # (8.4)
                else:
                    recur_rz(h[k], ghrz)  # (8.1, 8.2)
                    fused[0](ghrz[:, :H], ghrz[:, H:], h[k], r, z, rh)
                    recur_n(rh, tmp)  # (8.3b)
                    fused[1](tmp, z, h[k], n, h[k])  # (8.4)
                return
            if self.reset_after:
                recur(h[k], gh)  # h_{t-1} W_hh^T                                         (8.1)-(8.3a)
                xp.add(rz, gh[:, : 2 * H], out=rz)
                sigmoid_(rz, xp)  # (8.1, 8.2)
                if b_hn is not None:
                    xp.add(hn, b_hn, out=hn)
                xp.multiply(rz[:, :H], hn, out=tmp)
                xp.add(n, tmp, out=n)  # (8.3a)
            else:
                recur_rz(h[k], ghrz)
                xp.add(rz, ghrz, out=rz)
                sigmoid_(rz, xp)  # (8.1, 8.2)
                xp.multiply(rz[:, :H], h[k], out=rh)  # r_t * h_{t-1}
                recur_n(rh, tmp)  # (8.3b)
                xp.add(n, tmp, out=n)
            xp.tanh(n, out=n)  # (8.3a, 8.3b)
            xp.subtract(h[k], n, out=tmp)
            xp.multiply(tmp, rz[:, H:], out=tmp)
            xp.add(n, tmp, out=h[k])  # (8.4)

        return step

    # ---------------------------------------------------------------- backward
    def backward(self, dout, dh_n=None):
        """Backpropagate through time; accumulate every parameter's gradient.

        Parameters
        ----------
        dout : array, shape (T, B, D*H) ((B, T, D*H) when `batch_first`), or None
        dh_n : array, shape (num_layers*D, B, H), optional

        Returns
        -------
        dx : array, shape of x, or None for token-id input
        dh0 : array, shape (num_layers*D, B, H)
        """
        xp = self.xp
        dout, B = self._check_backward(dout, xp)
        if dh_n is not None:
            self._check_state("dh_n", dh_n, B, xp)
        dx, dh0, _ = self._run_backward(dout, dh_n, None)
        return dx, dh0

    def _scan_back(self, rec, dY, dh_n, dc_n):
        """The backward time loop of one (layer, direction); returns (dgx, dh0, None)."""
        xp = self.xp
        T, B, H = rec.T, rec.B, self.hidden_size
        Hs, p, G = rec.Hs, rec.p, rec.gx
        W_hh = self._p("weight_hh", rec.k, rec.suffix)
        r, z, n = G[:, :, :H], G[:, :, H : 2 * H], G[:, :, 2 * H :]
        prev = Hs[p : p + T]  # h_{t-1} for every t, (T, B, H)
        fused = self._fused_backward(xp)  # None when the fused kernels are off or unavailable
        if fused is not None:
            return self._scan_back_fused(rec, dY, dh_n, fused)

        # the slopes of every step at once, from the cached gates: dh_t times these is
        # dL/da_n (8.6), dL/da_z (8.7); dL/da_n times S_r is dL/da_r (8.9a, 8.9b)
        S = self._buffer("slopes", (T, B, 3 * H), xp)
        S_r, S_z, S_n = S[:, :, :H], S[:, :, H : 2 * H], S[:, :, 2 * H :]
        tmp = self._buffer("tmpT", (T, B, H), xp)
        xp.multiply(n, n, out=S_n)
        xp.subtract(1, S_n, out=S_n)  # 1 - n^2
        xp.subtract(1, z, out=tmp)
        S_n *= tmp  # (1 - z) (1 - n^2)                                                  (8.6)
        xp.multiply(z, tmp, out=S_z)  # z (1 - z)
        xp.subtract(prev, n, out=tmp)
        S_z *= tmp  # (h_{t-1} - n) z (1 - z)                                            (8.7)
        xp.subtract(1, r, out=S_r)
        S_r *= r  # r (1 - r)
        if self.reset_after:
            S_r *= rec.GH[:, :, 2 * H :]  # (h_{t-1} W_hn^T + b_hn) r (1 - r)             (8.9a)
        else:
            S_r *= prev  # h_{t-1} r (1 - r)                                             (8.9b)
            W_hn, W_rz = W_hh[2 * H :], W_hh[: 2 * H]

        dgx = self._buffer("dgx", (T, B, 3 * H), xp)  # dL/d(input side): [da_r, da_z, da_n]  (8.12)
        # reset_after: the gradient of h_{t-1} W_hh^T (+ b_hn): [da_r, da_z, da_n * r]
        dGH = rec.dGH = self._buffer("dGH", (T, B, 3 * H), xp) if self.reset_after else dgx
        dh = self._buffer("dh", (B, H), xp)
        drh = self._buffer("drh", (B, H), xp)
        carry = self._buffer("carry", (B, H), xp)
        step_tmp = self._buffer("step_tmp", (B, H), xp)
        has_carry = dh_n is not None
        if has_carry:
            carry[...] = dh_n  # dL/dh_T from outside
        for t in range(T) if rec.reverse else range(T - 1, -1, -1):
            if has_carry:
                xp.add(dY[t], carry, out=dh)  # dh_t = dout_t + c_t                          (8.5)
            else:
                dh[...] = dY[t]  # (8.5)
            da_n = dgx[t, :, 2 * H :]
            xp.multiply(dh, S_n[t], out=da_n)  # dL/da_n                                (8.6)
            xp.multiply(dh, S_z[t], out=dGH[t, :, H : 2 * H])  # dL/da_z                (8.7)
            if self.reset_after:
                xp.multiply(da_n, r[t], out=dGH[t, :, 2 * H :])  # dL/d(h W_hn^T + b_hn)  (8.8a)
                xp.multiply(da_n, S_r[t], out=dGH[t, :, :H])  # dL/da_r                  (8.9a)
                backend.matmul(dGH[t], W_hh, out=carry)  # via all three hidden products      (8.10a)
            else:
                backend.matmul(da_n, W_hn, out=drh)  # dL/d(r * h_{t-1})                      (8.8b)
                xp.multiply(drh, S_r[t], out=dGH[t, :, :H])  # dL/da_r                   (8.9b)
                backend.matmul(dGH[t, :, : 2 * H], W_rz, out=carry)  # via r's and z's products (8.10b)
                xp.multiply(drh, r[t], out=step_tmp)
                carry += step_tmp  # via r * h_{t-1}                                     (8.10b)
            xp.multiply(dh, z[t], out=step_tmp)
            carry += step_tmp  # via z * h_{t-1}                                         (8.10a, 8.10b)
            has_carry = True
        return self._hidden_grads(rec, dgx, dGH, carry)

    def _hidden_grads(self, rec, dgx, dGH, carry, rz_copied=False):
        """After the backward loop: dW_hh (and dgx's r, z columns unless `rz_copied`); returns (dgx, dh0, None)."""
        xp = self.xp
        T, B, H = rec.T, rec.B, self.hidden_size
        prev = rec.Hs[rec.p : rec.p + T]
        W_hh = self._p("weight_hh", rec.k, rec.suffix)
        g = self._g("weight_hh", rec.k, rec.suffix)
        if self.reset_after:
            if not rz_copied:
                dgx[:, :, : 2 * H] = dGH[:, :, : 2 * H]  # r and z: the same on both sides  (8.12)
            dW = self._buffer("dW_hh", W_hh.shape, xp)
            g += backend.matmul(dGH.reshape(T * B, 3 * H).T, prev.reshape(T * B, H), out=dW)  # (8.11a)
        else:
            dG2 = dgx.reshape(T * B, 3 * H)
            g[: 2 * H] += backend.matmul(dG2[:, : 2 * H].T, prev.reshape(T * B, H))  # (8.11b)
            g[2 * H :] += backend.matmul(dG2[:, 2 * H :].T, rec.RH.reshape(T * B, H))  # (8.11b)
        return dgx, carry, None

    def _fused_backward(self, xp):
        """The fused kernels of one backward step (one with reset_after, else two), or None."""
        if self.reset_after:
            kernel = kernels.get(xp, "gru_after_bwd", self.dtype)
            return None if kernel is None else (kernel,)
        a, b = kernels.get(xp, "gru_before_bwd_a", self.dtype), kernels.get(xp, "gru_before_bwd_b", self.dtype)
        return None if a is None or b is None else (a, b)

    def _scan_back_fused(self, rec, dY, dh_n, fused):
        """`_scan_back` with each step's element-wise work in fused kernels.

        The same arithmetic: the slopes (8.6), (8.7), (8.9a, 8.9b) are computed per step from the
        cached gates instead of for all steps at once, and the last additions to the carry,
        (8.10a, 8.10b), are done by the next step's kernel (and once after the loop).
        """
        xp = self.xp
        T, B, H = rec.T, rec.B, self.hidden_size
        Hs, p, G = rec.Hs, rec.p, rec.gx
        W_hh = self._p("weight_hh", rec.k, rec.suffix)
        r, z, n = G[:, :, :H], G[:, :, H : 2 * H], G[:, :, 2 * H :]
        prev = Hs[p : p + T]
        dgx = self._buffer("dgx", (T, B, 3 * H), xp)
        dGH = rec.dGH = self._buffer("dGH", (T, B, 3 * H), xp) if self.reset_after else dgx
        carry = self._buffer("carry", (B, H), xp)
        carry[...] = 0 if dh_n is None else dh_n  # dL/dh_T from outside, or 0
        zdh = self._buffer("step_tmp", (B, H), xp)  # dh_t * z_t of the step before
        zdh[...] = 0
        if self.reset_after:
            # on the CPU, r's and z's gradients are copied to the input side step by step, while
            # the step's rows are in cache (one pass over all steps afterwards costs ~1 ms)
            per_step = xp.__name__ == "numpy"
            loops = self._cpu_loops(xp)
            scatter = self._loop_scatter(rec, loops, xp)  # (ids, sums, with_sum): the gather's gradient in the loop
            compiled = loops is not None and loops.gru_backward(dY, carry, zdh, G, Hs, rec.GH, dGH, dgx, W_hh, p,
                                                                rec.reverse, *scatter)
            if compiled:
                rec.scattered = scatter[1]  # (5.2), (5.3)
            if not compiled:  # the loop below, unless its compiled twin just ran it
                for t in range(T) if rec.reverse else range(T - 1, -1, -1):
                    fused[0](dY[t], carry, r[t], z[t], n[t], prev[t], rec.GH[t, :, 2 * H :],  # (8.5)-(8.9a)
                             dGH[t, :, :H], dGH[t, :, H : 2 * H], dgx[t, :, 2 * H :], dGH[t, :, 2 * H :], zdh)
                    if per_step:
                        dgx[t, :, : 2 * H] = dGH[t, :, : 2 * H]  # r and z: the same on both sides  (8.12)
                    backend.matmul(dGH[t], W_hh, out=carry)  # via all three hidden products    (8.10a)
            carry += zdh  # via z * h_{t-1}                                               (8.10a)
            return self._hidden_grads(rec, dgx, dGH, carry, rz_copied=per_step or compiled)
        else:
            W_hn, W_rz = W_hh[2 * H :], W_hh[: 2 * H]
            drh = self._buffer("drh", (B, H), xp)
            rdh = self._buffer("rdh", (B, H), xp)  # drh_t * r_t of the step before
            rdh[...] = 0
            loops = self._cpu_loops(xp)
            scatter = self._loop_scatter(rec, loops, xp)  # (ids, sums, with_sum): the gather's gradient in the loop
            compiled = loops is not None and loops.gru_before_backward(dY, carry, zdh, rdh, drh, G, Hs, dgx, W_hh, p,
                                                                       rec.reverse, *scatter)
            if compiled:
                rec.scattered = scatter[1]  # (5.2), (5.3)
            if not compiled:  # the loop below, unless its compiled twin just ran it
                for t in range(T) if rec.reverse else range(T - 1, -1, -1):
                    da_z, da_n = dgx[t, :, H : 2 * H], dgx[t, :, 2 * H :]
                    fused[0](dY[t], carry, rdh, z[t], n[t], prev[t], da_z, da_n, zdh)  # (8.5)-(8.7)
                    backend.matmul(dgx[t, :, 2 * H :], W_hn, out=drh)  # dL/d(r * h_{t-1})      (8.8b)
                    fused[1](drh, r[t], prev[t], dgx[t, :, :H], rdh)  # dL/da_r             (8.9b)
                    backend.matmul(dgx[t, :, : 2 * H], W_rz, out=carry)  # via r's and z's products (8.10b)
            carry += rdh  # via r * h_{t-1}                                               (8.10b)
            carry += zdh  # via z * h_{t-1}                                               (8.10b)
        return self._hidden_grads(rec, dgx, dGH, carry)
