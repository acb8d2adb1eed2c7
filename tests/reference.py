"""The torch references that npyrnn is checked and measured against, each written once.

Used by the tests (``from reference import ...``: pytest puts tests/ on ``sys.path``) and by
benchmarks/ (``from tests.reference import ...`` after putting the repository root on
``sys.path``). Everything here is torch and runs on the CPU; d2l's ``device`` arguments are
dropped. Sections:

1. Layers: ``torch.nn.RNN`` holding an ``npyrnn.nn.RNN``'s weights.
2. d2l chapters 8 and 9, concise: ``RNNModel`` (a torch recurrent layer + ``nn.Linear``, one-hot
   input) and ``concise_twin`` (any cell).
3. d2l chapter 8, scratch: ``get_params``, ``init_rnn_state``, ``rnn``, ``RNNModelScratch``.
4. d2l chapter 8, training and generation: ``grad_clipping``, ``sgd``, ``train_epoch_ch8``,
   ``predict_ch8``.
5. Every cell: ``torch_layer(layer)``, a ``torch.nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` holding an
   npyrnn layer's weights (loaded by name, so names and order are checked too), and
   ``scratch_stack(layer, x, state, masks)``, the same stack written step by step in torch
   autograd as d2l's chapter 9 scratch models are, with dropout masks between layers; it also
   covers the GRU with the reset gate before the product (``reset_after=False``).
6. d2l chapter 9, scratch: ``get_gru_params`` (d2l 9.1's ``get_params``), ``init_gru_state``, ``gru``;
   ``get_lstm_params``, ``init_lstm_state``, ``lstm`` (9.2); ``scratch_cell_twin(model)`` loads an
   ``RNNLM(cell='gru', reset_after=False)`` or ``RNNLM(cell='lstm')`` into d2l's ``RNNModelScratch``.
   The concise models of chapter 9 are ``RNNModel(nn.GRU(...))`` / ``RNNModel(nn.LSTM(...))``:
   ``concise_twin`` builds them for any cell.

A twin built from an npyrnn model holds copies of its weights, in the model's dtype, so that
both sides do the same arithmetic.
"""

import math

import numpy as np

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
        # npyrnn's generalisation: with nn.LSTM(proj_size=P) the output layer reads h of size P
        self.linear = nn.Linear((getattr(self.rnn, "proj_size", 0) or self.num_hiddens) * self.num_directions,
                                self.vocab_size)

    def forward(self, inputs, state):
        X = F.one_hot(inputs.T.long(), self.vocab_size).to(self.linear.weight.dtype)
        Y, state = self.rnn(X, state)
        output = self.linear(Y.reshape((-1, Y.shape[-1])))
        return output, state

    def begin_state(self, batch_size=1):
        """Zeros (num_directions * num_layers, batch_size, num_hiddens); a pair (h, c) for nn.LSTM (d2l 9.2)."""
        shape = (self.num_directions * self.rnn.num_layers, batch_size)
        dtype = self.linear.weight.dtype
        if not isinstance(self.rnn, nn.LSTM):
            return torch.zeros(shape + (self.num_hiddens,), dtype=dtype)
        P = getattr(self.rnn, "proj_size", 0) or self.num_hiddens
        return torch.zeros(shape + (P,), dtype=dtype), torch.zeros(shape + (self.num_hiddens,), dtype=dtype)


def concise_twin(model):
    """d2l's ``RNNModel`` holding an ``npyrnn.models.RNNLM``'s weights, loaded through its state dict.

    Any cell: ``nn.RNN``, ``nn.GRU`` (``reset_after=True`` only: torch has no other) or ``nn.LSTM``
    (with ``proj_size``), with the model's layers, directions and dropout (torch applies it in
    training mode only, as npyrnn). npyrnn uses torch's parameter names, so the state dicts
    match key for key (``strict=True``).
    """
    dtype = getattr(torch, model.dtype)
    rnn = model.rnn
    kwargs = dict(num_layers=rnn.num_layers, bidirectional=rnn.bidirectional, dropout=rnn.dropout, dtype=dtype)
    if model.cell == "rnn":
        layer = nn.RNN(model.vocab_size, model.num_hiddens, nonlinearity=rnn.nonlinearity, **kwargs)
    elif model.cell == "gru":
        if not rnn.reset_after:
            raise ValueError("torch.nn.GRU has only reset_after=True; use scratch_cell_twin for d2l's scratch GRU")
        layer = nn.GRU(model.vocab_size, model.num_hiddens, **kwargs)
    else:
        layer = nn.LSTM(model.vocab_size, model.num_hiddens, proj_size=rnn.proj_size, **kwargs)
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


