"""Fully connected layer ``y = x W^T + b`` with its hand-written backward.

Equations (2.12)-(2.15) of ``docs/derivations/bptt.md``.
"""

from npyrnn import backend
from npyrnn.nn.init import init_bias, init_weight
from npyrnn.nn.module import INITS, Module, check_choice, check_dtype, check_positive_int, shape_str


class Linear(Module):
    """Affine map over the last axis, torch's ``nn.Linear`` layout.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool, default True
    dtype : {'float32', 'float64'}, default 'float32'
    init : {'normal', 'uniform'}, default 'normal'
        'normal': weight N(0, 0.01^2), bias 0 (d2l's scratch `W_hq`, `b_q`);
        'uniform': U(-1/sqrt(in_features), 1/sqrt(in_features)) (torch's default).
    seed : int or None

    Attributes
    ----------
    params : dict
        ``weight`` (out_features, in_features), ``bias`` (out_features,).
    """

    def __init__(self, in_features, out_features, bias=True, dtype="float32", init="normal", seed=None):
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self.dtype = check_dtype(dtype)
        self.init = check_choice("init", init, INITS)
        self.bias = bool(bias)
        rng = backend.default_rng(seed)
        self._add_param("weight", init_weight(rng, (out_features, in_features), init, in_features))
        if self.bias:
            self._add_param("bias", init_bias(rng, (out_features,), init, in_features))
        self._x = None

    def __repr__(self):
        return f"Linear({self.in_features}, {self.out_features}, bias={self.bias}, dtype={self.dtype!r})"

    def forward(self, x):
        """``y = x W^T + b`` (2.12).

        Parameters
        ----------
        x : array, shape (N, in_features)

        Returns
        -------
        y : array, shape (N, out_features)
        """
        xp = backend.get_array_module(self.params["weight"])
        if not hasattr(x, "ndim") or x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"Linear.forward: expected x of shape (N, {self.in_features}), "
                f"got {shape_str(getattr(x, 'shape', ()))}"
            )
        if x.dtype != self.dtype or backend.get_array_module(x) is not xp:
            raise ValueError(f"Linear.forward: expected a {xp.__name__} array of dtype {self.dtype}, got {x.dtype}")
        self._x = x
        y = backend.matmul(x, self.params["weight"].T)  # (N, out)          (2.12)
        if self.bias:
            y += self.params["bias"]
        return y

    __call__ = forward

    def apply(self, x, out=None):
        """`y = x W^T + b` (2.12) for inference: nothing is kept for backward, nothing checked.

        Parameters
        ----------
        x : array, shape (N, in_features)
        out : array, shape (N, out_features), optional
            Where to write `y`; a new array when omitted.
        """
        xp = backend.get_array_module(x)
        y = backend.matmul(x, self.params["weight"].T, out=out)  # (N, out)                  (2.12)
        if self.bias:
            xp.add(y, self.params["bias"], out=y)
        return y

    def backward(self, dy, out=None):
        """Accumulate ``dW``, ``db``; return ``dx``.

        Parameters
        ----------
        dy : array, shape (N, out_features)
        out : array, shape (N, in_features), optional
            Where to write ``dx`` (a caller's reusable buffer); a new array when omitted.

        Returns
        -------
        dx : array, shape (N, in_features)
        """
        if self._x is None:
            raise RuntimeError("Linear.backward called before forward; call forward first")
        x = self._x
        if not hasattr(dy, "shape") or tuple(dy.shape) != (x.shape[0], self.out_features):
            raise ValueError(
                f"Linear.backward: expected dy of shape ({x.shape[0]}, {self.out_features}), "
                f"got {shape_str(getattr(dy, 'shape', ()))}"
            )
        self.grads["weight"] += backend.matmul(dy.T, x)  # dW = dy^T x, one product over all rows (2.13)
        if self.bias:
            self.grads["bias"] += dy.sum(axis=0)  # db = sum_n dy_n                  (2.14)
        return backend.matmul(dy, self.params["weight"], out=out)  # dx = dy W  (2.15)
