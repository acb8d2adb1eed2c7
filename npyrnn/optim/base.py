"""What every optimiser shares: parameters, argument checks, state buffers, state dicts.

An optimiser holds the model's `params` (name -> array, updated in place), its
hyperparameters as Python numbers (`hyper`, JSON-able), one step count (a
Python int, so bias corrections are Python floats and nothing syncs with the
device), per-parameter *state* buffers that a checkpoint must keep (momentum,
moving averages) and per-parameter *scratch* arrays that it need not. Both are
allocated once, in the parameters' dtype and on their backend; `step` writes
into them with `out=` and in-place operators, so it allocates no arrays.

State dicts come in two pieces so that a checkpoint writer can put the arrays
into safetensors and the rest into JSON:

```python
sd = opt.state_dict()       # {'name', 'hyper', 'step', 'state': {param: {buffer: array}}}
tensors, meta = split_state_dict(sd)   # {'state.<param>.<buffer>': array}, JSON-able dict
opt.load_state_dict(join_state_dict(tensors, meta))
```
"""

import math

from npyrnn import backend


def shape_str(shape):
    """`(3,)`, `(2, 3)`: a shape as Python prints a tuple."""
    return str(tuple(int(s) for s in shape))


def _arrays(grads):
    return list(grads.values()) if isinstance(grads, dict) else list(grads)


