"""Elman RNN (tanh or relu), stacked and bidirectional, with hand-written BPTT.

The surface is ``torch.nn.RNN``'s: the same arguments, parameter names and
layouts, ``out`` and ``h_n`` shapes. Equation numbers (2.x), (4.x) and (5.x)
refer to ``docs/derivations/bptt.md``, ``docs/derivations/stacked-bidirectional.md``
and ``docs/derivations/one-hot.md``.

Forward, one layer, one direction (time-major, row vectors)::

    a_t = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh        (2.1)
    h_t = f(a_t),  f = tanh or relu                        (2.2)

Storage. Each direction keeps one buffer ``Hs`` of shape (T+1, B, H) holding
the initial state and every output, so the time loop writes into preallocated
memory and backward finds h_t and h_{t-1} without copies:

* forward direction: ``Hs[0] = h0``, ``Hs[t+1] = h_t``  (outputs at offset o=1, previous states at p=0)
* reverse direction: ``Hs[T] = h0``, ``Hs[t] = h_t``    (outputs at offset o=0, previous states at p=1)

so in both cases step t reads ``Hs[p + t]`` and writes ``Hs[o + t]``.
"""

from npyrnn import backend
from npyrnn.nn.init import init_bias, init_weight
from npyrnn.nn.module import (
    INITS,
    Module,
    check_choice,
    check_dtype,
    check_positive_int,
    shape_str,
)

NONLINEARITIES = ("tanh", "relu")


