"""Text generation from a trained language model (d2l's `predict_ch8`): greedy or sampled, batched, streamed.

The prefix warms the state up (all but its last token, fed a token at a time as d2l's
`predict_ch8` feeds them; for a bidirectional model, which has no step-by-step form, one
forward pass over them); then each step feeds one token per sample through `RNNLM.stepper`
and picks the next one:

- **greedy** (`temperature=0`, d2l's choice): the most likely token;
- **sampled** (`temperature > 0`): a draw from `sampling_probs`, which applies, in this
  order, the temperature ($\\mathrm{softmax}(z / T)$), top-k (keep the k most likely tokens)
  and top-p (keep the smallest set of most likely tokens whose probability reaches p), then
  renormalises what is kept.

`predict` returns the text; `generate_stream` yields it piece by piece as it is produced.

Costs:

- Greedy generation by `predict` keeps the generated ids on the device and copies them back
  once at the end: no host sync per token, with or without a stop string (the text is cut
  after the stop string at the end, so all `num_preds` steps run). On NumPy with the `fast`
  extra, while the split products are on (`npyrnn generate` turns them on), its warm-up and
  its loop run compiled whole (`npyrnn.nn.cpu_greedy`), with the stepper's bits.
- Sampling copies each step's logits, shape (B, V), to the host and draws there: one host
  sync per token, which drawing on the host needs. It stops early once every sample has met
  its stop string.
- Streaming (`generate_stream`) needs each token on the host as it is produced: one host
  sync per token, greedy included. It stops as soon as the stop string appears. Greedy
  streaming of one sequence where the compiled loop runs is computed `STREAM_CHUNK` (256)
  tokens at a time and yielded token by token after each chunk (2-5 ms apart).
- `num_samples=N` runs the N samples as one batch of N sequences through the stepper, so
  N samples cost about the time of one.

Reproducibility: sample `i` of a call with `seed=S` draws from its own host generator
`numpy.random.default_rng(S + i)`, so it is exactly the text that a single-sample call with
`seed=S + i` gives, whatever `num_samples` is, on NumPy and on CuPy alike (up to the rounding
of the logits, which can move a draw that falls within rounding of a boundary).
`seed=None` draws fresh entropy: not reproducible.
"""

import contextlib
import math
import numbers
import warnings

import numpy  # host side only: the sampling generators and the probabilities they draw from

from npyrnn import backend
from npyrnn.errors import UsageError

__all__ = ["predict", "generate_stream", "sampling_probs", "split_prefix", "choose"]


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