def train_epoch_ch8(net, train_iter, updater, clip=1.0, use_random_iter=False, on_step=None):
    """d2l's ``train_epoch_ch8`` without its timer: one pass, truncated BPTT; returns (perplexity, tokens).

    ``train_iter`` yields integer arrays X, Y of shape (B, T) on either backend (copied to the host). ``updater`` is a
    ``torch.optim.Optimizer`` (concise model) or ``updater(batch_size)`` (d2l's scratch model:
    ``lambda batch_size: sgd(net.params, lr, batch_size)``, called with 1 as d2l does). The state
    is carried across minibatches with its gradient cut (``detach_``) unless ``use_random_iter``.
    The loss is cross-entropy averaged over the T*B tokens; clipping is d2l's ``grad_clipping``.
    ``on_step(loss)``, when given, receives each minibatch's loss as a float (not d2l's: for the tests).
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
        if on_step is not None:
            on_step(float(loss.detach()))
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


# ------------------------------------------------------------------------ 5. every cell

TORCH_CLASSES = {"RNN": torch.nn.RNN, "GRU": torch.nn.GRU, "LSTM": torch.nn.LSTM}


def to_torch(a):
    """A torch tensor holding a copy of a numpy or cupy array."""
    return torch.from_numpy(np.array(backend.to_numpy(a), copy=True))


def torch_layer(layer):
    """`torch.nn.RNN`, `nn.GRU` or `nn.LSTM` with the configuration and weights of an npyrnn layer."""
    kind = type(layer).__name__
    kwargs = dict(
        num_layers=layer.num_layers,
        bias=layer.bias,
        batch_first=layer.batch_first,
        bidirectional=layer.bidirectional,
        dtype=getattr(torch, layer.dtype),
    )
    if kind == "RNN":
        kwargs["nonlinearity"] = layer.nonlinearity
    if kind == "LSTM":
        kwargs["proj_size"] = layer.proj_size
    if kind == "GRU" and not layer.reset_after:
        raise ValueError("torch.nn.GRU has only reset_after=True; use scratch_stack")
    net = TORCH_CLASSES[kind](layer.input_size, layer.hidden_size, **kwargs)
    names = [n for n, _ in net.named_parameters()]
    assert names == list(layer.params), f"parameter names or order differ from torch: {names} != {list(layer.params)}"
    with torch.no_grad():
        for n, p in net.named_parameters():
            assert tuple(p.shape) == tuple(layer.params[n].shape), n
            p.copy_(to_torch(layer.params[n]))
    return net


# ------------------------------------------------------------------------------ scratch steps
# One step of each cell, in d2l's scratch style: row vectors, torch's stacked gate rows split.


def rnn_step(layer, X, H, W_ih, W_hh, b):
    f = torch.tanh if layer.nonlinearity == "tanh" else torch.relu
    return f(X @ W_ih.T + H @ W_hh.T + b),


def gru_step(layer, X, H, W_ih, W_hh, b_ih, b_hh):
    """d2l 9.1's `gru` step; with reset_after, torch's n gate."""
    W_xr, W_xz, W_xh = W_ih.chunk(3)
    W_hr, W_hz, W_hh_ = W_hh.chunk(3)
    b_ir, b_iz, b_in = b_ih.chunk(3)
    b_hr, b_hz, b_hn = b_hh.chunk(3)
    R = torch.sigmoid(X @ W_xr.T + H @ W_hr.T + b_ir + b_hr)
    Z = torch.sigmoid(X @ W_xz.T + H @ W_hz.T + b_iz + b_hz)
    if layer.reset_after:
        H_tilda = torch.tanh(X @ W_xh.T + b_in + R * (H @ W_hh_.T + b_hn))
    else:
        H_tilda = torch.tanh(X @ W_xh.T + (R * H) @ W_hh_.T + b_in + b_hn)
    return Z * H + (1 - Z) * H_tilda,


def lstm_step(layer, X, H, C, W_ih, W_hh, b_ih, b_hh, W_hr):
    """d2l 9.2's `lstm` step, with torch's projection h = (o * tanh(c)) W_hr^T."""
    gates = X @ W_ih.T + H @ W_hh.T + b_ih + b_hh
    a_i, a_f, a_g, a_o = gates.chunk(4, dim=-1)
    I, F, O = torch.sigmoid(a_i), torch.sigmoid(a_f), torch.sigmoid(a_o)
    C_tilda = torch.tanh(a_g)
    C = F * C + I * C_tilda
    H = O * torch.tanh(C)
    if W_hr is not None:
        H = H @ W_hr.T
    return H, C


def scratch_stack(layer, x, h0=None, c0=None, masks=None):
    """The layer's forward in torch autograd, step by step, with `masks` between layers.

    Parameters
    ----------
    layer : npyrnn RNN, GRU or LSTM (its configuration and weights are read)
    x : torch tensor, (T, B, I) float, or (B, T, I) when batch_first (one-hot for token ids)
    h0, c0 : torch tensors (L*D, B, P) and (L*D, B, H), or None for zeros
    masks : list of torch tensors (T, B, D*P), one per layer above the first, or None

    Returns
    -------
    out, h_n, c_n (c_n None for RNN and GRU), params : dict of leaf tensors requiring grad
    """
    kind = type(layer).__name__
    dtype = getattr(torch, layer.dtype)
    params = {n: to_torch(p).requires_grad_(True) for n, p in layer.params.items()}
    L, D, H, P = layer.num_layers, layer.num_directions, layer.hidden_size, layer.output_size
    if layer.batch_first:
        x = x.transpose(0, 1)
    T, B = x.shape[0], x.shape[1]
    if h0 is None:
        h0 = torch.zeros(L * D, B, P, dtype=dtype)
    if kind == "LSTM" and c0 is None:
        c0 = torch.zeros(L * D, B, H, dtype=dtype)
    h_n, c_n, inp = [], [], x
    for k in range(L):
        if k > 0 and masks is not None:
            inp = inp * masks[k - 1]
        outs = []
        for d, suffix in enumerate(("", "_reverse")[:D]):
            p = {name: params.get(f"{name}_l{k}{suffix}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")}
            zeros = torch.zeros(layer.GATES * H, dtype=dtype)
            b_ih = p["bias_ih"] if layer.bias else zeros
            b_hh = p["bias_hh"] if layer.bias else zeros
            Hst = h0[k * D + d]
            Cst = None if c0 is None else c0[k * D + d]
            ys = [None] * T
            for t in (range(T - 1, -1, -1) if d == 1 else range(T)):
                if kind == "RNN":
                    (Hst,) = rnn_step(layer, inp[t], Hst, p["weight_ih"], p["weight_hh"], b_ih + b_hh)
                elif kind == "GRU":
                    (Hst,) = gru_step(layer, inp[t], Hst, p["weight_ih"], p["weight_hh"], b_ih, b_hh)
                else:
                    Hst, Cst = lstm_step(layer, inp[t], Hst, Cst, p["weight_ih"], p["weight_hh"], b_ih, b_hh, p["weight_hr"])
                ys[t] = Hst
            outs.append(torch.stack(ys))
            h_n.append(Hst)
            c_n.append(Cst)
        inp = torch.cat(outs, dim=2)
    out = inp.transpose(0, 1) if layer.batch_first else inp
    return out, torch.stack(h_n), (torch.stack(c_n) if kind == "LSTM" else None), params


# ------------------------------------------------------------------------ 6. d2l chapter 9, scratch GRU and LSTM


def _normal(shape):
    return torch.randn(size=shape) * 0.01


def get_gru_params(vocab_size, num_hiddens):
    """d2l 9.1's ``get_params`` (renamed beside chapter 8's): one (W_x*, W_h*, b_*) triple per gate.

    Returns ``[W_xz, W_hz, b_z, W_xr, W_hr, b_r, W_xh, W_hh, b_h, W_hq, b_q]``, weights N(0, 0.01^2)
    in d2l's (in, out) layout, biases zero, all requiring grad.
    """
    num_inputs = num_outputs = vocab_size

    def three():
        return (_normal((num_inputs, num_hiddens)), _normal((num_hiddens, num_hiddens)), torch.zeros(num_hiddens))

    W_xz, W_hz, b_z = three()  # Update gate parameters
    W_xr, W_hr, b_r = three()  # Reset gate parameters
    W_xh, W_hh, b_h = three()  # Candidate hidden state parameters
    W_hq = _normal((num_hiddens, num_outputs))
    b_q = torch.zeros(num_outputs)
    params = [W_xz, W_hz, b_z, W_xr, W_hr, b_r, W_xh, W_hh, b_h, W_hq, b_q]
    for param in params:
        param.requires_grad_(True)
    return params


def init_gru_state(batch_size, num_hiddens, dtype=torch.float32):
    """d2l 9.1's ``init_gru_state``: a one-tuple holding zeros (batch_size, num_hiddens)."""
    return (torch.zeros((batch_size, num_hiddens), dtype=dtype),)


