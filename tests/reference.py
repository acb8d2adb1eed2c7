"""Torch twins of npyrnn's recurrent layers, for the tests only (torch is never imported by npyrnn).

- `torch_layer(layer)`: a `torch.nn.RNN` / `nn.GRU` / `nn.LSTM` holding the layer's weights,
  loaded by name, so the parameter names and order are checked too.
- `scratch_stack(layer, x, state, masks)`: the same stack written step by step in torch
  autograd, as d2l's scratch models are (chapter 9.1 GRU, 9.2 LSTM), with the dropout masks of
  a training-mode forward call applied between layers. It also covers what torch.nn has not:
  the GRU with the reset gate before the product (`reset_after=False`, d2l's and the paper's).
"""

import numpy as np
import torch

from npyrnn import backend

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