class RNN(Module):
    """Multi-layer Elman RNN with tanh or relu, like ``torch.nn.RNN``.

    Parameters
    ----------
    input_size : int
        Features per step I (for token-id input: the vocabulary size).
    hidden_size : int
        Hidden units H.
    num_layers : int, default 1
    nonlinearity : {'tanh', 'relu'}, default 'tanh'
    bias : bool, default True
        Whether the layers have ``bias_ih`` and ``bias_hh``.
    bidirectional : bool, default False
        D = 2 directions when True, else 1.
    batch_first : bool, default False
        Input and output are (B, T, ...) instead of (T, B, ...). ``h0`` and
        ``h_n`` are always (num_layers*D, B, H), as in torch.
    dtype : {'float32', 'float64'}, default 'float32'
    init : {'normal', 'uniform'}, default 'normal'
        'normal': weights N(0, 0.01^2), biases 0 (the seed's scratch RNN);
        'uniform': every parameter U(-1/sqrt(H), 1/sqrt(H)) (torch's default).
    seed : int or None
        Seed of the host generator that draws the parameters.
    reuse_buffers : bool, default False
        Keyword only. When True, `out` and the other per-call arrays live in this layer's
        workspace and are overwritten by the next `forward`: for a caller that consumes
        `out` before calling again (the language model does), it saves a multi-megabyte
        allocation per minibatch. On CuPy the range check of token ids (a host sync) is
        then skipped. When False, every call returns new arrays.

    Attributes
    ----------
    params : dict
        ``weight_ih_l{k}`` (H, I_k), ``weight_hh_l{k}`` (H, H), ``bias_ih_l{k}``,
        ``bias_hh_l{k}`` (H,), suffix ``_reverse`` for the backward direction;
        I_0 = input_size, I_k = D*H for k > 0.
    grads : dict
        Same keys and shapes as ``params``.
    """

    def __init__(
        self,
        input_size,
        hidden_size,
        num_layers=1,
        nonlinearity="tanh",
        bias=True,
        bidirectional=False,
        batch_first=False,
        dtype="float32",
        init="normal",
        seed=None,
        *,
        reuse_buffers=False,
    ):
        super().__init__()
        self.reuse_buffers = bool(reuse_buffers)
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.num_layers = check_positive_int("num_layers", num_layers)
        self.nonlinearity = check_choice("nonlinearity", nonlinearity, NONLINEARITIES)
        self.bias = bool(bias)
        self.bidirectional = bool(bidirectional)
        self.batch_first = bool(batch_first)
        self.dtype = check_dtype(dtype)
        self.init = check_choice("init", init, INITS)
        self.num_directions = 2 if self.bidirectional else 1

        rng = backend.default_rng(seed)
        H = self.hidden_size
        for k in range(self.num_layers):
            in_k = self.input_size if k == 0 else self.num_directions * H
            for suffix in self._suffixes():
                self._add_param(f"weight_ih_l{k}{suffix}", init_weight(rng, (H, in_k), init, H))
                self._add_param(f"weight_hh_l{k}{suffix}", init_weight(rng, (H, H), init, H))
                if self.bias:
                    self._add_param(f"bias_ih_l{k}{suffix}", init_bias(rng, (H,), init, H))
                    self._add_param(f"bias_hh_l{k}{suffix}", init_bias(rng, (H,), init, H))
        self._cache = None

    def _suffixes(self):
        return ("", "_reverse")[: self.num_directions]

    def _bias_sum(self, k, suffix):
        """b_ih + b_hh of layer k: they always appear together in a_t (2.1)."""
        return self.params[f"bias_ih_l{k}{suffix}"] + self.params[f"bias_hh_l{k}{suffix}"]

    def _input_table(self, k, suffix, xp):
        """(I, H) table whose row v is onehot(v) W_ih^T + b_ih + b_hh (5.1).

        Gathering its rows gives the whole input part of a_t for token ids in
        one indexing operation.
        """
        table = xp.ascontiguousarray(self.params[f"weight_ih_l{k}{suffix}"].T)
        if self.bias:
            table += self._bias_sum(k, suffix)
        return table

    def __repr__(self):
        return (
            f"RNN({self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
            f"nonlinearity={self.nonlinearity!r}, bias={self.bias}, bidirectional={self.bidirectional}, "
            f"batch_first={self.batch_first}, dtype={self.dtype!r})"
        )

    # ------------------------------------------------------------------ checks
    def _check_input(self, x, xp, check_ids=True):
        """Return (x time-major, is_ids); raise ValueError on a wrong shape, size or dtype.

        ``check_ids`` checks that token ids lie in [0, input_size): two reductions
        read back to the host, which on CuPy is a device sync.
        """
        layout = "(B, T" if self.batch_first else "(T, B"
        if not hasattr(x, "ndim") or backend.get_array_module(x) is not xp:
            raise ValueError(
                f"RNN.forward: x must be a {xp.__name__} array (the backend of the parameters), "
                f"got {type(x).__name__}; convert it with npyrnn.backend.asarray"
            )
        is_ids = x.dtype.kind in "iu"  # integer token ids
        if is_ids:
            if x.ndim != 2:
                raise ValueError(
                    f"RNN.forward: token ids must have shape {layout}), got {shape_str(x.shape)}"
                )
        elif x.ndim != 3 or x.shape[2] != self.input_size:
            raise ValueError(
                f"RNN.forward: expected x of shape {layout}, {self.input_size}) "
                f"or integer token ids {layout}), got {shape_str(x.shape)}"
            )
        elif x.dtype != self.dtype:
            raise ValueError(
                f"RNN.forward: expected x of dtype {self.dtype}, got {x.dtype}; "
                f"cast with x.astype('{self.dtype}') or build the RNN with dtype='{x.dtype}'"
            )
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"RNN.forward: x must have at least one step and one sequence, got {shape_str(x.shape)}")
        if is_ids and check_ids:
            lo, hi = int(x.min()), int(x.max())
            if lo < 0 or hi >= self.input_size:
                raise ValueError(
                    f"RNN.forward: token ids must lie in [0, {self.input_size}) (input_size), "
                    f"got values in [{lo}, {hi}]"
                )
        if self.batch_first:
            x = x.swapaxes(0, 1)
        return x, is_ids

    def _check_state(self, name, h, B, xp):
        expected = (self.num_layers * self.num_directions, B, self.hidden_size)
        if not hasattr(h, "shape") or backend.get_array_module(h) is not xp:
            raise ValueError(f"RNN: {name} must be a {xp.__name__} array of shape {shape_str(expected)}")
        if tuple(h.shape) != expected:
            raise ValueError(
                f"RNN: expected {name} of shape {shape_str(expected)} "
                f"(num_layers*num_directions, batch, hidden), got {shape_str(h.shape)}"
            )
        if h.dtype != self.dtype:
            raise ValueError(f"RNN: expected {name} of dtype {self.dtype}, got {h.dtype}")

    # ----------------------------------------------------------------- forward
    def forward(self, x, h0=None):
        """Run the RNN over a whole sequence and cache what backward needs.

        Every call returns new arrays (``out`` stays valid after later calls).

        Parameters
        ----------
        x : array, shape (T, B, I) float, or (T, B) integer token ids
            (B, T, ...) when ``batch_first``. Token ids stand for one-hot
            vectors of size I = input_size; they are gathered as rows of
            ``weight_ih_l0``, never expanded to a dense one-hot array (5.1).
        h0 : array, shape (num_layers*D, B, H), optional
            Initial states; zeros when omitted.

        Returns
        -------
        out : array, shape (T, B, D*H)  ((B, T, D*H) when ``batch_first``)
            Last layer's hidden states; directions concatenated (4.3). May be a
            view of the cache that backward reads: copy it before writing to it.
        h_n : array, shape (num_layers*D, B, H)
            Final state of every layer and direction (4.5).
        """
        return self._forward(x, h0, reuse=self.reuse_buffers)

    def _forward(self, x, h0, reuse):
        """forward; with ``reuse`` the state buffers are this module's workspace.

        Then ``out`` is overwritten by the next call: for callers that consume
        it before calling again (``RNNLM``), it saves a multi-megabyte
        allocation per minibatch.
        """
        xp = backend.get_array_module(self.params["weight_hh_l0"])
        self._cache = None
        # the training path (reuse) checks ids on NumPy only: on CuPy that would be a host sync per minibatch
        x, is_ids = self._check_input(x, xp, check_ids=not reuse or xp.__name__ == "numpy")
        T, B = x.shape[0], x.shape[1]
        H, D = self.hidden_size, self.num_directions
        if h0 is not None:
            self._check_state("h0", h0, B, xp)
        act = xp.tanh if self.nonlinearity == "tanh" else _relu(xp)

        layers = []  # per layer: (input, [Hs per direction])
        h_n = xp.empty((self.num_layers * D, B, H), dtype=self.dtype)
        inp = x
        for k in range(self.num_layers):
            states = []
            for d, suffix in enumerate(self._suffixes()):
                W_ih = self.params[f"weight_ih_l{k}{suffix}"]  # (H, I_k)
                W_hh = self.params[f"weight_hh_l{k}{suffix}"]  # (H, H)
                reverse = d == 1
                o, p = (0, 1) if reverse else (1, 0)
                shape = (T + 1, B, H)
                Hs = self._buffer(f"Hs{k}{suffix}", shape, xp) if reuse else xp.empty(shape, dtype=self.dtype)
                A = Hs[o : o + T]  # (T, B, H): receives a_t, then h_t in place
                # the input part of a_t for all T*B rows at once, written where h_t will go   (2.1)
                if k == 0 and is_ids:  # one-hot rows: a gather from a (V, H) table   (5.1)
                    backend.take_rows(self._input_table(k, suffix, xp), inp, out=A)
                else:
                    xp.matmul(inp.reshape(T * B, -1), W_ih.T, out=A.reshape(T * B, H))
                    if self.bias:
                        A += self._bias_sum(k, suffix)
                Hs[p * T] = 0 if h0 is None else h0[k * D + d]  # h_0 sits at index 0 or T
                W_hhT = W_hh.T
                tmp = xp.empty((B, H), dtype=self.dtype)
                # the reverse direction runs t = T-1 .. 0 and reads h_{t+1}        (4.2)
                for t in range(T - 1, -1, -1) if reverse else range(T):
                    h = Hs[o + t]  # holds x_t W_ih^T + b_ih + b_hh
                    xp.matmul(Hs[p + t], W_hhT, out=tmp)  # h_{t-1} W_hh^T            (2.1)
                    h += tmp  # a_t                                                  (2.1)
                    act(h, out=h)  # h_t = f(a_t)                                    (2.2)
                h_n[k * D + d] = Hs[0] if reverse else Hs[T]  # (4.5)
                states.append(Hs)
            layers.append((inp, states))
            if D == 1:
                inp = states[0][1:]  # the next layer's input, (T, B, H), a view       (4.1)
            else:  # [forward h_t ; reverse h_t]                                       (4.3)
                shape = (T, B, 2 * H)
                cat = self._buffer(f"cat{k}", shape, xp) if reuse else xp.empty(shape, dtype=self.dtype)
                inp = xp.concatenate((states[0][1:], states[1][:T]), axis=2, out=cat)  # (T, B, 2H)
        self._cache = (layers, is_ids, T, B)
        out = inp.swapaxes(0, 1) if self.batch_first else inp
        return out, h_n

    __call__ = forward

    def stepper(self, h):
        """A function that advances the RNN by one time step, for generation.

        Inference only: nothing is cached for backward, nothing is allocated
        per step (the gather and the products write into preallocated
        buffers), and nothing is checked, so a character costs a handful of
        array calls. Forward direction only.

        Parameters
        ----------
        h : array, shape (num_layers, B, H)
            The state; updated in place by every call.

        Returns
        -------
        step : callable
            ``step(x_t) -> h_t`` with ``x_t`` token ids of shape (B,) (or dense
            input of shape (B, I)); returns the top layer's new state (B, H), a
            view of ``h``. It uses the weights as they are now: make a new one
            after the weights change.
        """
        if self.bidirectional:
            raise ValueError("RNN.stepper: a bidirectional RNN cannot run one step at a time; use forward")
        xp = backend.get_array_module(self.params["weight_hh_l0"])
        if getattr(h, "ndim", 0) != 3:
            raise ValueError(f"RNN.stepper: expected h of shape (num_layers, B, {self.hidden_size}), "
                             f"got {shape_str(getattr(h, 'shape', ()))}")
        self._check_state("h", h, h.shape[1], xp)
        act = xp.tanh if self.nonlinearity == "tanh" else _relu(xp)
        L, B, H = self.num_layers, h.shape[1], self.hidden_size
        table = self._input_table(0, "", xp)  # (I, H) rows: onehot(v) W_ih^T + b   (5.1)
        W_ihT = [self.params[f"weight_ih_l{k}"].T for k in range(L)]
        W_hhT = [self.params[f"weight_hh_l{k}"].T for k in range(L)]
        bias = [self._bias_sum(k, "") if self.bias else None for k in range(L)]
        xw = xp.empty((B, H), dtype=self.dtype)
        tmp = xp.empty((B, H), dtype=self.dtype)
        if B == 1:  # one sequence: a matrix-vector product (gemv) beats a one-row matrix product

            def recur(k):
                xp.dot(self.params[f"weight_hh_l{k}"], h[k, 0], out=tmp[0])  # W_hh h_{t-1}  (2.1)

        else:

            def recur(k):
                xp.matmul(h[k], W_hhT[k], out=tmp)  # h_{t-1} W_hh^T                      (2.1)

        def step(x_t):
            for k in range(L):
                if k == 0 and x_t.dtype.kind in "iu":  # token ids
                    backend.take_rows(table, x_t, out=xw)  # x_t W_ih^T + b_ih + b_hh   (5.1)
                else:
                    xp.matmul(x_t if k == 0 else h[k - 1], W_ihT[k], out=xw)  # (2.1)
                    if bias[k] is not None:
                        xp.add(xw, bias[k], out=xw)
                recur(k)  # h_{t-1} W_hh^T                                            (2.1)
                xp.add(xw, tmp, out=xw)  # a_t                                        (2.1)
                act(xw, out=h[k])  # h_t = f(a_t)                                     (2.2)
            return h[L - 1]

        return step

    # ---------------------------------------------------------------- backward
    def backward(self, dout, dh_n=None):
        """Backpropagate through time; accumulate every parameter's gradient.

        Parameters
        ----------
        dout : array, shape (T, B, D*H) ((B, T, D*H) when ``batch_first``), or None
            Gradient of the loss w.r.t. ``out``; None means zeros.
        dh_n : array, shape (num_layers*D, B, H), optional
            Gradient w.r.t. ``h_n``; zeros when omitted.

        Returns
        -------
        dx : array, shape of x, or None
            Gradient w.r.t. dense input; None for token-id input.
        dh0 : array, shape (num_layers*D, B, H)
            Gradient w.r.t. the initial states (4.6).
        """
        if self._cache is None:
            raise RuntimeError("RNN.backward called before forward; call forward first")
        layers, is_ids, T, B = self._cache
        xp = backend.get_array_module(self.params["weight_hh_l0"])
        H, D = self.hidden_size, self.num_directions
        expected = (B, T, D * H) if self.batch_first else (T, B, D * H)
        if dout is None:
            dout = xp.zeros(expected, dtype=self.dtype)
        elif not hasattr(dout, "shape") or tuple(dout.shape) != expected:
            raise ValueError(
                f"RNN.backward: expected dout of shape {shape_str(expected)} (the shape of out), "
                f"got {shape_str(getattr(dout, 'shape', ()))}"
            )
        elif dout.dtype != self.dtype:
            raise ValueError(f"RNN.backward: expected dout of dtype {self.dtype}, got {dout.dtype}")
        if dh_n is not None:
            self._check_state("dh_n", dh_n, B, xp)
        dY = dout.swapaxes(0, 1) if self.batch_first else dout  # (T, B, D*H)
        relu = self.nonlinearity == "relu"

        dh0 = xp.empty((self.num_layers * D, B, H), dtype=self.dtype)
        for k in range(self.num_layers - 1, -1, -1):
            inp, states = layers[k]
            needs_dx = not (k == 0 and is_ids)
            dX = None
            for d, suffix in enumerate(self._suffixes()):
                W_ih = self.params[f"weight_ih_l{k}{suffix}"]
                W_hh = self.params[f"weight_hh_l{k}{suffix}"]
                Hs = states[d]
                reverse = d == 1
                o, p = (0, 1) if reverse else (1, 0)
                Y = Hs[o : o + T]  # h_t for every t, (T, B, H)
                # f'(a_t) for every t at once, from the cached outputs
                fprime = self._buffer("fprime", (T, B, H), xp)
                if relu:
                    xp.greater(Y, 0, out=fprime)  # relu'(a_t) = 1[h_t > 0]            (2.5b)
                else:
                    xp.multiply(Y, Y, out=fprime)
                    xp.subtract(1, fprime, out=fprime)  # tanh'(a_t) = 1 - h_t^2          (2.5a)
                # dA starts as this direction's share of dout and becomes dL/da_t   (4.4)
                dA = self._buffer("dA", (T, B, H), xp)
                dA[...] = dY[:, :, d * H : (d + 1) * H]
                carry = None if dh_n is None else dh_n[k * D + d]  # dL/dh_T from outside
                step_carry = xp.empty((B, H), dtype=self.dtype)
                for t in range(T) if reverse else range(T - 1, -1, -1):
                    da = dA[t]
                    if carry is not None:
                        da += carry  # dL/dh_t = dout_t + (from step t+1)              (2.3)
                    da *= fprime[t]  # dL/da_t = dL/dh_t * f'(a_t)                   (2.4)
                    xp.matmul(da, W_hh, out=step_carry)  # dL/dh_{t-1} via a_t       (2.6)
                    carry = step_carry
                dh0[k * D + d] = carry  # (4.6)
                dA2 = dA.reshape(T * B, H)
                prev = Hs[p : p + T].reshape(T * B, H)  # h_{t-1} for every t, in time order
                g = self.grads
                dW = self._buffer("dW_hh", (H, H), xp)  # a workspace: no 1 MB allocation per call
                g[f"weight_hh_l{k}{suffix}"] += xp.matmul(dA2.T, prev, out=dW)  # sum_t da_t^T h_{t-1} (2.7)
                if k == 0 and is_ids:  # sum_t da_t^T onehot(x_t): a scatter into columns (5.2)
                    g[f"weight_ih_l{k}{suffix}"] += _scatter_columns(inp.reshape(-1), dA2, self.input_size, xp)
                else:
                    dW = self._buffer(f"dW_ih{k}", W_ih.shape, xp)
                    g[f"weight_ih_l{k}{suffix}"] += xp.matmul(dA2.T, inp.reshape(T * B, -1), out=dW)  # (2.8)
                if self.bias:
                    db = dA2.sum(axis=0)  # sum over t and b                            (2.9)
                    g[f"bias_ih_l{k}{suffix}"] += db
                    g[f"bias_hh_l{k}{suffix}"] += db
                if needs_dx:  # dL/dx_t = da_t W_ih, summed over directions         (2.10, 4.4)
                    if dX is None:  # layer k-1's dout: workspace; the caller's dx: new
                        shape = (T * B, W_ih.shape[1])
                        dX = self._buffer(f"dX{k}", shape, xp) if k > 0 else xp.empty(shape, dtype=self.dtype)
                        xp.matmul(dA2, W_ih, out=dX)
                    else:
                        dX += dA2 @ W_ih
            dY = None if dX is None else dX.reshape(T, B, -1)
        dx = None if is_ids else (dY.swapaxes(0, 1) if self.batch_first else dY)
        return dx, dh0


ONE_HOT_MAX = 128  # up to this vocabulary size the one-hot product beats the sorted scatter


def _scatter_columns(ids, dA2, num_columns, xp):
    """sum_n dA2[n]^T onehot(ids[n]): the (H, V) gradient of a row gather (5.2).

    For a small vocabulary one product with a (T*B, V) one-hot matrix, built
    here once for all T*B rows, is fastest (2*T*B*V*H flops in BLAS); for a
    large one the rows are summed per token with ``backend.index_add``.
    """
    if num_columns <= ONE_HOT_MAX:
        onehot = (ids[:, None] == xp.arange(num_columns)).astype(dA2.dtype)  # (T*B, V)
        return dA2.T @ onehot  # (H, V)
    dW_T = xp.zeros((num_columns, dA2.shape[1]), dtype=dA2.dtype)
    backend.index_add(dW_T, ids, dA2)
    return dW_T.T


def _relu(xp):
    def relu(a, out):
        return xp.maximum(a, 0, out=out)

    return relu
