"""Adagrad: torch.optim.Adagrad's rule, equations (11.5)-(11.7) of `docs/derivations/optimizers.md`."""

from npyrnn.optim.base import Optimizer


class Adagrad(Optimizer):
    """Adagrad (Duchi et al., 2011), the optimiser of Karpathy's min-char-rnn.

    Each entry's step is divided by the root of the sum of its squared
    gradients so far. With $t$ the step count (from 1), $\\kappa$ = `lr_decay`,

    ```text
    g <- g + weight_decay p                              (11.1)
    lr_t = lr / (1 + (t - 1) kappa)                      (11.5)
    s <- s + g * g                                       (11.6)
    p <- p - lr_t g / (sqrt(s) + eps)                    (11.7)
    ```

    Parameters
    ----------
    params : dict of arrays (or list)
        Updated in place.
    lr : float, default 1e-2
        >= 0 (min-char-rnn uses 0.1).
    lr_decay : float, default 0
        >= 0.
    weight_decay : float, default 0
        >= 0.
    initial_accumulator_value : float, default 0
        >= 0; the starting value of every entry of `s`.
    eps : float, default 1e-10
        >= 0; added to the root, outside it.
    maximize : bool, default False

    Notes
    -----
    State per parameter: `sum` ($s$), shape of the parameter. min-char-rnn
    adds its 1e-8 inside the square root and starts `s` at 0; torch (and
    npyrnn) add `eps` outside.
    """

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0, eps=1e-10, *,
                 maximize=False):
        super().__init__(params, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                         initial_accumulator_value=initial_accumulator_value, eps=eps, maximize=maximize)

    def _check(self, lr, lr_decay, weight_decay, initial_accumulator_value, eps, maximize):
        return {
            "lr": self._nonneg("lr", lr),
            "lr_decay": self._nonneg("lr_decay", lr_decay),
            "weight_decay": self._nonneg("weight_decay", weight_decay),
            "initial_accumulator_value": self._nonneg("initial_accumulator_value", initial_accumulator_value),
            "eps": self._nonneg("eps", eps),
            "maximize": self._flag("maximize", maximize),
        }

    def _state_names(self):
        return ("sum",)

    def _initial_value(self, buffer_name):
        return self.hyper["initial_accumulator_value"]

    def _update(self, p, g, state, scratch, xp):
        h = self.hyper
        d, t = scratch
        s = state["sum"]
        if h["weight_decay"] != 0:
            xp.multiply(p, h["weight_decay"], out=d)
            (xp.subtract if h["maximize"] else xp.add)(d, g, out=d)  # (+-g) + weight_decay p      (11.1)
            g = d
        elif h["maximize"]:
            xp.negative(g, out=d)
            g = d
        clr = h["lr"] / (1 + (self.step_count - 1) * h["lr_decay"])  # a Python float              (11.5)
        xp.multiply(g, g, out=t)
        s += t  # s <- s + g^2                                                                   (11.6)
        xp.sqrt(s, out=t)
        t += h["eps"]  # sqrt(s) + eps                                                           (11.7)
        xp.multiply(g, -clr, out=d)  # g is read for the last time here
        d /= t
        p += d  # p <- p - lr_t g / (sqrt(s) + eps)                                              (11.7)
