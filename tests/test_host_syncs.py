"""No device-to-host synchronisation per training minibatch or per greedily generated character.

Runs on CuPy only: under the CPU stand-in (`PYTHONPATH=../shared/tools/fakecupy NPYRNN_BACKEND=cupy`,
whose `cupy._fake.STATS` counts every synchronisation and `forbid_syncs()` raises at the first), and on
a GPU, where real CuPy's `cupyx.allow_synchronize(False)` (deprecated since CuPy 10, used where it
still exists) raises `cupyx.DeviceSynchronized` at a synchronisation. Skipped on NumPy, which has no
device, and where neither check exists.
"""

import contextlib
import warnings

import numpy as np
import pytest

from conftest import CUPY_OK
from npyrnn import backend
from npyrnn.data import Vocab
from npyrnn.generate import predict
from npyrnn.models import RNNLM
from npyrnn.optim import SGD
from npyrnn.train import train_step


@pytest.fixture
def cp():
    """The cupy backend (the stand-in or real CuPy), with at least one way to detect a synchronisation."""
    if not CUPY_OK:
        pytest.skip("host syncs exist only on a device: cupy cannot import or sees no CUDA device")
    previous = backend.name
    module = backend.set_backend("cupy")
    import cupyx

    if not hasattr(module, "_fake") and not hasattr(cupyx, "allow_synchronize"):
        backend.set_backend(previous)
        pytest.skip("this CuPy has no cupyx.allow_synchronize and is not the stand-in: no way to detect a sync")
    yield module
    backend.set_backend(previous)


@contextlib.contextmanager
def no_sync_allowed(cp):
    """Raise DeviceSynchronized at the first device-to-host sync inside the block (stand-in or real CuPy)."""
    import cupyx

    if hasattr(cp, "_fake"):
        with cp._fake.forbid_syncs():
            yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # CuPy >= 10 warns that it will go
        with cupyx.allow_synchronize(False):
            yield


def sync_count(cp):
    """Synchronisations counted so far by the stand-in (None on real CuPy, which counts nothing)."""
    fake = getattr(cp, "_fake", None)
    return None if fake is None else fake.STATS.syncs


def make_batches(cp, V, B, T, n, seed=0):
    rng = np.random.default_rng(seed)  # drawn on the host, then copied: the same data on every backend
    ids = rng.integers(0, V, size=(n, B, T + 1))
    return [(cp.asarray(w[:, :-1]), cp.asarray(w[:, 1:])) for w in ids]


@pytest.mark.parametrize("num_layers, bidirectional, clip", [(1, False, 1.0), (2, True, 0.5), (1, False, None)])
def test_training_minibatch_has_no_host_sync(cp, num_layers, bidirectional, clip):
    V, B, T = 11, 3, 5
    model = RNNLM(V, 8, num_layers=num_layers, bidirectional=bidirectional, seed=0)
    optimizer = SGD(model.params, 1.0)
    batches = make_batches(cp, V, B, T, 4)
    state = model.begin_state(B)
    loss, state = train_step(model, *batches[0], state, optimizer, clip=clip)  # warm-up: buffers allocated
    before = sync_count(cp)
    losses = []
    with no_sync_allowed(cp):
        for X, Y in batches[1:]:
            loss, state = train_step(model, X, Y, state, optimizer, clip=clip)
            losses.append(loss)
    if before is not None:
        assert sync_count(cp) - before == 0, "train_step synchronised with the host"
    assert np.isfinite(backend.to_numpy(cp.stack(losses))).all()  # the steps did run


def test_greedy_generation_syncs_do_not_grow_with_length(cp):
    vocab = Vocab(list("time traveller said"))
    model = RNNLM(len(vocab), 16, seed=0)
    predict("time", 2, model, vocab)  # warm-up
    counts, texts = [], []
    for length in (5, 40):
        before = sync_count(cp)
        texts.append(predict("time", length, model, vocab))
        if before is not None:
            counts.append(sync_count(cp) - before)
    assert len(texts[0]) == len("time") + 5 and len(texts[1]) == len("time") + 40
    assert texts[1].startswith(texts[0])  # greedy: the same text, only longer
    if counts:
        assert counts[0] == counts[1], f"syncs per call {counts}: greedy generation syncs per character"
        assert counts[0] <= 2, f"{counts[0]} syncs for one greedy call; expected the final copy back only"


def test_greedy_generation_steps_have_no_host_sync(cp, monkeypatch):
    """The token loop itself under the guard: only the final copy of the ids to the host may sync."""
    from npyrnn import generate

    vocab = Vocab(list("time traveller said"))
    model = RNNLM(len(vocab), 16, seed=0)
    expected = predict("time", 30, model, vocab)
    copies = []
    real_to_numpy = backend.to_numpy

    def to_numpy_outside_guard(a):
        if not isinstance(a, np.ndarray):  # a device array: a copy to the host
            copies.append(a.shape)
        with allow(cp):
            return real_to_numpy(a)

    monkeypatch.setattr(generate.backend, "to_numpy", to_numpy_outside_guard)
    with no_sync_allowed(cp):
        text = predict("time", 30, model, vocab)
    assert text == expected
    assert copies == [(30,)], f"copies to the host for one greedy call of 30 characters: {copies}"


@contextlib.contextmanager
def allow(cp):
    import cupyx

    if hasattr(cp, "_fake"):
        with cp._fake.allow_synchronize(True):
            yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with cupyx.allow_synchronize(True):
            yield
