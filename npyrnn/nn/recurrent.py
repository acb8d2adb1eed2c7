"""The recurrent driver that RNN, GRU and LSTM share; a cell supplies its time loop.

What is written once here, for every cell:

- parameters with G*H rows in torch's gate order and names (`weight_ih_l{k}` (G*H, I_k),
  `weight_hh_l{k}` (G*H, P), `bias_ih_l{k}`, `bias_hh_l{k}` (G*H,), `weight_hr_l{k}` (P, H) for a
  projected LSTM, suffix `_reverse`), argument and input checks, `batch_first`;
- the layer x direction loops (4.1)-(4.6), packing `h0`/`h_n` (and `c0`/`c_n`);
- the input side of every gate for all steps at once: a gather from a folded (V, G*H) table for
  token ids (5.1) or one matrix product for dense input (2.1); its gradients `dW_ih` (2.8),
  (5.2), `db_ih` (2.9) and `dx` summed over directions (2.10), (4.4), once after the time loop
  (the compiled loops of `cpu_loops` gather token ids' rows and sum their gradient step by step,
  with the same bits: `_loop_gather`, `_loop_scatter`);
- dropout between layers (10.1)-(10.3);
- the stepper's loop over layers for generation.

What a cell (`rnn.py`, `gru.py`, `lstm.py`) owns: its storage, its time loop forward and
backward (with the hidden-side gradients `dW_hh`, `db_hh`, `dW_hr`), and one step for
generation. The hooks it implements are listed in `Recurrent`'s docstring.

Storage. Each (layer, direction) keeps one buffer `Hs` of shape (T+1, B, P) holding the
initial state and every output, so the time loop writes into preallocated memory and backward
finds h_t and h_{t-1} without copies:

- forward direction: `Hs[0] = h0`, `Hs[t+1] = h_t` (outputs at offset o=1, previous states at p=0)
- reverse direction: `Hs[T] = h0`, `Hs[t] = h_t` (outputs at offset o=0, previous states at p=1)

so in both cases step t reads `Hs[p + t]` and writes `Hs[o + t]`.
"""

from types import SimpleNamespace

from npyrnn import backend
from npyrnn.nn.init import init_bias, init_weight, seed_streams
from npyrnn.nn.module import (
    INITS,
    Module,
    check_choice,
    check_dtype,
    check_positive_int,
    check_probability,
    shape_str,
)

ONE_HOT_MAX = 128  # up to this vocabulary size the one-hot product beats the sorted scatter
PAD_BYTES = 64  # the rows of a weight's transposed copy longer by this much where they would be a multiple of 1 KiB
# None: where they pay or the tiles take them (`Recurrent._step_weight`); True, False: always,
# never (bench_ab.py --switch wt)
transposed_copies = None


