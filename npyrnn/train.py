"""Training loop (truncated BPTT), as in d2l chapter 8, resumable at any minibatch.

`train_epoch` is d2l's `train_epoch_ch8` and `train` its `train_ch8`, with the backward
pass written by hand:

    forward -> softmax cross-entropy -> backward -> clip (global norm) -> SGD

State across minibatches (`docs/derivations/truncated-bptt.md`): with sequential
minibatches each row continues the previous minibatch's row, so the final state is carried
in as the next initial state (3.1) while its gradient is cut (3.2): `backward` is called
without `dstate`. With random minibatches the state is reset to zeros every minibatch (3.3).

`Trainer` is the loop itself, written once: `train` runs it for a number of epochs, and
`npyrnn.runs` runs it with checkpoints, validation and interrupts. Everything that decides
the next parameter update (weights, optimiser state, the minibatch generator's state, the
position inside the epoch and the carried state) is in `Trainer.state_dict()`, so a run
that is stopped and resumed computes exactly what an uninterrupted run computes.
"""

import math
import sys
import time

from npyrnn import backend
from npyrnn.errors import DataError, NpyrnnError
from npyrnn.generate import predict
from npyrnn.losses import perplexity, softmax_cross_entropy
from npyrnn.optim import SGD, clip_and_step

__all__ = ["train", "train_epoch", "train_step", "evaluate", "Trainer", "Diverged", "predict"]

#: An epoch whose mean loss exceeds this many times the run's first minibatch loss has diverged.
DIVERGENCE_FACTOR = 2.0


class _PlainBar:
    """What `progress_bar` gives without tqdm: no bar; `write` prints, everything else does nothing."""

    def __init__(self, iterable=None):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n=1):
        pass

    def set_postfix(self, **kwargs):
        pass

    def write(self, text):
        print(text, file=sys.stdout, flush=True)

    def close(self):
        pass


def progress_bar(iterable=None, **kwargs):
    """A tqdm bar (`tqdm.auto.tqdm(iterable, **kwargs)`), or a plain stand-in where tqdm is not installed.

    tqdm is optional: training runs without it, with no bar (samples are still printed).
    """
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainBar(iterable)
    return tqdm(iterable, **kwargs)


class Diverged(NpyrnnError):
    """Training produced a non-finite loss or gradient norm, or a loss far above its start."""


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
    loss, state, _ = _step(model, X, Y, state, optimizer, clip)
    return loss, state


def _step(model, X, Y, state, optimizer, clip):
    """`train_step`, also returning the global gradient norm before clipping (a 0-d device array)."""
    model.zero_grad()
    logits, state = model.forward(X, state)  # (T*B, V)
    y = Y.T.reshape(-1)  # time-major targets, matching the logits' rows
    loss, dlogits = softmax_cross_entropy(logits, y)
    model.backward(dlogits)  # no dstate: the gradient stops at this minibatch   (3.2)
    if clip is not None:
        norm = clip_and_step(model.grads, clip, optimizer)  # (6.2), (6.3)
    else:
        xp = model.xp
        norm = xp.sqrt(sum(xp.vdot(g.ravel(), g.ravel()) for g in model.grads.values()))  # (6.1)
        optimizer.step(model.grads)  # (6.3)
    return loss, state, norm


