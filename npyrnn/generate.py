"""Text generation from a trained language model (d2l's `predict_ch8`), greedy or sampled.

The prefix warms the state up (one forward pass over all but its last token); then each
step feeds one token through `RNNLM.stepper` and picks the next one: the most likely
(greedy, as d2l's scratch model) or a draw from `softmax(logits / temperature)`,
optionally restricted to the `top_k` most likely tokens.
"""

import math
import warnings

from npyrnn import backend
from npyrnn.errors import UsageError

__all__ = ["predict", "split_prefix", "choose"]


def split_prefix(prefix, token="char"):
    """The prefix as tokens: characters for `token='char'`, whitespace-separated words for `'word'`.

    Raises
    ------
    UsageError
        The prefix is empty or has no words.
    """
    if not isinstance(prefix, str) or not prefix:
        raise UsageError("the prefix is empty; give at least one character, e.g. --prefix 'time traveller'")
    tokens = list(prefix) if token == "char" else prefix.split()
    if not tokens:
        raise UsageError("the prefix has no words; give at least one word, e.g. --prefix 'the time'")
    return tokens


def choose(logits_row, temperature, top_k, rng):
    """Next token id drawn from one row of logits, shape (V,).

    A draw from `softmax(logits / temperature)` restricted to the `top_k` largest logits
    (exactly k, ties at the k-th logit included). The probabilities are computed on the
    backend and drawn from on the host generator `rng`, so NumPy and CuPy generate the same
    text from one seed (one host sync per token, which sampling needs).
    """
    xp = backend.get_array_module(logits_row)
    z = logits_row.astype("float64") / temperature
    if top_k is not None and top_k < z.size:
        keep = xp.argpartition(z, -top_k)[-top_k:]
        kept = xp.full_like(z, -math.inf)
        kept[keep] = z[keep]
        z = kept
    p = xp.exp(z - z.max())
    p = backend.to_numpy(p / p.sum())
    return int(rng.choice(p.size, p=p))


def _check_arguments(num_preds, temperature, top_k):
    if temperature is None or not temperature >= 0:
        raise UsageError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise UsageError(f"top_k must be a positive integer, got {top_k!r}")
    if top_k is not None and not temperature:
        raise UsageError("top_k applies only when sampling; give a temperature above 0 (e.g. 1.0)")
    if isinstance(num_preds, bool) or not isinstance(num_preds, int) or num_preds < 0:
        raise UsageError(f"num_preds must be a non-negative integer, got {num_preds!r}")


def predict(prefix, num_preds, model, vocab, temperature=0.0, top_k=None, seed=None, token="char"):
    """Generate `num_preds` tokens after `prefix` (d2l's `predict_ch8`).

    Parameters
    ----------
    prefix : str
        Not empty. Characters (or words) that the vocabulary does not know map to `<unk>`,
        with a warning.
    num_preds : int
        Tokens to generate.
    model : RNNLM
    vocab : Vocab
    temperature : float, default 0
        0 is greedy (argmax, as d2l's `predict_ch8`); above 0 samples from
        `softmax(logits / temperature)`.
    top_k : int, optional
        Sample only among the k most likely tokens; needs `temperature > 0`.
    seed : int, optional
        Seed of the sampling generator (host NumPy, so both backends agree).
    token : {'char', 'word'}, default 'char'
        Whether the prefix is split into characters or words, and generated tokens are
        joined with '' or ' '.

    Returns
    -------
    str
        The prefix followed by the generated text.

    Raises
    ------
    UsageError
        An empty prefix, a negative temperature or length, or top_k without sampling.
    """
    tokens = split_prefix(prefix, token)
    _check_arguments(num_preds, temperature, top_k)
    unknown = list(dict.fromkeys(t for t in tokens if t not in vocab.token_to_idx))  # in order of appearance
    if unknown:
        warnings.warn(
            f"prefix tokens not in the vocabulary map to <unk>: {', '.join(map(repr, unknown))}",
            stacklevel=2,
        )
    xp = model.xp
    rng = backend.default_rng(seed)
    ids = vocab[tokens]
    state = model.begin_state(1)
    if len(ids) > 1:  # warm-up: one forward pass over all but the last prefix token
        _, state = model.forward(xp.asarray([ids[:-1]]), state)
    out = xp.empty(num_preds + 1, dtype="int64")  # generated ids stay on the device
    out[0] = ids[-1]
    step = model.stepper(state)
    for i in range(num_preds):
        logits = step(out[i : i + 1])  # (1, V)
        if temperature:
            out[i + 1] = choose(logits[0], temperature, top_k, rng)
        else:
            out[i + 1] = logits[0].argmax()  # greedy, without a host sync on CuPy
    generated = vocab.to_tokens(backend.to_numpy(out[1:]))
    sep = "" if token == "char" else " "
    return prefix + (sep if generated and sep else "") + sep.join(generated)
