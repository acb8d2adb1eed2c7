"""Generation: RNNLM.stepper agrees with forward for every layout, and predict's contract."""

import numpy as np
import pytest

from conftest import rel_err
from npyrnn import backend
from npyrnn.errors import UsageError
from npyrnn.data import Vocab
from npyrnn.generate import predict, split_prefix
from npyrnn.models import RNNLM


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("B", [1, 3])
def test_stepper_equals_forward_one_token_at_a_time(layers, bidirectional, B, xp):
    model = RNNLM(11, 6, num_layers=layers, bidirectional=bidirectional, dtype="float64", init="uniform", seed=3)
    ids = np.random.default_rng(B).integers(0, 11, size=(B, 5))
    state = model.begin_state(B)
    step = model.stepper(state)
    expected_state = model.begin_state(B)
    for t in range(5):
        column = xp.asarray(ids[:, t])
        expected, expected_state = model.forward(xp.asarray(ids[:, t : t + 1]), expected_state)
        got = step(column)
        assert got.shape == (B, 11)
        assert rel_err(got, backend.to_numpy(expected)) < 1e-13
        assert rel_err(state, backend.to_numpy(expected_state)) < 1e-13, "the state is updated in place"


def test_bidirectional_predict_runs_and_is_deterministic():
    vocab = Vocab(list("abcdefghijklmnopqrstuvwxyz "))  # 28 tokens with <unk>
    model = RNNLM(len(vocab), 8, bidirectional=True, init="uniform", seed=0)
    a = predict("time", 12, model, vocab)
    assert a == predict("time", 12, model, vocab) and a.startswith("time")
    assert len(vocab[list(a[4:].replace("<unk>", "\0"))]) == 12


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(prefix=""), "prefix is empty"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(temperature=float("nan")), "temperature must be >= 0"),
        (dict(temperature=1.0, top_k=0), "top_k must be a positive integer"),
        (dict(top_k=2), "top_k applies only when sampling"),
        (dict(num_preds=-1), "num_preds must be a non-negative integer"),
        (dict(num_preds=True), "num_preds must be a non-negative integer"),
    ],
)
def test_bad_arguments_are_usage_errors(kwargs, words):
    model = RNNLM(28, 4, seed=0)
    args = dict(prefix="a", num_preds=3, model=model, vocab=None)
    args.update(kwargs)
    with pytest.raises(UsageError, match=words):
        predict(args.pop("prefix"), args.pop("num_preds"), args.pop("model"), args.pop("vocab"), **args)


def test_split_prefix_words_and_chars():
    assert split_prefix("ab c") == ["a", "b", " ", "c"]
    assert split_prefix("the  time", token="word") == ["the", "time"]
    with pytest.raises(UsageError, match="no words"):
        split_prefix("   ", token="word")


# --------------------------------------------------------------------------- sampling filters

from optional_hypothesis import given, settings, st  # noqa: E402  (hypothesis, or skips without it)

from npyrnn.generate import _cut, _Stop, choose, generate_stream, sampling_probs  # noqa: E402


def probs_of(p, temperature=1.0, top_k=None, top_p=None, xp=np):
    """`sampling_probs` of the logits log(p), on the host."""
    return backend.to_numpy(sampling_probs(xp.asarray(np.log(np.asarray(p, dtype=np.float64))), temperature,
                                           top_k, top_p))


