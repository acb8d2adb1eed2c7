"""Tests of npyrnn.data.vocab: d2l's Vocab, its lookups both ways, and its dict for checkpoints."""

import json

import numpy as np
import pytest
from conftest import one_line

from npyrnn import data
from npyrnn.data import DataError, Vocab

pytestmark = pytest.mark.usefixtures("no_internet")  # the round trip loads The Time Machine


# --------------------------------------------------------------------------- Vocab


def test_vocab_order_ties_and_min_freq():
    vocab = Vocab(list("cab") + list("bb"))  # b:3, then c:1 and a:1 in first-seen order
    assert vocab.idx_to_token == ["<unk>", "b", "c", "a"]
    assert vocab.token_freqs == [("b", 3), ("c", 1), ("a", 1)]
    assert vocab.token_to_idx == {"<unk>": 0, "b": 1, "c": 2, "a": 3}
    rare_cut = Vocab(list("aaabbc"), min_freq=2)
    assert rare_cut.idx_to_token == ["<unk>", "a", "b"] and rare_cut["c"] == rare_cut.unk == 0
    assert rare_cut.token_freqs[-1] == ("c", 1)  # counted, though not in the vocabulary


def test_vocab_flat_and_nested_agree_and_reserved_tokens():
    nested = Vocab([["a", "b"], ["b"]], reserved_tokens=["<pad>", "<bos>"])
    flat = Vocab(["a", "b", "b"], reserved_tokens=["<pad>", "<bos>"])
    assert nested.idx_to_token == flat.idx_to_token == ["<unk>", "<pad>", "<bos>", "b", "a"]
    assert len(Vocab()) == 1 and Vocab().idx_to_token == ["<unk>"]


def test_vocab_lookup_both_ways():
    vocab = Vocab(list("hello"))  # l:2, h, e, o
    assert len(vocab) == 5
    assert vocab["l"] == 1 and vocab["z"] == 0
    assert vocab[["h", ("e", "z")]] == [2, [3, 0]]
    assert vocab.to_tokens(1) == "l" and vocab.to_tokens(np.int64(2)) == "h"
    assert vocab.to_tokens([2, 3, 1, 1, 4]) == list("hello")
    assert vocab.to_tokens(np.array([[2, 3], [1, 4]])) == [["h", "e"], ["l", "o"]]
    with pytest.raises(DataError) as e:
        vocab.to_tokens(5)
    assert "out of range for a vocabulary of 5 tokens" in one_line(e)
    assert repr(vocab).startswith("Vocab(size=5")


def test_vocab_to_tokens_takes_backend_arrays(xp):
    vocab = Vocab(list("hello"))
    assert vocab.to_tokens(xp.asarray([2, 3])) == ["h", "e"]


def test_vocab_dict_round_trip_through_json():
    _, vocab = data.load_corpus("timemachine", token="word", min_freq=2, reserved_tokens=["<pad>"])
    back = Vocab.from_dict(json.loads(json.dumps(vocab.to_dict())))
    assert back.idx_to_token == vocab.idx_to_token
    assert back.token_to_idx == vocab.token_to_idx
    assert back.token_freqs == vocab.token_freqs
    assert back[["the", "time", "zzz"]] == vocab[["the", "time", "zzz"]]


@pytest.mark.parametrize("bad", [{}, {"idx_to_token": ["a", "b"]}, {"idx_to_token": ["<unk>", "a", "a"]}, []])
def test_vocab_from_bad_dict(bad):
    with pytest.raises(DataError) as e:
        Vocab.from_dict(bad)
    assert "Vocab.to_dict()" in one_line(e)
