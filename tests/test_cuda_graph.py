"""npyrnn/cuda_graph.py: a training minibatch replayed from one CUDA graph.

On a GPU: the replayed steps give the same bits as eager steps with the same products (cuBLAS gemm
called directly), for every cell and both dtypes, with the state carried or fresh, across a change
of learning rate, across minibatches of two shapes and a forward of a third in between. Everywhere:
what is refused (NumPy, the CPU stand-in, dropout, optimisers that read the step count) is one clear
line, the CLI's flag included, and the gemm's description of strided views computes the product.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import one_line
from npyrnn import backend, cuda_graph
from npyrnn.errors import BackendError
from npyrnn.models import RNNLM
from npyrnn.optim import SGD, Adagrad, Adam, RMSprop
from optional_hypothesis import given, settings, st
from test_cli import TEXT, run_subprocess, tree


def _real_cupy():
    if not backend.is_cupy_available():
        return False
    import cupy

    return not hasattr(cupy, "_fake")


REAL_CUPY = _real_cupy()
gpu = pytest.mark.skipif(not REAL_CUPY, reason="needs real CuPy and a CUDA device (not the CPU stand-in)")
V, H, B, T = 11, 16, 4, 5


# ------------------------------------------------------------------ what is refused, everywhere


def test_numpy_model_is_refused_in_one_line():
    backend.set_backend("numpy")
    model = RNNLM(V, H, seed=0)
    with pytest.raises(BackendError) as info:
        cuda_graph.CudaGraphStep(model, SGD(model.params, 1.0))
    assert one_line(info) == ("cuda graph: the model is on numpy; CUDA graphs need NPYRNN_BACKEND=cupy "
                              "on a CUDA device")


def test_stand_in_is_refused_in_one_line():
    if not backend.is_cupy_available() or REAL_CUPY:
        pytest.skip("runs under the CPU stand-in for CuPy only (NPYRNN_BACKEND=cupy with fakecupy first on PYTHONPATH)")
    backend.set_backend("cupy")
    model = RNNLM(V, H, seed=0)
    with pytest.raises(BackendError, match="fakecupy, which has no CUDA graphs"):
        cuda_graph.CudaGraphStep(model, SGD(model.params, 1.0))


def _on_cupy(dropout=0.0, training=True, layers=2):
    """A model as `why_not` sees it, on (an imitation of) CuPy."""
    return SimpleNamespace(xp=SimpleNamespace(__name__="cupy"), training=training,
                           rnn=SimpleNamespace(dropout=dropout, num_layers=layers))


@pytest.mark.parametrize("make, model, reason", [
    (lambda p: SGD(p, 1.0), _on_cupy(), None),
    (lambda p: SGD(p, 0.1, momentum=0.9, nesterov=True), _on_cupy(), None),
    (lambda p: RMSprop(p, 0.01), _on_cupy(), None),
    (lambda p: Adagrad(p, 0.1), _on_cupy(), None),
    (lambda p: SGD(p, 1.0), _on_cupy(dropout=0.3, training=False), None),  # eval mode: no masks drawn
    (lambda p: SGD(p, 1.0), _on_cupy(dropout=0.3, layers=1), None),  # one layer: nothing between layers
    (lambda p: SGD(p, 1.0), _on_cupy(dropout=0.3), "dropout masks are drawn on the host"),
    (lambda p: Adagrad(p, 0.1, lr_decay=0.01), _on_cupy(), "Adagrad's lr_decay changes the step"),
    (lambda p: Adam(p, 1e-3), _on_cupy(), "Adam's update reads the step count every minibatch"),
])
def test_why_not(make, model, reason):
    backend.set_backend("numpy")
    optimizer = make({"w": np.zeros(3)})
    found = cuda_graph.why_not(model, optimizer)
    assert found is None if reason is None else reason in found and "\n" not in found, found


def test_cli_flag_off_a_gpu_is_one_line_and_writes_nothing(tmp_path):
    if REAL_CUPY:
        pytest.skip("a GPU is here: --cuda-graph trains (test_cli_trains_with_cuda_graph_on_gpu)")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    before = tree(tmp_path)
    result = run_subprocess(["train", "--corpus", corpus, "--hidden", 8, "--epochs", 1, "--batch-size", 2,
                             "--num-steps", 4, "--val-tokens", 0, "--out", tmp_path / "run", "--cuda-graph"], tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("npyrnn: error: cuda graph: "), result.stderr
    assert tree(tmp_path) == before


# ------------------------------------------------------------------ pieces that need no GPU


def _column_major_gemm(a, b, out, layout):
    """What cublas<t>gemm computes from the (op, ld) that `layout` gives for a, b and out, on their raw memory."""

    def raw(x):  # the memory x lives in, as a flat array, and x's offset in it (in elements)
        base = x if x.base is None else x.base
        offset = (x.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // x.itemsize
        return base.reshape(-1), offset

    def operand(x, rows, cols):  # op(X) as cuBLAS reads it: rows x cols
        op, ld = layout(x, x.itemsize)
        flat, off = raw(x)
        r, c = (rows, cols) if op == 0 else (cols, rows)
        stored = np.array([[flat[off + i + j * ld] for j in range(c)] for i in range(r)])
        return stored if op == 0 else stored.T

    (M, K), N = a.shape, b.shape[1]
    op_c, ldc = layout(out, out.itemsize)
    assert op_c == 0, "the output must be row-major"
    result = operand(b, N, K) @ operand(a, K, M)  # column-major C^T = B^T A^T: N x M
    flat, off = raw(out)
    for i in range(N):
        for j in range(M):
            flat[off + i + j * ldc] = result[i, j]


@given(M=st.integers(1, 4), K=st.integers(1, 4), N=st.integers(1, 4), a_kind=st.sampled_from(["c", "f", "pad"]),
       b_kind=st.sampled_from(["c", "f", "pad"]), out_kind=st.sampled_from(["c", "pad"]))
@settings(max_examples=150, deadline=None, derandomize=True)
def test_gemm_layout_gives_the_product_for_any_strides(M, K, N, a_kind, b_kind, out_kind):
    """The (op, ld) handed to cuBLAS, for row-major, transposed and padded views, computes a @ b."""
    rng = np.random.default_rng(M * 100 + K * 10 + N)
    A, B_ = rng.standard_normal((M, K)), rng.standard_normal((K, N))

    def view(x, kind):
        if kind == "c":
            return x.copy()
        if kind == "f":  # the transpose of a C-ordered array, as W.T is
            return np.ascontiguousarray(x.T).T
        return np.pad(x, ((0, 0), (1, 2)))[:, 1 : 1 + x.shape[1]]  # rows further apart than their length

    out = np.zeros((M, N)) if out_kind == "c" else np.zeros((M, N + 3))[:, 2 : 2 + N]
    _column_major_gemm(view(A, a_kind), view(B_, b_kind), out, cuda_graph.DirectGemm.layout)
    np.testing.assert_allclose(out, A @ B_, rtol=1e-12, atol=1e-12)


def test_gemm_layout_refuses_what_cublas_cannot_read():
    x = np.zeros((4, 6))
    assert cuda_graph.DirectGemm.layout(x[:, ::2], x.itemsize) is None  # neither rows nor columns contiguous
    assert cuda_graph.DirectGemm.layout(x[::2, ::2], x.itemsize) is None


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_every_array_of_model_and_optimiser_is_pinned(cell):
    """After a step, the walk finds the parameters, gradients, optimiser buffers and every work array."""
    from npyrnn.train import _step

    backend.set_backend("numpy")
    model = RNNLM(V, H, cell=cell, seed=0)
    optimizer = SGD(model.params, 0.5, momentum=0.9)
    X = np.random.default_rng(0).integers(0, V, (B, T))
    _step(model, X, X, model.begin_state(B), optimizer, 1.0)
    found = {id(a) for a in cuda_graph._reachable_arrays((model, optimizer), np.ndarray)}
    expected = [*model.params.values(), *model.grads.values()]
    expected += [a for buffers in optimizer.state.values() for a in buffers.values()]
    for module in (model.rnn, model.linear):
        expected += list(module._workspace.values())
    assert len(expected) > 2 * len(model.params)
    assert all(id(a) in found for a in expected)


# ------------------------------------------------------------------ a real GPU


def _batches(count, shapes=((B, T),), seed=0):
    import cupy

    rng = np.random.default_rng(seed)
    return [tuple(cupy.asarray(rng.integers(0, V, shapes[i % len(shapes)])) for _ in range(2)) for i in range(count)]


def _eager(model, optimizer, X, Y, state):
    """The step the graph must reproduce: eager, with the same direct cuBLAS products."""
    import cupy

    from npyrnn.train import _step

    with cuda_graph.direct_gemm(cupy).patched(cupy.cuda.get_current_stream()):
        return _step(model, X, Y, state, optimizer, 1.0)


def _same(a, b, what):
    parts_a = a if isinstance(a, tuple) else (a,)
    parts_b = b if isinstance(b, tuple) else (b,)
    for x, y in zip(parts_a, parts_b):
        x, y = backend.to_numpy(x), backend.to_numpy(y)
        assert x.shape == y.shape and np.array_equal(x, y), f"{what}: largest difference {np.max(np.abs(x - y))}"


def _twins(cell, dtype, make=lambda p: SGD(p, 1.0)):
    backend.set_backend("cupy")
    models = [RNNLM(V, H, cell=cell, dtype=dtype, seed=7) for _ in range(2)]
    return models, [make(m.params) for m in models]


@gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("carry", [True, False], ids=["carried", "fresh"])
def test_replays_give_the_eager_bits_on_gpu(cell, dtype, carry):
    (m_graph, m_eager), (o_graph, o_eager) = _twins(cell, dtype, lambda p: SGD(p, 0.5, momentum=0.9))
    step = cuda_graph.CudaGraphStep(m_graph, o_graph, 1.0)
    s_graph, s_eager = m_graph.begin_state(B), m_eager.begin_state(B)
    for i, (X, Y) in enumerate(_batches(6)):
        if not carry:
            s_graph, s_eager = m_graph.begin_state(B), m_eager.begin_state(B)
        loss_g, s_graph, norm_g = step(X, Y, s_graph)
        loss_e, s_eager, norm_e = _eager(m_eager, o_eager, X, Y, s_eager)
        _same(loss_g, loss_e, f"loss of minibatch {i}")
        _same(norm_g, norm_e, f"gradient norm of minibatch {i}")
        _same(s_graph, s_eager, f"state after minibatch {i}")
        for name in m_eager.params:
            _same(m_graph.params[name], m_eager.params[name], f"{name} after minibatch {i}")
    assert (step.captures, step.replays) == (1, 5)
    assert o_graph.step_count == o_eager.step_count == 6


@gpu
def test_a_new_learning_rate_is_a_new_graph_on_gpu():
    (m_graph, m_eager), (o_graph, o_eager) = _twins("gru", "float64")
    step = cuda_graph.CudaGraphStep(m_graph, o_graph, 1.0)
    s_graph, s_eager = m_graph.begin_state(B), m_eager.begin_state(B)
    for i, (X, Y) in enumerate(_batches(8)):
        if i == 4:
            o_graph.lr = o_eager.lr = 0.25
        loss_g, s_graph, _ = step(X, Y, s_graph)
        loss_e, s_eager, _ = _eager(m_eager, o_eager, X, Y, s_eager)
        _same(loss_g, loss_e, f"loss of minibatch {i}")
    assert step.captures == 2
    for name in m_eager.params:
        _same(m_graph.params[name], m_eager.params[name], name)


@gpu
def test_two_shapes_and_a_forward_between_them_on_gpu():
    """Minibatches of two shapes alternate; after the captures, an eager forward of a third shape
    (validation) replaces the model's work arrays. The graphs must keep theirs: fresh arrays
    allocated then (which would reuse freed memory) stay untouched by the replays."""
    import cupy

    (m_graph, m_eager), (o_graph, o_eager) = _twins("lstm", "float32")
    step = cuda_graph.CudaGraphStep(m_graph, o_graph, 1.0)
    batches = _batches(12, shapes=((B, T), (B, T), (B - 1, T + 2), (B - 1, T + 2)))
    sentinels = []
    for i, (X, Y) in enumerate(batches):
        fresh = (m_graph.begin_state(X.shape[0]), m_eager.begin_state(X.shape[0]))
        loss_g, _, _ = step(X, Y, fresh[0])
        loss_e, _, _ = _eager(m_eager, o_eager, X, Y, fresh[1])
        _same(loss_g, loss_e, f"loss of minibatch {i}")
        if i == 3:  # both shapes captured: every work array the model holds now belongs to a graph
            held = [a for module in (m_graph.rnn, m_graph.linear) for a in module._workspace.values()]
            pinned = {id(a) for entry in step._graphs.values() for a in entry.pinned}
            assert held and all(id(a) in pinned for a in held)
            probe = cupy.asarray(np.random.default_rng(i).integers(0, V, (2, 3)))
            for model in (m_graph, m_eager):
                model.eval()
                model.forward(probe, model.begin_state(2))
                model.train()
            sentinels = [cupy.full(a.shape, 7, dtype=a.dtype) for a in held for _ in range(2)]
    assert step.captures == 2 and step.replays == 10
    for name in m_eager.params:
        _same(m_graph.params[name], m_eager.params[name], name)
    for k, sentinel in enumerate(sentinels):
        assert bool((sentinel == 7).all()), f"sentinel {k} was overwritten by a replay"


@gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_direct_gemm_matches_cupy_matmul_on_gpu(dtype):
    """The products the cells hand over: transposed weights, column slices, padded rows, a new `out`."""
    import cupy

    backend.set_backend("cupy")
    gemm = cuda_graph.direct_gemm(cupy)
    rng = np.random.default_rng(0)
    W = cupy.asarray(rng.standard_normal((3 * H, H)), dtype=dtype)  # (3H, H), as a GRU's weight_hh
    G = cupy.asarray(rng.standard_normal((B * T, 3 * H)), dtype=dtype)
    h = cupy.asarray(rng.standard_normal((B, H)), dtype=dtype)
    cases = [(h, W.T), (G, W), (G[:, : 2 * H].T, h.repeat(T, axis=0)), (G[:, : 2 * H], W[: 2 * H]),
             (cupy.pad(h, ((0, 0), (1, 2)))[:, 1 : 1 + H], W[:H].T)]
    tol = 1e-12 if dtype == "float64" else 1e-5
    with gemm.patched(cupy.cuda.get_current_stream()):
        for a, b in cases:
            out = cupy.empty((a.shape[0], b.shape[1]), dtype=dtype)
            assert cupy.matmul(a, b, out=out) is out
            expected = gemm.original_matmul(a, b)
            np.testing.assert_allclose(backend.to_numpy(out), backend.to_numpy(expected), rtol=tol, atol=tol)
            np.testing.assert_allclose(backend.to_numpy(cupy.matmul(a, b)), backend.to_numpy(expected),
                                       rtol=tol, atol=tol)
    assert cupy.matmul is gemm.original_matmul  # restored


@gpu
def test_trainer_epoch_with_a_graph_matches_eager_on_gpu():
    from npyrnn.train import Trainer

    (m_graph, m_eager), (o_graph, o_eager) = _twins("rnn", "float64")
    batches = _batches(6)
    trainer = Trainer(m_graph, batches, o_graph, 1.0, cuda_graph=True)
    graph = trainer.run_epoch()
    eager = Trainer(m_eager, batches, o_eager, 1.0).run_epoch()
    assert trainer.graph_replays == 5  # the first minibatch eager, the second captured and replayed
    assert abs(graph["perplexity"] - eager["perplexity"]) <= 1e-12 * eager["perplexity"]
    for name in m_eager.params:
        np.testing.assert_allclose(backend.to_numpy(m_graph.params[name]), backend.to_numpy(m_eager.params[name]),
                                   rtol=1e-12, atol=1e-14)


@gpu
def test_cli_trains_with_cuda_graph_on_gpu(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    runs = {}
    for flag in ("--cuda-graph", "--no-cuda-graph"):
        out = tmp_path / flag.strip("-")
        result = run_subprocess(["train", "--corpus", corpus, "--hidden", 16, "--epochs", 3, "--batch-size", 4,
                                 "--num-steps", 5, "--val-tokens", 50, "--dtype", "float64", "--out", out, "--quiet",
                                 flag], tmp_path, {"NPYRNN_BACKEND": "cupy"})
        assert result.returncode == 0, result.stderr
        runs[flag] = json.loads(Path(out, "summary.json").read_text())
    assert runs["--cuda-graph"]["cuda_graph"] is True and runs["--no-cuda-graph"]["cuda_graph"] is False
    assert runs["--cuda-graph"]["cuda_graph_replays"] > 0 and runs["--no-cuda-graph"]["cuda_graph_replays"] is None
    graph, eager = runs["--cuda-graph"]["perplexity"], runs["--no-cuda-graph"]["perplexity"]
    assert abs(graph - eager) <= 1e-10 * eager, (graph, eager)
