"""RMSprop: torch.optim.RMSprop's rule, equations (11.8)-(11.11) of `docs/derivations/optimizers.md`."""

from npyrnn.optim.base import Optimizer, lerp_


class RMSprop(Optimizer):
    """RMSprop (Hinton's lecture 6e), the optimiser of Karpathy's char-rnn.

    A moving average of squared gradients divides each step; `centered`
    subtracts the square of the moving average of gradients (an estimate of
    the variance instead of the second moment); `momentum` keeps a buffer of
    the normalised steps.

    ```text
    g <- g + weight_decay p                              (11.1)
    v <- alpha v + (1 - alpha) g * g                     (11.8)
    m <- m + (1 - alpha)(g - m)           (centered)     (11.9)
    r = sqrt(max(v - m * m, 0)) + eps  (centered),
        sqrt(v) + eps                     (otherwise)    (11.10)
    b <- momentum b + g / r;  p <- p - lr b  (momentum > 0)
    p <- p - lr g / r                     (otherwise)    (11.11)
    ```

    Parameters
    ----------
    params : dict of arrays (or list)
        Updated in place.
    lr : float, default 1e-2
        >= 0 (char-rnn uses 2e-3).
    alpha : float, default 0.99
        >= 0 (torch's check; values above 1 make `v` negative). char-rnn's `decay_rate` 0.95.
    eps : float, default 1e-8
        >= 0.
    weight_decay : float, default 0
        >= 0.
    momentum : float, default 0
        >= 0.
    centered : bool, default False
    maximize : bool, default False

    Notes
    -----
    State per parameter: `square_avg` ($v$), `grad_avg` ($m$, when centered),
    `momentum_buffer` ($b$, when `momentum > 0`).

    One deliberate difference from torch: centered, where the variance
    estimate `v - m * m` is 0 up to rounding (`alpha = 0`, or the same
    gradient step after step), torch's fused multiply-add can leave it at
    -1e-18 and its parameters become nan; npyrnn takes the root of 0 instead.
    """

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False, *,
                 maximize=False):
        super().__init__(params, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                         centered=centered, maximize=maximize)

    def _check(self, lr, alpha, eps, weight_decay, momentum, centered, maximize):
        return {
            "lr": self._nonneg("lr", lr),
            "alpha": self._nonneg("alpha", alpha),
            "eps": self._nonneg("eps", eps),
            "weight_decay": self._nonneg("weight_decay", weight_decay),
            "momentum": self._nonneg("momentum", momentum),
            "centered": self._flag("centered", centered),
            "maximize": self._flag("maximize", maximize),
        }

    def _state_names(self):
        names = ["square_avg"]
        if self.hyper["centered"]:
            names.append("grad_avg")
        if self.hyper["momentum"] > 0:
            names.append("momentum_buffer")
        return tuple(names)

    def _update(self, p, g, state, scratch, xp):
        h = self.hyper
        d, t = scratch
        alpha, v = h["alpha"], state["square_avg"]
        if h["weight_decay"] != 0:
            xp.multiply(p, h["weight_decay"], out=d)
            (xp.subtract if h["maximize"] else xp.add)(d, g, out=d)  # (+-g) + weight_decay p      (11.1)
            g = d
        elif h["maximize"]:
            xp.negative(g, out=d)
            g = d
        v *= alpha
        xp.multiply(g, 1 - alpha, out=t)
        t *= g
        v += t  # v <- alpha v + (1 - alpha) g^2                                                  (11.8)
        if h["centered"]:
            m = state["grad_avg"]
            lerp_(xp, m, g, 1 - alpha, t)  # m <- m + (1 - alpha)(g - m)                           (11.9)
            xp.multiply(m, m, out=t)
            xp.subtract(v, t, out=t)
            xp.maximum(t, 0, out=t)  # v >= m^2 exactly; rounding may leave -1e-18 (torch: nan)
            xp.sqrt(t, out=t)  # sqrt(max(v - m^2, 0))                                             (11.10)
        else:
            xp.sqrt(v, out=t)  # sqrt(v)                                                           (11.10)
        t += h["eps"]  # r                                                                         (11.10)
        if h["momentum"] > 0:
            b = state["momentum_buffer"]
            b *= h["momentum"]
            xp.divide(g, t, out=t)
            b += t  # b <- momentum b + g / r                                                      (11.11)
            xp.multiply(b, h["lr"], out=t)
            p -= t  # p <- p - lr b                                                                (11.11)
        else:
            xp.multiply(g, -h["lr"], out=d)  # g is read for the last time here
            d /= t
            p += d  # p <- p - lr g / r                                                            (11.11)
