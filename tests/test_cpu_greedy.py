"""Greedy generation compiled whole (`npyrnn.nn.cpu_greedy`, the `fast` extra): the ids and the
final state of the stepper's loop, bit for bit, for every cell, at 0 and 1 helper; declined
where it cannot run, with nothing written.

The stepper is checked against forward (tests/test_cells.py, test_cells_lm.py), and forward
against torch, so the compiled loop is too. Runs wherever Numba is installed and NumPy's BLAS
is OpenBLAS with its 64-bit interface.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("numba", reason="the compiled loops need Numba (pip install 'npyrnn[fast]')")

from npyrnn.data import Vocab  # noqa: E402
from npyrnn import generate  # noqa: E402
from npyrnn.generate import generate_stream, predict  # noqa: E402
from npyrnn.models import RNNLM  # noqa: E402
from npyrnn.nn import cpu_gemm, kernels  # noqa: E402

if cpu_gemm.why_unavailable() is not None:
    pytest.skip(f"split products {cpu_gemm.why_unavailable()}", allow_module_level=True)

from npyrnn.nn import cpu_greedy  # noqa: E402
from test_cpu_loops import _on_numpy, split  # noqa: E402,F401 (the fused kernels on, the helper taking part; a fixture)

CELLS = {  # every cell and variant the loop has a branch for
    "rnn tanh": {"cell": "rnn"},
    "rnn relu": {"cell": "rnn", "nonlinearity": "relu"},
    "gru": {"cell": "gru"},
    "gru no bias": {"cell": "gru", "bias": False},
    "gru reset before": {"cell": "gru", "reset_after": False},
    "lstm": {"cell": "lstm"},
    "lstm proj": {"cell": "lstm", "proj_size": 5},
    "lstm no bias": {"cell": "lstm", "bias": False},
    "lstm proj no bias": {"cell": "lstm", "proj_size": 5, "bias": False},
    "gru reset before no bias": {"cell": "gru", "reset_after": False, "bias": False},
}


def model_of(cfg, V=13, H=9, L=1, dtype="float64", seed=0, scale=4.0):
    """An RNNLM in evaluation mode whose weights are scaled up, so that greedy ids keep changing."""
    cfg = dict(cfg)
    bias = cfg.pop("bias", True)
    model = RNNLM(V, H, num_layers=L, dtype=dtype, init="uniform", seed=seed, **cfg)
    if not bias:  # RNNLM has no switch for its layer's biases: the same layer without them
        layer = {k: v for k, v in cfg.items() if k in ("nonlinearity", "reset_after", "proj_size")}
        model.rnn = type(model.rnn)(V, H, num_layers=L, bias=False, dtype=dtype, init="uniform", seed=seed, **layer)
    for p in list(model.rnn.params.values()) + list(model.linear.params.values()):
        p *= scale
    model.eval()
    return model


def parts(state):
    return state if isinstance(state, tuple) else (state,)


def stepper_loop(model, prefix, n):
    """`predict`'s loop with the stepper: feed the prefix, then n greedy ids; (ids, final state)."""
    state = model.begin_state(1)
    step = model.stepper(state)
    for i in prefix[:-1]:
        step(np.array([i]))
    ids, last = [], prefix[-1]
    for _ in range(n):
        last = int(step(np.array([last])).argmax())
        ids.append(last)
    return ids, state


def varied_model(cfg, L, dtype, prefix, n):
    """`model_of` with the first seed and scale whose greedy ids (the stepper's) take 3 values or more:
    untrained models often settle on one token, which would leave the output layer's argmax
    hardly checked."""
    for seed in range(60):
        for scale in (3.0, 6.0):
            model = model_of(cfg, L=L, dtype=dtype, seed=seed, scale=scale)
            if len(set(stepper_loop(model, prefix, n)[0])) >= 3:
                return model
    raise AssertionError(f"no seed below 60 gives varied ids for {cfg}")


def compiled_loop(model, prefix, n):
    state = model.begin_state(1)
    out = np.empty((len(prefix) + n, 1), dtype=np.int64)
    out[: len(prefix), 0] = prefix
    ran = cpu_greedy.run(model, state, out, len(prefix) - 1)
    return ran, list(out[len(prefix):, 0]), state, out