def test_top_p_keeps_the_smallest_set_that_reaches_p(xp):
    p = [0.5, 0.3, 0.1, 0.1]
    np.testing.assert_allclose(probs_of(p, top_p=0.79, xp=xp), [5 / 8, 3 / 8, 0, 0], rtol=1e-14)  # 0.5 + 0.3 reach 0.79
    np.testing.assert_allclose(probs_of(p, top_p=0.81, xp=xp), [5 / 9, 3 / 9, 1 / 9, 0], rtol=1e-14)  # 0.8 does not
    np.testing.assert_allclose(probs_of(p, top_p=0.49, xp=xp), [1, 0, 0, 0], rtol=1e-14)  # 0.5 alone reaches 0.49
    np.testing.assert_allclose(probs_of(p, top_p=0.95, xp=xp), p, rtol=1e-14)  # 0.9 does not reach 0.95: all four
    np.testing.assert_allclose(probs_of(p, top_p=1.0, xp=xp), p, rtol=1e-14)  # p=1 keeps all
    np.testing.assert_array_equal(probs_of(p, top_p=1e-12, xp=xp), [1, 0, 0, 0])  # tiny p: exactly the argmax
    np.testing.assert_array_equal(probs_of([0.1, 0.2, 0.7], top_p=1e-12, xp=xp), [0, 0, 1])


def test_ties_go_to_the_lower_token_id(xp):
    # tokens 2 and 3 tie at 0.1: the kept set is a prefix of the order (0, 1, 2, 3)
    np.testing.assert_allclose(probs_of([0.5, 0.3, 0.1, 0.1], top_p=0.85, xp=xp), [5 / 9, 3 / 9, 1 / 9, 0],
                               rtol=1e-14)
    np.testing.assert_array_equal(probs_of([0.25, 0.25, 0.5], top_p=0.5, xp=xp), [0, 0, 1])
    np.testing.assert_array_equal(probs_of([0.4, 0.4, 0.2], top_p=0.3, xp=xp), [1, 0, 0])
    np.testing.assert_array_equal(probs_of([0.2, 0.4, 0.4], top_k=1, xp=xp), [0, 1, 0])
    np.testing.assert_allclose(probs_of([0.2, 0.4, 0.4], top_k=2, xp=xp), [0, 0.5, 0.5], rtol=1e-14)


def test_filters_apply_in_the_order_temperature_top_k_top_p(xp):
    # top-k first: of [0.4, 0.3] renormalised, 4/7 alone reaches 0.5 (top-p first would keep two)
    np.testing.assert_array_equal(probs_of([0.4, 0.3, 0.2, 0.1], top_k=2, top_p=0.5, xp=xp), [1, 0, 0, 0])
    # temperature first: T=0.5 squares and renormalises [0.7, 0.2, 0.1] -> 0.49/0.54 >= 0.75 alone
    np.testing.assert_allclose(probs_of([0.7, 0.2, 0.1], top_p=0.75, xp=xp), [7 / 9, 2 / 9, 0], rtol=1e-14)
    np.testing.assert_array_equal(probs_of([0.7, 0.2, 0.1], temperature=0.5, top_p=0.75, xp=xp), [1, 0, 0])
    np.testing.assert_allclose(probs_of([0.7, 0.2, 0.1], temperature=0.5, xp=xp), np.array([49, 4, 1]) / 54,
                               rtol=1e-14)


def test_sampling_probs_rows_out_and_tiny_temperature(xp):
    logits = xp.asarray([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]], dtype="float32")
    out = xp.empty((2, 3), dtype="float64")
    got = sampling_probs(logits, 1.0, top_p=0.4, out=out)
    assert got is out
    np.testing.assert_array_equal(backend.to_numpy(out), [[1, 0, 0], [0, 1, 0]])
    tiny = backend.to_numpy(sampling_probs(xp.asarray([3.0, 1e300, -1e300]), 1e-300))  # no overflow, no NaN
    np.testing.assert_array_equal(tiny, [0, 1, 0])


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(temperature=0.0), "temperature above 0"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(top_k=0), "top_k must be a positive integer"),
        (dict(top_p=0.0), r"top_p must be a number in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be a number in \(0, 1\]"),
        (dict(top_p=float("nan")), r"top_p must be a number in \(0, 1\]"),
        (dict(top_p=True), r"top_p must be a number in \(0, 1\]"),
    ],
)
def test_sampling_probs_bad_arguments(kwargs, words):
    args = dict(temperature=1.0)
    args.update(kwargs)
    with pytest.raises(UsageError, match=words):
        sampling_probs(np.zeros(4), args.pop("temperature"), **args)