class Optimizer:
    """Base class: subclasses define `_check`, `_state_names` and `_update`.

    Parameters
    ----------
    params : dict of arrays, or list of arrays
        Floating-point arrays of one backend, updated in place (the layers
        that own them see the update). A dict's keys name the state buffers;
        a list's positions do (`'0'`, `'1'`, ...).
    **hyper
        The subclass's hyperparameters, checked by its `_check`.

    Attributes
    ----------
    params : dict or list
        As given.
    hyper : dict
        Hyperparameters as Python numbers and bools (JSON-able), `lr` included.
    step_count : int
        Number of `step` calls so far (torch's `state['step']`).
    state : dict
        `{param_name: {buffer_name: array}}`, the buffers a checkpoint keeps.
    """

    #: scratch arrays per parameter, each the parameter's shape (never saved)
    _num_scratch = 2

    def __init__(self, params, **hyper):
        self._name = type(self).__name__
        if isinstance(params, dict):
            names = list(params)
            arrays = list(params.values())
        else:
            try:
                params = list(params)
            except TypeError:
                raise TypeError(
                    f"{self._name}: params must be a dict of arrays (e.g. model.params) or a list of arrays, "
                    f"got {type(params).__name__}"
                ) from None
            names = [str(i) for i in range(len(params))]
            arrays = params
        if not arrays:
            raise ValueError(f"{self._name}: params is empty; pass the model's parameters (model.params)")
        for n, p in zip(names, arrays):
            kind = getattr(getattr(p, "dtype", None), "kind", None)
            if kind != "f" or not hasattr(p, "shape"):
                raise TypeError(f"{self._name}: parameter {n!r} must be a floating-point array, got {type(p).__name__}"
                                + (f" of dtype {p.dtype}" if hasattr(p, "dtype") else ""))
        self.params = params
        self._names = names
        self.hyper = self._check(**hyper)
        self.step_count = 0
        self._allocate()

    # ------------------------------------------------------------------ hyperparameters

    @property
    def lr(self):
        """Learning rate (a Python float); schedules set it between epochs."""
        return self.hyper["lr"]

    @lr.setter
    def lr(self, value):
        self.hyper["lr"] = self._nonneg("lr", value)

    def _number(self, name, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
            raise TypeError(f"{self._name}: {name} must be a number, got {value!r}")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{self._name}: {name} must be a number, got {value!r}") from None
        return value

    def _nonneg(self, name, value):
        """`value` as a float in [0, inf), else ValueError naming `name` and the range (torch's check)."""
        value = self._number(name, value)
        if not (0.0 <= value < math.inf):
            raise ValueError(f"{self._name}: {name} must be a finite number >= 0, got {value}")
        return value

    def _unit(self, name, value):
        """`value` as a float in [0, 1), else ValueError (torch's range for Adam's betas)."""
        value = self._number(name, value)
        if not (0.0 <= value < 1.0):
            raise ValueError(f"{self._name}: {name} must be in [0, 1), got {value}")
        return value

    def _flag(self, name, value):
        if not isinstance(value, bool):
            raise TypeError(f"{self._name}: {name} must be True or False, got {value!r}")
        return value

    def _check(self, **hyper):  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def _state_names(self):
        """Names of the per-parameter buffers a checkpoint keeps, given `self.hyper`."""
        raise NotImplementedError  # pragma: no cover

    def _initial_value(self, buffer_name):
        """Initial value of a state buffer (0 unless a subclass says otherwise)."""
        return 0.0

    # ------------------------------------------------------------------ buffers

    def _current(self):
        """`[(name, array)]` of the parameters as they are now in `self.params`."""
        if isinstance(self.params, dict):
            return list(self.params.items())
        return list(zip(self._names, self.params))

    def _allocate(self):
        """State and scratch buffers, once, each shaped, typed and placed like its parameter."""
        self.state, self._scratch = {}, {}
        for name, p in self._current():
            xp = backend.get_array_module(p)
            self.state[name] = {}
            for b in self._state_names():
                buf = xp.empty_like(p)
                buf.fill(self._initial_value(b))
                self.state[name][b] = buf
            self._scratch[name] = tuple(xp.empty_like(p) for _ in range(self._num_scratch))

    # ------------------------------------------------------------------ step

    def _pairs(self, grads):
        """`[(name, param, grad)]` with the keys, count and shapes checked (no arrays made)."""
        method = f"{self._name}.step"
        if isinstance(self.params, dict):
            if not isinstance(grads, dict) or grads.keys() != self.params.keys():
                raise ValueError(f"{method}: grads must be a dict with exactly the keys of params")
            triples = [(k, p, grads[k]) for k, p in self.params.items()]
        else:
            params, grads = list(self.params), _arrays(grads)
            if len(params) != len(grads):
                raise ValueError(f"{method}: {len(params)} params but {len(grads)} grads")
            triples = [(n, p, g) for n, p, g in zip(self._names, params, grads)]
        for n, p, g in triples:
            if p.shape != g.shape:
                raise ValueError(
                    f"{method}: gradient of shape {shape_str(g.shape)} for parameter {n!r} of shape {shape_str(p.shape)}"
                )
            scratch = self._scratch.get(n)
            if scratch is None or (scratch and (scratch[0].shape != p.shape or scratch[0].dtype != p.dtype)):
                raise ValueError(
                    f"{method}: parameter {n!r} is now {shape_str(p.shape)} {p.dtype}, not what this optimiser "
                    "was built for; build a new optimiser for the new parameters"
                )
        return triples

    def step(self, grads):
        """Apply one update with `grads` (the keys of `params`, or the same order for lists).

        The gradients are read, never modified.
        """
        triples = self._pairs(grads)
        self.step_count += 1
        for n, p, g in triples:
            self._update(p, g, self.state[n], self._scratch[n], backend.get_array_module(p))

    def _update(self, p, g, state, scratch, xp):  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    # ------------------------------------------------------------------ state dicts

    def state_dict(self):
        """Everything needed to continue exactly: hyperparameters, step count, state buffers.

        Returns
        -------
        dict
            `{'name': class name, 'hyper': {...}, 'step': int,
            'state': {param_name: {buffer_name: array}}}`. The arrays are copies
            on the parameters' backend; `split_state_dict` separates them from
            the JSON-able rest.
        """
        return {
            "name": self._name,
            "hyper": dict(self.hyper),
            "step": self.step_count,
            "state": {n: {b: buf.copy() for b, buf in bufs.items()} for n, bufs in self.state.items()},
        }

    def load_state_dict(self, state_dict):
        """Restore `state_dict()`'s output (arrays from either backend, copied in place).

        Hyperparameters are restored too (as torch does), so the learning rate
        a schedule set is back.

        Raises
        ------
        ValueError
            When the optimiser's name differs, or a parameter or buffer is
            missing, unexpected or of the wrong shape; one message lists all.
        """
        where = f"{self._name}.load_state_dict"
        if not isinstance(state_dict, dict) or not {"name", "hyper", "step", "state"} <= state_dict.keys():
            raise ValueError(f"{where}: expected a dict with keys 'name', 'hyper', 'step', 'state' "
                             "(what state_dict() returns)")
        if state_dict["name"] != self._name:
            raise ValueError(f"{where}: the state is of a {state_dict['name']} optimiser, not {self._name}")
        step = state_dict["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{where}: step must be an integer >= 0, got {step!r}")
        hyper = self._check(**state_dict["hyper"])  # same checks as the constructor
        saved_hyper, allocated = self.hyper, self._state_names()
        self.hyper = hyper
        expected = self._state_names()
        self.hyper = saved_hyper
        current = dict(self._current())
        given = state_dict["state"]
        problems = []
        missing = [n for n in current if n not in given]
        unexpected = [n for n in given if n not in current]
        if missing:
            problems.append("missing parameters " + ", ".join(missing))
        if unexpected:
            problems.append("unexpected parameters " + ", ".join(unexpected))
        for n, p in current.items():
            bufs = given.get(n)
            if bufs is None:
                continue
            if set(bufs) != set(expected):
                problems.append(f"{n}: buffers {sorted(bufs)}, expected {sorted(expected)}")
                continue
            for b in expected:
                if tuple(bufs[b].shape) != tuple(p.shape):
                    problems.append(f"{n}.{b}: expected {shape_str(p.shape)}, got {shape_str(bufs[b].shape)}")
        if problems:
            raise ValueError(f"{where}: " + "; ".join(problems))
        self.hyper = hyper
        if set(expected) != set(allocated):
            self._allocate()  # other flags (amsgrad, momentum, centered): other buffers; not a hot path
        for n, p in current.items():
            xp = backend.get_array_module(p)
            for b in expected:
                xp.copyto(self.state[n][b], xp.asarray(given[n][b], dtype=p.dtype))
        self.step_count = step


def split_state_dict(state_dict):
    """Split an optimiser's `state_dict()` into arrays and a JSON-able rest.

    Parameters
    ----------
    state_dict : dict
        What `Optimizer.state_dict` returns.

    Returns
    -------
    tensors : dict
        `{'state.<param>.<buffer>': array}` (buffer names hold no dots, so the
        last dot separates them), ready for safetensors after `backend.to_numpy`.
    meta : dict
        `{'name', 'hyper', 'step'}`: Python strings, numbers and bools.
    """
    tensors = {
        f"state.{n}.{b}": arr for n, bufs in state_dict["state"].items() for b, arr in bufs.items()
    }
    meta = {k: v for k, v in state_dict.items() if k != "state"}
    meta["params"] = list(state_dict["state"])  # keeps parameters without buffers (plain SGD)
    return tensors, meta


def join_state_dict(tensors, meta):
    """Inverse of `split_state_dict`: the dict that `Optimizer.load_state_dict` takes.

    Raises
    ------
    ValueError
        For a tensor name that is not `state.<param>.<buffer>` of a listed parameter.
    """
    state = {n: {} for n in meta.get("params", [])}
    for key, arr in tensors.items():
        head, _, rest = key.partition(".")
        param, _, buf = rest.rpartition(".")
        if head != "state" or not param or not buf or param not in state:
            raise ValueError(
                f"join_state_dict: tensor name {key!r} is not 'state.<param>.<buffer>' for a parameter in meta['params']"
            )
        state[param][buf] = arr
    return {"name": meta["name"], "hyper": dict(meta["hyper"]), "step": meta["step"], "state": state}


def lerp_(xp, a, end, weight, tmp):
    """`a <- a + weight (end - a)` in place, rounded as torch's `lerp_` rounds it.

    torch evaluates `a + w (end - a)` for `|w| < 0.5` and `end - (end - a)(1 - w)`
    otherwise, which keeps the result exact at `w = 1`. `tmp` is scratch of `a`'s shape.
    """
    xp.subtract(end, a, out=tmp)
    if abs(weight) < 0.5:
        tmp *= weight
        a += tmp
    else:
        tmp *= 1 - weight
        xp.subtract(end, tmp, out=a)