@pytest.mark.parametrize("helpers", [0, 1])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("L", [1, 3])
@pytest.mark.parametrize("name", CELLS)
def test_the_compiled_loop_gives_the_stepper_loops_ids_and_state(name, L, dtype, helpers):
    split(helpers)
    prefix = [3, 1, 4, 1, 5]
    model = varied_model(CELLS[name], L, dtype, prefix, 40)
    ran, ids, state, _ = compiled_loop(model, prefix, 40)
    assert ran == len(prefix) - 1 + 40
    expected, expected_state = stepper_loop(model, prefix, 40)
    assert ids == expected
    for ours, theirs in zip(parts(state), parts(expected_state)):
        assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("name", ["rnn tanh", "lstm", "gru reset before"])
def test_a_product_cut_between_the_cores_gives_the_same_bits(name):
    """d2l's sizes: `cpu_gemm.blocks` cuts the scratch RNN's (512, 512) and the LSTM's (1024, 256) step
    products in two, offered to the helper one half each, as `cpu_gemm.matvec` has it in the stepper;
    not d2l's scratch GRU's (512, 256) and (256, 256)."""
    split(1)
    H = 512 if name == "rnn tanh" else 256
    model = model_of(CELLS[name], V=28, H=H, dtype="float32", scale=2.0)
    cut = name != "gru reset before"  # whose products are h W_hrz^T (512, 256), then (r * h) W_hn^T
    rows = 2 * H if name == "gru reset before" else model.rnn.GATES * H
    assert (cpu_gemm.blocks(1, rows, H)[1] == 2) == cut
    before = cpu_gemm.stats()
    ran, ids, state, _ = compiled_loop(model, [1, 2, 3], 30)
    assert ran == 2 + 30
    after = cpu_gemm.stats()
    if cut:
        assert after["posted"] > before["posted"]  # offered to the helper (which computes them when awake)
    expected, expected_state = stepper_loop(model, [1, 2, 3], 30)
    assert ids == expected
    for ours, theirs in zip(parts(state), parts(expected_state)):
        assert np.array_equal(ours, theirs)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    name=st.sampled_from(sorted(CELLS)),
    V=st.integers(2, 12),
    H=st.integers(1, 8),
    L=st.integers(1, 3),
    prefix=st.lists(st.integers(0, 11), min_size=1, max_size=5),
    n=st.integers(0, 12),
    dtype=st.sampled_from(["float32", "float64"]),
    helpers=st.integers(0, 1),
)
def test_any_model_and_prefix_gives_the_stepper_loops_ids_and_state(name, V, H, L, prefix, n, dtype, helpers):
    cfg = dict(CELLS[name])
    if cfg.get("proj_size", 0) >= H:
        cfg["proj_size"] = H - 1 if H > 1 else 0
    split(helpers)
    model = model_of(cfg, V=V, H=H, L=L, dtype=dtype, seed=V * 7 + H)
    prefix = [i % V for i in prefix]
    ran, ids, state, _ = compiled_loop(model, prefix, n)
    assert ran == len(prefix) - 1 + n
    again = compiled_loop(model, prefix, n)  # a second call: nothing carried over from the first
    assert again[1] == ids
    expected, expected_state = stepper_loop(model, prefix, n)
    assert ids == expected
    for ours, theirs in zip(parts(state), parts(expected_state)):
        assert np.array_equal(ours, theirs)


def test_predict_gives_the_same_text_compiled_or_not(monkeypatch):
    split(1)
    vocab = Vocab(list("abcdefghij "))
    calls = []
    real = cpu_greedy.run
    monkeypatch.setattr(cpu_greedy, "run", lambda *a: calls.append(real(*a)) or calls[-1])
    for name in ("gru", "lstm proj", "rnn tanh"):
        model = model_of(CELLS[name], V=len(vocab), H=16, L=2, dtype="float32")
        compiled = predict("abc ab", 60, model, vocab)
        assert calls[-1] == 6 - 1 + 60
        cpu_greedy.enabled = False
        try:
            assert predict("abc ab", 60, model, vocab) == compiled
            assert calls[-1] == 0
        finally:
            cpu_greedy.enabled = True
        stop = compiled[6:8]
        assert predict("abc ab", 60, model, vocab, stop=stop) == compiled[: compiled.index(stop, 6) + 2]


