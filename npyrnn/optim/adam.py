"""Adam and AdamW: torch.optim.Adam's and AdamW's rules, equations (11.12)-(11.17) of `docs/derivations/optimizers.md`."""

from npyrnn.optim.base import Optimizer, lerp_


class Adam(Optimizer):
    """Adam (Kingma and Ba, 2015), optionally AMSGrad, as torch.optim.Adam computes it.

    With $t$ the step count (from 1):

    ```text
    g <- g + weight_decay p      (or, decoupled: p <- (1 - lr weight_decay) p)  (11.1), (11.12)
    m <- m + (1 - beta1)(g - m)                                                 (11.13)
    v <- beta2 v + (1 - beta2) g * g                                            (11.14)
    c1 = 1 - beta1^t,  c2 = 1 - beta2^t       (Python floats)                   (11.15)
    vmax <- max(vmax, v), used instead of v  (amsgrad)                          (11.16)
    p <- p - (lr / c1) m / (sqrt(v) / sqrt(c2) + eps)                           (11.17)
    ```

    Parameters
    ----------
    params : dict of arrays (or list)
        Updated in place.
    lr : float, default 1e-3
        >= 0.
    betas : (float, float), default (0.9, 0.999)
        Each in [0, 1).
    eps : float, default 1e-8
        >= 0.
    weight_decay : float, default 0
        >= 0; an L2 penalty added to the gradient (AdamW decouples it).
    amsgrad : bool, default False
    maximize : bool, default False
    decoupled_weight_decay : bool, default False
        True gives AdamW's update.

    Notes
    -----
    State per parameter: `exp_avg` ($m$), `exp_avg_sq` ($v$) and, with
    amsgrad, `max_exp_avg_sq` ($v_{max}$).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 maximize=False, decoupled_weight_decay=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, decoupled_weight_decay=decoupled_weight_decay)

    def _check(self, lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay):
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
            raise ValueError(f"{self._name}: betas must be a pair (beta1, beta2), each in [0, 1), got {betas!r}")
        return {
            "lr": self._nonneg("lr", lr),
            "betas": [self._unit("betas[0]", betas[0]), self._unit("betas[1]", betas[1])],
            "eps": self._nonneg("eps", eps),
            "weight_decay": self._nonneg("weight_decay", weight_decay),
            "amsgrad": self._flag("amsgrad", amsgrad),
            "maximize": self._flag("maximize", maximize),
            "decoupled_weight_decay": self._flag("decoupled_weight_decay", decoupled_weight_decay),
        }

    def _state_names(self):
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if self.hyper["amsgrad"] else ("exp_avg", "exp_avg_sq")

    def _update(self, p, g, state, scratch, xp):
        h = self.hyper
        d, t = scratch
        lr, wd, (beta1, beta2) = h["lr"], h["weight_decay"], h["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if h["maximize"]:
            xp.negative(g, out=d)
            g = d
        if wd != 0:
            if h["decoupled_weight_decay"]:
                p *= 1 - lr * wd  # p <- (1 - lr weight_decay) p                                  (11.12)
            else:
                xp.multiply(p, wd, out=t)
                xp.add(g, t, out=d)  # g + weight_decay p                                        (11.1)
                g = d
        lerp_(xp, m, g, 1 - beta1, t)  # m <- m + (1 - beta1)(g - m)                               (11.13)
        v *= beta2
        xp.multiply(g, 1 - beta2, out=t)
        t *= g
        v += t  # v <- beta2 v + (1 - beta2) g^2                                                 (11.14)
        c1 = 1 - beta1 ** self.step_count  # Python floats: no device sync                         (11.15)
        c2 = 1 - beta2 ** self.step_count  #                                                       (11.15)
        if h["amsgrad"]:
            vmax = state["max_exp_avg_sq"]
            xp.maximum(vmax, v, out=vmax)  # vmax <- max(vmax, v)                                  (11.16)
            xp.sqrt(vmax, out=t)
        else:
            xp.sqrt(v, out=t)
        t /= c2 ** 0.5
        t += h["eps"]  # sqrt(v) / sqrt(c2) + eps                                                  (11.17)
        xp.multiply(m, -(lr / c1), out=d)
        d /= t
        p += d  # p <- p - (lr / c1) m / (sqrt(v) / sqrt(c2) + eps)                                (11.17)


class AdamW(Adam):
    """AdamW (Loshchilov and Hutter, 2019): Adam with decoupled weight decay, as torch.optim.AdamW.

    The weights shrink by `1 - lr * weight_decay` before the Adam step (11.12)
    instead of `weight_decay * p` joining the gradient (11.1), so the decay is
    not divided by the second-moment estimate.

    Parameters
    ----------
    params : dict of arrays (or list)
        Updated in place.
    lr : float, default 1e-3
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
    weight_decay : float, default 1e-2
        >= 0 (torch's default, unlike Adam's 0).
    amsgrad : bool, default False
    maximize : bool, default False
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, decoupled_weight_decay=True)

    def _check(self, decoupled_weight_decay=True, **hyper):
        return super()._check(decoupled_weight_decay=True, **hyper)  # always decoupled, as torch