def gru(inputs, state, params):
    """d2l 9.1's ``gru``: the reset gate multiplies h before the recurrent product (``reset_after=False``)."""
    W_xz, W_hz, b_z, W_xr, W_hr, b_r, W_xh, W_hh, b_h, W_hq, b_q = params
    (H,) = state
    outputs = []
    for X in inputs:
        Z = torch.sigmoid((X @ W_xz) + (H @ W_hz) + b_z)
        R = torch.sigmoid((X @ W_xr) + (H @ W_hr) + b_r)
        H_tilda = torch.tanh((X @ W_xh) + ((R * H) @ W_hh) + b_h)
        H = Z * H + (1 - Z) * H_tilda
        Y = H @ W_hq + b_q
        outputs.append(Y)
    return torch.cat(outputs, dim=0), (H,)


def get_lstm_params(vocab_size, num_hiddens):
    """d2l 9.2's ``get_lstm_params``, one (W_x*, W_h*, b_*) triple per gate.

    Returns ``[W_xi, W_hi, b_i, W_xf, W_hf, b_f, W_xo, W_ho, b_o, W_xc, W_hc, b_c, W_hq, b_q]``.
    """
    num_inputs = num_outputs = vocab_size

    def three():
        return (_normal((num_inputs, num_hiddens)), _normal((num_hiddens, num_hiddens)), torch.zeros(num_hiddens))

    W_xi, W_hi, b_i = three()  # Input gate parameters
    W_xf, W_hf, b_f = three()  # Forget gate parameters
    W_xo, W_ho, b_o = three()  # Output gate parameters
    W_xc, W_hc, b_c = three()  # Candidate memory cell parameters
    W_hq = _normal((num_hiddens, num_outputs))
    b_q = torch.zeros(num_outputs)
    params = [W_xi, W_hi, b_i, W_xf, W_hf, b_f, W_xo, W_ho, b_o, W_xc, W_hc, b_c, W_hq, b_q]
    for param in params:
        param.requires_grad_(True)
    return params