def _check_filters(temperature, top_k, top_p):
    if temperature is None or isinstance(temperature, bool) or not temperature >= 0:
        raise UsageError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise UsageError(f"top_k must be a positive integer, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1):
        raise UsageError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if top_k is not None and not temperature:
        raise UsageError("top_k applies only when sampling; give a temperature above 0 (e.g. 1.0)")
    if top_p is not None and not temperature:
        raise UsageError("top_p applies only when sampling; give a temperature above 0 (e.g. 1.0)")


def sampling_probs(logits, temperature, top_k=None, top_p=None, out=None):
    """The probabilities that sampling draws the next token from: temperature, then top-k, then top-p.

    1. Temperature: `p = softmax(z / T)` (computed as `softmax((z - max z) / T)`, so that a
       tiny T cannot overflow).
    2. Top-k: keep the `top_k` most likely tokens, exactly k (ties broken in favour of the
       lower token id), drop the rest.
    3. Top-p (nucleus sampling, Holtzman et al. 2020, as transformers' `TopPLogitsWarper`):
       of what top-k kept, renormalised, keep the smallest set of most likely tokens whose
       probability reaches `top_p`: a token stays when the tokens ranked before it hold less
       than `top_p`, so the most likely token always stays. `top_p=1` keeps everything.

    What is kept is renormalised to sum to 1; dropped tokens get probability 0. The kept set
    is always a prefix of the tokens sorted by probability (most likely first, ties by id).

    Parameters
    ----------
    logits : float array, shape (V,) or (B, V)
        On either backend; each row is one distribution.
    temperature : float
        Above 0.
    top_k : int, optional
        At least 1; None (or k >= V) keeps every token.
    top_p : float, optional
        In (0, 1]; None or 1 keeps every token.
    out : float64 array, shape of `logits`, optional
        Written and returned instead of a new array (the generation loop reuses one).

    Returns
    -------
    float64 array, shape of `logits`
        Rows sum to 1 (NaN where a row of logits is not finite).

    Raises
    ------
    UsageError
        A temperature that is not above 0, top_k not a positive integer, top_p outside (0, 1].
    """
    _check_filters(temperature, top_k, top_p)
    if not temperature:
        raise UsageError("sampling needs a temperature above 0 (e.g. 1.0); 0 means greedy")
    xp = backend.get_array_module(logits)
    if out is None:
        out = xp.empty(logits.shape, dtype="float64")
    _filter(logits, temperature, top_k, top_p, out.reshape(-1, out.shape[-1]), xp)
    return out


def _filter(logits, temperature, top_k, top_p, p, xp):
    """`sampling_probs` without the checks, into `p` of shape (B, V) (the generation loop calls it per token)."""
    V = p.shape[1]
    p[...] = logits.reshape(p.shape)  # float64 from here on
    p -= p.max(axis=1, keepdims=True)
    with numpy.errstate(over="ignore"):  # a tiny T sends the others to -inf, as it should (NumPy only)
        p /= temperature
    xp.exp(p, out=p)  # unnormalised softmax(z / T), the largest entry exactly 1
    k = V if top_k is None else min(int(top_k), V)
    if k < V or (top_p is not None and top_p < 1):
        rows = xp.arange(p.shape[0])[:, None]
        order = xp.argsort(-p, axis=1, kind="stable")  # (B, V) most likely first, ties by id
        ranked = p[rows, order]  # (B, V) descending
        ranked[:, k:] = 0  # top-k
        if top_p is not None and top_p < 1:
            mass = xp.cumsum(ranked, axis=1)  # mass[:, r]: tokens ranked 0..r
            ranked[:, 1:][mass[:, :-1] >= top_p * mass[:, -1:]] = 0  # those before r reach p: drop r
        p[rows, order] = ranked  # back to token order
    p /= p.sum(axis=1, keepdims=True)


class _Sampler:
    """Draws row i of a (B, V) batch of logits from host generator i, by inverse CDF.

    Each row's draw is `Generator.choice(V, p=row)`'s own algorithm (cumulative sum,
    normalised, `searchsorted(u, side='right')` of one uniform `u` from that row's
    generator), so one sample's text does not depend on how many others share the batch.
    """

    def __init__(self, seeds, vocab_size, temperature, top_k, top_p):
        self.rngs = [backend.default_rng(s) for s in seeds]
        self.filters = (temperature, top_k, top_p)
        self.cdf = numpy.empty((len(self.rngs), vocab_size))  # reused every token
        self.ids = numpy.empty(len(self.rngs), dtype=numpy.int64)

    def draw(self, logits):
        """Next ids, shape (B,), host int64 (overwritten by the next draw)."""
        host = backend.to_numpy(logits)  # (B, V): the one host sync per token that sampling needs
        _filter(host, *self.filters, self.cdf, numpy)  # the probabilities (arguments checked once, by the caller)
        for i, rng in enumerate(self.rngs):
            cdf = self.cdf[i]
            cdf.cumsum(out=cdf)
            if not math.isfinite(cdf[-1]):
                raise UsageError("the model gives logits that are not finite (did its training diverge?); "
                                 "sample from a model whose perplexity is finite")
            cdf /= cdf[-1]
            self.ids[i] = cdf.searchsorted(rng.random(), side="right")
        return self.ids


def choose(logits_row, temperature, top_k, rng, top_p=None):
    """Next token id drawn from one row of logits, shape (V,), with the host generator `rng`.

    A draw from `sampling_probs(logits_row, temperature, top_k, top_p)`: the probabilities are
    computed where the logits live and drawn from on the host, so NumPy and CuPy generate the
    same text from one seed (one host sync per token, which sampling needs). The same draw as
    `rng.choice(V, p=probs)`.
    """
    p = backend.to_numpy(sampling_probs(logits_row, temperature, top_k, top_p))
    return int(rng.choice(p.size, p=p))


def _check_arguments(num_preds, temperature, top_k, top_p=None, num_samples=None, seed=None, stop=None):
    _check_filters(temperature, top_k, top_p)
    if isinstance(num_preds, bool) or not isinstance(num_preds, numbers.Integral) or num_preds < 0:
        raise UsageError(f"num_preds must be a non-negative integer, got {num_preds!r}")
    if num_samples is not None and (
        isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 1
    ):
        raise UsageError(f"num_samples must be a positive integer, got {num_samples!r}")
    if num_samples is not None and num_samples > 1 and not temperature:
        raise UsageError("several samples need sampling: greedy generation gives the same text every time; "
                         "give a temperature above 0 (e.g. 1.0)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
        raise UsageError(f"seed must be a non-negative integer or None, got {seed!r}")
    if stop is not None and (not isinstance(stop, str) or not stop):
        raise UsageError(f"the stop string must be a non-empty string, got {stop!r}; leave it out to stop after "
                         "num_preds tokens")


def _warn_unknown(tokens, vocab):
    unknown = list(dict.fromkeys(t for t in tokens if t not in vocab.token_to_idx))  # in order of appearance
    if unknown:
        warnings.warn(f"prefix tokens not in the vocabulary map to <unk>: {', '.join(map(repr, unknown))}",
                      stacklevel=4)


def _seeds(seed, n):
    """The seed of each sample's generator: `seed + i`, or fresh entropy when `seed` is None."""
    if seed is None:
        return numpy.random.SeedSequence().spawn(n)
    return [int(seed) + i for i in range(n)]


@contextlib.contextmanager
def _eval_mode(model):
    """Generate without dropout (`model.eval()`), then restore the model's mode."""
    if not hasattr(model, "eval"):  # a stand-in model without modes
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _warm_up(model, ids):
    """The state of one sequence after all prefix ids but the last: fed a token at a time through
    the stepper, as d2l's `predict_ch8` feeds them, or for a bidirectional model (whose stepper
    runs each token alone) in one forward pass over them."""
    xp = model.xp
    state = model.begin_state(1)
    if len(ids) < 2:
        return state
    prefix = xp.asarray(ids[:-1], dtype="int64")
    if getattr(getattr(model, "rnn", None), "bidirectional", False):
        _, state = model.forward(prefix[None, :], state)
        return state
    step = model.stepper(state)  # updates state in place
    for t in range(len(prefix)):
        step(prefix[t : t + 1])
    return state


def _start(model, ids, batch_size, num_preds):
    """Warm up on the prefix ids; return the state after them (every sample's) and the device array of
    generated ids, whose first row is the last prefix id."""
    xp = model.xp
    state = _warm_up(model, ids)
    if isinstance(state, tuple):  # the LSTM's (h, c)
        state = tuple(xp.repeat(part, batch_size, axis=1) for part in state)
    else:
        state = xp.repeat(state, batch_size, axis=1)  # (L*D, B, H): every sample starts from it
    out = xp.empty((num_preds + 1, batch_size), dtype="int64")  # generated ids stay on the device
    out[0] = ids[-1]
    return state, out


def _one_sequence(model, ids, num_preds):
    """(out, state) for generating one sequence: out (P + num_preds, 1) int64 on the device, holding
    the P prefix ids, then room for the generated ones; the initial state at batch 1."""
    xp = model.xp
    out = xp.empty((len(ids) + num_preds, 1), dtype="int64")
    out[: len(ids), 0] = xp.asarray(ids, dtype="int64")
    return out, model.begin_state(1)


def _greedy_ids(model, ids, num_preds):
    """Greedy generation of one sequence: the device array (num_preds,) of ids after the prefix ids.

    A compiled loop, warm-up included, where it can run (`RNNLM._greedy_compiled`); else (or from
    where it stopped) the stepper a token at a time, after a forward pass over the prefix for a
    bidirectional model. The same ids either way, and no host sync per token.
    """
    P = len(ids)
    out, state = _one_sequence(model, ids, num_preds)
    compiled = getattr(model, "_greedy_compiled", None)  # a stand-in model may not have it
    fed = compiled(state, out, P - 1) if compiled is not None else 0  # ids of out fed so far
    if fed < P - 1 + num_preds:
        if fed == 0 and getattr(getattr(model, "rnn", None), "bidirectional", False):
            state, fed = _warm_up(model, ids), P - 1  # no step-by-step form: the prefix in one pass
        _feed(model.stepper(state), out, fed, P - 1 + num_preds, P - 1)  # on from the state after out[:fed]
    return out[P:, 0]


def _feed(step, out, start, end, forced):
    """Feed out[t] through the stepper for t in [start, end); from t = forced on, out[t + 1] = the
    argmax of the logits after it (greedy). Before, out[t + 1] is given (the prefix)."""
    for t in range(start, end):
        logits = step(out[t])
        if t >= forced:
            logits.argmax(axis=1, out=out[t + 1])


class _Stop:
    """Cuts one sample's text right after the first occurrence of `stop`, fed piece by piece."""

    def __init__(self, stop):
        self.stop, self.tail = stop, ""

    def feed(self, piece):
        """`(piece, met)`: the piece up to the end of the first occurrence, and whether it occurred."""
        text = self.tail + piece  # the tail is shorter than stop: an occurrence ends in this piece
        j = text.find(self.stop)
        if j >= 0:
            return piece[: j + len(self.stop) - len(self.tail)], True
        self.tail = text[max(0, len(text) - (len(self.stop) - 1)):]  # the end that may begin an occurrence
        return piece, False


def _cut(text, stop):
    """`text` up to and including the first occurrence of `stop` (all of it when none or no stop)."""
    j = -1 if stop is None else text.find(stop)
    return text if j < 0 else text[: j + len(stop)]


def _pieces(prefix, tokens, num_preds, model, vocab, temperature, top_k, top_p, seeds, sep, stop):
    """Yield `(i, piece)`: each sample's prefix, then each generated token's text (host sync per token)."""
    with _eval_mode(model):  # restored when the generator finishes or is closed
        yield from _pieces_eval(prefix, tokens, num_preds, model, vocab, temperature, top_k, top_p, seeds, sep, stop)


STREAM_CHUNK = 256  # greedy ids a compiled call while streaming (2-5 ms of work), then they are printed


def _compiled_stream(model, ids, num_preds):
    """Greedy generation of one sequence compiled whole (`RNNLM._greedy_compiled`), in calls of
    `STREAM_CHUNK` ids: an iterator of host arrays of the ids generated, or None where the
    compiled loop does not run (the stepper then streams a token at a time). Should the products
    be taken by another thread between two calls, the stepper goes on from there: the same ids."""
    compiled = getattr(model, "_greedy_compiled", None)  # a stand-in model may not have it
    if compiled is None or num_preds == 0:
        return None
    P, total = len(ids), len(ids) - 1 + num_preds  # ids of out to feed
    out, state = _one_sequence(model, ids, num_preds)
    end = min(total, P - 1 + STREAM_CHUNK)
    fed = compiled(state, out[: end + 1], P - 1)
    if fed == 0:
        return None

    def chunks(fed, end):
        step, start = None, P  # out[start:end + 1] generated by this call
        while True:
            if fed < end:  # the compiled call stopped short: the stepper goes on from the state after out[:fed]
                step = step or model.stepper(state)
                _feed(step, out, fed, end, P - 1)
            yield backend.to_numpy(out[start : end + 1, 0])
            if end == total:
                return
            start, fed, end = end + 1, end, min(total, end + STREAM_CHUNK)
            if step is None:
                fed += compiled(state, out[fed : end + 1], 0)

    return chunks(fed, end)


def _pieces_eval(prefix, tokens, num_preds, model, vocab, temperature, top_k, top_p, seeds, sep, stop):
    xp = model.xp
    B = len(seeds)
    stream = _compiled_stream(model, vocab[tokens], num_preds) if not temperature and B == 1 else None
    if stream is not None:  # greedy, compiled: printed a chunk at a time
        stopper = _Stop(stop) if stop is not None else None
        yield 0, prefix
        for ids in stream:
            for idx in ids.tolist():
                piece = sep + vocab.idx_to_token[idx]
                met = False
                if stopper is not None:
                    piece, met = stopper.feed(piece)
                yield 0, piece
                if met:
                    return
        return
    state, out = _start(model, vocab[tokens], B, num_preds)
    step = model.stepper(state)
    sampler = _Sampler(seeds, model.vocab_size, temperature, top_k, top_p) if temperature else None
    stops = [_Stop(stop) if stop is not None else None for _ in range(B)]
    running = [True] * B
    for i in range(B):
        yield i, prefix
    for t in range(num_preds):
        logits = step(out[t])  # (B, V)
        if sampler is None:
            logits.argmax(axis=1, out=out[t + 1])
            ids = backend.to_numpy(out[t + 1])  # the host sync that streaming needs
        else:
            ids = sampler.draw(logits)
            out[t + 1] = xp.asarray(ids)
        for i, idx in enumerate(ids.tolist()):
            if not running[i]:
                continue
            piece = sep + vocab.idx_to_token[idx]
            if stops[i] is not None:
                piece, met = stops[i].feed(piece)
                running[i] = not met
            yield i, piece
        if not any(running):
            return


def _prepare(prefix, num_preds, vocab, temperature, top_k, top_p, num_samples, seed, token, stop):
    tokens = split_prefix(prefix, token)
    _check_arguments(num_preds, temperature, top_k, top_p, num_samples, seed, stop)
    _warn_unknown(tokens, vocab)
    return tokens, ("" if token == "char" else " ")


def generate_stream(prefix, num_preds, model, vocab, temperature=0.0, top_k=None, seed=None, token="char", *,
                    top_p=None, num_samples=None, stop=None):
    """Generate like `predict`, yielding the text piece by piece as it is produced.

    The arguments are checked (and unknown prefix tokens warned about) when this is called,
    before anything is generated. Each token's text reaches the host as it is produced: one
    host sync per token, greedy included (`predict` without streaming has none for greedy).
    Generation stops as soon as the stop string appears (every sample's, when batched).

    Parameters
    ----------
    prefix, num_preds, model, vocab, temperature, top_k, seed, token, top_p, stop
        As for `predict`.
    num_samples : int, optional
        None: yield `str` pieces of one sample. N: the N samples run as one batch and the
        generator yields `(i, piece)` pairs, `i` in `range(N)`, in the order produced
        (every sample's prefix first, then one piece per sample and step).

    Yields
    ------
    str or (int, str)
        The prefix, then each generated token's text (for word tokens, a space and the
        word). The pieces of one sample join to exactly what `predict` returns.

    Examples
    --------
    ```python
    for piece in generate_stream("time traveller", 50, model, vocab):
        print(piece, end="", flush=True)
    ```
    """
    tokens, sep = _prepare(prefix, num_preds, vocab, temperature, top_k, top_p, num_samples, seed, token, stop)
    pieces = _pieces(prefix, tokens, num_preds, model, vocab, temperature, top_k, top_p,
                     _seeds(seed, num_samples or 1), sep, stop)
    if num_samples is None:
        return (piece for _, piece in pieces)
    return pieces


def predict(prefix, num_preds, model, vocab, temperature=0.0, top_k=None, seed=None, token="char", *,
            top_p=None, num_samples=None, stop=None):
    """Generate `num_preds` tokens after `prefix` (d2l's `predict_ch8`), greedy or sampled.

    Parameters
    ----------
    prefix : str
        Not empty. Characters (or words) that the vocabulary does not know map to `<unk>`,
        with a warning.
    num_preds : int
        Tokens to generate (fewer when the stop string appears).
    model : RNNLM
    vocab : Vocab
    temperature : float, default 0
        0 is greedy (argmax, as d2l's `predict_ch8`); above 0 samples from
        `sampling_probs(logits, temperature, top_k, top_p)`.
    top_k : int, optional
        Sample only among the k most likely tokens; needs `temperature > 0`.
    seed : int, optional
        Seed of the sampling: sample `i` draws from the host generator
        `numpy.random.default_rng(seed + i)`, so both backends agree and each sample is what a
        single-sample call with `seed + i` gives. None: fresh entropy.
    token : {'char', 'word'}, default 'char'
        Whether the prefix is split into characters or words, and generated tokens are
        joined with '' or ' '.
    top_p : float, optional
        Nucleus sampling: keep the smallest set of most likely tokens whose probability
        reaches `top_p`, in (0, 1]; applied after top-k; needs `temperature > 0`.
    num_samples : int, optional
        None: one text (a `str`). N: a list of N texts, generated as one batch of N
        sequences (about the time of one). N > 1 needs `temperature > 0`.
    stop : str, optional
        Stop after the first occurrence of this string in the generated text (not in the
        prefix); the text ends with it, as with transformers' `stop_strings`.

    Returns
    -------
    str or list of str
        The prefix followed by the generated text; a list of them when `num_samples` is given.

    Raises
    ------
    UsageError
        An empty prefix, a negative temperature or length, top_k or top_p without sampling
        or out of range, several greedy samples, an empty stop string.
    """
    tokens, sep = _prepare(prefix, num_preds, vocab, temperature, top_k, top_p, num_samples, seed, token, stop)
    n = num_samples or 1
    if temperature:
        texts = [[] for _ in range(n)]
        for i, piece in _pieces(prefix, tokens, num_preds, model, vocab, temperature, top_k, top_p,
                                _seeds(seed, n), sep, stop):
            texts[i].append(piece)
        texts = ["".join(pieces) for pieces in texts]
    else:  # greedy (one sample): the ids stay on the device until the end, no host sync per token
        with _eval_mode(model):
            ids = _greedy_ids(model, vocab[tokens], num_preds)
        generated = vocab.to_tokens(backend.to_numpy(ids))
        texts = [prefix + _cut("".join(sep + g for g in generated), stop)]
    return texts[0] if num_samples is None else texts
