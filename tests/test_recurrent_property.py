"""A differential property test: RNN, GRU and LSTM against torch on configurations nobody picked.

hypothesis draws the configuration (size-1 dimensions included), the memory layout of the inputs
(Fortran order, negative strides, non-contiguous views) and a call history; every example is
checked against torch (float64: outputs 1e-12, gradients 1e-10), and a forward pass must never
change a parameter. A second property feeds invalid inputs: each raises ValueError or TypeError
and leaves parameters and gradients untouched.
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import record, rel_err
from npyrnn import backend
from npyrnn.nn import GRU, LSTM, RNN
from reference import scratch_stack, torch_layer

SETTINGS = settings(derandomize=True, max_examples=50, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def configs(draw):
    kind = draw(st.sampled_from(["RNN", "GRU", "GRU-before", "LSTM"]))
    H = draw(st.integers(1, 4))
    cfg = dict(
        kind=kind,
        I=draw(st.integers(1, 4)),
        H=H,
        L=draw(st.integers(1, 3)),
        bi=draw(st.booleans()),
        bias=draw(st.booleans()),
        bf=draw(st.booleans()),
        proj=draw(st.integers(0, H - 1)) if kind == "LSTM" else 0,
        nl=draw(st.sampled_from(["tanh", "relu"])),
        T=draw(st.integers(1, 4)),
        B=draw(st.integers(1, 3)),
        ids=draw(st.sampled_from([None, "int64", "int32", "uint8"])),
        with_h0=draw(st.booleans()),
        with_dhn=draw(st.booleans()),
        layout=draw(st.sampled_from(["C", "F", "reversed", "strided"])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )
    return cfg


def build(cfg):
    kind, I, H, L = cfg["kind"], cfg["I"], cfg["H"], cfg["L"]
    common = dict(num_layers=L, bias=cfg["bias"], batch_first=cfg["bf"], bidirectional=cfg["bi"],
                  dtype="float64", init="uniform", seed=cfg["seed"] % 1000)
    if kind == "RNN":
        return RNN(I, H, nonlinearity=cfg["nl"], **common)
    if kind.startswith("GRU"):
        return GRU(I, H, reset_after=kind == "GRU", **common)
    return LSTM(I, H, proj_size=cfg["proj"], **common)


def odd_layout(a, layout):
    """Host array `a` on the active backend in another memory layout: Fortran order, negative strides, or a strided view."""
    xp = backend.xp
    if layout == "F":
        return xp.asfortranarray(backend.asarray(a))
    if layout == "reversed":  # a view with negative strides on every axis
        flipped = backend.asarray(a[(slice(None, None, -1),) * a.ndim].copy())
        return flipped[(slice(None, None, -1),) * a.ndim]
    if layout == "strided":  # every other element of a larger array
        big = xp.zeros(tuple(2 * s for s in a.shape), dtype=a.dtype)
        view = big[(slice(None, None, 2),) * a.ndim]
        view[...] = backend.asarray(a)
        return view
    return backend.asarray(a)


def on_backend(value):
    """Host arrays, alone or in tuples and lists, moved to the active backend; anything else as it is."""
    if isinstance(value, np.ndarray):
        return backend.asarray(value)
    if isinstance(value, (tuple, list)):
        return type(value)(on_backend(v) for v in value)
    return value


def draw_inputs(layer, cfg, rng, T=None, B=None):
    T, B = T or cfg["T"], B or cfg["B"]
    L, D, H, P, I = layer.num_layers, layer.num_directions, layer.hidden_size, layer.output_size, layer.input_size
    shape = (B, T) if cfg["bf"] else (T, B)
    x = rng.integers(0, I, size=shape).astype(cfg["ids"]) if cfg["ids"] else rng.standard_normal(shape + (I,))
    out_shape = (B, T, D * P) if cfg["bf"] else (T, B, D * P)
    return dict(x=x, h0=rng.standard_normal((L * D, B, P)), c0=rng.standard_normal((L * D, B, H)),
                dout=rng.standard_normal(out_shape), dh_n=rng.standard_normal((L * D, B, P)),
                dc_n=rng.standard_normal((L * D, B, H)))


def forward_backward(layer, v, with_h0, with_dhn, layout="C"):
    a = {k: odd_layout(val, layout) for k, val in v.items()}
    lstm = isinstance(layer, LSTM)
    h0 = ((a["h0"], a["c0"]) if lstm else a["h0"]) if with_h0 else None
    dhn = ((a["dh_n"], a["dc_n"]) if lstm else a["dh_n"]) if with_dhn else None
    out, h_n = layer.forward(a["x"], h0)
    out, h_n = out.copy(), (tuple(s.copy() for s in h_n) if lstm else h_n.copy())
    dx, dh0 = layer.backward(a["dout"], dhn)
    return out, h_n, dx, dh0


def snapshot(layer):
    return {n: p.copy() for n, p in layer.params.items()}, {n: g.copy() for n, g in layer.grads.items()}


def unchanged(layer, snap):
    params, grads = snap
    same = backend.to_numpy
    return (all(np.array_equal(same(params[n]), same(layer.params[n])) for n in params)
            and all(np.array_equal(same(grads[n]), same(layer.grads[n])) for n in grads))


@SETTINGS
@given(cfg=configs())
def test_every_cell_matches_torch_whatever_the_configuration_layout_and_history(cfg):
    layer = build(cfg)
    rng = np.random.default_rng(cfg["seed"])
    # an earlier call with other sizes: the checked call must not depend on it
    earlier = draw_inputs(layer, cfg, rng, T=cfg["T"] + 2, B=cfg["B"] + 1)
    forward_backward(layer, earlier, True, True)
    layer.zero_grad()
    v = draw_inputs(layer, cfg, rng)
    params_before = snapshot(layer)[0]
    out, h_n, dx, dh0 = forward_backward(layer, v, cfg["with_h0"], cfg["with_dhn"], cfg["layout"])
    assert all(np.array_equal(backend.to_numpy(params_before[n]), backend.to_numpy(layer.params[n]))
               for n in params_before), "forward changed a parameter"

    lstm = isinstance(layer, LSTM)
    ids = cfg["ids"] is not None
    xt = (torch.nn.functional.one_hot(torch.from_numpy(v["x"].astype("int64")), cfg["I"]).double() if ids
          else torch.from_numpy(v["x"]).requires_grad_(True))
    h0t = torch.from_numpy(v["h0"] if cfg["with_h0"] else 0 * v["h0"]).requires_grad_(True)
    c0t = torch.from_numpy(v["c0"] if cfg["with_h0"] else 0 * v["c0"]).requires_grad_(True)
    if cfg["kind"] == "GRU-before":
        out_t, h_n_t, c_n_t, params = scratch_stack(layer, xt, h0t, c0t)
    else:
        net = torch_layer(layer)
        params = dict(net.named_parameters())
        if lstm:
            out_t, (h_n_t, c_n_t) = net(xt, (h0t, c0t))
        else:
            (out_t, h_n_t), c_n_t = net(xt, h0t), None
    loss = (out_t * torch.from_numpy(v["dout"])).sum()
    if cfg["with_dhn"]:
        loss = loss + (h_n_t * torch.from_numpy(v["dh_n"])).sum()
        if lstm:
            loss = loss + (c_n_t * torch.from_numpy(v["dc_n"])).sum()
    loss.backward()

    finals = list(zip(h_n, (h_n_t, c_n_t))) if lstm else [(h_n, h_n_t)]
    for name, mine, theirs in [("out", out, out_t)] + [(f"final state {i}", m, t) for i, (m, t) in enumerate(finals)]:
        err = rel_err(mine, theirs.detach().numpy())
        record("property test: outputs vs torch (float64)", err)
        assert err <= 1e-12, f"{name}: {err:.2e} for {cfg}"
    grads = [(n, layer.grads[n], p.grad) for n, p in params.items()]
    grads += [("dh0", dh0[0], h0t.grad), ("dc0", dh0[1], c0t.grad)] if lstm else [("dh0", dh0, h0t.grad)]
    if ids:
        assert dx is None
    else:
        grads.append(("dx", dx, xt.grad))
    for name, mine, theirs in grads:
        err = rel_err(mine, theirs.numpy())
        record("property test: gradients vs autograd (float64)", err)
        assert err <= 1e-10, f"d{name}: {err:.2e} for {cfg}"


BAD_INPUTS = [
    "features", "rank", "dtype", "id-too-large", "id-negative", "torch", "list", "bool",
    "empty", "h0-shape", "h0-dtype", "h0-torch", "lstm-h0-not-a-pair", "dout-shape", "dout-dtype", "dhn-shape",
]


@SETTINGS
@given(cfg=configs(), bad=st.sampled_from(BAD_INPUTS))
def test_invalid_input_raises_and_leaves_the_layer_untouched(cfg, bad):
    layer = build(cfg)
    rng = np.random.default_rng(cfg["seed"])
    v = draw_inputs(layer, cfg, rng)
    lstm = isinstance(layer, LSTM)
    forward_backward(layer, v, True, True)  # gradients that must survive the bad call
    snap = snapshot(layer)
    x, h0 = v["x"], ((v["h0"], v["c0"]) if lstm else v["h0"])
    dout, dhn = v["dout"], ((v["dh_n"], v["dc_n"]) if lstm else v["dh_n"])
    dense = rng.standard_normal(((cfg["B"], cfg["T"]) if cfg["bf"] else (cfg["T"], cfg["B"])) + (cfg["I"],))
    call = "forward"
    if bad == "features":
        x = np.concatenate([dense, dense[..., :1]], axis=-1)
    elif bad == "rank":
        x = dense[0]
    elif bad == "dtype":
        x = dense.astype("float32")
    elif bad == "id-too-large":
        x = np.full(dense.shape[:2], cfg["I"])
    elif bad == "id-negative":
        x = np.full(dense.shape[:2], -1)
    elif bad == "torch":
        x = torch.from_numpy(dense)
    elif bad == "list":
        x = dense.tolist()
    elif bad == "bool":
        x = dense > 0
    elif bad == "empty":
        x = dense[:0] if not cfg["bf"] else dense[:, :0]
    elif bad == "h0-shape":
        h0 = (v["h0"][:, :, :0], v["c0"]) if lstm else v["h0"][None]
    elif bad == "h0-dtype":
        h0 = (v["h0"], v["c0"].astype("float32")) if lstm else v["h0"].astype("float32")
    elif bad == "h0-torch":
        h0 = (torch.from_numpy(v["h0"]), v["c0"]) if lstm else torch.from_numpy(v["h0"])
    elif bad == "lstm-h0-not-a-pair":
        h0 = (v["h0"],) if lstm else [v["h0"]]
    else:
        call = "backward"
        layer.forward(backend.asarray(v["x"]), on_backend(h0))
        snap = snapshot(layer)
        if bad == "dout-shape":
            dout = dout[..., :-1]
        elif bad == "dout-dtype":
            dout = dout.astype("float32")
        else:
            dhn = (v["dh_n"][:1, :, :], v["dc_n"]) if lstm else v["dh_n"][:, :, :0]
    x, h0, dout, dhn = (on_backend(a) for a in (x, h0, dout, dhn))  # torch tensors and lists stay as they are
    with pytest.raises((ValueError, TypeError)) as err:
        if call == "forward":
            layer.forward(x, h0)
        else:
            layer.backward(dout, dhn)
    message = str(err.value)
    assert "\n" not in message and type(layer).__name__ in message, message
    assert unchanged(layer, snap), f"{bad}: parameters or gradients changed"
