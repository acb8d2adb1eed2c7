"""The torch references that npyrnn is checked and measured against, each written once.

Used by the tests (``from reference import ...``: pytest puts tests/ on ``sys.path``) and by
benchmarks/ (``from tests.reference import ...`` after putting the repository root on
``sys.path``). Everything here is torch and runs on the CPU; d2l's ``device`` arguments are
dropped. Sections:

1. Layers: ``torch.nn.RNN`` holding an ``npyrnn.nn.RNN``'s weights.
2. d2l chapter 8, concise: ``RNNModel`` (a torch recurrent layer + ``nn.Linear``, one-hot input).
3. d2l chapter 8, scratch: ``get_params``, ``init_rnn_state``, ``rnn``, ``RNNModelScratch``.
4. d2l chapter 8, training and generation: ``grad_clipping``, ``sgd``, ``train_epoch_ch8``,
   ``predict_ch8``.

A twin built from an npyrnn model holds copies of its weights, in the model's dtype, so that
both sides do the same arithmetic.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

from npyrnn import backend


def _tensor(array):
    """A torch tensor holding a copy of an npyrnn array (on any backend)."""
    return torch.from_numpy(backend.to_numpy(array).copy())


# ------------------------------------------------------------------------ 1. layers


def rnn_twin(rnn):
    """A ``torch.nn.RNN`` holding ``rnn``'s weights (an ``npyrnn.nn.RNN``, float32 or float64).

    The parameter names and their order must be torch's: the twin asserts it.
    """
    net = nn.RNN(
        rnn.input_size,
        rnn.hidden_size,
        num_layers=rnn.num_layers,
        nonlinearity=rnn.nonlinearity,
        bias=rnn.bias,
        batch_first=rnn.batch_first,
        bidirectional=rnn.bidirectional,
        dtype=getattr(torch, rnn.dtype),
    )
    names = [n for n, _ in net.named_parameters()]
    assert names == list(rnn.params), "parameter names or order differ from torch"
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(_tensor(rnn.params[n]))
    return net


# ------------------------------------------------------------------------ 2. d2l's concise model


class RNNModel(nn.Module):
    """d2l chapter 8's concise RNN model, verbatim in substance.

    The one-hot input takes the dtype of the output layer (d2l: float32), so that the same
    model runs in float64 for the gradient checks.
    """

    def __init__(self, rnn_layer, vocab_size):
        super().__init__()
        self.rnn = rnn_layer
        self.vocab_size = vocab_size
        self.num_hiddens = self.rnn.hidden_size
        self.num_directions = 2 if self.rnn.bidirectional else 1
        self.linear = nn.Linear(self.num_hiddens * self.num_directions, self.vocab_size)

    def forward(self, inputs, state):
        X = F.one_hot(inputs.T.long(), self.vocab_size).to(self.linear.weight.dtype)
        Y, state = self.rnn(X, state)
        output = self.linear(Y.reshape((-1, Y.shape[-1])))
        return output, state

    def begin_state(self, batch_size=1):
        """Zeros of shape (num_directions * num_layers, batch_size, num_hiddens) (d2l; not for LSTM)."""
        return torch.zeros((self.num_directions * self.rnn.num_layers, batch_size, self.num_hiddens),
                           dtype=self.linear.weight.dtype)


def concise_twin(model):
    """d2l's ``RNNModel`` holding an ``npyrnn.models.RNNLM``'s weights, loaded through its state dict.

    npyrnn uses torch's parameter names, so the state dicts match key for key (``strict=True``).
    """
    dtype = getattr(torch, model.dtype)
    layer = nn.RNN(model.vocab_size, model.num_hiddens, num_layers=model.rnn.num_layers,
                   nonlinearity=model.rnn.nonlinearity, bidirectional=model.rnn.bidirectional, dtype=dtype)
    net = RNNModel(layer, model.vocab_size).to(dtype)
    net.load_state_dict({k: _tensor(v) for k, v in model.state_dict().items()}, strict=True)
    return net


# ------------------------------------------------------------------------ 3. d2l's scratch model


def get_params(vocab_size, num_hiddens):
    """d2l's ``get_params``: ``[W_xh (V,H), W_hh (H,H), b_h (H,), W_hq (H,V), b_q (V,)]``.

    Weights N(0, 0.01^2) from torch's global generator, biases zero, all requiring grad.
    """
    num_inputs = num_outputs = vocab_size

    def normal(shape):
        return torch.randn(size=shape) * 0.01

    W_xh = normal((num_inputs, num_hiddens))
    W_hh = normal((num_hiddens, num_hiddens))
    b_h = torch.zeros(num_hiddens)
    W_hq = normal((num_hiddens, num_outputs))
    b_q = torch.zeros(num_outputs)
    params = [W_xh, W_hh, b_h, W_hq, b_q]
    for param in params:
        param.requires_grad_(True)
    return params


def init_rnn_state(batch_size, num_hiddens, dtype=torch.float32):
    """d2l's ``init_rnn_state``: a one-tuple holding zeros of shape (batch_size, num_hiddens)."""
    return (torch.zeros((batch_size, num_hiddens), dtype=dtype),)


def rnn(inputs, state, params):
    """d2l's ``rnn``: a Python loop over the T one-hot inputs (T, B, V); returns (logits (T*B, V), (H,))."""
    W_xh, W_hh, b_h, W_hq, b_q = params
    (H,) = state
    outputs = []
    for X in inputs:
        H = torch.tanh(torch.mm(X, W_xh) + torch.mm(H, W_hh) + b_h)
        Y = torch.mm(H, W_hq) + b_q
        outputs.append(Y)
    return torch.cat(outputs, dim=0), (H,)


