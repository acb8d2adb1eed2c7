"""Tests of npyrnn.data.batches: the minibatch iterators and SeqDataLoader."""

import numpy as np
import pytest
from conftest import one_line

from npyrnn import backend, data
from npyrnn.data import DataError, SeqDataLoader, seq_data_iter_random, seq_data_iter_sequential

pytestmark = pytest.mark.usefixtures("no_internet")  # one test loads The Time Machine
ITERATORS = [seq_data_iter_sequential, seq_data_iter_random]


# --------------------------------------------------------------------------- helpers


def positions_corpus(n):
    """A corpus whose token ids equal their positions, so a batch shows where it came from."""
    return np.arange(n, dtype=np.int64)


def epoch(iterator_or_loader):
    """All (X, Y) of one epoch as host arrays."""
    return [(backend.to_numpy(X), backend.to_numpy(Y)) for X, Y in iterator_or_loader]


# --------------------------------------------------------------------------- errors for bad input


@pytest.mark.parametrize("iterator", ITERATORS)
def test_corpus_too_short_error(iterator):
    # B*T + T = 4*5 + 5 = 25 tokens are needed
    with pytest.raises(DataError) as e:
        iterator(positions_corpus(24), 4, 5, rng=np.random.default_rng(0))
    msg = one_line(e)
    assert "has 24 tokens" in msg and "at least 25" in msg and "--batch-size" in msg and "--num-steps" in msg
    # exactly the minimum works and fills one minibatch at every offset
    for seed in range(20):
        assert len(epoch(iterator(positions_corpus(25), 4, 5, rng=np.random.default_rng(seed)))) == 1


def test_corpus_too_short_error_from_loader():
    with pytest.raises(DataError) as e:
        SeqDataLoader(positions_corpus(10), 3, 3)
    assert "has 10 tokens" in one_line(e) and "at least 12" in str(e.value)


@pytest.mark.parametrize("iterator", ITERATORS)
@pytest.mark.parametrize("bad", [0, -2, 2.5, True, None])
def test_invalid_batch_size_and_num_steps(iterator, bad):
    corpus, rng = positions_corpus(100), np.random.default_rng(0)
    with pytest.raises(DataError) as e:
        iterator(corpus, bad, 5, rng=rng)
    msg = one_line(e)
    assert msg.startswith("batch_size must be a whole number >= 1") and "--batch-size" in msg
    with pytest.raises(DataError) as e:
        iterator(corpus, 2, bad, rng=rng)
    msg = one_line(e)
    assert msg.startswith("num_steps must be a whole number >= 1") and "--num-steps" in msg


def test_errors_are_raised_up_front_not_on_first_next():
    """The iterators check when called, so a bad config fails before any training starts."""
    with pytest.raises(DataError):
        seq_data_iter_sequential(positions_corpus(5), 2, 3, rng=np.random.default_rng(0))  # no next()


@pytest.mark.parametrize("iterator", ITERATORS)
def test_rng_must_be_a_generator_and_a_keyword(iterator):
    with pytest.raises(DataError) as e:
        iterator(positions_corpus(100), 2, 3, rng=0)
    assert "numpy.random.Generator" in one_line(e) and "default_rng" in str(e.value)
    with pytest.raises(TypeError):
        iterator(positions_corpus(100), 2, 3, np.random.default_rng(0))  # rng is keyword-only


def test_corpus_must_be_1d_integers():
    with pytest.raises(DataError) as e:
        seq_data_iter_random(np.zeros((10, 10), dtype=np.int64), 2, 3, rng=np.random.default_rng(0))
    assert "1-D array of integer token ids" in one_line(e)


# --------------------------------------------------------------------------- minibatch iterators

# With positions_corpus, a token id is its position, so X[b, t] is where that token sits in the corpus.


@pytest.mark.parametrize("iterator", ITERATORS)
@pytest.mark.parametrize("B,T,L", [(1, 1, 2), (2, 3, 50), (4, 5, 103), (3, 1, 20), (1, 7, 64), (32, 35, 10000)])
def test_shapes_dtype_backend_and_shift(xp, iterator, B, T, L):
    batches = list(iterator(positions_corpus(L), B, T, rng=np.random.default_rng(1)))
    assert len(batches) >= 1
    for X, Y in batches:
        assert isinstance(X, xp.ndarray) and isinstance(Y, xp.ndarray)
        assert X.shape == Y.shape == (B, T) and X.dtype == Y.dtype == xp.int64
        assert bool((Y == X + 1).all())  # Y is X shifted by one in the corpus


