"""Training loop (truncated BPTT) and text generation, as in d2l chapter 8.

``train_epoch`` is d2l's ``train_epoch_ch8``, ``train`` its ``train_ch8`` and
``predict`` its ``predict_ch8``, with the backward pass written by hand:

    forward -> softmax cross-entropy -> backward -> clip (global norm) -> SGD

State across minibatches (``docs/derivations/truncated-bptt.md``): with
sequential minibatches each row continues the previous minibatch's row, so the
final state is carried in as the next initial state (3.1) while its gradient
is cut (3.2): ``backward`` is called without ``dstate``. With random
minibatches the state is reset to zeros every minibatch (3.3).
"""

import math
import time
import warnings

from tqdm.auto import tqdm

from npyrnn import backend
from npyrnn.losses import perplexity, softmax_cross_entropy
from npyrnn.optim import SGD, clip_grad_norm


def train_step(model, X, Y, state, optimizer, clip=1.0):
    """One minibatch: forward, loss, backward, clip, update.

    Parameters
    ----------
    model : RNNLM
    X, Y : integer arrays, shape (B, T)
        Inputs and next-token targets.
    state : array, shape (num_layers*D, B, H)
        Initial state (carried or fresh).
    optimizer : SGD
    clip : float or None
        Global-norm threshold theta; None disables clipping.

    Returns
    -------
    loss : 0-d array
        Mean cross-entropy of the minibatch (on the backend; no host sync).
    state : array
        Final state, to carry into the next minibatch.
    """
    model.zero_grad()
    logits, state = model.forward(X, state)  # (T*B, V)
    y = Y.T.reshape(-1)  # time-major targets, matching the logits' rows
    loss, dlogits = softmax_cross_entropy(logits, y)
    model.backward(dlogits)  # no dstate: the gradient stops at this minibatch   (3.2)
    if clip is not None:
        clip_grad_norm(model.grads, clip)  # (6.2)
    optimizer.step(model.grads)  # (6.3)
    return loss, state


def train_epoch(model, data_iter, optimizer, clip=1.0, use_random_iter=False, on_step=None):
    """One pass over ``data_iter`` with truncated BPTT.

    Parameters
    ----------
    model : RNNLM
    data_iter : iterable of (X, Y)
        Integer arrays of shape (B, T) on the model's backend.
    optimizer : SGD
    clip : float or None, default 1.0
    use_random_iter : bool, default False
        Reset the state every minibatch (random sampling) instead of carrying it.
    on_step : callable, optional
        ``on_step(loss)`` with the float loss of every minibatch (a host sync each).

    Returns
    -------
    perplexity : float
        ``exp`` of the mean cross-entropy over every predicted token (1.5).
    tokens_per_s : float
    """
    start = time.perf_counter()
    state = None
    loss_sum, num_tokens = 0.0, 0
    for X, Y in data_iter:
        if state is None or use_random_iter:
            state = model.begin_state(X.shape[0])  # fresh zeros             (3.3)
        # else: carry the state in; its gradient is cut in train_step          (3.1)
        loss, state = train_step(model, X, Y, state, optimizer, clip)
        if on_step is not None:
            on_step(float(loss))
        loss_sum = loss_sum + loss * Y.size  # stays on the device until the end
        num_tokens += Y.size
    if num_tokens == 0:
        raise ValueError("train_epoch: the data iterator yielded no minibatch; use a longer corpus")
    mean_loss = float(loss_sum) / num_tokens  # the one host sync of the epoch
    seconds = time.perf_counter() - start
    return perplexity(mean_loss), num_tokens / seconds


def train(
    model,
    data_iter,
    vocab,
    lr,
    num_epochs,
    clip=1.0,
    use_random_iter=False,
    progress=None,
    sample_every=10,
    prefix="time traveller",
    num_preds=50,
    token="char",
    on_epoch=None,
):
    """Train ``model`` for ``num_epochs`` epochs with SGD and global-norm clipping (d2l ``train_ch8``).

    Parameters
    ----------
    model : RNNLM
    data_iter : re-iterable of (X, Y)
        One epoch per ``iter()``, e.g. :class:`npyrnn.data.SeqDataLoader`.
    vocab : Vocab
    lr : float
    num_epochs : int
    clip : float or None, default 1.0
    use_random_iter : bool, default False
    progress : bool or None, default None
        Show a tqdm bar (epoch, perplexity, tokens/s); None: only on a terminal.
    sample_every : int, default 10
        Print ``predict(prefix)`` every this many epochs (0: never). Printed only
        while a progress bar may be shown (``progress`` is not False).
    prefix : str, default 'time traveller'
    num_preds : int, default 50
    token : {'char', 'word'}
        How generated tokens are joined for the samples.
    on_epoch : callable, optional
        ``on_epoch(epoch, perplexity, tokens_per_s)`` after each epoch.

    Returns
    -------
    history : list of dict
        ``{'epoch', 'perplexity', 'tokens_per_s'}`` per epoch.
    """
    optimizer = SGD(model.params, lr)
    history = []
    bar = tqdm(range(1, num_epochs + 1), disable=(None if progress is None else not progress), unit="epoch",
               dynamic_ncols=True, leave=False)
    for epoch in bar:
        ppl, speed = train_epoch(model, data_iter, optimizer, clip, use_random_iter)
        history.append({"epoch": epoch, "perplexity": ppl, "tokens_per_s": speed})
        bar.set_postfix(perplexity=f"{ppl:.2f}", tokens_per_s=f"{speed:,.0f}")
        if progress is not False and sample_every and epoch % sample_every == 0:
            bar.write(f"epoch {epoch}: {predict(prefix, num_preds, model, vocab, token=token)!r}")
        if on_epoch is not None:
            on_epoch(epoch, ppl, speed)
    bar.close()
    return history


