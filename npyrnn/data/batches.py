"""Minibatches for language models: token ids -> `X, Y` of shape `(B, T)` on the active backend.

The last step of d2l chapter 8 ("Language models and the dataset"):

```text
corpus of token ids -> minibatches X, Y
```

Each epoch's windows are gathered on the host with NumPy and copied to the backend
(`npyrnn.backend`) at once; each minibatch is then a slice there. Bad arguments raise
`DataError` when an iterator is created, before any training starts.
"""

import numbers

import numpy

from npyrnn import backend
from npyrnn.errors import DataError

__all__ = ["seq_data_iter_random", "seq_data_iter_sequential", "SeqDataLoader"]


def _check_positive_int(name, value, flag):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise DataError(f"{name} must be a whole number >= 1, got {value!r}; pass e.g. {flag}")


def _checked_corpus(corpus, batch_size, num_steps):
    """The corpus as a 1-D int64 host array, after every up-front check of the iterator arguments."""
    _check_positive_int("batch_size", batch_size, "--batch-size 32")
    _check_positive_int("num_steps", num_steps, "--num-steps 35")
    ids = numpy.asarray(backend.to_numpy(corpus))
    if ids.ndim != 1 or not (ids.size == 0 or numpy.issubdtype(ids.dtype, numpy.integer)):
        raise DataError(
            f"corpus must be a 1-D array of integer token ids, got shape {ids.shape} dtype {ids.dtype}; "
            "pass the first value that load_corpus returns"
        )
    needed = batch_size * num_steps + num_steps
    if len(ids) < needed:
        raise DataError(
            f"corpus has {len(ids)} tokens but batch_size={batch_size} x num_steps={num_steps} needs at least "
            f"{needed} (batch_size*num_steps + num_steps, so that every start offset fills one minibatch); "
            "use a smaller --batch-size or --num-steps, or a longer corpus (a larger --max-tokens or another --corpus)"
        )
    return ids.astype(numpy.int64, copy=False)


def _check_rng(rng):
    if not isinstance(rng, numpy.random.Generator):
        raise DataError(
            f"rng must be a numpy.random.Generator, got {type(rng).__name__}; create one per run with "
            "numpy.random.default_rng(seed) and pass the same generator every epoch"
        )


def _num_batches(num_tokens, batch_size, num_steps, offset, use_random_iter):
    """Minibatches an epoch yields when it starts at `offset`."""
    if use_random_iter:
        num_subseqs = (num_tokens - offset - 1) // num_steps
        return num_subseqs // batch_size
    row_length = (num_tokens - offset - 1) // batch_size
    return row_length // num_steps


def _batches(corpus, batch_size, num_steps, rng, use_random_iter, max_batches=None):
    """One epoch of minibatches; the shared body of both iterators.

    Each minibatch is a (batch_size, num_steps + 1) window of the corpus per
    row: X is its first num_steps columns, Y its last num_steps. The window
    starts are computed on the host, the whole epoch's windows are gathered
    on the host and copied to the backend at once, and each step then slices
    there.
    """
    L, B, T = len(corpus), batch_size, num_steps
    offset = int(rng.integers(0, T))  # in [0, T)
    num_batches = _num_batches(L, B, T, offset, use_random_iter)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    if use_random_iter:
        # subsequence k is corpus[offset + k*T : offset + (k+1)*T]; visit them in random order
        num_subseqs = (L - offset - 1) // T
        order = rng.permutation(num_subseqs)[: num_batches * B]
        starts = offset + T * order.reshape(num_batches, B)  # (num_batches, B)
    else:
        # row r of the epoch is corpus[offset + r*n : offset + (r+1)*n]; minibatch i is its i-th block of T
        row_length = (L - offset - 1) // B
        starts = offset + row_length * numpy.arange(B)[None, :] + T * numpy.arange(num_batches)[:, None]
    windows = corpus[starts[:, :, None] + numpy.arange(T + 1)]  # (num_batches, B, T+1), host
    windows = backend.asarray(windows, dtype=numpy.int64)  # the epoch's one host->device copy
    xp = backend.get_array_module(windows)

    def generate():
        for i in range(num_batches):
            window = windows[i]  # (B, T+1)
            yield xp.ascontiguousarray(window[:, :-1]), xp.ascontiguousarray(window[:, 1:])

    return generate()


