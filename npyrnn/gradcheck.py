"""Finite-difference gradient check along random directions (no torch needed).

For a parameter p with hand gradient g and a unit direction v, the
central difference

    (L(p + eps v) - L(p - eps v)) / (2 eps)  =  <g, v> + O(eps^2)          (7.1)

needs two forward passes, whatever the size of p. Each direction is
v = (g/||g|| + r)/||g/||g|| + r|| with r a random unit vector: the random part
reaches every entry of g, and the g part keeps <g, v> away from zero, where
round-off in the two losses would swamp the difference. The relative error

    |num - ana| / max(|num|, |ana|)                                       (7.2)

is about 1e-10 in float64 with eps = 1e-5 (1e-6 is a generous tolerance). See ``docs/derivations/gradcheck.md``.
"""

from npyrnn import backend


def relative_error(a, b, tiny=1e-300):
    """``|a - b| / max(|a|, |b|)`` for scalars; 0 when both are 0 (7.2)."""
    a, b = float(a), float(b)
    denom = max(abs(a), abs(b), tiny)
    return abs(a - b) / denom if (a or b) else 0.0


def directional_check(loss_fn, params, grads, num_directions=2, eps=1e-5, seed=0):
    """Compare hand gradients with central differences along random directions.

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn() -> float``: the loss at the current parameter values, forward pass only.
    params : dict of arrays
        Perturbed in place and restored exactly afterwards.
    grads : dict of arrays
        The hand gradients of the same loss, same keys as ``params``.
    num_directions : int, default 2
        Directions per parameter (each half gradient, half random).
    eps : float, default 1e-5
        Step length; balances the O(eps^2) truncation error against round-off
        (about 1e-16 |L| / eps). Use float64 parameters: float32 cannot resolve it.
    seed : int, default 0
        Seed of the host generator that draws the directions.

    Returns
    -------
    errors : dict
        ``{name: largest relative error (7.2) over the directions}``.
    """
    rng = backend.default_rng(seed)
    errors = {}
    for name, p in params.items():
        g = backend.to_numpy(grads[name])
        xp = backend.get_array_module(p)
        worst = 0.0
        for _ in range(num_directions):
            v = rng.standard_normal(p.shape)
            v /= (v * v).sum() ** 0.5
            g_norm = (g * g).sum() ** 0.5
            if g_norm > 0:
                v += g / g_norm
                v /= (v * v).sum() ** 0.5
            v_dev = xp.asarray(v, dtype=p.dtype)
            saved = p.copy()
            p += eps * v_dev
            plus = float(loss_fn())
            p[...] = saved
            p -= eps * v_dev
            minus = float(loss_fn())
            p[...] = saved
            numeric = (plus - minus) / (2 * eps)  # (7.1)
            analytic = float((g * v).sum())  # <g, v>
            worst = max(worst, relative_error(numeric, analytic))
        errors[name] = worst
    return errors


def check_model(model, X, Y, num_directions=2, seed=0, eps=1e-5):
    """The gradient check of `npyrnn gradcheck`: a language model's hand gradient on one minibatch.

    The loss is the mean cross-entropy of `model` on `X -> Y`, from a random initial state
    (N(0, 0.1^2), so that the recurrent weights also act on the first step), in evaluation
    mode (no dropout). The hand
    gradient comes from `model.backward`; each parameter is then compared with central
    differences along `num_directions` directions (`directional_check`). Use a float64 model.

    Parameters
    ----------
    model : RNNLM
        Its gradients are overwritten; its parameters end as they started.
    X, Y : integer arrays, shape (B, T), on the model's backend
    num_directions : int, default 2
    seed : int, default 0
        Seed of the initial state and of the directions.
    eps : float, default 1e-5

    Returns
    -------
    errors : dict
        `{parameter name: largest relative error (7.2)}`.
    """
    from npyrnn.losses import softmax_cross_entropy

    rng = backend.default_rng(seed)
    state = model.begin_state(X.shape[0])
    for part in state if isinstance(state, tuple) else (state,):  # the LSTM's (h, c)
        part += 0.1 * backend.asarray(rng.standard_normal(part.shape), dtype=part.dtype)
    was_training = model.training
    model.eval()  # dropout would draw new masks on every forward: check the deterministic model
    y = Y.T.reshape(-1)  # time-major targets, matching the logits' rows

    def loss():
        return float(softmax_cross_entropy(model.forward(X, state)[0], y)[0])

    try:
        model.zero_grad()
        logits, _ = model.forward(X, state)
        model.backward(softmax_cross_entropy(logits, y)[1])
        return directional_check(loss, model.params, model.grads, num_directions=num_directions, eps=eps, seed=seed)
    finally:
        model.train(was_training)
