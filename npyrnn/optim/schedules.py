"""Learning-rate schedules with torch.optim.lr_scheduler's values per epoch.

Equations (11.18)-(11.22) of `docs/derivations/optimizers.md`. Each schedule
computes the closed form from the learning rate the optimiser had when the
schedule was made (`base_lr`) and the epoch count, and writes it into
`optimizer.lr`. torch's `step()` computes most of them recursively from the
previous learning rate instead; both agree to rounding (about 1e-15
relative; the derivation lists where they differ). A schedule owns the
optimiser's `lr`: use one per optimiser (torch's `SequentialLR` and
`ChainedScheduler`, which combine several, are not provided).

```python
sched = StepLR(opt, step_size=10, gamma=0.5)   # after construction: epoch 0's lr
for epoch in range(epochs):
    ...                                          # opt.step(grads) for each minibatch
    sched.step()                                 # after each epoch
```
"""

import math
from bisect import bisect_right

__all__ = ["LRScheduler", "StepLR", "MultiStepLR", "ExponentialLR", "CosineAnnealingLR", "LinearLR"]


class LRScheduler:
    """Base class: subclasses define `_check` and `_lr_at(epoch)`.

    Attributes
    ----------
    optimizer : Optimizer
        Its `lr` is set at construction (epoch 0) and by every `step`.
    base_lr : float
        The optimiser's learning rate when the schedule was made.
    last_epoch : int
        Number of `step` calls so far (torch's name).
    """

    def __init__(self, optimizer, **hyper):
        self._name = type(self).__name__
        if not hasattr(optimizer, "lr") or not hasattr(optimizer, "step"):
            raise TypeError(f"{self._name}: optimizer must be an npyrnn.optim optimiser, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.hyper = self._check(**hyper)
        self.base_lr = float(optimizer.lr)
        self.last_epoch = 0
        self.optimizer.lr = self._lr_at(0)

    def _int(self, name, value, low):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{self._name}: {name} must be an integer >= {low}, got {value!r}")
        return value

    def _float(self, name, value, low, high, low_open=False):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
        if not ok or not (low < value if low_open else low <= value) or not (value < high if high == math.inf else value <= high):
            interval = f"{'(' if low_open else '['}{low}, {high}{')' if high == math.inf else ']'}"
            raise ValueError(f"{self._name}: {name} must be a number in {interval}, got {value!r}")
        return value

    def step(self):
        """Advance one epoch and set the optimiser's learning rate; call after each epoch."""
        self.last_epoch += 1
        self.optimizer.lr = self._lr_at(self.last_epoch)

    def get_last_lr(self):
        """`[lr]`: the learning rate set last, a list of one (torch's per-group list)."""
        return [self._lr_at(self.last_epoch)]

    def state_dict(self):
        """JSON-able: `{'name', 'hyper', 'base_lr', 'last_epoch'}`."""
        return {"name": self._name, "hyper": dict(self.hyper), "base_lr": self.base_lr, "last_epoch": self.last_epoch}

    def load_state_dict(self, state_dict):
        """Restore `state_dict()`'s output and set the optimiser's lr to that epoch's value.

        Raises
        ------
        ValueError
            For another schedule's state, or a malformed one.
        """
        where = f"{self._name}.load_state_dict"
        if not isinstance(state_dict, dict) or set(state_dict) != {"name", "hyper", "base_lr", "last_epoch"}:
            raise ValueError(f"{where}: expected a dict with keys 'name', 'hyper', 'base_lr', 'last_epoch' "
                             "(what state_dict() returns)")
        if state_dict["name"] != self._name:
            raise ValueError(f"{where}: the state is of a {state_dict['name']} schedule, not {self._name}")
        hyper = self._check(**state_dict["hyper"])
        epoch = self._int("last_epoch", state_dict["last_epoch"], 0)
        base_lr = self._float("base_lr", state_dict["base_lr"], 0.0, math.inf)
        self.hyper, self.base_lr, self.last_epoch = hyper, base_lr, epoch
        self.optimizer.lr = self._lr_at(epoch)


class StepLR(LRScheduler):
    """Multiply the learning rate by `gamma` every `step_size` epochs (11.18).

    Parameters
    ----------
    optimizer : Optimizer
    step_size : int
        >= 1.
    gamma : float, default 0.1
        Finite, >= 0 (below 1 decays).
    """

    def __init__(self, optimizer, step_size, gamma=0.1):
        super().__init__(optimizer, step_size=step_size, gamma=gamma)

    def _check(self, step_size, gamma):
        return {"step_size": self._int("step_size", step_size, 1), "gamma": self._float("gamma", gamma, 0.0, math.inf)}

    def _lr_at(self, epoch):
        return self.base_lr * self.hyper["gamma"] ** (epoch // self.hyper["step_size"])  # (11.18)


class MultiStepLR(LRScheduler):
    """Multiply the learning rate by `gamma` at each milestone epoch (11.19).

    char-rnn's schedule (`-learning_rate_decay 0.97 -learning_rate_decay_after 10`:
    multiply by 0.97 at the end of every epoch from the 10th on) is
    `MultiStepLR(opt, milestones=range(10, epochs + 1), gamma=0.97)`; a single decay
    by a factor after epoch N is `milestones=[N]`.

    Parameters
    ----------
    optimizer : Optimizer
    milestones : sequence of int
        Epochs >= 1, increasing (a repeated epoch applies `gamma` twice, as torch).
    gamma : float, default 0.1
        Finite, >= 0.
    """

    def __init__(self, optimizer, milestones, gamma=0.1):
        super().__init__(optimizer, milestones=milestones, gamma=gamma)

    def _check(self, milestones, gamma):
        try:
            ms = [self._int("each milestone", m, 1) for m in milestones]
        except TypeError:
            raise ValueError(f"{self._name}: milestones must be a list of epochs >= 1, got {milestones!r}") from None
        if ms != sorted(ms):
            raise ValueError(f"{self._name}: milestones must be in increasing order, got {ms}")
        return {"milestones": ms, "gamma": self._float("gamma", gamma, 0.0, math.inf)}

    def _lr_at(self, epoch):
        return self.base_lr * self.hyper["gamma"] ** bisect_right(self.hyper["milestones"], epoch)  # (11.19)


class ExponentialLR(LRScheduler):
    """Multiply the learning rate by `gamma` every epoch (11.20).

    Parameters
    ----------
    optimizer : Optimizer
    gamma : float
        Finite, >= 0.
    """

    def __init__(self, optimizer, gamma):
        super().__init__(optimizer, gamma=gamma)

    def _check(self, gamma):
        return {"gamma": self._float("gamma", gamma, 0.0, math.inf)}

    def _lr_at(self, epoch):
        return self.base_lr * self.hyper["gamma"] ** epoch  # (11.20)


class CosineAnnealingLR(LRScheduler):
    """Half a cosine from `base_lr` down to `eta_min` over `T_max` epochs (11.21).

    After `T_max` epochs the learning rate rises again along the same cosine,
    as torch's does (no restart).

    Parameters
    ----------
    optimizer : Optimizer
    T_max : int
        >= 1.
    eta_min : float, default 0
        >= 0.
    """

    def __init__(self, optimizer, T_max, eta_min=0.0):
        super().__init__(optimizer, T_max=T_max, eta_min=eta_min)

    def _check(self, T_max, eta_min):
        return {"T_max": self._int("T_max", T_max, 1), "eta_min": self._float("eta_min", eta_min, 0.0, math.inf)}

    def _lr_at(self, epoch):
        h = self.hyper
        return h["eta_min"] + (self.base_lr - h["eta_min"]) * (1 + math.cos(math.pi * epoch / h["T_max"])) / 2  # (11.21)


class LinearLR(LRScheduler):
    """Scale the learning rate linearly from `start_factor` to `end_factor` over `total_iters` epochs (11.22).

    Linear warm-up with the defaults: a third of the rate at epoch 0, the full
    rate from epoch 5 on.

    Parameters
    ----------
    optimizer : Optimizer
    start_factor : float, default 1/3
        In (0, 1].
    end_factor : float, default 1
        In [0, 1].
    total_iters : int, default 5
        >= 1.
    """

    def __init__(self, optimizer, start_factor=1.0 / 3, end_factor=1.0, total_iters=5):
        super().__init__(optimizer, start_factor=start_factor, end_factor=end_factor, total_iters=total_iters)

    def _check(self, start_factor, end_factor, total_iters):
        return {
            "start_factor": self._float("start_factor", start_factor, 0, 1, True),
            "end_factor": self._float("end_factor", end_factor, 0, 1),
            "total_iters": self._int("total_iters", total_iters, 1),
        }

    def _lr_at(self, epoch):
        h = self.hyper
        f0, f1, n = h["start_factor"], h["end_factor"], h["total_iters"]
        factor = f0 + (f1 - f0) * epoch / n if epoch < n else f1  # exactly end_factor from total_iters on
        return self.base_lr * factor  # (11.22)
