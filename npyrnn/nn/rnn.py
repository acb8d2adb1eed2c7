"""Elman RNN (tanh or relu): the cell's time loop forward and backward, and one step.

Stacking, directions, the input side and dropout are the shared driver's
(`npyrnn/nn/recurrent.py`). The surface is `torch.nn.RNN`'s: the same arguments, parameter
names and layouts, `out` and `h_n` shapes. Equation numbers (2.x) refer to
`docs/derivations/bptt.md`.

Forward, one layer, one direction (time-major, row vectors):

```text
a_t = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh        (2.1)
h_t = f(a_t),  f = tanh or relu                        (2.2)
```

With one gate (G = 1), the input side `rec.gx` is the output slice `Hs[o:o+T]` itself:
the driver writes x_t W_ih^T + b_ih + b_hh where h_t will go, and the loop turns it
into a_t, then h_t, in place.
"""

from npyrnn import backend
from npyrnn.nn import kernels
from npyrnn.nn.module import check_choice
from npyrnn.nn.recurrent import ONE_HOT_MAX, Recurrent, hidden_product  # noqa: F401 (ONE_HOT_MAX: re-exported)

NONLINEARITIES = ("tanh", "relu")


class RNN(Recurrent):
    """Multi-layer Elman RNN with tanh or relu, like `torch.nn.RNN`.

    Parameters
    ----------
    input_size : int
        Features per step I (for token-id input: the vocabulary size).
    hidden_size : int
        Hidden units H.
    num_layers : int, default 1
    nonlinearity : {'tanh', 'relu'}, default 'tanh'
    bias : bool, default True
        Whether the layers have `bias_ih` and `bias_hh`.
    bidirectional : bool, default False
        D = 2 directions when True, else 1.
    batch_first : bool, default False
        Input and output are (B, T, ...) instead of (T, B, ...). `h0` and
        `h_n` are always (num_layers*D, B, H), as in torch.
    dropout : float, default 0.0
        Probability of zeroing each output of every layer but the last, in training
        mode only (`train()`, the default; `eval()` turns it off), as in torch
        (`docs/derivations/dropout.md`).
    dtype : {'float32', 'float64'}, default 'float32'
    init : {'normal', 'uniform'}, default 'normal'
        'normal': weights N(0, 0.01^2), biases 0 (d2l's scratch RNN);
        'uniform': every parameter U(-1/sqrt(H), 1/sqrt(H)) (torch's default).
    seed : int or None
        Seeds the host generators that draw the parameters and the dropout masks.
    reuse_buffers : bool, default False, keyword only
        When True, `out` (and the other per-call memory) lives in the layer's workspace and
        is overwritten by the next `forward` call, and on CuPy the token-id range check (a
        host sync) is skipped. For a training loop that consumes `out` before the next call.

    Attributes
    ----------
    params : dict
        `weight_ih_l{k}` (H, I_k), `weight_hh_l{k}` (H, H), `bias_ih_l{k}`,
        `bias_hh_l{k}` (H,), suffix `_reverse` for the backward direction;
        I_0 = input_size, I_k = D*H for k > 0.
    grads : dict
        Same keys and shapes as `params`.
    dropout_masks : list of arrays or None
        The masks of the last training-mode forward call, one (T, B, D*H) array per layer
        above the first, entries 0 or 1/(1-dropout) (10.1); None when no dropout was applied.
    """

    GATES = 1

    def __init__(
        self,
        input_size,
        hidden_size,
        num_layers=1,
        nonlinearity="tanh",
        bias=True,
        bidirectional=False,
        batch_first=False,
        dropout=0.0,
        dtype="float32",
        init="normal",
        seed=None,
        *,
        reuse_buffers=False,
    ):
        self.nonlinearity = check_choice("nonlinearity", nonlinearity, NONLINEARITIES)
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            dtype, init, seed, reuse_buffers=reuse_buffers,
        )

    def _repr_extra(self):
        return (("nonlinearity", self.nonlinearity),)

    def _act(self, xp):
        if self.nonlinearity == "tanh":
            return xp.tanh
        return lambda a, out: xp.maximum(a, 0, out=out)

    # ----------------------------------------------------------------- forward
    def forward(self, x, h0=None):
        """Run the RNN over a whole sequence and cache what backward needs.

        Parameters
        ----------
        x : array, shape (T, B, I) float, or (T, B) integer token ids
            (B, T, ...) when `batch_first`. Token ids stand for one-hot
            vectors of size I = input_size; they are gathered as rows of
            `weight_ih_l0`, never expanded to a dense one-hot array (5.1).
        h0 : array, shape (num_layers*D, B, H), optional
            Initial states; zeros when omitted.

        Returns
        -------
        out : array, shape (T, B, D*H)  ((B, T, D*H) when `batch_first`)
            Last layer's hidden states; directions concatenated (4.3). A new array on every
            call unless `reuse_buffers`; it is also the cache that backward reads: copy it
            before writing to it.
        h_n : array, shape (num_layers*D, B, H)
            Final state of every layer and direction (4.5).
        """
        out, h_n, _ = self._forward(x, h0)
        return out, h_n

    __call__ = forward

    def _alloc_cell(self, rec, xp):
        rec.gx = rec.Hs[rec.o : rec.o + rec.T]  # (T, B, H): receives the input part, then a_t, then h_t

    def _scan(self, rec, c0):
        """The time loop: step t reads h_{t-1} from Hs[p+t] and turns Hs[o+t] into h_t."""
        xp = self.xp
        Hs, o, p = rec.Hs, rec.o, rec.p
        act = self._act(xp)
        W_hhT = self._step_weight("weight_hh", rec, xp)  # (H, H)
        tmp = self._buffer("tmp", (rec.B, self.hidden_size), xp)
        fused = kernels.get(xp, f"rnn_fwd_{self.nonlinearity}", self.dtype)  # None when the fused kernels are off or unavailable
        loops = self._cpu_loops(xp) if fused is not None else None
        if loops is not None and loops.rnn_forward(Hs, W_hhT, tmp, o, p, rec.reverse, self.nonlinearity == "relu",
                                                   *self._loop_gather(rec, loops)):
            return  # the fused loop below, compiled whole
        self._input_rows(rec)  # token ids' input side, all steps at once                      (5.1)
        for t in range(rec.T - 1, -1, -1) if rec.reverse else range(rec.T):
            h = Hs[o + t]  # holds x_t W_ih^T + b_ih + b_hh
            backend.matmul(Hs[p + t], W_hhT, out=tmp)  # h_{t-1} W_hh^T                        (2.1)
            if fused is not None:  # the two lines below in one fused kernel
                fused(h, tmp, h)
                continue
            h += tmp  # a_t                                                              (2.1)
            act(h, out=h)  # h_t = f(a_t)                                                (2.2)

    def stepper(self, h):
        """A function that advances the RNN by one time step, for generation.

        Inference only: nothing is cached for backward, nothing is allocated
        per step (the gather and the products write into preallocated
        buffers), and nothing is checked, so a character costs a handful of
        array calls. Forward direction only; no dropout.

        Parameters
        ----------
        h : array, shape (num_layers, B, H)
            The state; updated in place by every call.

        Returns
        -------
        step : callable
            `step(x_t) -> h_t` with `x_t` token ids of shape (B,) (or dense
            input of shape (B, I)); returns the top layer's new state (B, H), a
            view of `h`. It uses the weights as they are now: make a new one
            after the weights change.
        """
        return self._stepper(h, None)

    def _step_fn(self, k, h, c, xw):
        xp = self.xp
        act = self._act(xp)
        recur = hidden_product(self._p("weight_hh", k, ""), h.shape[1], xp)
        tmp = xp.empty(xw.shape, dtype=self.dtype)
        fused = kernels.get(xp, f"rnn_fwd_{self.nonlinearity}", self.dtype) if self._rows_contiguous(h) else None

        def step():
            recur(h[k], tmp)  # h_{t-1} W_hh^T                                           (2.1)
            if fused is not None:  # the two lines below in one fused kernel
                fused(xw, tmp, h[k])
                return
            xp.add(xw, tmp, out=xw)  # a_t                                               (2.1)
            act(xw, out=h[k])  # h_t = f(a_t)                                            (2.2)

        return step

    # ---------------------------------------------------------------- backward
    def backward(self, dout, dh_n=None):
        """Backpropagate through time; accumulate every parameter's gradient.

        Parameters
        ----------
        dout : array, shape (T, B, D*H) ((B, T, D*H) when `batch_first`), or None
            Gradient of the loss w.r.t. `out`; None means zeros.
        dh_n : array, shape (num_layers*D, B, H), optional
            Gradient w.r.t. `h_n`; zeros when omitted.

        Returns
        -------
        dx : array, shape of x, or None
            Gradient w.r.t. dense input; None for token-id input.
        dh0 : array, shape (num_layers*D, B, H)
            Gradient w.r.t. the initial states (4.6).
        """
        xp = self.xp
        dout, B = self._check_backward(dout, xp)
        if dh_n is not None:
            self._check_state("dh_n", dh_n, B, xp)
        dx, dh0, _ = self._run_backward(dout, dh_n, None)
        return dx, dh0

    def _scan_back(self, rec, dY, dh_n, dc_n):
        """The backward time loop of one (layer, direction); returns (dA, dh0, None).

        dA (T, B, H) holds dL/da_t for every t: the gradient of the input side.
        """
        xp = self.xp
        T, B, H = rec.T, rec.B, self.hidden_size
        Hs, o, p = rec.Hs, rec.o, rec.p
        W_hh = self._p("weight_hh", rec.k, rec.suffix)
        Y = Hs[o : o + T]  # h_t for every t, (T, B, H)
        # fused: carry, slope and product of each step in one kernel, the slope from h_t
        fused = kernels.get(xp, f"rnn_bwd_{self.nonlinearity}", self.dtype)  # None when the fused kernels are off or unavailable
        if fused is None:  # f'(a_t) for every t at once, from the cached outputs
            fprime = self._buffer("fprime", (T, B, H), xp)
            if self.nonlinearity == "relu":
                xp.greater(Y, 0, out=fprime)  # relu'(a_t) = 1[h_t > 0]                  (2.5b)
            else:
                xp.multiply(Y, Y, out=fprime)
                xp.subtract(1, fprime, out=fprime)  # tanh'(a_t) = 1 - h_t^2                (2.5a)
        # dA starts as this direction's share of dout and becomes dL/da_t             (4.4)
        dA = self._buffer("dA", (T, B, H), xp)
        dA[...] = dY
        carry = dh_n  # dL/dh_T from outside, or nothing
        step_carry = self._buffer("carry", (B, H), xp)
        if fused is not None:  # the kernel always adds a carry: 0 at the last step
            step_carry[...] = 0 if carry is None else carry
            carry = step_carry
        loops = self._cpu_loops(xp) if fused is not None else None
        scatter = self._loop_scatter(rec, loops, xp)  # (ids, sums, with_sum): the gather's gradient in the loop
        compiled = loops is not None and loops.rnn_backward(Y, dA, W_hh, carry, rec.reverse, self.nonlinearity == "relu",
                                                            *scatter)
        if compiled:
            rec.scattered = scatter[1]  # (5.2), (5.3)
        if not compiled:  # the loop below, unless its compiled twin just ran it
            for t in range(T) if rec.reverse else range(T - 1, -1, -1):
                da = dA[t]
                if fused is not None:  # da = (da + carry) * f'(a_t) in one fused kernel   (2.3)-(2.5b)
                    fused(Y[t], carry, da)
                elif carry is not None:
                    da += carry  # dL/dh_t = dout_t + (from step t+1)                        (2.3)
                if fused is None:
                    da *= fprime[t]  # dL/da_t = dL/dh_t * f'(a_t)                         (2.4)
                backend.matmul(da, W_hh, out=step_carry)  # dL/dh_{t-1} via a_t                 (2.6)
                carry = step_carry
        prev = Hs[p : p + T].reshape(T * B, H)  # h_{t-1} for every t, in time order
        dW = self._buffer("dW_hh", (H, H), xp)  # a workspace: no 1 MB allocation per call
        self._g("weight_hh", rec.k, rec.suffix)[...] += backend.matmul(dA.reshape(T * B, H).T, prev, out=dW)  # (2.7)
        return dA, carry, None
