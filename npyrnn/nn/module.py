"""What every layer shares: parameters, gradients, state dicts, argument checks.

A module owns ``params`` (name -> array, torch's names and layouts) and
``grads`` (exactly the same keys). ``backward`` accumulates into ``grads``
(``+=``) and ``zero_grad`` clears them, like torch. A composite module (the
language model) shares its children's arrays under prefixed names, so an
optimiser that updates ``model.params`` in place updates the layers too.
"""

from npyrnn import backend

DTYPES = ("float32", "float64")
INITS = ("normal", "uniform")


def check_dtype(dtype):
    """Canonical dtype name, or ValueError naming the allowed ones."""
    name = getattr(dtype, "name", None) or getattr(dtype, "__name__", None) or str(dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return name


def check_positive_int(name, value):
    """``value`` as an int >= 1, or ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_probability(name, value):
    """``value`` as a float in [0, 1), or ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def shape_str(shape):
    """``(3,)``, ``(2, 3)``: a shape as Python prints a tuple."""
    return str(tuple(int(s) for s in shape))


class Module:
    """Base class: `params`, `grads`, `zero_grad`, `state_dict`, `load_state_dict`, `train`, `eval`.

    Attributes
    ----------
    training : bool
        True after construction and `train()`, False after `eval()`. Only dropout
        looks at it (masks are drawn in training mode only, as in torch).
    """

    def __init__(self):
        self.params = {}
        self.grads = {}
        self._workspace = {}
        self.training = True

    def train(self, mode=True):
        """Set training mode (dropout active) on this module and every module it holds; return self."""
        self.training = bool(mode)
        for value in vars(self).values():
            if isinstance(value, Module):
                value.train(mode)
        return self

    def eval(self):
        """Set evaluation mode (no dropout), like `torch.nn.Module.eval`; return self."""
        return self.train(False)

    @property
    def xp(self):
        """The array module (numpy or cupy) that holds this module's parameters."""
        return backend.get_array_module(next(iter(self.params.values())))

    def _buffer(self, name, shape, xp):
        """A work array kept on the module and handed out again on the next call.

        Large fresh arrays cost page faults every minibatch (several
        milliseconds per megabyte on some machines), so arrays whose life ends
        inside one forward/backward cycle are allocated once per shape and
        rewritten. Only for memory that never escapes to the caller.
        """
        buf = self._workspace.get(name)
        if buf is None or buf.shape != tuple(shape) or backend.get_array_module(buf) is not xp:
            buf = self._workspace[name] = xp.empty(shape, dtype=self.dtype)
        return buf

    def _add_param(self, name, host_array):
        """Register a parameter drawn on the host; it moves to the active backend."""
        xp = backend.xp
        self.params[name] = xp.ascontiguousarray(backend.asarray(host_array, dtype=self.dtype))
        self.grads[name] = xp.zeros_like(self.params[name])

    def _adopt(self, prefix, child):
        """Share a child's parameters and gradients under ``prefix.name``."""
        for key in child.params:
            self.params[f"{prefix}.{key}"] = child.params[key]
            self.grads[f"{prefix}.{key}"] = child.grads[key]

    def zero_grad(self):
        """Set every gradient to zero in place."""
        for g in self.grads.values():
            g.fill(0)

    def state_dict(self):
        """``{name: array}`` for every parameter, in registration order (the arrays themselves)."""
        return dict(self.params)

    def load_state_dict(self, state):
        """Copy ``state`` (numpy or cupy arrays, any float dtype) into the parameters in place.

        Raises
        ------
        ValueError
            When a key is missing or unexpected, or a shape differs; the message lists them all.
        """
        missing = [k for k in self.params if k not in state]
        unexpected = [k for k in state if k not in self.params]
        wrong = [
            f"{k}: expected {shape_str(self.params[k].shape)}, got {shape_str(state[k].shape)}"
            for k in self.params
            if k in state and tuple(state[k].shape) != tuple(self.params[k].shape)
        ]
        problems = []
        if missing:
            problems.append("missing keys " + ", ".join(missing))
        if unexpected:
            problems.append("unexpected keys " + ", ".join(unexpected))
        if wrong:
            problems.append("wrong shapes " + "; ".join(wrong))
        if problems:
            raise ValueError(f"{type(self).__name__}.load_state_dict: " + "; ".join(problems))
        for k, p in self.params.items():
            value = state[k]
            if backend.get_array_module(value) is not backend.get_array_module(p):
                value = backend.to_numpy(value)
            p[...] = backend.get_array_module(p).asarray(value, dtype=p.dtype)