def init_lstm_state(batch_size, num_hiddens, dtype=torch.float32):
    """d2l 9.2's ``init_lstm_state``: (H, C), zeros of shape (batch_size, num_hiddens) each."""
    return (torch.zeros((batch_size, num_hiddens), dtype=dtype), torch.zeros((batch_size, num_hiddens), dtype=dtype))


def lstm(inputs, state, params):
    """d2l 9.2's ``lstm``."""
    [W_xi, W_hi, b_i, W_xf, W_hf, b_f, W_xo, W_ho, b_o, W_xc, W_hc, b_c, W_hq, b_q] = params
    (H, C) = state
    outputs = []
    for X in inputs:
        I = torch.sigmoid((X @ W_xi) + (H @ W_hi) + b_i)  # noqa: E741 (d2l's name)
        F = torch.sigmoid((X @ W_xf) + (H @ W_hf) + b_f)
        O = torch.sigmoid((X @ W_xo) + (H @ W_ho) + b_o)  # noqa: E741
        C_tilda = torch.tanh((X @ W_xc) + (H @ W_hc) + b_c)
        C = F * C + I * C_tilda
        H = O * torch.tanh(C)
        Y = (H @ W_hq) + b_q
        outputs.append(Y)
    return torch.cat(outputs, dim=0), (H, C)


# npyrnn's gate rows (torch's order) for each of d2l's gates, in d2l's parameter order
D2L_GATES = {"gru": ("z", "r", "n"), "lstm": ("i", "f", "o", "g")}
TORCH_ROWS = {"gru": "rzn", "lstm": "ifgo"}