@pytest.mark.parametrize("use_random_iter", [False, True])
def test_batches_are_the_real_corpus_shifted_by_one(use_random_iter):
    corpus, _ = data.load_corpus("timemachine")
    iterator = seq_data_iter_random if use_random_iter else seq_data_iter_sequential
    # the same seed draws the same offset and order, so the positions run tells where each token came from
    real = epoch(iterator(corpus, 32, 35, rng=np.random.default_rng(7)))
    where = epoch(iterator(positions_corpus(len(corpus)), 32, 35, rng=np.random.default_rng(7)))
    assert len(real) == len(where) > 0
    for (X, Y), (pos, _) in zip(real, where):
        np.testing.assert_array_equal(X, corpus[pos])
        np.testing.assert_array_equal(Y, corpus[pos + 1])


def test_sequential_minibatches_continue_each_other():
    B, T, L = 4, 5, 211
    for seed in range(10):
        batches = epoch(seq_data_iter_sequential(positions_corpus(L), B, T, rng=np.random.default_rng(seed)))
        assert len(batches) >= 2
        for (X0, _), (X1, _) in zip(batches, batches[1:]):
            np.testing.assert_array_equal(X1[:, 0], X0[:, -1] + 1)  # row r resumes right after it stopped
        rows = np.concatenate([X for X, _ in batches], axis=1)  # (B, num_batches*T)
        assert (np.diff(rows, axis=1) == 1).all()  # each row is one contiguous stretch
        row_starts = rows[:, 0]
        assert len(set(np.diff(row_starts))) == 1  # rows are evenly spaced: equal-length rows
        assert 0 <= row_starts[0] < T


def test_sequential_coverage_bound_is_exact():
    """Tokens never used as input: the offset (< T), the remainder of splitting into B rows
    (1..B, since one token is kept back for the last target) and B row tails (< T each),
    so at most (T-1) + B + B*(T-1) = B*T + T - 1. L=14, B=2, T=3 reaches it at offset 2."""
    B, T, L = 2, 3, 14
    rng = np.random.default_rng(0)
    unused = []
    for _ in range(200):
        batches = epoch(seq_data_iter_sequential(positions_corpus(L), B, T, rng=rng))
        used = np.concatenate([X.ravel() for X, _ in batches])
        assert len(np.unique(used)) == len(used)  # no token is an input twice
        unused.append(L - len(used))
    assert max(unused) == B * T + T - 1 == 8
    # on a long corpus the same bound holds
    L = 1000
    for seed in range(30):
        batches = epoch(seq_data_iter_sequential(positions_corpus(L), 7, 9, rng=np.random.default_rng(seed)))
        assert L - sum(X.size for X, _ in batches) <= 7 * 9 + 9 - 1


def test_random_subsequences_do_not_overlap_and_share_the_offset():
    B, T, L = 3, 4, 150
    for seed in range(20):
        batches = epoch(seq_data_iter_random(positions_corpus(L), B, T, rng=np.random.default_rng(seed)))
        starts = np.concatenate([X[:, 0] for X, _ in batches])
        for X, _ in batches:
            assert (X == X[:, :1] + np.arange(T)).all()  # each row is a contiguous subsequence
        offset = starts.min() % T
        assert set(starts % T) == {offset}  # every start is offset + k*T ...
        assert len(set(starts)) == len(starts)  # ... with distinct k, so no two overlap
        num_subseqs = (L - offset - 1) // T
        assert len(batches) == num_subseqs // B
        assert starts.max() + T + 1 <= L  # the last target is still in the corpus


def test_random_iter_shuffles():
    batches = epoch(seq_data_iter_random(positions_corpus(2000), 4, 5, rng=np.random.default_rng(0)))
    starts = np.concatenate([X[:, 0] for X, _ in batches])
    assert not (np.diff(starts) > 0).all()


