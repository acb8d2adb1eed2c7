"""Optimisers and learning-rate schedules against torch.optim, state dicts, argument checks.

The optimisers are fed the same gradients as torch's (single-tensor algorithm,
`foreach=False`) and compared after every step in float64; the schedules'
closed forms are compared with torch's recursive values epoch by epoch.
"""

import json
import tracemalloc
import warnings

import numpy as np
import pytest
import torch
from optional_hypothesis import HealthCheck, given, settings, st  # hypothesis, or skips without it

from conftest import record, rel_err
from npyrnn import backend
from npyrnn.models import RNNLM
from npyrnn.optim import (
    SGD,
    Adagrad,
    Adam,
    AdamW,
    CosineAnnealingLR,
    ExponentialLR,
    LinearLR,
    MultiStepLR,
    RMSprop,
    StepLR,
    clip_grad_norm,
    join_state_dict,
    split_state_dict,
)

OURS = {"SGD": SGD, "Adagrad": Adagrad, "RMSprop": RMSprop, "Adam": Adam, "AdamW": AdamW}

# (optimiser, keywords): torch's defaults and a few non-default settings of each
CONFIGS = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.3}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ("SGD", {"lr": 0.1, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.05, "momentum": 0.8, "dampening": 0.1, "weight_decay": 0.02, "maximize": True}),
    ("Adagrad", {}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.01}),
    ("Adagrad", {"lr": 0.1, "weight_decay": 0.01, "initial_accumulator_value": 0.1, "eps": 1e-6}),
    ("Adagrad", {"lr": 0.1, "maximize": True}),
    ("RMSprop", {}),
    ("RMSprop", {"lr": 2e-3, "alpha": 0.95}),
    ("RMSprop", {"centered": True}),
    ("RMSprop", {"momentum": 0.9}),
    ("RMSprop", {"lr": 1e-3, "alpha": 0.9, "centered": True, "momentum": 0.5, "weight_decay": 0.01}),
    ("RMSprop", {"alpha": 0.3, "centered": True, "maximize": True}),  # lerp weight 0.7: torch's second form
    ("Adam", {}),
    ("Adam", {"amsgrad": True}),
    ("Adam", {"lr": 1e-2, "weight_decay": 0.01}),
    ("Adam", {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6, "amsgrad": True, "maximize": True}),
    ("Adam", {"lr": 1e-2, "betas": (0.3, 0.9)}),  # lerp weight 0.7
    ("Adam", {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("AdamW", {}),
    ("AdamW", {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}),
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'defaults'}" for name, kw in CONFIGS]

STEPS = 50


def rnnlm_params(xp):
    """d2l-style RNNLM parameters in float64 on the active backend (xp fixture)."""
    return RNNLM(28, 16, seed=0, dtype="float64").params


def random_grads(params, steps, seed=0, scale=1.0):
    """`steps` dicts of gradients drawn on the host with a fixed seed."""
    rng = np.random.default_rng(seed)
    return [{k: scale * rng.standard_normal(p.shape) for k, p in params.items()} for _ in range(steps)]


def torch_twin(name, kw, params):
    """torch tensors holding copies of `params` and torch's optimiser over them."""
    tensors = {k: torch.tensor(backend.to_numpy(p), requires_grad=True) for k, p in params.items()}
    opt = getattr(torch.optim, name)(list(tensors.values()), foreach=False, **kw)
    return tensors, opt


def torch_step(tensors, opt, grads):
    for k, t in tensors.items():
        t.grad = torch.from_numpy(grads[k].copy())
    opt.step()


def as_backend(grads, xp):
    return {k: xp.asarray(g) for k, g in grads.items()}


# ------------------------------------------------------------------------------------ against torch


@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_optimizer_matches_torch_every_step(name, kw, xp):
    params = rnnlm_params(xp)
    tensors, topt = torch_twin(name, kw, params)
    opt = OURS[name](params, **kw)
    arrays = dict(params)  # the same array objects: updated in place
    for i, host in enumerate(random_grads(params, STEPS)):
        grads = as_backend(host, xp)
        opt.step(grads)
        torch_step(tensors, topt, host)
        for k, t in tensors.items():
            err = rel_err(params[k], t.detach().numpy())
            record(f"{name} parameters vs torch.optim, every step (float64)", err)
            assert err <= 1e-12, f"{k} after step {i + 1}: relative error {err:.2e}"
        for k, g in grads.items():
            assert (backend.to_numpy(g) == host[k]).all(), "step must not modify the gradients"
    assert all(params[k] is arrays[k] for k in params), "parameters must be updated in place"
    assert opt.step_count == STEPS
    for k, t in tensors.items():  # the state buffers carry torch's names and values
        tstate = topt.state[t]
        ours = opt.state_dict()["state"][k]
        assert set(ours) == {b for b in tstate if b != "step"}, k
        for b, arr in ours.items():
            assert rel_err(arr, tstate[b].numpy()) <= 1e-12, f"{k}.{b}"


def test_real_gradients_from_the_model_match_torch(xp):
    """Gradients from npyrnn's own forward/backward, fed to Adam and to torch's Adam."""
    model = RNNLM(28, 16, seed=0, dtype="float64")
    tensors, topt = torch_twin("Adam", {"lr": 1e-2, "amsgrad": True}, model.params)
    opt = Adam(model.params, lr=1e-2, amsgrad=True)
    rng = np.random.default_rng(5)
    from npyrnn.losses import softmax_cross_entropy

    for i in range(STEPS):
        X, Y = xp.asarray(rng.integers(0, 28, size=(4, 6))), xp.asarray(rng.integers(0, 28, size=(4, 6)))
        model.zero_grad()
        logits, _ = model.forward(X, model.begin_state(4))
        _, dlogits = softmax_cross_entropy(logits, Y.T.reshape(-1))
        model.backward(dlogits)
        clip_grad_norm(model.grads, 1.0)
        host = {k: backend.to_numpy(g).copy() for k, g in model.grads.items()}
        opt.step(model.grads)
        torch_step(tensors, topt, host)
        for k, t in tensors.items():
            assert rel_err(model.params[k], t.detach().numpy()) <= 1e-12, f"{k} after step {i + 1}"


@pytest.mark.parametrize("name,kw", CONFIGS[::4], ids=IDS[::4])
def test_float32_matches_torch(name, kw, xp):
    rng = np.random.default_rng(3)
    host = {"w": rng.standard_normal((6, 5)).astype("float32"), "b": rng.standard_normal(5).astype("float32")}
    params = {k: xp.asarray(v.copy()) for k, v in host.items()}
    tensors, topt = torch_twin(name, kw, params)
    opt = OURS[name](params, **kw)
    for g in random_grads(params, 10, seed=4):
        g = {k: v.astype("float32") for k, v in g.items()}
        opt.step(as_backend(g, xp))
        torch_step(tensors, topt, g)
    for k, t in tensors.items():
        assert params[k].dtype == "float32"
        assert all(b.dtype == "float32" for b in opt.state[k].values())
        assert rel_err(params[k], t.detach().numpy()) <= 1e-5, k


def test_list_params_match_dict_params():
    host = [np.linspace(-1, 1, 12).reshape(3, 4), np.arange(4.0)]
    grads = random_grads({"0": host[0], "1": host[1]}, 5, seed=6)
    as_dict, as_list = {"a": host[0].copy(), "b": host[1].copy()}, [host[0].copy(), host[1].copy()]
    o1, o2 = Adam(as_dict, lr=0.1), Adam(as_list, lr=0.1)
    for g in grads:
        o1.step({"a": g["0"], "b": g["1"]})
        o2.step([g["0"], g["1"]])
    assert (as_dict["a"] == as_list[0]).all() and (as_dict["b"] == as_list[1]).all()
    assert sorted(o2.state_dict()["state"]) == ["0", "1"]


@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_step_allocates_no_arrays(name, kw):
    """After the first step, a step allocates nothing near the size of a parameter (1 MB here)."""
    params = {"w": np.zeros((512, 256)), "b": np.zeros(256)}
    grads = {k: np.full(p.shape, 0.5) for k, p in params.items()}
    opt = OURS[name](params, **kw)
    opt.step(grads)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(3):
            opt.step(grads)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak - before < 64 * 1024, f"{name} allocated {peak - before} bytes during three steps"


def test_rmsprop_centered_alpha_0_stays_finite():
    """alpha = 0: v = g^2 and m = g, so r = sqrt(0) + eps exactly; torch's fused multiply-add gives
    v - m^2 = -1e-18 for this gradient and nan parameters (docs/derivations/optimizers.md, 11.10)."""
    g = np.array([0.34558419143001, 0.5, 3.0])
    params = {"w": np.zeros(3)}
    opt = RMSprop(params, lr=0.1, alpha=0.0, eps=1e-3, centered=True)
    for t in range(3):
        opt.step({"w": g})
        np.testing.assert_allclose(params["w"], -(t + 1) * 0.1 * g / 1e-3, rtol=1e-15)


# ------------------------------------------------------------------------------------ state dicts


@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_state_dict_round_trip_continues_bit_exactly(name, kw, xp, tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="safetensors is not installed")
    load_file, save_file = safetensors_numpy.load_file, safetensors_numpy.save_file

    grads = random_grads(rnnlm_params(xp), STEPS, seed=7)
    straight = rnnlm_params(xp)
    opt = OURS[name](straight, **kw)
    for g in grads:
        opt.step(as_backend(g, xp))

    first = rnnlm_params(xp)
    opt1 = OURS[name](first, **kw)
    for g in grads[:25]:
        opt1.step(as_backend(g, xp))
    # what a checkpoint writer does: the arrays to safetensors, the rest to JSON
    tensors, meta = split_state_dict(opt1.state_dict())
    save_file({k: backend.to_numpy(v) for k, v in tensors.items()}, str(tmp_path / "opt.safetensors"))
    (tmp_path / "opt.json").write_text(json.dumps(meta))
    resumed = {k: xp.asarray(backend.to_numpy(v).copy()) for k, v in first.items()}
    del opt1, first

    opt2 = OURS[name](resumed)  # default settings: the state dict brings the saved ones back
    opt2.load_state_dict(join_state_dict(load_file(str(tmp_path / "opt.safetensors")),
                                         json.loads((tmp_path / "opt.json").read_text())))
    assert opt2.step_count == 25
    assert opt2.hyper == opt.hyper
    for g in grads[25:]:
        opt2.step(as_backend(g, xp))
    for k in straight:
        assert (backend.to_numpy(resumed[k]) == backend.to_numpy(straight[k])).all(), k
    for k, bufs in opt.state.items():
        for b, arr in bufs.items():
            assert (backend.to_numpy(opt2.state[k][b]) == backend.to_numpy(arr)).all(), f"{k}.{b}"


def test_state_dict_is_a_copy():
    params = {"w": np.ones(3)}
    opt = SGD(params, lr=0.1, momentum=0.9)
    opt.step({"w": np.ones(3)})
    sd = opt.state_dict()
    opt.step({"w": np.ones(3)})
    assert (sd["state"]["w"]["momentum_buffer"] == 1).all() and sd["step"] == 1


def test_load_state_dict_lists_every_problem_in_one_error():
    params = {"w": np.zeros((2, 3)), "b": np.zeros(3)}
    sd = Adam(params).state_dict()
    sd["state"]["w"]["exp_avg"] = np.zeros((3, 2))
    del sd["state"]["b"]
    sd["state"]["extra"] = {}
    with pytest.raises(ValueError, match=r"Adam.load_state_dict: missing parameters b; unexpected parameters extra; "
                                         r"w.exp_avg: expected \(2, 3\), got \(3, 2\)"):
        Adam(params).load_state_dict(sd)


def test_load_state_dict_refuses_another_optimizer():
    params = {"w": np.zeros(3)}
    with pytest.raises(ValueError, match="the state is of a SGD optimiser, not Adam"):
        Adam(params).load_state_dict(SGD(params).state_dict())


def test_load_state_dict_refuses_missing_buffers():
    params = {"w": np.zeros(3)}
    sd = Adam(params, amsgrad=True).state_dict()
    del sd["state"]["w"]["max_exp_avg_sq"]
    with pytest.raises(ValueError, match=r"w: buffers \['exp_avg', 'exp_avg_sq'\], expected"):
        Adam(params).load_state_dict(sd)


def test_load_state_dict_refuses_a_non_state():
    with pytest.raises(ValueError, match="expected a dict with keys 'name', 'hyper', 'step', 'state'"):
        SGD({"w": np.zeros(3)}).load_state_dict({"w": np.zeros(3)})


def test_load_state_dict_checks_the_saved_hyperparameters():
    params = {"w": np.zeros(3)}
    sd = SGD(params).state_dict()
    sd["hyper"]["lr"] = -1.0
    with pytest.raises(ValueError, match="SGD: lr must be a finite number >= 0, got -1.0"):
        SGD(params).load_state_dict(sd)


def test_join_state_dict_refuses_unknown_tensor_names():
    tensors, meta = split_state_dict(Adam({"rnn.w": np.zeros(3)}).state_dict())
    assert sorted(tensors) == ["state.rnn.w.exp_avg", "state.rnn.w.exp_avg_sq"]
    with pytest.raises(ValueError, match="tensor name 'state.other.exp_avg' is not"):
        join_state_dict({"state.other.exp_avg": np.zeros(3)}, meta)


# ------------------------------------------------------------------------------------ bad arguments

BAD = [
    (SGD, {"lr": -0.1}, "SGD: lr must be a finite number >= 0, got -0.1"),
    (SGD, {"lr": float("nan")}, "SGD: lr must be a finite number >= 0, got nan"),
    (SGD, {"lr": float("inf")}, "SGD: lr must be a finite number >= 0, got inf"),
    (SGD, {"lr": "fast"}, "SGD: lr must be a number, got 'fast'"),
    (SGD, {"momentum": -0.5}, "SGD: momentum must be a finite number >= 0, got -0.5"),
    (SGD, {"weight_decay": -1}, "SGD: weight_decay must be a finite number >= 0, got -1.0"),
    (SGD, {"nesterov": True}, "SGD: nesterov=True needs momentum > 0 and dampening == 0, got momentum=0.0"),
    (SGD, {"nesterov": True, "momentum": 0.9, "dampening": 0.1}, "needs momentum > 0 and dampening == 0"),
    (SGD, {"nesterov": 1}, "SGD: nesterov must be True or False, got 1"),
    (Adagrad, {"lr_decay": -0.1}, "Adagrad: lr_decay must be a finite number >= 0, got -0.1"),
    (Adagrad, {"initial_accumulator_value": -1}, "Adagrad: initial_accumulator_value must be a finite number >= 0"),
    (Adagrad, {"eps": -1e-10}, "Adagrad: eps must be a finite number >= 0, got -1e-10"),
    (RMSprop, {"alpha": -0.9}, "RMSprop: alpha must be a finite number >= 0, got -0.9"),
    (RMSprop, {"momentum": -0.9}, "RMSprop: momentum must be a finite number >= 0, got -0.9"),
    (RMSprop, {"centered": "yes"}, "RMSprop: centered must be True or False, got 'yes'"),
    (Adam, {"betas": (1.0, 0.999)}, r"Adam: betas\[0\] must be in \[0, 1\), got 1.0"),
    (Adam, {"betas": (0.9, -0.1)}, r"Adam: betas\[1\] must be in \[0, 1\), got -0.1"),
    (Adam, {"betas": 0.9}, r"Adam: betas must be a pair \(beta1, beta2\), each in \[0, 1\), got 0.9"),
    (Adam, {"eps": -1.0}, "Adam: eps must be a finite number >= 0, got -1.0"),
    (Adam, {"amsgrad": None}, "Adam: amsgrad must be True or False, got None"),
    (AdamW, {"weight_decay": -0.01}, "AdamW: weight_decay must be a finite number >= 0, got -0.01"),
]


@pytest.mark.parametrize("cls,kw,match", BAD, ids=[f"{c.__name__}-{list(k)}" for c, k, _ in BAD])
def test_bad_hyperparameters_raise_one_clear_error(cls, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        cls({"w": np.zeros(3)}, **kw)


def test_bad_lr_assignment_raises_and_keeps_the_old_value():
    opt = Adam({"w": np.zeros(3)}, lr=0.01)
    with pytest.raises(ValueError, match="Adam: lr must be a finite number >= 0, got -1.0"):
        opt.lr = -1
    assert opt.lr == 0.01


def test_empty_params_raise():
    with pytest.raises(ValueError, match="RMSprop: params is empty; pass the model's parameters"):
        RMSprop({})


def test_integer_params_raise():
    with pytest.raises(TypeError, match="Adam: parameter 'w' must be a floating-point array, got ndarray of dtype int64"):
        Adam({"w": np.zeros(3, dtype=np.int64)})


def test_params_that_are_not_a_collection_raise():
    with pytest.raises(TypeError, match="SGD: params must be a dict of arrays .* or a list of arrays, got float"):
        SGD(1.0)


def test_step_with_wrong_keys_raises(xp):
    with pytest.raises(ValueError, match="Adam.step: grads must be a dict with exactly the keys of params"):
        Adam({"w": xp.zeros(3)}).step({"v": xp.zeros(3)})


def test_step_with_wrong_count_raises():
    with pytest.raises(ValueError, match="RMSprop.step: 2 params but 1 grads"):
        RMSprop([np.zeros(3), np.zeros(2)]).step([np.zeros(3)])


def test_step_with_wrong_shape_raises_and_leaves_everything_untouched():
    params = {"w": np.ones(3), "b": np.ones(2)}
    opt = Adam(params)
    with pytest.raises(ValueError, match=r"Adam.step: gradient of shape \(3,\) for parameter 'b' of shape \(2,\)"):
        opt.step({"w": np.ones(3), "b": np.ones(3)})
    assert opt.step_count == 0 and (params["w"] == 1).all() and not opt.state["w"]["exp_avg"].any()


def test_step_after_a_parameter_was_replaced_raises():
    params = {"w": np.ones(3)}
    opt = SGD(params, lr=0.1)
    params["w"] = np.ones(4)
    with pytest.raises(ValueError, match=r"parameter 'w' is now \(4,\) float64, not what this optimiser was built for"):
        opt.step({"w": np.ones(4)})


# ------------------------------------------------------------------------------------ property test

HYPER = {
    "SGD": st.fixed_dictionaries({
        "lr": st.floats(0, 1), "momentum": st.floats(0, 0.99), "dampening": st.floats(0, 1),
        "weight_decay": st.floats(0, 0.1), "maximize": st.booleans(),
    }),
    "Adagrad": st.fixed_dictionaries({
        "lr": st.floats(0, 1), "lr_decay": st.floats(0, 1), "weight_decay": st.floats(0, 0.1),
        "initial_accumulator_value": st.floats(0, 1), "eps": st.floats(1e-10, 1e-3), "maximize": st.booleans(),
    }),
    "RMSprop": st.booleans().flatmap(lambda centered: st.fixed_dictionaries({
        # centered with alpha near 0: v - m^2 is 0 up to rounding, torch's nan (test_rmsprop_centered_alpha_0)
        "lr": st.floats(0, 0.1), "alpha": st.floats(0.01 if centered else 0, 0.999), "eps": st.floats(1e-10, 1e-3),
        "weight_decay": st.floats(0, 0.1), "momentum": st.floats(0, 0.99), "centered": st.just(centered),
        "maximize": st.booleans(),
    })),
    "Adam": st.fixed_dictionaries({
        "lr": st.floats(0, 0.1), "betas": st.tuples(st.floats(0, 0.999), st.floats(0, 0.999)),
        "eps": st.floats(1e-10, 1e-3), "weight_decay": st.floats(0, 0.1), "amsgrad": st.booleans(),
        "maximize": st.booleans(), "decoupled_weight_decay": st.booleans(),
    }),
    "AdamW": st.fixed_dictionaries({
        "lr": st.floats(0, 0.1), "betas": st.tuples(st.floats(0, 0.999), st.floats(0, 0.999)),
        "eps": st.floats(1e-10, 1e-3), "weight_decay": st.floats(0, 0.1), "amsgrad": st.booleans(),
    }),
}


@st.composite
def optimizer_settings(draw):
    name = draw(st.sampled_from(sorted(HYPER)))
    kw = draw(HYPER[name])
    if name == "SGD" and draw(st.booleans()):
        kw.update(nesterov=True, dampening=0.0, momentum=draw(st.floats(0.01, 0.99)))
    shape = draw(st.sampled_from([(1,), (3, 1), (1, 4), (5, 3)]))
    return name, kw, shape, draw(st.integers(0, 2**16)), draw(st.integers(1, 6))


@settings(derandomize=True, max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(optimizer_settings())
def test_property_random_hyperparameters_match_torch(setting):
    """Random settings in the valid ranges, 1-6 steps, against torch; the error is relative to the
    larger of the parameter's size now and at the start (a size-1 parameter may pass near 0)."""
    name, kw, shape, seed, steps = setting
    rng = np.random.default_rng(seed)
    params = {"w": rng.standard_normal(shape), "b": rng.standard_normal(shape[-1])}
    tensors, topt = torch_twin(name, kw, params)
    scale = {k: np.linalg.norm(p) for k, p in params.items()}  # a size-1 parameter may pass near 0
    opt = OURS[name](params, **kw)
    cond = 1.0
    for i, g in enumerate(random_grads(params, steps, seed=seed + 1)):
        opt.step(g)
        torch_step(tensors, topt, g)
        if name == "RMSprop" and kw["centered"]:
            # v - m^2 cancels: torch's fused multiply-add and npyrnn's two roundings differ by
            # about u v, relative u v / (v - m^2); scale the tolerance by that condition number
            for state in opt.state.values():
                v, m = state["square_avg"], state["grad_avg"]
                cond = max(cond, float(np.max(v / (v - m * m))))
        for k, t in tensors.items():
            ours, theirs = params[k], t.detach().numpy()
            err = np.linalg.norm(ours - theirs) / max(np.linalg.norm(ours), np.linalg.norm(theirs), scale[k])
            assert err <= 1e-12 * cond, f"{name}({kw}) {k} after step {i + 1}: {err:.2e} (condition {cond:.1e})"


# ------------------------------------------------------------------------------------ schedules

SCHEDULES = {
    "StepLR": StepLR, "MultiStepLR": MultiStepLR, "ExponentialLR": ExponentialLR,
    "CosineAnnealingLR": CosineAnnealingLR, "LinearLR": LinearLR,
}
SCHEDULE_CONFIGS = [
    ("StepLR", {"step_size": 7, "gamma": 0.5}),
    ("StepLR", {"step_size": 1, "gamma": 0.97}),
    ("MultiStepLR", {"milestones": [10, 30, 30, 60], "gamma": 0.3}),
    ("MultiStepLR", {"milestones": [35]}),  # char-rnn: "decay by a factor after epoch N"
    ("ExponentialLR", {"gamma": 0.95}),
    ("CosineAnnealingLR", {"T_max": 30}),  # down to 0 at 30, back up to the start at 60
    ("CosineAnnealingLR", {"T_max": 100, "eta_min": 0.01}),
    ("CosineAnnealingLR", {"T_max": 7, "eta_min": 0.05}),
    ("LinearLR", {}),
    ("LinearLR", {"start_factor": 0.1, "end_factor": 0.9, "total_iters": 40}),
    ("LinearLR", {"start_factor": 1.0, "end_factor": 0.0, "total_iters": 100}),
]
SCHEDULE_IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'defaults'}" for n, kw in SCHEDULE_CONFIGS]


def torch_lrs(name, kw, lr, epochs):
    """torch's learning rate at construction and after each of `epochs` steps (its recursive form)."""
    t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([t], lr=lr)
    sched = getattr(torch.optim.lr_scheduler, name)(opt, **kw)
    lrs = [opt.param_groups[0]["lr"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
        for _ in range(epochs):
            opt.step()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
    return lrs


def our_lrs(name, kw, lr, epochs):
    opt = SGD({"w": np.zeros(1)}, lr=lr)
    sched = SCHEDULES[name](opt, **kw)
    lrs = [opt.lr]
    for _ in range(epochs):
        assert sched.get_last_lr() == [opt.lr]
        sched.step()
        lrs.append(opt.lr)
    return lrs


def close(ours, theirs, base_lr, rel=1e-12):
    """Entry-wise |a - b| <= rel max(|a|, |b|) + 1e-15 base_lr.

    The absolute 1e-15 of the starting rate covers where the exact value is 0:
    the closed form gives 0, torch's recursion a rounding residue (LinearLR
    with end_factor 0 ends at -1e-16 x the starting rate).
    """
    ours, theirs = np.array(ours), np.array(theirs)
    return np.abs(ours - theirs) <= rel * np.maximum(np.abs(ours), np.abs(theirs)) + 1e-15 * base_lr


@pytest.mark.parametrize("name,kw", SCHEDULE_CONFIGS, ids=SCHEDULE_IDS)
def test_schedule_matches_torch_every_epoch(name, kw):
    ours, theirs = our_lrs(name, kw, 0.7, 100), torch_lrs(name, kw, 0.7, 100)
    ok = close(ours, theirs, 0.7)
    worst = max(abs(a - b) / max(abs(a), abs(b)) for a, b in zip(ours, theirs) if a != b) if ours != theirs else 0.0
    record("schedules: closed form vs torch's recursive form, 100 epochs", worst)
    assert ok.all(), f"epochs {np.flatnonzero(~ok).tolist()}: ours {ours}, torch {theirs}"


def test_schedules_reach_their_landmarks_exactly():
    assert our_lrs("StepLR", {"step_size": 2, "gamma": 0.5}, 1.0, 5) == [1, 1, 0.5, 0.5, 0.25, 0.25]
    assert our_lrs("MultiStepLR", {"milestones": [2, 4], "gamma": 0.1}, 1.0, 4)[:3] == [1, 1, 0.1]
    assert our_lrs("CosineAnnealingLR", {"T_max": 4}, 1.0, 8)[::4] == [1, 0, 1]
    assert our_lrs("LinearLR", {"start_factor": 0.5, "total_iters": 2}, 1.0, 3) == [0.5, 0.75, 1, 1]


@pytest.mark.parametrize("name,kw", SCHEDULE_CONFIGS[::2], ids=SCHEDULE_IDS[::2])
def test_schedule_state_dict_round_trip(name, kw):
    opt = SGD({"w": np.zeros(1)}, lr=0.7)
    sched = SCHEDULES[name](opt, **kw)
    for _ in range(9):
        sched.step()
    saved = json.loads(json.dumps(sched.state_dict()))  # JSON-able
    straight = [opt.lr]
    for _ in range(20):
        sched.step()
        straight.append(opt.lr)
    opt2 = SGD({"w": np.zeros(1)}, lr=123.0)
    other = {"StepLR": {"step_size": 1}, "MultiStepLR": {"milestones": [1]}, "ExponentialLR": {"gamma": 0.5},
             "CosineAnnealingLR": {"T_max": 3}, "LinearLR": {}}[name]
    sched2 = SCHEDULES[name](opt2, **other)
    sched2.load_state_dict(saved)
    resumed = [opt2.lr]
    for _ in range(20):
        sched2.step()
        resumed.append(opt2.lr)
    assert resumed == straight and sched2.last_epoch == 29


def test_schedule_state_refuses_another_schedule():
    opt = SGD({"w": np.zeros(1)}, lr=0.7)
    with pytest.raises(ValueError, match="the state is of a StepLR schedule, not ExponentialLR"):
        ExponentialLR(opt, 0.9).load_state_dict(StepLR(opt, 3).state_dict())


def test_schedule_state_refuses_a_non_state():
    opt = SGD({"w": np.zeros(1)}, lr=0.7)
    with pytest.raises(ValueError, match="expected a dict with keys 'name', 'hyper', 'base_lr', 'last_epoch'"):
        StepLR(opt, 3).load_state_dict({"last_epoch": 3})


def test_schedule_sets_the_optimizer_lr_that_step_uses():
    params = {"w": np.ones(2)}
    opt = SGD(params, lr=1.0)
    sched = StepLR(opt, step_size=1, gamma=0.5)
    sched.step()
    opt.step({"w": np.ones(2)})
    assert (params["w"] == 0.5).all()
    assert opt.state_dict()["hyper"]["lr"] == 0.5


BAD_SCHEDULES = [
    (StepLR, {"step_size": 0}, "StepLR: step_size must be an integer >= 1, got 0"),
    (StepLR, {"step_size": 2.5}, "StepLR: step_size must be an integer >= 1, got 2.5"),
    (StepLR, {"step_size": 2, "gamma": -0.1}, r"StepLR: gamma must be a number in \[0.0, inf\), got -0.1"),
    (StepLR, {"step_size": 2, "gamma": float("inf")}, r"StepLR: gamma must be a number in \[0.0, inf\), got inf"),
    (MultiStepLR, {"milestones": [5, 3]}, r"MultiStepLR: milestones must be in increasing order, got \[5, 3\]"),
    (MultiStepLR, {"milestones": [0, 3]}, "MultiStepLR: each milestone must be an integer >= 1, got 0"),
    (MultiStepLR, {"milestones": 5}, "MultiStepLR: milestones must be a list of epochs >= 1, got 5"),
    (ExponentialLR, {"gamma": "0.9"}, r"ExponentialLR: gamma must be a number in \[0.0, inf\), got '0.9'"),
    (CosineAnnealingLR, {"T_max": 0}, "CosineAnnealingLR: T_max must be an integer >= 1, got 0"),
    (CosineAnnealingLR, {"T_max": 10, "eta_min": -1}, r"CosineAnnealingLR: eta_min must be a number in \[0.0, inf\)"),
    (LinearLR, {"start_factor": 0}, r"LinearLR: start_factor must be a number in \(0, 1\], got 0.0"),
    (LinearLR, {"start_factor": 1.5}, r"LinearLR: start_factor must be a number in \(0, 1\], got 1.5"),
    (LinearLR, {"end_factor": -0.5}, r"LinearLR: end_factor must be a number in \[0, 1\], got -0.5"),
    (LinearLR, {"total_iters": 0}, "LinearLR: total_iters must be an integer >= 1, got 0"),
]


@pytest.mark.parametrize("cls,kw,match", BAD_SCHEDULES, ids=[f"{c.__name__}-{kw}" for c, kw, _ in BAD_SCHEDULES])
def test_bad_schedule_arguments_raise_one_clear_error(cls, kw, match):
    opt = SGD({"w": np.zeros(1)}, lr=0.7)
    with pytest.raises(ValueError, match=match):
        cls(opt, **kw)
    assert opt.lr == 0.7, "a refused schedule leaves the optimiser alone"


def test_schedule_needs_an_optimizer():
    with pytest.raises(TypeError, match="StepLR: optimizer must be an npyrnn.optim optimiser, got dict"):
        StepLR({"lr": 0.1}, 3)


SCHEDULE_HYPER = {
    "StepLR": st.fixed_dictionaries({"step_size": st.integers(1, 20), "gamma": st.floats(0.01, 1)}),
    "MultiStepLR": st.fixed_dictionaries({
        "milestones": st.lists(st.integers(1, 60), max_size=5).map(sorted), "gamma": st.floats(0.01, 1)}),
    "ExponentialLR": st.fixed_dictionaries({"gamma": st.floats(0.5, 1)}),
    "CosineAnnealingLR": st.fixed_dictionaries({"T_max": st.integers(1, 80), "eta_min": st.floats(0, 1e-3)}),
    "LinearLR": st.fixed_dictionaries({
        "start_factor": st.floats(0.01, 1), "end_factor": st.floats(0, 1), "total_iters": st.integers(1, 60)}),
}


@settings(derandomize=True, max_examples=100, deadline=None)
@given(st.sampled_from(sorted(SCHEDULE_HYPER)).flatmap(lambda n: st.tuples(st.just(n), SCHEDULE_HYPER[n])),
       st.floats(1e-4, 2.0))
def test_property_random_schedules_match_torch(setting, lr):
    name, kw = setting
    ours, theirs = our_lrs(name, kw, lr, 60), torch_lrs(name, kw, lr, 60)
    ok = close(ours, theirs, lr)
    assert ok.all(), f"{name}({kw}) epochs {np.flatnonzero(~ok).tolist()}"


# ------------------------------------------------------------------------------------ clipping and plain SGD


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("max_norm", [1.0, 0.01, 1e6])
def test_clip_grad_norm_matches_torch(max_norm, dtype, xp):
    rng = np.random.default_rng(1)
    shapes = [(4, 3), (3,), (5, 5, 2)]
    host = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = {f"g{i}": xp.asarray(g) for i, g in enumerate(host)}
    ts = [torch.zeros(s, dtype=getattr(torch, dtype), requires_grad=True) for s in shapes]
    for t, g in zip(ts, host):
        t.grad = torch.from_numpy(g.copy())
    expected_norm = torch.nn.utils.clip_grad_norm_(ts, max_norm)
    norm = clip_grad_norm(grads, max_norm)
    tol = 1e-14 if dtype == "float64" else 1e-6
    assert float(norm) == pytest.approx(expected_norm.item(), rel=tol)
    for i, t in enumerate(ts):
        assert grads[f"g{i}"].dtype == dtype
        err = rel_err(grads[f"g{i}"], t.grad.numpy())
        if dtype == "float64":
            record("clip_grad_norm vs torch (float64)", err)
        assert err <= tol
    total = np.sqrt(sum((backend.to_numpy(g) ** 2).sum() for g in grads.values()))
    assert total <= max_norm * (1 + 1e-12)


def test_clip_grad_norm_keeps_direction_and_is_safe_at_zero():
    g = [np.array([3.0, 4.0])]
    assert float(clip_grad_norm(g, 1.0)) == 5.0
    np.testing.assert_allclose(g[0], [0.6, 0.8], rtol=1e-6)
    zeros = [np.zeros(3), np.zeros((2, 2))]
    assert float(clip_grad_norm(zeros, 1.0)) == 0.0
    assert all(not z.any() and np.isfinite(z).all() for z in zeros)
    with pytest.raises(ValueError, match="max_norm must be positive, got 0.0"):
        clip_grad_norm(g, 0)
    with pytest.raises(ValueError, match="total gradient norm is inf"):
        clip_grad_norm([np.array([np.inf])], 1.0, error_if_nonfinite=True)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(shapes=st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=3), min_size=1, max_size=5),
       dtype=st.sampled_from(["float32", "float64"]), max_norm=st.sampled_from([1e-3, 1.0, 1e6]),
       lr=st.sampled_from([0.0, 0.1, 1.0, 3.7]), momentum=st.sampled_from([0.0, 0.9]),
       seed=st.integers(0, 2**32 - 1))
def test_clip_and_step_gives_the_bits_of_clipping_then_stepping(shapes, dtype, max_norm, lr, momentum, seed):
    """`clip_and_step` (one compiled pass for plain SGD with the fast extra) against `clip_grad_norm`
    then `step`: the same norm, gradients and parameters to the bit, twice in a row, any shapes
    (size 1 included); with momentum (not fused) as well."""
    from npyrnn.optim.clip import clip_and_step

    rng = np.random.default_rng(seed)
    params = {f"p{i}": rng.standard_normal(s).astype(dtype) for i, s in enumerate(shapes)}
    grads = [{k: rng.standard_normal(p.shape).astype(dtype) for k, p in params.items()} for _ in range(2)]
    twin = {k: p.copy() for k, p in params.items()}
    fused, plain = SGD(params, lr=lr, momentum=momentum), SGD(twin, lr=lr, momentum=momentum)
    for g in grads:
        g_plain = {k: v.copy() for k, v in g.items()}
        norm = clip_and_step(g, max_norm, fused)
        norm_plain = clip_grad_norm(g_plain, max_norm)
        plain.step(g_plain)
        assert norm.tobytes() == norm_plain.tobytes()
        for k in params:
            assert g[k].tobytes() == g_plain[k].tobytes(), f"clipped {k}"
            assert params[k].tobytes() == twin[k].tobytes(), f"updated {k}"
    assert fused.step_count == plain.step_count == 2


def test_the_training_step_clips_and_steps_in_one_compiled_pass(monkeypatch):
    """Plain SGD on NumPy with the fast extra takes the compiled pass; momentum, the kernels off, or
    a non-contiguous gradient take the array operations."""
    pytest.importorskip("numba", reason="the compiled pass is the fast extra's")
    from npyrnn.nn import cpu_kernels, kernels
    from npyrnn.optim.clip import clip_and_step

    calls = []
    compiled = cpu_kernels.clipped_sgd
    monkeypatch.setattr(cpu_kernels, "clipped_sgd", lambda *a: calls.append(len(a[0])) or compiled(*a))
    params = {"w": np.ones((3, 4), np.float32), "b": np.ones(4, np.float32)}

    def grads():
        return {"w": np.full((3, 4), 2.0, np.float32), "b": np.full(4, 2.0, np.float32)}

    kernels.set_enabled(True)  # whatever NPYRNN_FUSED says (CI's second pass sets it to 0)
    try:
        clip_and_step(grads(), 1.0, SGD(params, lr=0.5))
        assert calls == [2]
        clip_and_step(grads(), 1.0, SGD(params, lr=0.5, momentum=0.9))
        strided = {"w": np.full((3, 8), 2.0, np.float32)[:, ::2], "b": np.full(4, 2.0, np.float32)}
        clip_and_step(strided, 1.0, SGD(params, lr=0.5))
        kernels.set_enabled(False)
        clip_and_step(grads(), 1.0, SGD(params, lr=0.5))
    finally:
        kernels.set_enabled(None)
    assert calls == [2]
    with pytest.raises(ValueError, match="max_norm must be positive, got -1.0"):
        clip_and_step(grads(), -1, SGD(params, lr=0.5))


def test_sgd_step_matches_torch(xp):
    rng = np.random.default_rng(2)
    w, g = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    params = {"w": xp.asarray(w.copy())}
    same = params["w"]
    SGD(params, lr=0.5).step({"w": xp.asarray(g)})
    assert params["w"] is same, "SGD must update in place"
    t = torch.from_numpy(w.copy()).requires_grad_(True)
    t.grad = torch.from_numpy(g.copy())
    torch.optim.SGD([t], lr=0.5).step()
    np.testing.assert_allclose(backend.to_numpy(params["w"]), t.detach().numpy(), rtol=1e-15)
    with pytest.raises(ValueError, match="exactly the keys of params"):
        SGD(params, 1.0).step({"v": xp.asarray(g)})
    with pytest.raises(ValueError, match="SGD: lr must be a finite number >= 0, got -1.0"):
        SGD(params, -1)


