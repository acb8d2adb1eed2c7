"""Parameter initialisers, drawn on the host from one seeded generator.

``'normal'`` is d2l's scratch initialisation (`get_params`): weights
N(0, 0.01^2), biases 0. ``'uniform'`` is torch's default for ``nn.RNN`` and
``nn.Linear``: every parameter U(-k, k) with k = 1/sqrt(fan), fan = hidden size
for the RNN and in_features for Linear.

Drawing on the host and copying to the backend means the same seed gives the
same weights on NumPy and on CuPy. This is host-side code, so it uses numpy
directly; the layers copy the result to the active backend.
"""

import numpy


def init_weight(rng, shape, init, fan):
    """A weight matrix of ``shape``, drawn with ``init`` ('normal' or 'uniform')."""
    if init == "normal":
        return rng.normal(0.0, 0.01, size=shape)
    bound = 1.0 / fan**0.5
    return rng.uniform(-bound, bound, size=shape)


def init_bias(rng, shape, init, fan):
    """A bias vector: zeros for 'normal', U(-1/sqrt(fan), 1/sqrt(fan)) for 'uniform'."""
    if init == "normal":
        return numpy.zeros(shape)
    bound = 1.0 / fan**0.5
    return rng.uniform(-bound, bound, size=shape)


def seed_streams(seed):
    """Two independent host generators from one seed: (parameters, dropout masks).

    The first is exactly `numpy.random.default_rng(seed)`, so a layer draws the
    same weights for a seed as before dropout existed; the second is a child
    stream spawned from the same `SeedSequence`.
    """
    sequence = numpy.random.SeedSequence(seed)
    return numpy.random.default_rng(sequence), numpy.random.default_rng(sequence.spawn(1)[0])