@pytest.mark.parametrize("iterator", ITERATORS)
def test_offset_is_below_num_steps(iterator):
    """d2l's sequential offset randint(0, T) can be T; ours is in [0, T) and takes every value.

    With B=1, T=4, L=40 every offset in [0, 4) leaves 9 subsequences and all of them are
    used, so the smallest start in an epoch is its offset (an offset of 4 would show as 4)."""
    B, T, L = 1, 4, 40
    rng = np.random.default_rng(3)
    offsets = set()
    for _ in range(200):
        batches = epoch(iterator(positions_corpus(L), B, T, rng=rng))
        assert len(batches) == 9
        offsets.add(int(min(X[0, 0] for X, _ in batches)))
    assert offsets == {0, 1, 2, 3}


@pytest.mark.parametrize("iterator", ITERATORS)
def test_same_seed_repeats_reused_generator_varies(iterator):
    corpus = positions_corpus(500)
    a = epoch(iterator(corpus, 4, 6, rng=np.random.default_rng(42)))
    b = epoch(iterator(corpus, 4, 6, rng=np.random.default_rng(42)))
    assert len(a) == len(b) and all((xa == xb).all() for (xa, _), (xb, _) in zip(a, b))
    rng = np.random.default_rng(42)
    firsts = [epoch(iterator(corpus, 4, 6, rng=rng))[0][0] for _ in range(8)]
    assert len({f.tobytes() for f in firsts}) > 1  # later epochs draw new offsets / orders


@pytest.mark.parametrize("use_random_iter", [False, True])
def test_one_host_to_device_copy_per_epoch(monkeypatch, use_random_iter):
    calls = []
    real_asarray = backend.asarray

    def counting_asarray(a, dtype=None):
        calls.append(np.shape(a))
        return real_asarray(a, dtype=dtype)

    monkeypatch.setattr(backend, "asarray", counting_asarray)
    iterator = seq_data_iter_random if use_random_iter else seq_data_iter_sequential
    batches = epoch(iterator(positions_corpus(5000), 8, 10, rng=np.random.default_rng(0)))
    assert len(batches) > 10
    assert len(calls) == 1 and calls[0] == (len(batches), 8, 11)  # the whole epoch's windows at once


# --------------------------------------------------------------------------- SeqDataLoader


@pytest.mark.parametrize("use_random_iter", [False, True])
@pytest.mark.parametrize("B,T,L", [(2, 3, 9), (2, 3, 50), (4, 5, 103), (3, 7, 100), (32, 35, 10000)])
def test_loader_len_is_exact(use_random_iter, B, T, L):
    loader = SeqDataLoader(positions_corpus(L), B, T, use_random_iter=use_random_iter)
    counts = {len(epoch(loader)) for _ in range(30)}
    assert counts == {len(loader)}
    assert len(loader) >= 1


@pytest.mark.parametrize("use_random_iter", [False, True])
def test_loader_len_is_the_minimum_over_offsets(use_random_iter):
    # here the plain iterator yields 3 batches at small offsets and 2 at large ones
    B, T, L = 2, 3, 19
    iterator = seq_data_iter_random if use_random_iter else seq_data_iter_sequential
    rng = np.random.default_rng(0)
    plain = {len(epoch(iterator(positions_corpus(L), B, T, rng=rng))) for _ in range(100)}
    loader = SeqDataLoader(positions_corpus(L), B, T, use_random_iter=use_random_iter)
    assert plain == {2, 3} and len(loader) == min(plain) == 2


@pytest.mark.parametrize("use_random_iter", [False, True])
def test_loader_delegates_with_its_rng(use_random_iter):
    corpus = positions_corpus(300)
    default = SeqDataLoader(corpus, 3, 4, use_random_iter=use_random_iter)
    seeded = SeqDataLoader(corpus, 3, 4, use_random_iter=use_random_iter, rng=np.random.default_rng(0))
    first, again = epoch(default), epoch(seeded)  # the default rng is default_rng(0)
    assert all((a == b).all() for (a, _), (b, _) in zip(first, again))
    iterator = seq_data_iter_random if use_random_iter else seq_data_iter_sequential
    direct = epoch(iterator(corpus, 3, 4, rng=np.random.default_rng(0)))[: len(default)]
    assert all((a == b).all() for (a, _), (b, _) in zip(first, direct))
    later = [epoch(default)[0][0].tobytes() for _ in range(8)]
    assert len(set(later)) > 1  # the loader keeps its generator, so epochs differ
