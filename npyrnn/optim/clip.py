"""Global-norm gradient clipping, equations (6.1)-(6.2) of `docs/derivations/clipping-sgd.md`;
`clip_and_step`, clipping then the optimiser's step (6.3)."""

from npyrnn import backend


def _arrays(grads):
    return list(grads.values()) if isinstance(grads, dict) else list(grads)


def clip_grad_norm(grads, max_norm, eps=1e-6, error_if_nonfinite=False):
    """Scale all gradients in place so that their global L2 norm is at most ``max_norm``.

    Same result as ``torch.nn.utils.clip_grad_norm_``: every gradient is
    multiplied by ``min(1, max_norm / (norm + eps))`` (6.2), one factor for all,
    so the direction of the full gradient is kept. Safe at norm 0 (the factor
    is 1). The factor is applied without a host sync, so CuPy keeps running.

    Parameters
    ----------
    grads : dict of arrays, or iterable of arrays
        Modified in place.
    max_norm : float
        theta > 0.
    eps : float, default 1e-6
        As torch; keeps the division finite.
    error_if_nonfinite : bool, default False
        Raise ``ValueError`` when the norm is nan or inf (a host sync).

    Returns
    -------
    total_norm : 0-d array
        The global norm before clipping, ``sqrt(sum_p sum g_p^2)`` (6.1).
    """
    arrays = _arrays(grads)
    max_norm = _checked(max_norm)
    if not arrays:
        return backend.xp.asarray(0.0)
    xp = backend.get_array_module(arrays[0])
    total_norm, coef = _norm_and_factor(arrays, max_norm, eps, xp)
    if error_if_nonfinite and not bool(xp.isfinite(total_norm)):
        raise ValueError(f"clip_grad_norm: the total gradient norm is {float(total_norm)}; lower the learning rate")
    for g in arrays:
        g *= coef.astype(g.dtype)
    return total_norm


def clip_and_step(grads, max_norm, optimizer):
    """`clip_grad_norm(grads, max_norm)`, then `optimizer.step(grads)`; returns the norm before clipping.

    The same arithmetic, the same bits. For plain SGD on NumPy with the `fast` extra (and the
    fused kernels on) the scaling (6.2) and the update (6.3) are one compiled pass over each
    gradient and parameter instead of three array operations (`SGD._clipped_step`).
    """
    fused = getattr(optimizer, "_clipped_step", None)
    total_norm = None if fused is None else fused(grads, _checked(max_norm))
    if total_norm is None:
        total_norm = clip_grad_norm(grads, max_norm)  # (6.1), (6.2)
        optimizer.step(grads)  # (6.3)
    return total_norm


def _checked(max_norm):
    max_norm = float(max_norm)
    if not max_norm > 0:
        raise ValueError(f"clip_grad_norm: max_norm must be positive, got {max_norm}")
    return max_norm


def _norm_and_factor(arrays, max_norm, eps, xp):
    """The global norm (6.1) and the factor min(1, theta / (norm + eps)) (6.2), 0-d arrays."""
    sq = sum(xp.vdot(g.ravel(), g.ravel()) for g in arrays)  # sum of squares, all grads  (6.1)
    total_norm = xp.sqrt(sq)
    coef = xp.minimum(max_norm / (total_norm + eps), 1.0)  # min(1, theta/||g||)           (6.2)
    return total_norm, coef