def scratch_cell_twin(model, biases="two"):
    """d2l's ``RNNModelScratch`` with ``gru`` or ``lstm`` holding an RNNLM's weights.

    For ``RNNLM(cell='gru', reset_after=False)`` (d2l's GRU) or ``RNNLM(cell='lstm')``, one layer,
    one direction, no projection. Each gate's rows of ``weight_ih_l0`` / ``weight_hh_l0`` become
    d2l's ``W_x*`` / ``W_h*`` (transposed to d2l's (in, out) layout); ``linear`` becomes ``W_hq``, ``b_q``.

    d2l has one bias per gate where npyrnn (torch's layout) has two, ``b_ih`` and ``b_hh``:

    - ``biases='one'``: d2l's bias is a leaf holding ``b_ih + b_hh``. The same function and the
      same gradient (d2l's bias gradient is the gradient of each of npyrnn's two biases), but SGD
      moves that one leaf half as far as npyrnn moves the sum of its two, and ``grad_clipping``
      counts its gradient once instead of twice: for one forward/backward only.
    - ``biases='two'`` (training): ``net.params`` is d2l's list with ``b_ih``'s part in each bias
      place, followed by the ``b_hh`` parts as leaves of their own; the forward function adds them
      into d2l's bias before calling d2l's ``gru`` / ``lstm`` unchanged. d2l's ``sgd`` and
      ``grad_clipping`` then see exactly npyrnn's parameters, so training follows npyrnn step for step.
    """
    rnn_ = model.rnn
    if model.cell not in D2L_GATES or rnn_.num_layers != 1 or rnn_.bidirectional or getattr(rnn_, "proj_size", 0) \
            or (model.cell == "gru" and rnn_.reset_after) or not rnn_.bias:
        raise ValueError("d2l's scratch GRU/LSTM has one layer, one direction, biases, no projection and (GRU) the "
                         "reset gate before the product; build RNNLM(cell='gru', reset_after=False) or cell='lstm' so")
    if biases not in ("one", "two"):
        raise ValueError(f"biases must be 'one' or 'two', got {biases!r}")
    p = {k: _tensor(v) for k, v in model.state_dict().items()}
    rows = TORCH_ROWS[model.cell]
    W_ih, W_hh = (dict(zip(rows, p[f"rnn.{n}_l0"].chunk(len(rows)))) for n in ("weight_ih", "weight_hh"))
    b_ih, b_hh = (dict(zip(rows, p[f"rnn.{n}_l0"].chunk(len(rows)))) for n in ("bias_ih", "bias_hh"))
    params, extra = [], []
    for gate in D2L_GATES[model.cell]:
        params += [W_ih[gate].T, W_hh[gate].T, b_ih[gate] + b_hh[gate] if biases == "one" else b_ih[gate]]
        if biases == "two":
            extra.append(b_hh[gate])
    params += [p["linear.weight"].T, p["linear.bias"]]
    params = [t.contiguous().clone().requires_grad_(True) for t in params + extra]
    cell_fn, init_state = (gru, init_gru_state) if model.cell == "gru" else (lstm, init_lstm_state)
    n = 3 * len(D2L_GATES[model.cell]) + 2  # d2l's list

    if biases == "one":
        forward_fn = cell_fn
    else:
        def forward_fn(inputs, state, params):
            d2l = list(params[:n])
            for j, b in enumerate(params[n:]):
                d2l[3 * j + 2] = d2l[3 * j + 2] + b  # d2l's one bias per gate = b_ih + b_hh
            return cell_fn(inputs, state, d2l)

    return RNNModelScratch(model.vocab_size, model.num_hiddens, init_state=init_state, forward_fn=forward_fn,
                           params=params)


def scratch_cell_as_npyrnn(model, arrays, biases="two"):
    """``scratch_cell_twin``'s parameters (or their gradients), a list of host arrays in ``net.params``'
    order, under npyrnn's names and layouts.

    With ``biases='one'`` d2l's bias stands for each of npyrnn's two (its gradient is theirs).
    """
    rows = TORCH_ROWS[model.cell]
    gates = D2L_GATES[model.cell]
    n = 3 * len(gates) + 2
    by_gate = {g: arrays[3 * j: 3 * j + 3] for j, g in enumerate(gates)}
    hh = dict(zip(gates, arrays[n:])) if biases == "two" else {g: by_gate[g][2] for g in gates}
    return {
        "rnn.weight_ih_l0": np.concatenate([by_gate[g][0].T for g in rows]),
        "rnn.weight_hh_l0": np.concatenate([by_gate[g][1].T for g in rows]),
        "rnn.bias_ih_l0": np.concatenate([by_gate[g][2] for g in rows]),
        "rnn.bias_hh_l0": np.concatenate([hh[g] for g in rows]),
        "linear.weight": arrays[n - 2].T,
        "linear.bias": arrays[n - 1],
    }