@pytest.mark.parametrize("name", ["gru", "lstm proj"])
def test_calls_of_a_few_tokens_each_give_the_same_ids_and_state(name, monkeypatch):
    """`CHUNK` tokens a compiled call (Ctrl-C is seen between calls): chunks of 7, the prefix cut too."""
    split(1)
    prefix = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    model = varied_model(CELLS[name], 2, "float64", prefix, 40)
    monkeypatch.setattr(cpu_greedy, "CHUNK", 7)
    calls = []
    real = cpu_gemm.run_loop
    monkeypatch.setattr(cpu_gemm, "run_loop", lambda *a, **k: calls.append(1) or real(*a, **k))
    ran, ids, state, _ = compiled_loop(model, prefix, 40)
    assert ran == len(prefix) - 1 + 40 and len(calls) == 7  # 49 tokens: 7 calls
    expected, expected_state = stepper_loop(model, prefix, 40)
    assert ids == expected
    for ours, theirs in zip(parts(state), parts(expected_state)):
        assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("declined_after", [0, 1, 3])
def test_predict_goes_on_with_the_stepper_where_the_compiled_calls_stop(declined_after, monkeypatch):
    """The products taken by another thread between two calls: the stepper goes on from there."""
    split(0)
    vocab = Vocab(list("abcdefghij "))
    model = model_of(CELLS["lstm"], V=len(vocab), H=12, L=2, dtype="float32")
    expected = predict("abc ab", 50, model, vocab)
    monkeypatch.setattr(cpu_greedy, "CHUNK", 8)
    calls = []
    real = cpu_gemm.run_loop
    monkeypatch.setattr(cpu_gemm, "run_loop",
                        lambda *a, **k: len(calls) < declined_after and (calls.append(1) or real(*a, **k)))
    fed = []
    real_run = cpu_greedy.run
    monkeypatch.setattr(cpu_greedy, "run", lambda *a: fed.append(real_run(*a)) or fed[-1])
    assert predict("abc ab", 50, model, vocab) == expected
    assert fed == [8 * declined_after]


@pytest.mark.parametrize("logits", ["tied", "nan"])
def test_the_argmax_is_numpys_on_ties_and_nans(logits):
    """numpy.argmax takes the first of equal values, and the first NaN if there is one."""
    split(0)
    model = model_of(CELLS["gru"], V=9, H=6)
    model.linear.params["weight"][...] = 0  # the logits are the bias
    bias = np.array([0.0, 1.0, 5.0, 2.0, 5.0, -1.0, 5.0, 0.0, 3.0])
    if logits == "nan":
        bias[[3, 7]] = np.nan
    model.linear.params["bias"][...] = bias
    ran, ids, state, _ = compiled_loop(model, [1, 2], 6)
    assert ran == 7 and ids == [2 if logits == "tied" else 3] * 6
    expected, expected_state = stepper_loop(model, [1, 2], 6)
    assert ids == expected and np.array_equal(state, expected_state)