class Recurrent(Module):
    """Stacked, optionally bidirectional recurrent layer; the base of `RNN`, `GRU` and `LSTM`.

    Not used directly: a subclass sets `GATES` (G, rows of `weight_ih` per hidden unit) and
    implements the cell's hooks:

    - `_alloc_cell(rec, xp)`: the per-(layer, direction) cache `rec` already holds `Hs`
      (T+1, B, P); add `rec.gx` (T, B, G*H), a C-contiguous array where the driver writes
      the input side of every gate, and whatever the time loop keeps for backward;
    - `_input_bias(k, suffix)`: the (G*H,) bias folded into the input side;
    - `_scan(rec, c0)`: the time loop, filling `rec.Hs[o:o+T]` from `rec.gx` and the initial
      state the driver put in `rec.Hs[p*T]` (the LSTM also fills `rec.C`, starting from `c0`);
      for token ids the input side is not in `rec.gx` yet: the loop calls `_input_rows(rec)`
      first, or hands `_loop_gather(rec, loops)` to a compiled loop that gathers step by step;
    - `_scan_back(rec, dY, dh_n, dc_n)`: the backward time loop; accumulates the hidden-side
      weight gradients and returns `(dgx, dh0, dc0)`, dgx (T, B, G*H) the gradient of `rec.gx`;
    - `_bias_hh_grad(rec, db_ih)`: the gradient of `bias_hh` given that of `bias_ih`;
    - `_step_fn(k, h, c, xw)`: one step of layer k for generation, reading the input side
      from `xw` (B, G*H) and updating `h[k]` (and `c[k]`) in place.

    Parameters
    ----------
    input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, dtype, init, seed
        As in `RNN`, `GRU` and `LSTM`.
    proj_size : int, default 0
        LSTM only: the size P of the projected state (0: no projection, P = H).
    reuse_buffers : bool, default False
        When True, `out` (and the other per-call memory) lives in the layer's workspace and is
        overwritten by the next `forward` call; on CuPy the token-id range check (a host sync)
        is skipped. For callers that consume `out` before calling again, such as a language
        model's training loop: it saves a multi-megabyte allocation per minibatch.
    """

    GATES = 1
    _has_cell_state = False

    def __init__(
        self,
        input_size,
        hidden_size,
        num_layers,
        bias,
        batch_first,
        dropout,
        bidirectional,
        dtype,
        init,
        seed,
        proj_size=0,
        reuse_buffers=False,
    ):
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.num_layers = check_positive_int("num_layers", num_layers)
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = check_probability("dropout", dropout)
        self.bidirectional = bool(bidirectional)
        self.dtype = check_dtype(dtype)
        self.init = check_choice("init", init, INITS)
        if isinstance(proj_size, bool) or not isinstance(proj_size, int) or not 0 <= proj_size < hidden_size:
            raise ValueError(f"proj_size must be an integer in [0, hidden_size) = [0, {hidden_size}), got {proj_size!r}")
        self.proj_size = proj_size
        self.reuse_buffers = bool(reuse_buffers)
        self.num_directions = 2 if self.bidirectional else 1
        self.dropout_masks = None
        self._cache = None

        param_rng, self._dropout_rng = seed_streams(seed)
        H, P, GH = self.hidden_size, self.output_size, self.GATES * self.hidden_size
        for k in range(self.num_layers):
            in_k = self.input_size if k == 0 else self.num_directions * P
            for suffix in self._suffixes():
                self._add_param(f"weight_ih_l{k}{suffix}", init_weight(param_rng, (GH, in_k), init, H))
                self._add_param(f"weight_hh_l{k}{suffix}", init_weight(param_rng, (GH, P), init, H))
                if self.bias:
                    self._add_param(f"bias_ih_l{k}{suffix}", init_bias(param_rng, (GH,), init, H))
                    self._add_param(f"bias_hh_l{k}{suffix}", init_bias(param_rng, (GH,), init, H))
                if self.proj_size:
                    self._add_param(f"weight_hr_l{k}{suffix}", init_weight(param_rng, (P, H), init, H))

    # --------------------------------------------------------------- properties
    @property
    def output_size(self):
        """P: the size of h (proj_size when the LSTM projects, else hidden_size)."""
        return self.proj_size or self.hidden_size

    @property
    def dropout_rng(self):
        """The host `numpy.random.Generator` that draws the dropout masks (seeded from `seed`)."""
        return self._dropout_rng

    @property
    def xp(self):
        """The array module (numpy or cupy) that holds the parameters."""
        return backend.get_array_module(self.params["weight_hh_l0"])

    def begin_state(self, batch_size):
        """Zero initial state for `batch_size` sequences, on the parameters' backend.

        Returns
        -------
        h0 : array, shape (num_layers*D, batch_size, P)
            For `RNN` and `GRU`. `LSTM` returns a tuple `(h0, c0)`, c0 of shape
            (num_layers*D, batch_size, H).
        """
        B = check_positive_int("batch_size", batch_size)
        xp, LD = self.xp, self.num_layers * self.num_directions
        h0 = xp.zeros((LD, B, self.output_size), dtype=self.dtype)
        if self._has_cell_state:
            return h0, xp.zeros((LD, B, self.hidden_size), dtype=self.dtype)
        return h0

    def _suffixes(self):
        return ("", "_reverse")[: self.num_directions]

    def _p(self, name, k, suffix):
        """The parameter `name_l{k}{suffix}`, e.g. `self._p('weight_hh', 0, '')`."""
        return self.params[f"{name}_l{k}{suffix}"]

    def _g(self, name, k, suffix):
        return self.grads[f"{name}_l{k}{suffix}"]

    def _input_table(self, k, suffix, out):
        """(V, G*H) table whose row v is onehot(v) W_ih^T + the folded bias (5.1).

        Written into `out`, never a view of the parameter: a forward pass must not
        change `weight_ih` (with H = 1, `W.T` of a contiguous (H, V) array is itself
        contiguous, so `ascontiguousarray` would return the parameter).
        """
        out[...] = self._p("weight_ih", k, suffix).T
        if self.bias:
            out += self._input_bias(k, suffix)
        return out

    def _input_bias(self, k, suffix):
        """b_ih + b_hh: for RNN and LSTM (and the GRU of d2l) both biases sit outside any product."""
        return self._p("bias_ih", k, suffix) + self._p("bias_hh", k, suffix)

    def _bias_hh_grad(self, rec, db_ih):
        """d bias_hh = d bias_ih when b_hh only appears next to b_ih (2.9)."""
        return db_ih

    def _dropping(self):
        return self.training and self.dropout > 0 and self.num_layers > 1

    def __repr__(self):
        extra = "".join(f", {k}={v!r}" for k, v in self._repr_extra())
        return (
            f"{type(self).__name__}({self.input_size}, {self.hidden_size}, num_layers={self.num_layers}{extra}, "
            f"bias={self.bias}, batch_first={self.batch_first}, dropout={self.dropout}, "
            f"bidirectional={self.bidirectional}, dtype={self.dtype!r})"
        )

    def _repr_extra(self):
        return ()

    # ------------------------------------------------------------------ checks
    def _where(self, method):
        return f"{type(self).__name__}.{method}"

    def _check_array(self, where, name, a, xp):
        if not isinstance(a, xp.ndarray):
            raise ValueError(
                f"{where}: {name} must be a {xp.__name__} array (the backend of the parameters), "
                f"got {type(a).__name__}; convert it with npyrnn.backend.asarray"
            )

    def _check_input(self, x, xp, check_ids=True):
        """Return (x time-major, is_ids); raise ValueError on a wrong type, shape, size or dtype.

        `check_ids` checks that token ids lie in [0, input_size): two reductions read back to
        the host, which on CuPy is a device sync.
        """
        where = self._where("forward")
        layout = "(B, T" if self.batch_first else "(T, B"
        self._check_array(where, "x", x, xp)
        is_ids = x.dtype.kind in "iu"  # integer token ids
        if is_ids:
            if x.ndim != 2:
                raise ValueError(f"{where}: token ids must have shape {layout}), got {shape_str(x.shape)}")
        elif x.ndim != 3 or x.shape[2] != self.input_size:
            raise ValueError(
                f"{where}: expected x of shape {layout}, {self.input_size}) "
                f"or integer token ids {layout}), got {shape_str(x.shape)}"
            )
        elif x.dtype != self.dtype:
            raise ValueError(
                f"{where}: expected x of dtype {self.dtype}, got {x.dtype}; "
                f"cast with x.astype('{self.dtype}') or build the layer with dtype='{x.dtype}'"
            )
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"{where}: x must have at least one step and one sequence, got {shape_str(x.shape)}")
        if is_ids and check_ids:
            lo, hi = int(x.min()), int(x.max())
            if lo < 0 or hi >= self.input_size:
                raise ValueError(
                    f"{where}: token ids must lie in [0, {self.input_size}) (input_size), got values in [{lo}, {hi}]"
                )
        if self.batch_first:
            x = x.swapaxes(0, 1)
        return x, is_ids

    def _check_state(self, name, h, B, xp, size=None, layers=None):
        """ValueError unless `h` is an array of shape (layers, B, size) and the layer's dtype."""
        layers = self.num_layers * self.num_directions if layers is None else layers
        expected = (layers, B, self.output_size if size is None else size)
        where = type(self).__name__
        if not isinstance(h, xp.ndarray):
            raise ValueError(
                f"{where}: {name} must be a {xp.__name__} array of shape {shape_str(expected)}, got {type(h).__name__}"
            )
        if tuple(h.shape) != expected:
            raise ValueError(
                f"{where}: expected {name} of shape {shape_str(expected)} "
                f"(num_layers*num_directions, batch, {'hidden' if size else 'state'}), got {shape_str(h.shape)}"
            )
        if h.dtype != self.dtype:
            raise ValueError(f"{where}: expected {name} of dtype {self.dtype}, got {h.dtype}")

    def _check_pair(self, name, pair, B, xp):
        """(h, c) for the LSTM: None, or a pair whose entries are None or arrays."""
        if pair is None:
            return None, None
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(
                f"{type(self).__name__}: {name} must be None or a tuple (h, c) of two arrays, got {type(pair).__name__}"
            )
        h, c = pair
        if h is not None:
            self._check_state(f"{name}[0]", h, B, xp)
        if c is not None:
            self._check_state(f"{name}[1]", c, B, xp, size=self.hidden_size)
        return h, c

    # ----------------------------------------------------------------- forward
    def _forward(self, x, state):
        """Every cell's `forward`: check `x` and the initial state, run; return out, h_n, c_n.

        `state` is h0 (or None), or for a cell with a cell state the pair `(h0, c0)` (or None).
        """
        xp = self.xp
        self._cache = None
        # the reusing path checks ids on NumPy only: on CuPy that would be a host sync per call
        x, _ = self._check_input(x, xp, check_ids=not self.reuse_buffers or xp.__name__ == "numpy")
        if self._has_cell_state:
            h0, c0 = self._check_pair("hc0", state, x.shape[1], xp)
        else:
            h0, c0 = state, None
            if h0 is not None:
                self._check_state("h0", h0, x.shape[1], xp)
        return self._run(x, h0, c0, self.reuse_buffers)

    def _run(self, x, h0, c0, reuse):
        """The forward pass of every cell. `h0`, `c0`: checked initial states or None.

        Returns out, h_n, c_n (c_n None without a cell state).
        """
        xp = self.xp
        T, B = x.shape[0], x.shape[1]
        H, P, D, L, GH = self.hidden_size, self.output_size, self.num_directions, self.num_layers, self.GATES * self.hidden_size
        is_ids = x.dtype.kind in "iu"
        h_n = xp.empty((L * D, B, P), dtype=self.dtype)
        c_n = xp.empty((L * D, B, H), dtype=self.dtype) if self._has_cell_state else None
        masks = [] if self._dropping() else None

        layers = []  # per layer: (input, [cache per direction], dropout mask or None)
        inp = x
        for k in range(L):
            mask = None
            if k > 0 and masks is not None:  # dropout on the layer below's output      (10.2)
                mask = self._draw_mask(inp.shape, xp)  # (T, B, D*P), 0 or 1/(1-p)   (10.1)
                masks.append(mask)
                inp = xp.multiply(inp, mask, out=self._buffer(f"dropped{k}", inp.shape, xp))
            fresh = not reuse and k == L - 1  # the caller's out must survive the next call
            recs = []
            for d, suffix in enumerate(self._suffixes()):
                reverse = d == 1
                o, p = (0, 1) if reverse else (1, 0)
                key = f"{k}{suffix}"
                shape = (T + 1, B, P)
                Hs = xp.empty(shape, dtype=self.dtype) if fresh else self._buffer(f"Hs{key}", shape, xp)
                rec = SimpleNamespace(k=k, suffix=suffix, key=key, reverse=reverse, o=o, p=p, T=T, B=B, Hs=Hs)
                self._alloc_cell(rec, xp)
                # the input part of every gate for all T*B rows at once                (2.1)
                rec.ids = rec.table = None
                rec.tokens = inp if k == 0 and is_ids else None  # the ids (T, B), for backward's scatter too
                if k == 0 and is_ids:  # one-hot rows: a gather from a (V, G*H) table   (5.1)
                    # done by the time loop (`_input_rows`, `_loop_gather`): a compiled loop gathers
                    # each step's rows just before its kernel reads them, while they are in cache
                    rec.table = self._input_table(k, suffix, self._buffer("table", (self.input_size, GH), xp))
                    rec.ids = inp
                else:
                    backend.matmul(inp.reshape(T * B, -1), self._p("weight_ih", k, suffix).T, out=rec.gx.reshape(T * B, GH))
                    if self.bias:
                        rec.gx += self._input_bias(k, suffix)
                rec.Hs[p * T] = 0 if h0 is None else h0[k * D + d]  # h_0 sits at index 0 or T
                c0_kd = None if c0 is None else c0[k * D + d]
                self._scan(rec, c0_kd)  # the cell's time loop; reverse runs t = T-1 .. 0 (4.2)
                h_n[k * D + d] = Hs[0] if reverse else Hs[T]  # (4.5)
                if c_n is not None:
                    c_n[k * D + d] = rec.C[0] if reverse else rec.C[T]  # (4.5)
                recs.append(rec)
            layers.append((inp, recs, mask))
            if D == 1:
                inp = recs[0].Hs[1:]  # the next layer's input, (T, B, P), a view        (4.1)
            else:  # [forward h_t ; reverse h_t]                                         (4.3)
                shape = (T, B, 2 * P)
                cat = xp.empty(shape, dtype=self.dtype) if fresh else self._buffer(f"cat{k}", shape, xp)
                inp = xp.concatenate((recs[0].Hs[1:], recs[1].Hs[:T]), axis=2, out=cat)  # (T, B, 2P)
        self.dropout_masks = masks
        self._cache = (layers, is_ids, T, B)
        out = inp.swapaxes(0, 1) if self.batch_first else inp
        return out, h_n, c_n

    def _draw_mask(self, shape, xp):
        """Inverted dropout's mask: 1/(1-p) with probability 1-p, else 0 (10.1).

        Drawn on the host from the layer's dropout generator (seeded from `seed`), then copied
        to the backend, so a seed gives the same masks on NumPy and CuPy.
        """
        keep = self._dropout_rng.random(shape) >= self.dropout  # host booleans, P(keep) = 1-p
        return xp.asarray(keep / (1.0 - self.dropout), dtype=self.dtype)

    # ---------------------------------------------------------------- backward
    def _check_backward(self, dout, xp):
        """(dout, B): `dout` checked against the cached forward (zeros for None)."""
        if self._cache is None:
            raise RuntimeError(f"{self._where('backward')} called before forward; call forward first")
        _, _, T, B = self._cache
        D, P = self.num_directions, self.output_size
        expected = (B, T, D * P) if self.batch_first else (T, B, D * P)
        where = self._where("backward")
        if dout is None:
            return xp.zeros(expected, dtype=self.dtype), B
        self._check_array(where, "dout", dout, xp)
        if tuple(dout.shape) != expected:
            raise ValueError(
                f"{where}: expected dout of shape {shape_str(expected)} (the shape of out), got {shape_str(dout.shape)}"
            )
        if dout.dtype != self.dtype:
            raise ValueError(f"{where}: expected dout of dtype {self.dtype}, got {dout.dtype}")
        return dout, B

    def _run_backward(self, dout, dh_n, dc_n):
        """Backpropagate through all layers and directions; return dx, dh0, dc0 (checked inputs)."""
        layers, is_ids, T, B = self._cache
        xp = self.xp
        H, P, D, GH = self.hidden_size, self.output_size, self.num_directions, self.GATES * self.hidden_size
        dY = dout.swapaxes(0, 1) if self.batch_first else dout  # (T, B, D*P)
        # the fused kernels read rows: the caller's arrays they may see get contiguous rows
        dY, dh_n, dc_n = (a if self._rows_contiguous(a) else xp.ascontiguousarray(a) for a in (dY, dh_n, dc_n))
        dh0 = xp.empty((self.num_layers * D, B, P), dtype=self.dtype)
        dc0 = xp.empty((self.num_layers * D, B, H), dtype=self.dtype) if self._has_cell_state else None
        for k in range(self.num_layers - 1, -1, -1):
            inp, recs, mask = layers[k]
            needs_dx = not (k == 0 and is_ids)
            dX = None
            for d, rec in enumerate(recs):
                suffix = rec.suffix
                rec.scattered = None  # the gather's gradient summed by the compiled loop: `_loop_scatter`
                dY_d = dY[:, :, d * P : (d + 1) * P]  # dout_t splits by direction      (4.4)
                dh_n_d = None if dh_n is None else dh_n[k * D + d]
                dc_n_d = None if dc_n is None else dc_n[k * D + d]
                dgx, dh0_d, dc0_d = self._scan_back(rec, dY_d, dh_n_d, dc_n_d)  # the cell's loop
                dh0[k * D + d] = dh0_d  # (4.6)
                if dc0 is not None:
                    dc0[k * D + d] = dc0_d  # (4.6)
                dG2 = dgx.reshape(T * B, GH)  # the input side's gradient, all steps stacked
                W_ih = self._p("weight_ih", k, suffix)
                db = None
                if k == 0 and is_ids:  # sum_t dgx_t^T onehot(x_t): a scatter into columns (5.2)
                    if rec.scattered is not None:  # the compiled loop summed each step's rows as it went
                        dW, db = _halves_sums(rec.scattered, self.input_size, self.bias)
                    else:
                        dW, db = _scatter_columns(inp, dgx, self.input_size, xp, self.bias, rec.reverse)
                    self._g("weight_ih", k, suffix)[...] += dW
                else:  # sum_t dgx_t^T x_t, one product for all steps and gates           (2.8)
                    dW = self._buffer(f"dW_ih{k}", W_ih.shape, xp)
                    self._g("weight_ih", k, suffix)[...] += backend.matmul(dG2.T, inp.reshape(T * B, -1), out=dW)
                if self.bias:
                    if db is None:
                        db = dG2.sum(axis=0)  # sum over t and b                          (2.9)
                    self._g("bias_ih", k, suffix)[...] += db
                    self._g("bias_hh", k, suffix)[...] += self._bias_hh_grad(rec, db)
                if needs_dx:  # dL/dx_t = dgx_t W_ih, summed over directions            (2.10, 4.4)
                    if dX is None:  # layer k-1's dout: workspace; the caller's dx: new
                        shape = (T * B, W_ih.shape[1])
                        dX = self._buffer(f"dX{k}", shape, xp) if k > 0 else xp.empty(shape, dtype=self.dtype)
                        backend.matmul(dG2, W_ih, out=dX)
                    else:
                        dX += backend.matmul(dG2, W_ih)
            if mask is not None:  # back through the dropout below this layer             (10.3)
                dX *= mask.reshape(T * B, -1)
            dY = None if dX is None else dX.reshape(T, B, -1)
        dx = None if is_ids else (dY.swapaxes(0, 1) if self.batch_first else dY)
        return dx, dh0, dc0

    def _input_rows(self, rec):
        """Gather the token ids' rows of the input table into `rec.gx`, all steps at once (5.1),
        unless done: a cell's `_scan` calls it before a loop that reads `rec.gx` whole."""
        if rec.ids is not None:
            backend.take_rows(rec.table, rec.ids, out=rec.gx)  # (5.1)
            rec.ids = None

    def _loop_gather(self, rec, loops):
        """(ids, table) for a compiled forward loop (`cpu_loops`) to gather each step's rows of the
        input side itself (5.1), or (None, None) when they are in `rec.gx` already (dense input,
        or `cpu_loops.gather` off: gathered here, now). A loop that declines gathers nothing: the
        cell then calls `_input_rows` before its Python loop."""
        if rec.ids is not None and not loops.gather:
            self._input_rows(rec)
        return rec.ids, rec.table

    def _loop_scatter(self, rec, loops, xp):
        """(ids, sums, with_sum) for a compiled backward loop (`cpu_loops`) to add each step's rows
        of the input side's gradient into `sums` (2, V [+ 1], G*H) as it finishes them (5.2), (5.3),
        or (None, None, False): no compiled loops, dense input, or `cpu_loops.scatter` off. The
        cell sets `rec.scattered = sums` where the loop ran; the driver then takes dW_ih and db_ih
        from it instead of summing the rows after the loop (`_scatter_columns`)."""
        if loops is None or rec.tokens is None or not loops.scatter:
            return None, None, False
        rows = self.input_size + int(self.bias)
        ids = _ids_in_range(rec.tokens, self.input_size, self._where("backward"))
        return ids, xp.zeros((2, rows, self.GATES * self.hidden_size), dtype=self.dtype), self.bias

    def _step_weight(self, name, rec, xp):
        """W^T, the (C, R) operand of a step product `h W^T` of one (layer, direction); W (R, C).

        On NumPy, for B > 1, where NumPy's OpenBLAS runs its AVX-512 kernels
        (`backend.transposed_copies_pay`) or the split products compute a step's product in their
        own tiles, which read b's rows (`backend.split_products_tiled`), a C-ordered copy of W^T,
        made once a forward pass into the layer's workspace; elsewhere the view `W.T`. Those
        kernels multiply a few rows by a transposed operand 1.2 to 1.5 times slower than by a
        C-ordered one (B = 32, 1 thread: the GRU's h W_hh^T at H = 256 in 218 against 152 us);
        the copy costs 0.03-0.07 ms (`cpu_kernels.transpose_into`; 0.06-0.15 before its squares in
        registers) of the 1.7 to 3.4 ms it saves a forward pass (docs/performance.md). With OpenBLAS on both sides the bits are the same either way at
        the cells' sizes timed (B = 32, H = 256 and 512), not always for small products (B = 2,
        or H = 32), which another kernel sums in another order; with the tiles on, the copy goes
        to them and the view to OpenBLAS, and the last bits differ: like every product's, a
        layer's bits depend on the machine. With B = 1 NumPy computes the product as a
        matrix-vector product: the view. `transposed_copies` (True, False) overrides the choice.

        Where a row of W^T is a multiple of 1 KiB (the LSTM's 4H = 1024 floats, the RNN's 512),
        the copy's rows are 64 bytes longer than W^T's: with rows 4 KiB apart the product's reads
        of a column fall in the same few cache sets, and at 1 thread the LSTM's h W_hh^T took 270
        against 211 us (the same bits: only the leading dimension changes).
        """
        W = self._p(name, rec.k, rec.suffix)
        copies = transposed_copies
        if copies is None:
            copies = backend.transposed_copies_pay() or backend.split_products_tiled()
        if not copies or rec.B < 2 or xp.__name__ != "numpy":
            return W.T
        from npyrnn.nn import kernels

        WT = self._padded_buffer(f"{name}T{rec.key}", W.shape[::-1], xp)
        transpose = kernels.transpose_into(xp)  # compiled with the fast extra: 3 to 7 times numpy.copyto
        if transpose is not None:
            transpose(W, WT)
        else:
            xp.copyto(WT, W.T)
        return WT

    def _padded_buffer(self, name, shape, xp):
        """A (R, C) work array like `_buffer`'s, its rows `PAD_BYTES` apart more where C items
        would be a multiple of 1 KiB on NumPy (a view of a C-ordered buffer; rows contiguous): a
        product reading or writing 32 rows 4 KiB apart meets them in the same few cache sets."""
        R, C = shape
        pad = row_pad(C, xp.dtype(self.dtype).itemsize) if xp.__name__ == "numpy" else 0
        return self._buffer(name, (R, C + pad), xp)[:, :C]

    @staticmethod
    def _cpu_loops(xp):
        """`npyrnn.nn.cpu_loops` (the fused time loops compiled whole) where it may run: on NumPy
        while the split products are on (`backend.set_cpu_threads`); else None."""
        if xp.__name__ != "numpy" or backend.split_products() is None:
            return None
        from npyrnn.nn import cpu_loops

        return cpu_loops if cpu_loops.enabled else None

    # ----------------------------------------------------------------- stepper
    @staticmethod
    def _rows_contiguous(*arrays):
        """Whether each array's rows (last axis) are contiguous, as the fused kernels need them.

        Backward copies the caller's arrays that fail this; the stepper, which updates the
        caller's states in place, runs the array operations for them instead of the kernels.
        """
        return all(a is None or a.shape[-1] <= 1 or a.strides[-1] == a.itemsize for a in arrays)

    def _stepper(self, h, c):
        """The stepper of every cell: the loop over layers and the input side; the cell steps."""
        name = type(self).__name__
        if self.bidirectional:
            raise ValueError(f"{name}.stepper: a bidirectional {name} cannot run one step at a time; use forward")
        xp = self.xp
        L, P, GH = self.num_layers, self.output_size, self.GATES * self.hidden_size
        if getattr(h, "ndim", 0) != 3:
            raise ValueError(
                f"{name}.stepper: expected h of shape (num_layers, B, {P}), got {shape_str(getattr(h, 'shape', ()))}"
            )
        B = h.shape[1]
        self._check_state("h", h, B, xp, layers=L)
        if self._has_cell_state:
            self._check_state("c", c, B, xp, size=self.hidden_size, layers=L)
        table = self._input_table(0, "", xp.empty((self.input_size, GH), dtype=self.dtype))  # (5.1)
        W_ihT = self._p("weight_ih", 0, "").T  # dense input: any float dtype, as forward takes it
        input_products = [None] + [hidden_product(self._p("weight_ih", k, ""), B, xp) for k in range(1, L)]  # (gemv at B = 1)
        bias = [self._input_bias(k, "") if self.bias else None for k in range(L)]
        xw = xp.empty((B, GH), dtype=self.dtype)  # the input side of layer k's gates
        cell_steps = [self._step_fn(k, h, c, xw) for k in range(L)]

        def step(x_t):
            for k in range(L):
                if k == 0 and x_t.dtype.kind in "iu":  # token ids
                    backend.take_rows(table, x_t, out=xw)  # onehot(x_t) W_ih^T + b        (5.1)
                else:
                    if k == 0:
                        backend.matmul(x_t, W_ihT, out=xw)  # x_t W_ih^T                     (2.1)
                    else:
                        input_products[k](h[k - 1], xw)  # h^{k-1}_t W_ih^T                (2.1)
                    if bias[k] is not None:
                        xp.add(xw, bias[k], out=xw)
                cell_steps[k]()
            return h[L - 1]

        return step


