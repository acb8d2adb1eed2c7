"""SGD with momentum, dampening, Nesterov momentum and weight decay: torch.optim.SGD's rule.

Equations (11.1)-(11.4) of `docs/derivations/optimizers.md`; with the
defaults it is plain SGD, (6.3) of `docs/derivations/clipping-sgd.md`.
"""

from npyrnn import backend
from npyrnn.optim.base import Optimizer


class SGD(Optimizer):
    """Stochastic gradient descent, optionally with (Nesterov) momentum and weight decay.

    The update of `torch.optim.SGD` (its single-tensor algorithm): with
    $\\lambda$ = `weight_decay`, $\\mu$ = `momentum`, $\\tau$ = `dampening`,
    $\\eta$ = `lr`,

    ```text
    g <- g + lambda p                                  (11.1)
    b <- g at the first step, else mu b + (1 - tau) g  (11.2)
    d <- g + mu b (nesterov) or b (momentum) or g      (11.3)
    p <- p - lr d                                      (11.4)
    ```

    Parameters
    ----------
    params : dict of arrays (or list)
        Updated in place, so the layers that own them see the update.
    lr : float, default 1e-3
        Learning rate, >= 0 (d2l's scratch model uses 1).
    momentum : float, default 0
        >= 0; 0 means no momentum buffer.
    dampening : float, default 0
        Scales the new gradient in the buffer by `1 - dampening`.
    weight_decay : float, default 0
        >= 0; L2 penalty added to the gradient.
    nesterov : bool, default False
        Nesterov momentum; needs `momentum > 0` and `dampening == 0`.
    maximize : bool, default False
        Ascend instead of descend (the gradient's sign flipped).

    Notes
    -----
    State per parameter: `momentum_buffer` (when `momentum > 0`), shape of the parameter.
    """

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False):
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, maximize=maximize)

    def _check(self, lr, momentum, dampening, weight_decay, nesterov, maximize):
        hyper = {
            "lr": self._nonneg("lr", lr),
            "momentum": self._nonneg("momentum", momentum),
            "dampening": self._number("dampening", dampening),
            "weight_decay": self._nonneg("weight_decay", weight_decay),
            "nesterov": self._flag("nesterov", nesterov),
            "maximize": self._flag("maximize", maximize),
        }
        if hyper["nesterov"] and (hyper["momentum"] <= 0 or hyper["dampening"] != 0):
            raise ValueError(
                f"{self._name}: nesterov=True needs momentum > 0 and dampening == 0, "
                f"got momentum={hyper['momentum']}, dampening={hyper['dampening']}"
            )
        return hyper

    def _state_names(self):
        return ("momentum_buffer",) if self.hyper["momentum"] != 0 else ()

    def _clipped_step(self, grads, max_norm, eps=1e-6):
        """`clip_grad_norm(grads, max_norm, eps)` then `step(grads)` in one compiled pass a parameter,
        for plain SGD (no momentum, weight decay or maximize) on NumPy with the `fast` extra; the
        norm before clipping, or None (nothing done) where that does not apply.

        The norm and the factor are computed as `clip_grad_norm` computes them; then each
        element is g <- g c (6.2), p <- p - (g lr) (6.3), each product rounded in the dtype as
        the array operations round it, so the bits are theirs (`tests/test_optim.py`).
        """
        from npyrnn.nn import kernels
        from npyrnn.optim.clip import _norm_and_factor

        h = self.hyper
        if h["momentum"] != 0 or h["weight_decay"] != 0 or h["maximize"]:
            return None
        triples = self._pairs(grads)
        if not triples:
            return None
        xp = backend.get_array_module(triples[0][1])
        update = kernels.clipped_sgd(xp)
        dtype = triples[0][1].dtype
        if update is None or not all(p.dtype == dtype and g.dtype == dtype and p.flags.c_contiguous
                                     and g.flags.c_contiguous and g.flags.writeable for _, p, g in triples):
            return None
        total_norm, coef = _norm_and_factor([g for _, _, g in triples], max_norm, eps, xp)  # (6.1), (6.2)
        self.step_count += 1
        update(tuple(p.reshape(-1) for _, p, _ in triples), tuple(g.reshape(-1) for _, _, g in triples),
               coef.astype(dtype)[()], dtype.type(h["lr"]))  # (6.2), (6.3)
        return total_norm

    def _update(self, p, g, state, scratch, xp):
        h = self.hyper
        d, t = scratch
        lr, mu, wd = h["lr"], h["momentum"], h["weight_decay"]
        if wd != 0:
            xp.multiply(p, wd, out=d)
            (xp.subtract if h["maximize"] else xp.add)(d, g, out=d)  # d = (+-g) + lambda p          (11.1)
            g = d
        elif h["maximize"]:
            xp.negative(g, out=d)
            g = d
        if mu != 0:
            b = state["momentum_buffer"]
            if self.step_count == 1:
                xp.copyto(b, g)  # b = g at the first step                                    (11.2)
            else:
                b *= mu  # mu b                                                               (11.2)
                if h["dampening"] == 0:
                    b += g  # + g                                                             (11.2)
                else:
                    xp.multiply(g, 1 - h["dampening"], out=t)
                    b += t  # + (1 - tau) g                                                   (11.2)
            if h["nesterov"]:
                xp.multiply(b, mu, out=t)
                xp.add(g, t, out=d)  # d = g + mu b                                            (11.3)
                g = d
            else:
                g = b  # d = b                                                                (11.3)
        xp.multiply(g, lr, out=t)
        p -= t  # p <- p - lr d                                                    (11.4), (6.3)