@settings(derandomize=True, max_examples=300, deadline=None)
@given(
    logits=st.lists(st.floats(-30, 30, allow_nan=False), min_size=1, max_size=12),
    temperature=st.floats(0.05, 20),
    top_k=st.one_of(st.none(), st.integers(1, 15)),
    top_p=st.one_of(st.none(), st.floats(1e-6, 1.0)),
)
def test_sampling_filter_property(logits, temperature, top_k, top_p):
    z = np.asarray(logits, dtype=np.float64)
    got = sampling_probs(z, temperature, top_k, top_p)
    full = sampling_probs(z, temperature)  # temperature alone: the distribution before top-k and top-p
    kept = got > 0
    assert kept.any(), "nothing kept"
    assert np.all(got >= 0)
    assert got.sum() == pytest.approx(1.0, abs=1e-12)
    if top_k is not None:
        assert kept.sum() <= top_k
    order = np.argsort(-full, kind="stable")  # most likely first, ties by id
    kept_in_order = kept[order]
    n = int(kept_in_order.sum())
    assert kept_in_order[:n].all(), (kept_in_order, full)  # a prefix of the sorted tokens
    np.testing.assert_allclose(got[kept], full[kept] / full[kept].sum(), rtol=1e-12)  # renormalised, not reshaped
    if top_p is not None:
        k = min(top_k or len(z), len(z))
        mass = np.cumsum(full[order][:k] / full[order][:k].sum())  # after top-k, renormalised
        assert n == 1 or mass[n - 2] < top_p * (1 + 1e-12)  # the smallest set: without its last token, short of p
        assert n == k or mass[n - 1] >= top_p * (1 - 1e-12)  # and it reaches p (or top-k kept everything)


# --------------------------------------------------------------------------- drawing


class FixedLogits:
    """A stand-in language model whose every step gives the same logits (draws are then i.i.d.)."""

    def __init__(self, logits, xp):
        self.xp, self.logits = xp, xp.asarray(logits, dtype="float32")
        self.vocab_size = len(logits)

    def begin_state(self, batch_size):
        return self.xp.zeros((1, batch_size, 1), dtype="float32")

    def forward(self, X, state):
        return None, state

    def stepper(self, state):
        out = self.xp.tile(self.logits, (state.shape[1], 1))  # (B, V)
        return lambda ids: out


FOUR = Vocab(list("abcd"))  # ids: <unk> 0, a 1, b 2, c 3, d 4


@pytest.mark.parametrize(
    "temperature, top_k, top_p, expected",
    [
        (1.0, None, None, [0.0, 0.4, 0.3, 0.2, 0.1]),
        (0.5, None, None, np.array([0.0, 16, 9, 4, 1]) / 30),
        (1.0, 3, None, np.array([0.0, 4, 3, 2, 0]) / 9),
        (1.0, 3, 0.75, np.array([0.0, 4, 3, 0, 0]) / 7),  # of 4/9, 3/9, 2/9: 7/9 reaches 0.75
        (2.0, None, 0.6, None),  # T=2: sqrt([.4, .3, .2, .1]) normalised; 0.6 needs the first three
    ],
)
def test_draws_follow_the_filtered_distribution(xp, temperature, top_k, top_p, expected):
    p = np.array([1e-30, 0.4, 0.3, 0.2, 0.1])
    if expected is None:
        s = np.sqrt(p[1:]) / np.sqrt(p[1:]).sum()  # [0.348, 0.302, 0.246, 0.174]: 0.650 >= 0.6 after two
        expected = np.r_[0.0, s[:2] / s[:2].sum(), 0, 0]
    model = FixedLogits(np.log(p), xp)
    text = predict("a", 2000, model, FOUR, temperature=temperature, top_k=top_k, top_p=top_p, seed=0)[1:]
    counts = np.array([text.count(t) for t in ["<unk>", "a", "b", "c", "d"]])
    assert counts[0] == 0 and counts.sum() == 2000
    assert np.all(counts[expected == 0] == 0), counts  # filtered tokens never come out
    np.testing.assert_allclose(counts / 2000, expected, atol=0.04)  # about 4 standard deviations