def row_pad(columns, itemsize):
    """Items to add to a row of `columns` items so that rows are not a multiple of 1 KiB apart:
    `PAD_BYTES` worth where they would be, else 0 (`Recurrent._padded_buffer`)."""
    return PAD_BYTES // itemsize if (columns * itemsize) % 1024 == 0 else 0


def hidden_product(W, B, xp):
    """A function `f(h, out)` computing `out = h W^T` for one step: W (R, C), h (B, C), out (B, R).

    With one sequence (B = 1) a matrix-vector product (gemv) beats a one-row matrix product;
    while the split products are on (`backend.set_cpu_threads`, as `npyrnn generate` sets them)
    a large one (W of 192K items or more in rows of 256 or more: the GRU and the LSTM at H = 256,
    the scratch RNN at H = 512) is cut in two by rows of W, one half a thread (`cpu_gemm.matvec`).
    """
    if B == 1:
        if xp.__name__ == "numpy" and backend.split_products():
            from npyrnn.nn import cpu_gemm

            split = cpu_gemm.matvec(W)  # None unless W is large and C-ordered
            if split is not None:
                return split
        return lambda h, out: xp.dot(W, h[0], out=out[0])
    WT = W.T
    return lambda h, out: backend.matmul(h, WT, out=out)


def sigmoid_(a, xp):
    """sigma(a) in place, as (1 + tanh(a/2)) / 2 (8.13): no overflow for large |a|."""
    a *= 0.5
    xp.tanh(a, out=a)
    a *= 0.5
    a += 0.5
    return a


