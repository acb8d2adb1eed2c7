"""Cross-entropy and Linear against torch (clipping and the optimisers: tests/test_optim.py)."""

import numpy as np
import pytest
import torch

from conftest import record, rel_err
from npyrnn import backend
from npyrnn.losses import perplexity, softmax_cross_entropy
from npyrnn.nn import Linear


@pytest.mark.parametrize("scale", [1.0, 1e4])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_softmax_cross_entropy_matches_torch(scale, dtype, xp):
    rng = np.random.default_rng(0)
    N, V = 37, 28
    logits = (rng.standard_normal((N, V)) * scale).astype(dtype)
    targets = rng.integers(0, V, size=N)
    loss, dlogits = softmax_cross_entropy(xp.asarray(logits), xp.asarray(targets))
    zt = torch.from_numpy(logits).requires_grad_(True)
    lt = torch.nn.functional.cross_entropy(zt, torch.from_numpy(targets))
    lt.backward()
    assert np.isfinite(float(loss)) and dlogits.dtype == dtype
    tol = 1e-12 if dtype == "float64" else 2e-6
    assert abs(float(loss) - lt.item()) <= tol * max(1.0, abs(lt.item())), "loss"
    err = rel_err(dlogits, zt.grad.numpy())
    if dtype == "float64":
        record("softmax cross-entropy gradient vs autograd (float64)", err)
    assert err <= (1e-12 if dtype == "float64" else 1e-6), "dlogits"


def test_cross_entropy_extreme_logits_are_exact():
    logits = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4]])
    loss, d = softmax_cross_entropy(logits, np.array([0, 1]))
    # row 0 is certain and right (-log 1 = 0), row 1 is certain and wrong (-log e^-2e4 = 2e4)
    assert float(loss) == pytest.approx(1e4, rel=1e-15)
    np.testing.assert_allclose(d, [[0, 0, 0], [0, -0.5, 0.5]], atol=1e-300)


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(np.log(28.0)) == pytest.approx(28.0)
    assert perplexity(1000.0) == float("inf")  # math.exp would raise OverflowError
    assert np.isnan(perplexity(float("nan")))


def test_cross_entropy_bad_input():
    with pytest.raises(ValueError, match=r"expected float logits of shape \(N, V\), got \(3,\)"):
        softmax_cross_entropy(np.zeros(3), np.zeros(3, int))
    with pytest.raises(ValueError, match=r"expected integer targets of shape \(4,\).*got \(3,\)"):
        softmax_cross_entropy(np.zeros((4, 2)), np.zeros(3, int))
    with pytest.raises(ValueError, match=r"expected integer targets.*float64"):
        softmax_cross_entropy(np.zeros((4, 2)), np.zeros(4))


def test_linear_matches_torch(xp):
    rng = np.random.default_rng(3)
    lin = Linear(6, 4, dtype="float64", init="uniform", seed=0)
    x, dy = rng.standard_normal((5, 6)), rng.standard_normal((5, 4))
    y = lin.forward(xp.asarray(x))
    dx = lin.backward(xp.asarray(dy))
    net = torch.nn.Linear(6, 4, dtype=torch.float64)
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(torch.from_numpy(backend.to_numpy(lin.params[n])))
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = net(xt)
    (yt * torch.from_numpy(dy)).sum().backward()
    assert rel_err(y, yt.detach().numpy()) <= 1e-14
    assert rel_err(dx, xt.grad.numpy()) <= 1e-14
    for n, p in net.named_parameters():
        err = rel_err(lin.grads[n], p.grad.numpy())
        record("Linear gradients vs autograd (float64)", err)
        assert err <= 1e-10, n
    with pytest.raises(ValueError, match=r"expected x of shape \(N, 6\), got \(5, 7\)"):
        lin.forward(xp.asarray(np.zeros((5, 7))))
    with pytest.raises(ValueError, match=r"expected dy of shape \(5, 4\), got \(5, 3\)"):
        lin.backward(xp.asarray(np.zeros((5, 3))))


@pytest.mark.parametrize("fused", [True, False], ids=["kernels on", "array ops"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bad", [-1, 3, 100])
def test_cross_entropy_targets_out_of_range(bad, dtype, fused):
    """A target outside [0, V) is refused in one line, with the kernels (which read no bounds) or
    without (where NumPy would wrap -1 around silently); dlogits is never half written."""
    from npyrnn.nn import kernels

    kernels.set_enabled(fused)
    try:
        targets = np.array([0, 1, bad, 2])
        with pytest.raises(ValueError, match=rf"targets must be class ids in \[0, 3\).*got values from {min(bad, 0)} to {max(bad, 2)}"):
            softmax_cross_entropy(np.zeros((4, 3), dtype), targets)
    finally:
        kernels.set_enabled(None)