def test_draws_are_numpy_choice_from_seed_plus_i(xp):
    """Sample i of a batch draws from default_rng(seed + i) exactly as Generator.choice does."""
    logits = np.log([1e-30, 0.4, 0.3, 0.2, 0.1])
    model = FixedLogits(logits, xp)
    texts = predict("a", 300, model, FOUR, temperature=0.8, top_k=4, top_p=0.9, seed=11, num_samples=3)
    for i, text in enumerate(texts):
        rng = np.random.default_rng(11 + i)
        ids = [choose(xp.asarray(logits), 0.8, 4, rng, top_p=0.9) for _ in range(300)]
        assert text == "a" + "".join(FOUR.to_tokens(ids)), i


def small_model(bidirectional=False, layers=1):
    vocab = Vocab(list("abcdefghijklmnopqrstuvwxyz "))
    return RNNLM(len(vocab), 8, num_layers=layers, bidirectional=bidirectional, init="uniform", seed=0), vocab


@pytest.mark.parametrize("bidirectional", [False, True])
def test_a_batch_of_samples_equals_single_calls_with_seed_plus_i(xp, bidirectional):
    model, vocab = small_model(bidirectional, layers=2)
    kw = dict(temperature=1.3, top_k=20, top_p=0.95)
    batch = predict("the time", 30, model, vocab, seed=4, num_samples=5, **kw)
    assert isinstance(batch, list) and len(batch) == 5 and len(set(batch)) == 5
    assert batch == [predict("the time", 30, model, vocab, seed=4 + i, **kw) for i in range(5)]
    assert predict("the time", 30, model, vocab, seed=4, num_samples=1, **kw) == batch[:1]
    assert predict("the time", 30, model, vocab, seed=4, num_samples=2, **kw) == batch[:2]
    fresh = predict("the time", 30, model, vocab, num_samples=3, **kw)  # seed None: fresh entropy
    assert [len(vocab[list(t[8:].replace("<unk>", "\0"))]) for t in fresh] == [30] * 3


def test_sampling_is_reproducible_across_backends(xp):
    model, vocab = small_model()
    state = {k: backend.to_numpy(v) for k, v in model.state_dict().items()}
    model.load_state_dict({k: xp.asarray(v) for k, v in state.items()})
    a = predict("time", 40, model, vocab, temperature=1.0, top_p=0.9, seed=7, num_samples=2)
    backend.set_backend("numpy")
    host, _ = small_model()
    assert a == predict("time", 40, host, vocab, temperature=1.0, top_p=0.9, seed=7, num_samples=2)


# --------------------------------------------------------------------------- stop strings and streaming


def test_stop_string_ends_the_text_after_its_first_occurrence(xp):
    model, vocab = small_model()
    for kw in (dict(), dict(temperature=1.0, seed=2)):
        full = predict("time", 60, model, vocab, **kw)
        generated = full[4:]
        stop = generated[20:22]
        expected = "time" + generated[: generated.index(stop) + 2]
        assert predict("time", 60, model, vocab, stop=stop, **kw) == expected, kw
        assert "".join(generate_stream("time", 60, model, vocab, stop=stop, **kw)) == expected, kw
        assert predict("time", 60, model, vocab, stop="never!", **kw) == full  # absent: all 60 tokens
    greedy = predict("time", 60, model, vocab)
    assert predict("time", 60, model, vocab, stop="ti") == "time" + _cut(greedy[4:], "ti")  # not the prefix's 'ti'


def test_stop_string_with_word_tokens_cuts_inside_a_word():
    vocab = Vocab("the time traveller said so".split())
    model = RNNLM(len(vocab), 8, init="uniform", seed=1)
    full = predict("the time", 20, model, vocab, temperature=1.0, seed=0, token="word")
    word = full.split()[5]
    stop = word[:2]
    generated = full[len("the time"):]
    expected = "the time" + generated[: generated.index(stop) + len(stop)]
    assert predict("the time", 20, model, vocab, temperature=1.0, seed=0, token="word", stop=stop) == expected