def _ids_in_range(ids, V, where):
    """`ids` when every id is in [0, V), else ValueError: the compiled scatter adds rows at these
    indices without bounds checks, and forward checked them, so only ids changed in place since
    forward can fail here."""
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise ValueError(f"{where}: the token ids changed since forward (now from {int(ids.min())} to "
                         f"{int(ids.max())}, outside [0, {V})); do not modify x between forward and backward")
    return ids


def _halves_sums(sums, num_columns, with_sum):
    """(dW, db) from `cpu_kernels.scatter_rows`'s sums (2, V [+ 1], G*H), one per half of the rows: their
    sum, dW (G*H, V) and db (G*H,) or None."""
    total = sums[0] + sums[1]
    return total[:num_columns].T, (total[num_columns] if with_sum else None)


def _scatter_columns(ids, dG, num_columns, xp, with_sum=False, reverse=False):
    """sum_n dG2[n]^T onehot(ids[n]): the (G*H, V) gradient of a row gather (5.2); and sum_n dG2[n] (2.9).

    ids (T, B) token ids, dG (T, B, G*H) the input side's gradient; dG2 and ids[n] its T*B rows.

    For a small vocabulary one product with a (T*B, V) one-hot matrix, built here once for all
    T*B rows, is fastest (2*T*B*V*G*H flops in BLAS); with `with_sum` the matrix gets a last
    column of ones, and the same product also gives the bias gradient, the sum of all rows
    (5.3), without a pass of its own over dG2. For a large vocabulary the rows are summed per
    token with `backend.index_add`, and the bias gradient is the sum of those V per-token sums
    (5.3).

    With the `fast` extra on NumPy (and the fused kernels on) one compiled pass does both for
    any vocabulary: each row of dG2 added to its token's row, and to a last row for the bias
    (`cpu_kernels.scatter_rows`), reading dG2 once without a one-hot matrix, in the order the
    backward loop finished the steps (`reverse`: the reverse direction's), as the compiled loops
    sum them step by step (`_loop_scatter`).

    Returns (dW, db): dW (G*H, V); db (G*H,), or None without `with_sum`.
    """
    from npyrnn.nn import kernels

    scatter = kernels.scatter_rows(xp)
    if scatter is not None and dG.strides[-1] == dG.itemsize:
        sums = xp.zeros((2, num_columns + int(with_sum), dG.shape[-1]), dtype=dG.dtype)  # (2, V [+ 1], G*H)
        ids = _ids_in_range(xp.ascontiguousarray(ids, dtype=xp.intp), num_columns, "backward")
        scatter(ids, dG, sums, bool(with_sum), bool(reverse))  # (5.2), (5.3)
        return _halves_sums(sums, num_columns, with_sum)
    ids, dG2 = ids.reshape(-1), dG.reshape(-1, dG.shape[-1])
    if num_columns <= ONE_HOT_MAX:
        onehot = xp.zeros((ids.shape[0], num_columns + int(with_sum)), dtype=dG2.dtype)  # (T*B, V [+ 1])
        onehot[xp.arange(ids.shape[0]), ids] = 1
        if with_sum:
            onehot[:, num_columns] = 1  # the column that sums every row             (5.3)
        dW = backend.matmul(dG2.T, onehot)  # (G*H, V [+ 1])
        return dW[:, :num_columns], (dW[:, num_columns] if with_sum else None)
    dW_T = xp.zeros((num_columns, dG2.shape[1]), dtype=dG2.dtype)
    backend.index_add(dW_T, ids, dG2)
    return dW_T.T, (dW_T.sum(axis=0) if with_sum else None)  # (5.3)