def evaluate(model, corpus, batch_size, num_steps):
    """Perplexity of `model` on held-out token ids: the state carried through the text in order, no gradient.

    The text is split into `rows = min(batch_size, (N - 1) // num_steps)` equal rows (at least
    one) read side by side, window after window of `num_steps` tokens (the last window may be
    shorter), with the state carried from each window into the next, so every token but the
    first of each row is predicted from everything before it in its row. Nothing random is
    drawn, so evaluating never changes a run's minibatches.

    Parameters
    ----------
    model : RNNLM
    corpus : integer array-like, shape (N,), N >= 2
        Token ids (host or backend).
    batch_size, num_steps : int

    Returns
    -------
    float
        `exp` of the mean cross-entropy over the `rows * ((N - 1) // rows)` predicted tokens (1.5).
    """
    ids = backend.to_numpy(corpus).reshape(-1)
    n = len(ids) - 1
    if n < 1:
        raise DataError(f"evaluate: need at least 2 tokens to predict one, got {len(ids)}; give more validation tokens")
    rows = max(1, min(batch_size, n // num_steps))
    length = n // rows
    xp = model.xp
    X = xp.asarray(ids[: rows * length].reshape(rows, length))  # one host->device copy
    Y = xp.asarray(ids[1 : rows * length + 1].reshape(rows, length))
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()  # no dropout while evaluating
    try:
        state = model.begin_state(rows)
        loss_sum = 0.0
        for start in range(0, length, num_steps):
            x, y = X[:, start : start + num_steps], Y[:, start : start + num_steps]
            logits, state = model.forward(xp.ascontiguousarray(x), state)  # (T*rows, V)
            loss, _ = softmax_cross_entropy(logits, xp.ascontiguousarray(y.T).reshape(-1))
            loss_sum = loss_sum + loss * y.size  # stays on the device until the end
    finally:
        if was_training:
            model.train()
    return perplexity(float(loss_sum) / (rows * length))  # the one host sync


class Trainer:
    """The truncated-BPTT epoch loop, resumable at any minibatch.

    Parameters
    ----------
    model : RNNLM
    loader : re-iterable of (X, Y)
        One epoch per `iter()`. To save and resume in the middle of an epoch it must draw
        its randomness from a `numpy.random.Generator` in `loader.rng` when `iter()` is
        called (as `npyrnn.data.SeqDataLoader` does).
    optimizer : SGD (or any optimiser with `step(grads)`)
    clip : float or None, default 1.0
    use_random_iter : bool, default False
        Reset the state every minibatch instead of carrying it (3.3).
    cuda_graph : bool, default False
        Replay each minibatch from a CUDA graph (`npyrnn.cuda_graph.CudaGraphStep`): CuPy on a
        CUDA device, no dropout between layers, an optimiser whose update does not read the step count.

    Attributes
    ----------
    epoch : int
        Completed epochs.
    history : list of dict
        `{'epoch', 'perplexity', 'tokens_per_s'}` per completed epoch (callers may add keys).
    start_loss : float or None
        The run's first minibatch loss: the divergence test compares against it.
    seconds, tokens : float, int
        Training time and tokens over every completed epoch, across resumes.
    """

    def __init__(self, model, loader, optimizer, clip=1.0, use_random_iter=False, cuda_graph=False):
        self.model = model
        self.loader = loader
        self.optimizer = optimizer
        self.clip = clip
        self._graph_step = None
        if cuda_graph:
            from npyrnn.cuda_graph import CudaGraphStep

            self._graph_step = CudaGraphStep(model, optimizer, clip)
        self.use_random_iter = bool(use_random_iter)
        self.epoch = 0
        self.history = []
        self.start_loss = None
        self.seconds = 0.0
        self.tokens = 0
        self._pos = None  # inside an epoch: where it stands (see state_dict)

    @property
    def graph_replays(self):
        """Minibatches replayed from a CUDA graph so far (None without `cuda_graph`)."""
        return None if self._graph_step is None else self._graph_step.replays

    @property
    def in_epoch(self):
        """True when the last `run_epoch` was stopped before the end of its epoch."""
        return self._pos is not None

    @property
    def batches_done(self):
        """Minibatches done in the stopped epoch (0 between epochs)."""
        return 0 if self._pos is None else self._pos["batch"]

    def _rng(self):
        return getattr(self.loader, "rng", None)

    def run_epoch(self, should_stop=None, on_step=None):
        """Train one epoch, or the rest of a stopped one.

        Parameters
        ----------
        should_stop : callable, optional
            Asked after every minibatch; when it returns True the epoch stops there and
            can be continued by the next call (or after `state_dict`/`load_state_dict`).
        on_step : callable, optional
            `on_step(loss)` with the float loss of every minibatch (a host sync each).

        Returns
        -------
        dict or None
            The epoch's record (`epoch`, `perplexity`, `tokens_per_s`), appended to
            `history`; None when stopped early.

        Raises
        ------
        Diverged
            The epoch's mean loss or a gradient norm is not finite, or the mean loss is above
            `DIVERGENCE_FACTOR` times the run's first minibatch loss. `epoch` and `history`
            are left as they were.
        """
        model, xp, rng = self.model, self.model.xp, self._rng()
        start = time.perf_counter()
        if self._pos is None:
            self._pos = {"batch": 0, "rng_state": None if rng is None else rng.bit_generator.state,
                         "state": None, "loss_sum": 0.0, "norm_max": 0.0, "num_tokens": 0, "seconds": 0.0}
        elif rng is not None:
            rng.bit_generator.state = self._pos["rng_state"]  # the epoch's draws, once more
        pos = self._pos
        state = pos["state"]
        for i, (X, Y) in enumerate(self.loader):
            if i < pos["batch"]:
                continue  # done before the stop
            if state is None or self.use_random_iter:
                state = model.begin_state(X.shape[0])  # fresh zeros                        (3.3)
            # else: carry the state in; its gradient is cut in _step                        (3.1)
            if self._graph_step is not None:
                loss, state, norm = self._graph_step(X, Y, state)
            else:
                loss, state, norm = _step(model, X, Y, state, self.optimizer, self.clip)
            if self.start_loss is None:
                self.start_loss = float(loss)  # one host sync per run
            pos["loss_sum"] = pos["loss_sum"] + loss * Y.size  # stays on the device until the end
            pos["norm_max"] = xp.maximum(pos["norm_max"], norm)  # nan stays nan
            pos["num_tokens"] += int(Y.size)
            pos["batch"], pos["state"] = i + 1, state
            if on_step is not None:
                on_step(float(loss))
            if should_stop is not None and should_stop():
                pos["seconds"] += time.perf_counter() - start
                return None
        if pos["num_tokens"] == 0:
            self._pos = None
            raise DataError("train_epoch: the data iterator yielded no minibatch; use a longer corpus")
        loss_sum, norm_max = (float(v) for v in backend.to_numpy(xp.stack([xp.asarray(pos["loss_sum"]),
                                                                          xp.asarray(pos["norm_max"])])))
        mean_loss = loss_sum / pos["num_tokens"]  # the one host sync of the epoch
        seconds = pos["seconds"] + time.perf_counter() - start
        num_tokens = pos["num_tokens"]
        self._pos = None
        if not (math.isfinite(mean_loss) and math.isfinite(norm_max)) or mean_loss > DIVERGENCE_FACTOR * self.start_loss:
            raise Diverged(
                f"training diverged in epoch {self.epoch + 1}: mean loss {mean_loss:.4g} (first minibatch "
                f"{self.start_loss:.4g}), largest gradient norm {norm_max:.4g}; lower --lr or --clip"
            )
        self.epoch += 1
        self.seconds += seconds
        self.tokens += num_tokens
        record = {"epoch": self.epoch, "perplexity": perplexity(mean_loss), "tokens_per_s": num_tokens / seconds}
        self.history.append(record)
        return record

    def state_dict(self):
        """Everything needed to continue exactly where the loop stands (not the model's weights).

        Returns
        -------
        tensors : dict of str to array
            The carried state and the running sums of a stopped epoch (names `trainer.*`).
        meta : dict
            JSON-able: epoch, history, first loss, time and tokens so far, the minibatch
            generator's state (and its state at the start of a stopped epoch) and the position.
        """
        rng = self._rng()
        meta = {"epoch": self.epoch, "history": self.history, "start_loss": self.start_loss,
                "seconds": self.seconds, "tokens": self.tokens,
                "rng_state": None if rng is None else rng.bit_generator.state, "position": None}
        tensors = {}
        if self._pos is not None:
            if rng is None:
                raise ValueError("Trainer.state_dict: the loader has no rng, so a stopped epoch cannot be saved")
            pos, xp = self._pos, self.model.xp
            state = pos["state"]
            parts = [] if state is None else list(state) if isinstance(state, tuple) else [state]
            for k, part in enumerate(parts):
                tensors[f"trainer.state.{k}"] = part
            tensors["trainer.loss_sum"] = xp.asarray(pos["loss_sum"])
            tensors["trainer.norm_max"] = xp.asarray(pos["norm_max"])
            meta["position"] = {"batch": pos["batch"], "rng_state": pos["rng_state"], "num_tokens": pos["num_tokens"],
                                "seconds": pos["seconds"], "state_parts": len(parts),
                                "state_is_tuple": isinstance(state, tuple)}
        return tensors, meta

    def load_state_dict(self, tensors, meta):
        """Restore what `state_dict` returned (tensors may be host arrays: they move to the model's backend)."""
        xp = self.model.xp
        self.epoch, self.history = int(meta["epoch"]), [dict(r) for r in meta["history"]]
        self.start_loss, self.seconds, self.tokens = meta["start_loss"], float(meta["seconds"]), int(meta["tokens"])
        rng = self._rng()
        if rng is not None and meta.get("rng_state") is not None:
            rng.bit_generator.state = meta["rng_state"]
        position = meta.get("position")
        if position is None:
            self._pos = None
            return
        parts = [xp.asarray(tensors[f"trainer.state.{k}"]) for k in range(position["state_parts"])]
        state = tuple(parts) if position["state_is_tuple"] else (parts[0] if parts else None)
        self._pos = {"batch": int(position["batch"]), "rng_state": position["rng_state"], "state": state,
                     "loss_sum": xp.asarray(tensors["trainer.loss_sum"]).reshape(()),
                     "norm_max": xp.asarray(tensors["trainer.norm_max"]).reshape(()),
                     "num_tokens": int(position["num_tokens"]), "seconds": float(position["seconds"])}


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
    record = Trainer(model, data_iter, optimizer, clip, use_random_iter).run_epoch(on_step=on_step)
    return record["perplexity"], record["tokens_per_s"]


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
    trainer = Trainer(model, data_iter, SGD(model.params, lr), clip, use_random_iter)
    bar = progress_bar(range(1, num_epochs + 1), disable=(None if progress is None else not progress), unit="epoch",
               dynamic_ncols=True, leave=False)
    for epoch in bar:
        record = trainer.run_epoch()
        ppl, speed = record["perplexity"], record["tokens_per_s"]
        bar.set_postfix(perplexity=f"{ppl:.2f}", tokens_per_s=f"{speed:,.0f}")
        if progress is not False and sample_every and epoch % sample_every == 0:
            bar.write(f"epoch {epoch}: {predict(prefix, num_preds, model, vocab, token=token)!r}")
        if on_epoch is not None:
            on_epoch(epoch, ppl, speed)
    bar.close()
    return trainer.history