@settings(derandomize=True, max_examples=300, deadline=None)
@given(pieces=st.lists(st.text("ab ", max_size=4), max_size=12), stop=st.text("ab ", min_size=1, max_size=4))
def test_stop_fed_piece_by_piece_cuts_where_the_whole_text_is_cut(pieces, stop):
    cut, out = _Stop(stop), []
    for piece in pieces:
        piece, met = cut.feed(piece)
        out.append(piece)
        if met:
            break
    assert "".join(out) == _cut("".join(pieces), stop)
    assert met == (stop in "".join(pieces)) if pieces else True


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(temperature=0.9, seed=1), dict(temperature=0.9, seed=1, top_k=5, top_p=0.8, stop="e"),
     dict(stop="a")],
    ids=["greedy", "sampled", "sampled-filtered-stop", "greedy-stop"],
)
def test_streamed_pieces_join_to_the_predicted_text(xp, kw):
    model, vocab = small_model()
    pieces = list(generate_stream("time trav", 40, model, vocab, **kw))
    assert pieces[0] == "time trav" and all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == predict("time trav", 40, model, vocab, **kw)
    if "stop" not in kw:
        assert len(pieces) == 41  # the prefix, then one piece per token


def test_streamed_batch_yields_index_piece_pairs(xp):
    model, vocab = small_model()
    kw = dict(temperature=1.0, seed=3, num_samples=3, stop="o")
    texts = ["", "", ""]
    for i, piece in generate_stream("the", 50, model, vocab, **kw):
        texts[i] += piece
    assert texts == predict("the", 50, model, vocab, **kw)


def test_streaming_checks_its_arguments_when_called():
    model, vocab = small_model()
    with pytest.raises(UsageError, match="top_p applies only when sampling"):
        generate_stream("the", 5, model, vocab, top_p=0.5)  # raised before the first next()
    with pytest.warns(UserWarning, match="'X'"):
        stream = generate_stream("the X", 5, model, vocab)
    assert "".join(stream).startswith("the X")


def test_greedy_predict_has_no_host_sync_per_token(monkeypatch):
    """Greedy `predict` copies ids to the host a fixed number of times, whatever the length; streaming per token."""
    model, vocab = small_model()
    calls = []
    real = backend.to_numpy
    monkeypatch.setattr(backend, "to_numpy", lambda a: calls.append(1) or real(a))

    def count(fn, n):
        calls.clear()
        fn(n)
        return len(calls)

    for stop in (None, "e"):
        greedy = lambda n: predict("time", n, model, vocab, stop=stop)  # noqa: E731
        assert count(greedy, 5) == count(greedy, 80), stop
    streamed = lambda n: "".join(generate_stream("time", n, model, vocab))  # noqa: E731
    assert count(streamed, 80) - count(streamed, 5) == 75


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(temperature=1.0, top_p=0.0), r"top_p must be a number in \(0, 1\]"),
        (dict(top_p=0.9), "top_p applies only when sampling"),
        (dict(temperature=1.0, num_samples=0), "num_samples must be a positive integer"),
        (dict(num_samples=2), "several samples need sampling"),
        (dict(stop=""), "stop string must be a non-empty string"),
        (dict(temperature=1.0, seed=-1), "seed must be a non-negative integer"),
    ],
)
def test_bad_sampling_arguments_are_usage_errors(kwargs, words):
    model, vocab = small_model()
    with pytest.raises(UsageError, match=words):
        predict("a", 3, model, vocab, **kwargs)
    with pytest.raises(UsageError, match=words):
        generate_stream("a", 3, model, vocab, **kwargs)


def test_non_finite_logits_are_a_usage_error():
    model = FixedLogits(np.array([0.0, np.nan, 1.0, 0.0, 0.0]), np)
    with pytest.raises(UsageError, match="not finite"):
        predict("a", 3, model, FOUR, temperature=1.0)
