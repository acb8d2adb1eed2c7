"""RNNLM: token ids -> recurrent layer (RNN, GRU or LSTM) -> Linear -> logits, with a hand-written backward.

The npyrnn twin of d2l's `RNNModel` ("concise RNN", chapters 8 and 9) and of d2l's scratch
models (`RNNModelScratch` with the RNN, GRU or LSTM cell): the one-hot input is a row gather
(5.1), the output layer one matrix product over all T*B rows (2.12).
"""

from npyrnn import backend
from npyrnn.nn.gru import GRU
from npyrnn.nn.linear import Linear
from npyrnn.nn.lstm import LSTM
from npyrnn.nn.module import Module, check_choice, shape_str
from npyrnn.nn.recurrent import hidden_product
from npyrnn.nn.rnn import RNN

CELLS = ("rnn", "gru", "lstm")


class RNNLM(Module):
    """Character (or word) level recurrent language model.

    Parameters
    ----------
    vocab_size : int
        V, the number of token ids (input one-hot size and output classes).
    num_hiddens : int
        H, hidden units per layer and direction.
    num_layers : int, default 1
    bidirectional : bool, default False
        Reads each window in both directions. A language model that sees the
        future of its window learns to copy it: useful to study the layer, not
        to generate text.
    nonlinearity : {'tanh', 'relu'}, default 'tanh'
        The Elman RNN's activation; only 'tanh' with `cell='gru'` or `'lstm'`.
    dtype : {'float32', 'float64'}, default 'float32'
    init : {'normal', 'uniform'}, default 'normal'
        See `npyrnn.nn.RNN`; the output layer uses the same scheme.
    seed : int or None
        One seed for all parameters (the recurrent layer and the output layer draw from
        independent streams spawned from it) and for the dropout masks.
    cell : {'rnn', 'gru', 'lstm'}, default 'rnn'
        Keyword only: `npyrnn.nn.RNN`, `GRU` or `LSTM`.
    dropout : float, default 0
        Keyword only: dropout between stacked layers, in training mode (`model.train()`);
        `model.eval()` turns it off.
    reset_after : bool, default True
        Keyword only, GRU: torch's and cuDNN's GRU (True) or d2l's chapter 9 scratch GRU (False).
    proj_size : int, default 0
        Keyword only, LSTM: the size P of the projected state (0: none).

    Attributes
    ----------
    params, grads : dict
        `rnn.weight_ih_l0` (G*H, V), `rnn.weight_hh_l0` (G*H, P), `rnn.bias_ih_l0`,
        `rnn.bias_hh_l0` (G*H,), ... and `linear.weight` (V, D*P), `linear.bias` (V,):
        the keys of d2l's torch `RNNModel` state dict, G = 1, 3, 4 for RNN, GRU, LSTM.
        They share memory with `model.rnn` and `model.linear`.
    """

    def __init__(
        self,
        vocab_size,
        num_hiddens,
        num_layers=1,
        bidirectional=False,
        nonlinearity="tanh",
        dtype="float32",
        init="normal",
        seed=None,
        *,
        cell="rnn",
        dropout=0.0,
        reset_after=True,
        proj_size=0,
    ):
        super().__init__()
        check_choice("cell", cell, CELLS)
        if cell != "rnn" and nonlinearity != "tanh":
            raise ValueError(f"nonlinearity={nonlinearity!r} applies to cell='rnn' only; the {cell.upper()} has "
                             "its own gate activations")
        if cell != "lstm" and proj_size:
            raise ValueError(f"proj_size={proj_size!r} applies to cell='lstm' only")
        seeds = backend.default_rng(seed).integers(0, 2**63 - 1, size=2)
        common = dict(num_layers=num_layers, bidirectional=bidirectional, dropout=dropout, dtype=dtype, init=init,
                      seed=int(seeds[0]), reuse_buffers=True)  # out is consumed by the output layer at once
        if cell == "rnn":
            self.rnn = RNN(vocab_size, num_hiddens, nonlinearity=nonlinearity, **common)
        elif cell == "gru":
            self.rnn = GRU(vocab_size, num_hiddens, reset_after=reset_after, **common)
        else:
            self.rnn = LSTM(vocab_size, num_hiddens, proj_size=proj_size, **common)
        self.cell = cell
        self.vocab_size = vocab_size
        self.num_hiddens = num_hiddens
        self.num_directions = self.rnn.num_directions
        self.dtype = self.rnn.dtype
        self.linear = Linear(
            self.num_directions * self.rnn.output_size, vocab_size, dtype=dtype, init=init, seed=int(seeds[1])
        )
        self._adopt("rnn", self.rnn)
        self._adopt("linear", self.linear)
        self._TB = None

    @property
    def config(self):
        """The constructor arguments that fix the parameter shapes (stored in checkpoints)."""
        config = {
            "vocab_size": self.vocab_size,
            "num_hiddens": self.num_hiddens,
            "num_layers": self.rnn.num_layers,
            "bidirectional": self.rnn.bidirectional,
            "nonlinearity": getattr(self.rnn, "nonlinearity", "tanh"),
            "dtype": self.dtype,
            "cell": self.cell,
            "dropout": self.rnn.dropout,
        }
        if self.cell == "gru":
            config["reset_after"] = self.rnn.reset_after
        if self.cell == "lstm":
            config["proj_size"] = self.rnn.proj_size
        return config

    def __repr__(self):
        return f"RNNLM(rnn={self.rnn!r}, linear={self.linear!r})"

    def begin_state(self, batch_size):
        """Zero initial state on the parameters' backend: (num_layers*D, batch_size, H), or `(h, c)` for the LSTM."""
        return self.rnn.begin_state(batch_size)

    def generator_state(self):
        """The state of the host generator that draws dropout masks (JSON-able; for checkpoints)."""
        return self.rnn.dropout_rng.bit_generator.state

    def set_generator_state(self, state):
        """Restore `generator_state()`'s output."""
        self.rnn.dropout_rng.bit_generator.state = state

    def forward(self, X, state=None):
        """Logits for every position of a minibatch.

        Parameters
        ----------
        X : integer array, shape (B, T)
            Token ids in [0, V), batch-major as the data iterators yield them.
            The range is checked on NumPy; on CuPy it is not (that would cost
            a host sync per minibatch), so out-of-range ids give wrong results.
        state : array, shape (num_layers*D, B, H), or `(h, c)` for the LSTM, optional
            Initial state (zeros when omitted).

        Returns
        -------
        logits : array, shape (T*B, V)
            Time-major rows, matching targets `Y.T.reshape(-1)`.
        state : array or tuple
            Final state, to carry into the next minibatch.
        """
        self._TB = None  # a failed call must not leave the previous minibatch's shapes behind
        if not hasattr(X, "ndim") or X.ndim != 2 or X.dtype.kind not in "iu":
            raise ValueError(
                f"RNNLM.forward: expected integer token ids X of shape (B, T), "
                f"got {shape_str(getattr(X, 'shape', ()))} {getattr(X, 'dtype', type(X).__name__)}"
            )
        B, T = X.shape
        # out lives in the layer's workspace (reuse_buffers): the output layer consumes it right away
        out, state = self.rnn.forward(X.T, state)  # (T, B, D*P)                       (5.1)
        logits = self.linear.forward(out.reshape(T * B, -1))  # (T*B, V)               (2.12)
        self._TB = (T, B)
        return logits, state

    __call__ = forward

    def stepper(self, state):
        """A function that feeds one token per sequence and returns the next logits (generation).

        Parameters
        ----------
        state : array, shape (num_layers*D, B, H), or `(h, c)` for the LSTM
            Updated in place by every call.

        Returns
        -------
        step : callable
            `step(ids) -> logits` with ids of shape (B,) on the model's backend and logits
            (B, V). It uses the weights as they are now. A unidirectional model advances one
            step without allocating or checking; a bidirectional one has no step-by-step
            form, so each call runs `forward` on the single token (correct, but slower).
        """
        if self.rnn.bidirectional:
            parts = state if isinstance(state, tuple) else (state,)

            def step(ids):
                logits, new_state = self.forward(ids[:, None], state)  # (B, V)
                for part, new in zip(parts, new_state if isinstance(new_state, tuple) else (new_state,)):
                    part[...] = new
                return logits

            return step
        rnn_step = self.rnn.stepper(state)
        xp = self.xp
        batch = (state[0] if isinstance(state, tuple) else state).shape[1]
        out = xp.empty((batch, self.vocab_size), dtype=self.dtype)
        # `linear.apply` without its checks: at B = 1 a matrix-vector product (1.6 against 5.2 us
        # for the 2-D product's path at V = 28, H = 512; the same bits)
        project = hidden_product(self.linear.params["weight"], batch, xp)
        bias = self.linear.params["bias"] if self.linear.bias else None

        def step(ids):
            project(rnn_step(ids), out)  # (B, V), overwritten next call                   (2.12)
            if bias is not None:
                xp.add(out, bias, out=out)
            return out

        return step

    def _greedy_compiled(self, state, out, forced):
        """Feed the ids out[:forced + 1] (N, 1) a step at a time, then fill out[forced + 1:] greedily,
        as `predict` does with the stepper, in a compiled loop (`npyrnn.nn.cpu_greedy.run`: the
        same ids and final state); the number of ids fed, N - 1 when done (on NumPy with the split
        products and the fused kernels on, at batch 1, unidirectional; else 0, nothing done)."""
        if self.xp.__name__ != "numpy" or backend.split_products() is None:
            return 0
        from npyrnn.nn import cpu_greedy

        return cpu_greedy.run(self, state, out, forced)

    def backward(self, dlogits, dstate=None):
        """Backpropagate `dlogits` through the output layer and the recurrent layer; grads accumulate.

        Parameters
        ----------
        dlogits : array, shape (T*B, V)
        dstate : array or tuple, optional
            Gradient w.r.t. the returned state. Omitted in truncated BPTT: the next
            minibatch's loss does not flow back into this one (3.2).

        Returns
        -------
        dstate0 : array, or `(dh0, dc0)` for the LSTM
            Gradient w.r.t. the initial state.
        """
        if self._TB is None:
            raise RuntimeError("RNNLM.backward called before forward; call forward first")
        T, B = self._TB
        xp = backend.get_array_module(dlogits)
        dout = self._buffer("dout", (T * B, self.linear.in_features), xp)
        self.linear.backward(dlogits, out=dout)  # (T*B, D*P)                          (2.15)
        _, dstate0 = self.rnn.backward(dout.reshape(T, B, -1), dstate)
        return dstate0