def seq_data_iter_random(corpus, batch_size, num_steps, *, rng):
    """Minibatches of random, non-overlapping subsequences (d2l's `seq_data_iter_random`).

    Drop a random prefix of `rng.integers(0, num_steps)` tokens, cut the rest
    into subsequences of `num_steps` tokens (each with its target shifted by
    one), shuffle them with `rng`, and yield `num_subseqs // batch_size`
    minibatches. Adjacent minibatches are not adjacent in the corpus, so the
    hidden state must be reset before each one.

    Parameters
    ----------
    corpus : integer array-like, shape (N,)
        Token ids, e.g. the first value that `load_corpus` returns.
    batch_size, num_steps : int
        B and T, each at least 1, with `N >= B*T + T`.
    rng : numpy.random.Generator
        Draws the offset and the order. Pass one generator for the whole run:
        epochs then differ and the run repeats from its seed.

    Returns
    -------
    iterator of (X, Y)
        `X, Y` are int64 arrays of shape (B, T) on the active backend, with
        `Y[b, t]` the corpus token right after `X[b, t]`. All checks and
        the random draws happen when this function is called.

    Raises
    ------
    DataError
        `batch_size` or `num_steps` below 1, or `N < B*T + T`.
    """
    corpus = _checked_corpus(corpus, batch_size, num_steps)
    _check_rng(rng)
    return _batches(corpus, batch_size, num_steps, rng, use_random_iter=True)


def seq_data_iter_sequential(corpus, batch_size, num_steps, *, rng):
    """Minibatches that continue each other (d2l's `seq_data_iter_sequential`).

    Drop a random prefix of `offset = rng.integers(0, num_steps)` tokens
    (`0 <= offset < num_steps`), split the rest into `batch_size` equal rows,
    and yield consecutive blocks of `num_steps` columns, so row `r` of
    minibatch `i + 1` starts right where row `r` of minibatch `i` ended and
    the hidden state can be carried over.

    d2l draws `random.randint(0, num_steps)`, which includes `num_steps`:
    that offset wastes a whole subsequence and adds nothing an offset of 0 does
    not already give (d2l-zh pull requests 1301, 1302 and 1337). Here the
    offset stays below `num_steps`.

    Parameters
    ----------
    corpus : integer array-like, shape (N,)
    batch_size, num_steps : int
        B and T, each at least 1, with `N >= B*T + T`.
    rng : numpy.random.Generator

    Returns
    -------
    iterator of (X, Y)
        `X, Y` int64 arrays of shape (B, T) on the active backend; with
        `n = (N - offset - 1) // B` tokens per row, it yields `n // T`
        minibatches. All tokens but fewer than `B*T + T` are used as inputs.

    Raises
    ------
    DataError
        `batch_size` or `num_steps` below 1, or `N < B*T + T`.
    """
    corpus = _checked_corpus(corpus, batch_size, num_steps)
    _check_rng(rng)
    return _batches(corpus, batch_size, num_steps, rng, use_random_iter=False)


class SeqDataLoader:
    """An iterable over minibatches, one epoch per `iter()` (d2l's `SeqDataLoader`).

    Parameters
    ----------
    corpus : integer array-like, shape (N,)
    batch_size, num_steps : int
    use_random_iter : bool, default False
        `seq_data_iter_random` when True, else `seq_data_iter_sequential`.
    rng : numpy.random.Generator, optional
        Kept and used by every epoch; default `numpy.random.default_rng(0)`.

    Notes
    -----
    How many minibatches an epoch holds depends on its random offset. So that
    `len(loader)` is exact, every epoch yields the number that the largest
    offset, `num_steps - 1`, allows (the minimum over offsets); an epoch with
    a smaller offset drops its extra last minibatch, if any.
    """

    def __init__(self, corpus, batch_size, num_steps, use_random_iter=False, rng=None):
        self.corpus = _checked_corpus(corpus, batch_size, num_steps)
        self.batch_size = batch_size
        self.num_steps = num_steps
        self.use_random_iter = bool(use_random_iter)
        self.rng = numpy.random.default_rng(0) if rng is None else rng
        _check_rng(self.rng)

    def __len__(self):
        return _num_batches(len(self.corpus), self.batch_size, self.num_steps, self.num_steps - 1, self.use_random_iter)

    def __iter__(self):
        return _batches(
            self.corpus, self.batch_size, self.num_steps, self.rng, self.use_random_iter, max_batches=len(self)
        )
