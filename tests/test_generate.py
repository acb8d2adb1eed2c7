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