def _choose(logits_row, temperature, top_k, rng):
    """Next token id drawn from one row of logits, shape (V,).

    A draw from ``softmax(logits / temperature)`` restricted to the ``top_k`` largest logits.
    The probabilities are computed on the backend and drawn from on the host
    generator ``rng``, so NumPy and CuPy generate the same text from one seed.
    """
    xp = backend.get_array_module(logits_row)
    z = logits_row.astype("float64") / temperature
    if top_k is not None and top_k < z.size:  # keep exactly k, ties at the k-th logit included
        keep = xp.argpartition(z, -top_k)[-top_k:]
        kept = xp.full_like(z, -math.inf)
        kept[keep] = z[keep]
        z = kept
    p = xp.exp(z - z.max())
    p = backend.to_numpy(p / p.sum())
    return int(rng.choice(p.size, p=p))


def split_prefix(prefix, token="char"):
    """The prefix as tokens (characters or words); ValueError when there are none."""
    if not isinstance(prefix, str) or not prefix:
        raise ValueError("predict: the prefix is empty; give at least one character, e.g. --prefix 'time traveller'")
    tokens = list(prefix) if token == "char" else prefix.split()
    if not tokens:
        raise ValueError("predict: the prefix has no words; give at least one word")
    return tokens


def predict(prefix, num_preds, model, vocab, temperature=0.0, top_k=None, seed=None, token="char"):
    """Generate ``num_preds`` tokens after ``prefix`` (d2l ``predict_ch8``).

    The prefix warms the state up (one forward pass over all but its last
    token), then each step feeds the last token and picks the next one.

    Parameters
    ----------
    prefix : str
        Not empty. Characters (or words) that the vocabulary does not know map
        to ``<unk>``, with a warning.
    num_preds : int
        Tokens to generate.
    model : RNNLM
    vocab : Vocab
    temperature : float, default 0
        0 is greedy (argmax, as the seed); above 0 samples from
        ``softmax(logits / temperature)``.
    top_k : int, optional
        Sample only among the k most likely tokens (exactly k, also when
        logits tie); needs ``temperature > 0``.
    seed : int, optional
        Seed of the sampling generator (host NumPy, so both backends agree).
    token : {'char', 'word'}, default 'char'
        Whether the prefix is split into characters or words, and generated
        tokens are joined with '' or ' '.

    Returns
    -------
    str
        The prefix followed by the generated text.
    """
    tokens = split_prefix(prefix, token)
    if temperature is None or temperature < 0:
        raise ValueError(f"predict: temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"predict: top_k must be a positive integer, got {top_k!r}")
    if top_k is not None and not temperature:
        raise ValueError("predict: top_k applies only when sampling; give a temperature above 0 (e.g. 1.0)")
    if not isinstance(num_preds, int) or num_preds < 0:
        raise ValueError(f"predict: num_preds must be a non-negative integer, got {num_preds!r}")
    unknown = list(dict.fromkeys(t for t in tokens if t not in vocab.token_to_idx))  # in order of appearance
    if unknown:
        warnings.warn(
            f"prefix tokens not in the vocabulary map to <unk>: {', '.join(map(repr, unknown))}",
            stacklevel=2,
        )
    xp = backend.get_array_module(model.params["linear.weight"])
    rng = backend.default_rng(seed)
    ids = vocab[tokens]
    state = model.begin_state(1)
    if len(ids) > 1:  # warm-up: one forward pass over all but the last prefix token
        _, state = model.forward(xp.asarray([ids[:-1]]), state)
    out = xp.empty(num_preds + 1, dtype="int64")  # generated ids stay on the device
    out[0] = ids[-1]
    if model.rnn.bidirectional:  # no step-by-step form: rerun forward on one token

        def step(token):
            nonlocal state
            logits, state = model.forward(token[None, :], state)
            return logits

    else:
        step = model.stepper(state)
    for i in range(num_preds):
        logits = step(out[i : i + 1])  # (1, V)
        if temperature:
            out[i + 1] = _choose(logits[0], temperature, top_k, rng)
        else:
            out[i + 1] = logits[0].argmax()  # greedy, without a host sync on CuPy
    generated = vocab.to_tokens(backend.to_numpy(out[1:]))
    sep = "" if token == "char" else " "
    return prefix + (sep if generated and sep else "") + sep.join(generated)