@pytest.mark.parametrize("chunk", [256, 5])
@pytest.mark.parametrize("declined_after", [None, 1, 2])
def test_streamed_greedy_text_is_predicts(chunk, declined_after, monkeypatch):
    """Greedy streaming of one sequence runs compiled, `STREAM_CHUNK` tokens a call, and joins to
    `predict`'s text, with and without a stop string; should the products be taken by another
    thread after some calls, the stepper goes on from there."""
    split(1)
    vocab = Vocab(list("abcdefghij "))
    model = model_of(CELLS["lstm proj"], V=len(vocab), H=16, L=2, dtype="float32")
    expected = predict("abc ab", 60, model, vocab)
    stop = expected[9:11]
    expected_stopped = predict("abc ab", 60, model, vocab, stop=stop)
    assert len(expected_stopped) < len(expected)
    monkeypatch.setattr(generate, "STREAM_CHUNK", chunk)
    calls = []
    real = cpu_gemm.run_loop
    monkeypatch.setattr(cpu_gemm, "run_loop", lambda *a, **k: (declined_after is None or len(calls) < declined_after)
                        and (calls.append(1) or real(*a, **k)))
    pieces = list(generate_stream("abc ab", 60, model, vocab))
    assert "".join(pieces) == expected and pieces[0] == "abc ab" and len(pieces) == 61
    needed = 1 + max(0, -(-(60 - chunk) // chunk))  # the prefix's 5 ids and the first chunk, then a chunk a call
    assert len(calls) == (needed if declined_after is None else min(declined_after, needed))
    calls.clear()
    assert "".join(generate_stream("abc ab", 60, model, vocab, stop=stop)) == expected_stopped


def declined(model, state=None, out=None, forced=0):
    state = model.begin_state(1) if state is None else state
    if out is None:
        out = np.zeros((6, 1), dtype=np.int64)
    before = out.copy(), [s.copy() for s in parts(state)]
    ran = cpu_greedy.run(model, state, out, forced)
    assert np.array_equal(out, before[0]) and all(np.array_equal(a, b) for a, b in zip(parts(state), before[1]))
    return not ran


def test_it_declines_where_it_cannot_run_and_writes_nothing(monkeypatch):
    model = model_of(CELLS["gru"])
    assert declined(model), "split products off: declined"
    split(0)
    assert cpu_greedy.run(model, model.begin_state(1), np.zeros((6, 1), dtype=np.int64)) == 5, "it runs with the products on"
    both_ways = RNNLM(13, 9, bidirectional=True, seed=0)
    both_ways.eval()
    assert declined(both_ways), "no step-by-step form"
    out = np.zeros((6, 1), dtype=np.int64)
    out[0] = 13  # outside the vocabulary: the compiled gather reads no bounds
    assert declined(model, out=out)
    out[0], out[1] = 2, -1
    assert declined(model, out=out, forced=1)
    assert declined(model, out=np.zeros((6, 2), dtype=np.int64)), "batch 1 only"
    assert declined(model, out=np.zeros((6, 1), dtype=np.int32)), "int64 ids only"
    assert declined(model, state=np.zeros((1, 2, 9))), "batch 1 only"
    assert declined(model, state=np.zeros((1, 1, 9), dtype=np.float32)), "the model's dtype"
    for wrong in (np.zeros((2, 1, 9)), np.zeros((1, 1, 8)), (np.zeros((1, 1, 9)), np.zeros((1, 1, 9))), [np.zeros((1, 1, 9))],
                  np.zeros((1, 1, 9))[:, :, ::-1]):  # more layers, another size, an LSTM's pair, a list, strided
        assert declined(model, state=wrong)
    lstm = model_of(CELLS["lstm proj"], L=2)  # h (2, 1, 5), c (2, 1, 9)
    for wrong in (np.zeros((2, 1, 5)), (np.zeros((2, 1, 9)), np.zeros((2, 1, 9))), (np.zeros((2, 1, 5)), np.zeros((1, 1, 9))),
                  (np.zeros((2, 1, 5)), np.zeros((2, 9)))):
        assert declined(lstm, state=wrong)
    read_only = np.zeros((6, 1), dtype=np.int64)
    read_only.flags.writeable = False
    assert not cpu_greedy.run(model, model.begin_state(1), read_only)
    for name, value in (("rnn.weight_hh_l0", np.asfortranarray(model.params["rnn.weight_hh_l0"])),
                        ("linear.weight", np.asfortranarray(model.params["linear.weight"])),
                        ("linear.bias", model.params["linear.bias"].astype(">f8"))):
        other = model_of(CELLS["gru"])
        layer, key = name.split(".")
        getattr(other, layer).params[key] = value  # the stepper reads it as it is: declined, not copied
        assert declined(other), name
    kernels.set_enabled(False)
    assert declined(model), "fused kernels off: the stepper's array operations are the reference"
    kernels.set_enabled(True)
    monkeypatch.setattr(cpu_greedy, "enabled", False)
    assert declined(model)
