"""Training loop (truncated BPTT), as in d2l chapter 8.

`train_epoch` is d2l's `train_epoch_ch8` and `train` its `train_ch8`, with the backward
pass written by hand:

    forward -> softmax cross-entropy -> backward -> clip (global norm) -> SGD

State across minibatches (``docs/derivations/truncated-bptt.md``): with
sequential minibatches each row continues the previous minibatch's row, so the
final state is carried in as the next initial state (3.1) while its gradient
is cut (3.2): ``backward`` is called without ``dstate``. With random
minibatches the state is reset to zeros every minibatch (3.3).
"""

import time

from tqdm.auto import tqdm

from npyrnn.errors import DataError
from npyrnn.generate import predict
from npyrnn.losses import perplexity, softmax_cross_entropy
from npyrnn.optim import SGD, clip_grad_norm

__all__ = ["train", "train_epoch", "train_step", "predict"]  # predict lives in npyrnn.generate


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
        raise DataError("train_epoch: the data iterator yielded no minibatch; use a longer corpus")
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
        One epoch per ``iter()``, e.g. `npyrnn.data.SeqDataLoader`.
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