class RNNModelScratch:
    """d2l's ``RNNModelScratch``: parameters from ``get_params``, a forward function, a state initialiser.

    ``params`` may be given instead of ``get_params`` (a list in ``get_params``' order), which is
    how ``scratch_twin`` hands over an npyrnn model's weights. The one-hot input takes the
    parameters' dtype (d2l: float32).
    """

    def __init__(self, vocab_size, num_hiddens, get_params=get_params, init_state=init_rnn_state, forward_fn=rnn,
                 params=None):
        self.vocab_size, self.num_hiddens = vocab_size, num_hiddens
        self.params = get_params(vocab_size, num_hiddens) if params is None else params
        self.init_state, self.forward_fn = init_state, forward_fn

    def __call__(self, X, state):
        X = F.one_hot(X.T.long(), self.vocab_size).type(self.params[0].dtype)
        return self.forward_fn(X, state, self.params)

    def begin_state(self, batch_size=1):
        return self.init_state(batch_size, self.num_hiddens, self.params[0].dtype)

    def parameters(self):
        return self.params


def scratch_twin(model):
    """d2l's ``RNNModelScratch`` holding a one-layer, one-direction tanh ``RNNLM``'s weights.

    Transposed to d2l's (in, out) layout: ``W_xh = weight_ih_l0^T``, ``W_hh = weight_hh_l0^T``,
    ``W_hq = linear.weight^T``; d2l has one hidden bias, ``b_h = bias_ih_l0 + bias_hh_l0``
    (so float32 results differ from npyrnn's in the last bits: the biases are added in another order).
    The gradient of ``b_h`` is the gradient of each of npyrnn's two biases.
    """
    if model.rnn.num_layers != 1 or model.rnn.bidirectional or model.rnn.nonlinearity != "tanh":
        raise ValueError("d2l's scratch model has one layer, one direction and tanh; build such an RNNLM")
    p = {k: _tensor(v) for k, v in model.state_dict().items()}
    params = [
        p["rnn.weight_ih_l0"].T,
        p["rnn.weight_hh_l0"].T,
        p["rnn.bias_ih_l0"] + p["rnn.bias_hh_l0"],
        p["linear.weight"].T,
        p["linear.bias"],
    ]
    params = [t.contiguous().clone().requires_grad_(True) for t in params]
    return RNNModelScratch(model.vocab_size, model.num_hiddens, params=params)


# ------------------------------------------------------------------------ 4. d2l's training and generation


def grad_clipping(net, theta):
    """d2l's ``grad_clipping``: rescale all gradients by theta / norm when their global norm exceeds theta.

    The same rescaling as ``torch.nn.utils.clip_grad_norm_``, without torch's ``eps``.
    """
    if isinstance(net, nn.Module):
        params = [p for p in net.parameters() if p.requires_grad]
    else:
        params = net.params
    norm = torch.sqrt(sum(torch.sum(p.grad**2) for p in params))
    if norm > theta:
        for param in params:
            param.grad[:] *= theta / norm


def sgd(params, lr, batch_size):
    """d2l's ``sgd``: ``param -= lr * grad / batch_size`` and zero the gradient, under ``no_grad``."""
    with torch.no_grad():
        for param in params:
            param -= lr * param.grad / batch_size
            param.grad.zero_()


def train_epoch_ch8(net, train_iter, updater, clip=1.0, use_random_iter=False):
    """d2l's ``train_epoch_ch8`` without its timer: one pass, truncated BPTT; returns (perplexity, tokens).

    ``train_iter`` yields integer arrays X, Y of shape (B, T) on either backend (copied to the host). ``updater`` is a
    ``torch.optim.Optimizer`` (concise model) or ``updater(batch_size)`` (d2l's scratch model:
    ``lambda batch_size: sgd(net.params, lr, batch_size)``, called with 1 as d2l does). The state
    is carried across minibatches with its gradient cut (``detach_``) unless ``use_random_iter``.
    The loss is cross-entropy averaged over the T*B tokens; clipping is d2l's ``grad_clipping``.
    """
    state, loss_sum, num_tokens = None, 0.0, 0
    for X, Y in train_iter:
        X, Y = torch.from_numpy(backend.to_numpy(X)), torch.from_numpy(backend.to_numpy(Y))  # any backend
        if state is None or use_random_iter:
            state = net.begin_state(batch_size=X.shape[0])
        else:
            for s in state if isinstance(state, tuple) else (state,):
                s.detach_()
        y = Y.T.reshape(-1)
        y_hat, state = net(X, state)
        loss = F.cross_entropy(y_hat, y.long()).mean()
        if isinstance(updater, torch.optim.Optimizer):
            updater.zero_grad()
            loss.backward()
            grad_clipping(net, clip)
            updater.step()
        else:
            loss.backward()
            grad_clipping(net, clip)
            updater(batch_size=1)
        loss_sum += float(loss.detach()) * y.numel()  # d2l's Accumulator: metric.add(l * y.numel(), y.numel())
        num_tokens += y.numel()
    return math.exp(loss_sum / num_tokens), num_tokens


def predict_ch8(prefix, num_preds, net, vocab):
    """d2l's ``predict_ch8``: warm up on the prefix one token at a time, then greedy (argmax), batch 1.

    Run it under ``torch.no_grad()`` to time generation alone.
    """
    state = net.begin_state(batch_size=1)
    outputs = [vocab[prefix[0]]]

    def get_input():
        return torch.tensor([outputs[-1]]).reshape((1, 1))

    for y in prefix[1:]:  # warm-up period
        _, state = net(get_input(), state)
        outputs.append(vocab[y])
    for _ in range(num_preds):  # predict num_preds steps
        y, state = net(get_input(), state)
        outputs.append(int(y.argmax(dim=1).reshape(1)))
    return "".join([vocab.idx_to_token[i] for i in outputs])
