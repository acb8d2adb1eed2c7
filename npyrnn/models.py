"""RNNLM: token ids -> RNN -> Linear -> logits, with a hand-written backward.

The npyrnn twin of d2l's `RNNModel` ("concise RNN", chapter 8) and of d2l's scratch
model `RNNModelScratch`: the one-hot input is a row gather (5.1), the output layer one
matrix product over all T*B rows (2.12).
"""

from npyrnn import backend
from npyrnn.nn.linear import Linear
from npyrnn.nn.module import Module, shape_str
from npyrnn.nn.rnn import RNN


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
    dtype : {'float32', 'float64'}, default 'float32'
    init : {'normal', 'uniform'}, default 'normal'
        See `npyrnn.nn.RNN`; the output layer uses the same scheme.
    seed : int or None
        One seed for all parameters (the RNN and the output layer draw from
        independent streams spawned from it).

    Attributes
    ----------
    params, grads : dict
        ``rnn.weight_ih_l0`` (H, V), ``rnn.weight_hh_l0`` (H, H), ``rnn.bias_ih_l0``,
        ``rnn.bias_hh_l0`` (H,), ... and ``linear.weight`` (V, D*H), ``linear.bias`` (V,):
        the keys of d2l's torch ``RNNModel`` state dict. They share memory
        with ``model.rnn`` and ``model.linear``.
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
    ):
        super().__init__()
        seeds = backend.default_rng(seed).integers(0, 2**63 - 1, size=2)
        self.rnn = RNN(
            vocab_size,
            num_hiddens,
            num_layers=num_layers,
            nonlinearity=nonlinearity,
            bidirectional=bidirectional,
            dtype=dtype,
            init=init,
            seed=int(seeds[0]),
            reuse_buffers=True,  # out is consumed by the output layer before the next call
        )
        self.vocab_size = vocab_size
        self.num_hiddens = num_hiddens
        self.num_directions = self.rnn.num_directions
        self.dtype = self.rnn.dtype
        self.linear = Linear(
            self.num_directions * num_hiddens, vocab_size, dtype=dtype, init=init, seed=int(seeds[1])
        )
        self._adopt("rnn", self.rnn)
        self._adopt("linear", self.linear)
        self._TB = None

    @property
    def config(self):
        """The constructor arguments that fix the parameter shapes (stored in checkpoints)."""
        return {
            "vocab_size": self.vocab_size,
            "num_hiddens": self.num_hiddens,
            "num_layers": self.rnn.num_layers,
            "bidirectional": self.rnn.bidirectional,
            "nonlinearity": self.rnn.nonlinearity,
            "dtype": self.dtype,
        }

    def __repr__(self):
        return f"RNNLM(rnn={self.rnn!r}, linear={self.linear!r})"

    def begin_state(self, batch_size):
        """Zero initial state, shape (num_layers*D, batch_size, H), on the parameters' backend."""
        shape = (self.rnn.num_layers * self.num_directions, batch_size, self.num_hiddens)
        return self.xp.zeros(shape, dtype=self.dtype)

    def forward(self, X, state=None):
        """Logits for every position of a minibatch.

        Parameters
        ----------
        X : integer array, shape (B, T)
            Token ids in [0, V), batch-major as the data iterators yield them.
            The range is checked on NumPy; on CuPy it is not (that would cost
            a host sync per minibatch), so out-of-range ids give wrong results.
        state : array, shape (num_layers*D, B, H), optional
            Initial state (zeros when omitted).

        Returns
        -------
        logits : array, shape (T*B, V)
            Time-major rows, matching targets ``Y.T.reshape(-1)``.
        state : array, shape (num_layers*D, B, H)
            Final state, to carry into the next minibatch.
        """
        self._TB = None  # a failed call must not leave the previous minibatch's shapes behind
        if not hasattr(X, "ndim") or X.ndim != 2 or X.dtype.kind not in "iu":
            raise ValueError(
                f"RNNLM.forward: expected integer token ids X of shape (B, T), "
                f"got {shape_str(getattr(X, 'shape', ()))} {getattr(X, 'dtype', type(X).__name__)}"
            )
        B, T = X.shape
        # out lives in the RNN's workspace (reuse_buffers): the output layer consumes it right away
        out, state = self.rnn.forward(X.T, state)  # (T, B, D*H)                       (5.1)
        logits = self.linear.forward(out.reshape(T * B, -1))  # (T*B, V)               (2.12)
        self._TB = (T, B)
        return logits, state

    __call__ = forward

    def stepper(self, state):
        """A function that feeds one token per sequence and returns the next logits (generation).

        Parameters
        ----------
        state : array, shape (num_layers*D, B, H)
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

            def step(ids):
                logits, new_state = self.forward(ids[:, None], state)  # (B, V)
                state[...] = new_state
                return logits

            return step
        rnn_step = self.rnn.stepper(state)
        out = self.xp.empty((state.shape[1], self.vocab_size), dtype=self.dtype)

        def step(ids):
            return self.linear.apply(rnn_step(ids), out=out)  # (B, V), overwritten next call  (2.12)

        return step

    def backward(self, dlogits, dstate=None):
        """Backpropagate ``dlogits`` through the output layer and the RNN; grads accumulate.

        Parameters
        ----------
        dlogits : array, shape (T*B, V)
        dstate : array, shape (num_layers*D, B, H), optional
            Gradient w.r.t. the returned state. Omitted in truncated BPTT: the
            next minibatch's loss does not flow back into this one (3.2).

        Returns
        -------
        dstate0 : array, shape (num_layers*D, B, H)
            Gradient w.r.t. the initial state.
        """
        if self._TB is None:
            raise RuntimeError("RNNLM.backward called before forward; call forward first")
        T, B = self._TB
        xp = backend.get_array_module(dlogits)
        dout = self._buffer("dout", (T * B, self.num_directions * self.num_hiddens), xp)
        self.linear.backward(dlogits, out=dout)  # (T*B, D*H)                          (2.15)
        _, dstate0 = self.rnn.backward(dout.reshape(T, B, -1), dstate)
        return dstate0
