"""Softmax cross-entropy: mean loss and its gradient in one pass, and perplexity.

Equations (1.1)-(1.5) of ``docs/derivations/cross-entropy.md``.
"""

import math

from npyrnn import backend
from npyrnn.nn import kernels
from npyrnn.nn.module import shape_str


def softmax_cross_entropy(logits, targets):
    """Mean cross-entropy of ``softmax(logits)`` against integer targets, and its gradient.

    Numerically stable for any finite logits (each row is shifted by its
    maximum before ``exp``), so logits of +-1e4 give exact results.

    Parameters
    ----------
    logits : array, shape (N, V), float
    targets : integer array, shape (N,), values in [0, V)

    Returns
    -------
    loss : 0-d array
        ``-(1/N) sum_n log softmax(logits_n)[targets_n]`` (1.2); a 0-d array on the
        backend, so CuPy needs no host sync until you ask for ``float(loss)``.
    dlogits : array, shape (N, V)
        ``(softmax(logits) - onehot(targets)) / N`` (1.4).
    """
    xp = backend.get_array_module(logits)
    if not hasattr(logits, "ndim") or logits.ndim != 2 or logits.dtype.kind != "f":
        raise ValueError(
            f"softmax_cross_entropy: expected float logits of shape (N, V), "
            f"got {shape_str(getattr(logits, 'shape', ()))} {getattr(logits, 'dtype', type(logits).__name__)}"
        )
    N, V = logits.shape
    if (
        not hasattr(targets, "ndim")
        or targets.ndim != 1
        or targets.shape[0] != N
        or targets.dtype.kind not in "iu"
    ):
        raise ValueError(
            f"softmax_cross_entropy: expected integer targets of shape ({N},) to match logits {shape_str(logits.shape)}, "
            f"got {shape_str(getattr(targets, 'shape', ()))} {getattr(targets, 'dtype', type(targets).__name__)}"
        )
    if N == 0:
        raise ValueError("softmax_cross_entropy: logits must have at least one row, got shape (0, V)")
    xent = kernels.softmax_xent(xp, logits.dtype)  # the `fast` extra: one compiled pass, float32
    if xent is not None and logits.flags.c_contiguous:
        dlogits = xp.empty_like(logits)
        loss = xent(logits, targets, dlogits)  # (1.1)-(1.4)
        if loss <= -1.0:  # -1 - n: row n's target is out of range, nothing else written
            _bad_targets(targets, V)
        return logits.dtype.type(loss), dlogits
    if xp.__name__ == "numpy" and (targets.min() < 0 or targets.max() >= V):  # a host sync on CuPy: not there
        _bad_targets(targets, V)
    rows = xp.arange(N)
    z = logits - logits.max(axis=1, keepdims=True)  # shift: softmax unchanged, exp <= 1   (1.1)
    e = xp.exp(z)
    s = e.sum(axis=1)  # (N,), in [1, V]
    loss = (xp.log(s) - z[rows, targets]).mean()  # -log p_y = log sum exp z - z_y         (1.2)
    dlogits = e
    dlogits /= s[:, None]  # p = softmax(logits)                                          (1.3)
    dlogits[rows, targets] -= 1  # p - onehot(y)                                          (1.4)
    dlogits /= N  # the mean over N rows                                                  (1.4)
    return loss, dlogits


def _bad_targets(targets, V):
    raise ValueError(
        f"softmax_cross_entropy: targets must be class ids in [0, {V}) (V = {V}, the logits' columns), "
        f"got values from {int(targets.min())} to {int(targets.max())}"
    )


def perplexity(mean_loss):
    """``exp(mean cross-entropy)`` (1.5): 1 for a perfect model, V for a uniform guess."""
    try:
        return math.exp(float(mean_loss))
    except OverflowError:  # a diverged run: the loss is above ~709.78
        return math.inf
