"""Fused CuPy kernels (`npyrnn.nn.kernels`): the same numbers as the array operations, and the switch.

Three groups:

- everywhere: the cells' fused loops run with each kernel replaced by its array-op twin
  (`spec.reference`) and must give the plain path's numbers; the switch (`NPYRNN_FUSED`,
  `set_enabled`), the probe's silent fallback and its warning, and NumPy never reaching past
  the backend check;
- under the CPU stand-in for CuPy: the real factory fails to launch and the cells fall back silently;
- on a real GPU: the compiled kernels against the array operations, forward, backward and stepper.
"""

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import one_line, record, rel_err
from npyrnn import backend
from npyrnn.errors import BackendError
from npyrnn.nn import GRU, LSTM, RNN, kernels


def _real_cupy():
    if not backend.is_cupy_available():
        return False
    import cupy

    return not hasattr(cupy, "_fake")


REAL_CUPY = _real_cupy()

CONFIGS = [  # (id, class, kwargs, kernels the cell must use)
    ("rnn-tanh", RNN, {}, {"rnn_fwd_tanh", "rnn_bwd_tanh"}),
    ("rnn-relu", RNN, {"nonlinearity": "relu"}, {"rnn_fwd_relu", "rnn_bwd_relu"}),
    ("rnn-2layer-bi", RNN, {"num_layers": 2, "bidirectional": True}, {"rnn_fwd_tanh", "rnn_bwd_tanh"}),
    ("gru-after", GRU, {}, {"gru_after_fwd", "gru_after_bwd"}),
    ("gru-after-nobias", GRU, {"bias": False}, {"gru_after_fwd_nobias", "gru_after_bwd"}),
    ("gru-before", GRU, {"reset_after": False},
     {"gru_before_rz", "gru_before_n", "gru_before_bwd_a", "gru_before_bwd_b"}),
    ("gru-before-2layer-bi", GRU, {"reset_after": False, "num_layers": 2, "bidirectional": True},
     {"gru_before_rz", "gru_before_n", "gru_before_bwd_a", "gru_before_bwd_b"}),
    ("gru-after-2layer-bi", GRU, {"num_layers": 2, "bidirectional": True}, {"gru_after_fwd", "gru_after_bwd"}),
    ("lstm", LSTM, {}, {"lstm_fwd", "lstm_bwd_noproj"}),
    ("lstm-proj", LSTM, {"proj_size": 3}, {"lstm_fwd", "lstm_bwd"}),
    ("lstm-2layer-bi", LSTM, {"num_layers": 2, "bidirectional": True}, {"lstm_fwd", "lstm_bwd_noproj"}),
    ("lstm-proj-2layer-bi", LSTM, {"proj_size": 3, "num_layers": 2, "bidirectional": True}, {"lstm_fwd", "lstm_bwd"}),
]
IDS = [c[0] for c in CONFIGS]
T, B, I, H = 5, 3, 4, 6


@pytest.fixture(autouse=True)
def _fresh_kernels(monkeypatch):
    """Every test starts with no probe done, the switch left to the environment, the variable unset."""
    monkeypatch.delenv(kernels.ENV, raising=False)
    kernels._reset()
    kernels.set_enabled(None)
    yield
    kernels._reset()
    kernels.set_enabled(None)


def _run(cls, kwargs, dtype, with_final_grads, sizes=(T, B, I, H)):
    """Forward, backward and 3 stepper steps of a fresh layer on the active backend; host copies of everything."""
    T, B, I, H = sizes
    xp = backend.xp
    rng = np.random.default_rng(7)
    layer = cls(I, H, dtype=dtype, init="uniform", seed=3, **kwargs)
    D, L, P = layer.num_directions, layer.num_layers, layer.output_size
    x = xp.asarray(rng.standard_normal((T, B, I)), dtype=dtype)
    lstm = cls is LSTM
    h0 = xp.asarray(rng.standard_normal((L * D, B, P)), dtype=dtype)
    state0 = (h0, xp.asarray(rng.standard_normal((L * D, B, H)), dtype=dtype)) if lstm else h0
    out, final = layer.forward(x, state0)
    dout = xp.asarray(rng.standard_normal(out.shape), dtype=dtype)
    if with_final_grads:
        dh_n = xp.asarray(rng.standard_normal((L * D, B, P)), dtype=dtype)
        dfinal = (dh_n, xp.asarray(rng.standard_normal((L * D, B, H)), dtype=dtype)) if lstm else dh_n
    else:
        dfinal = None
    dx, dstate0 = layer.backward(dout, dfinal)
    results = {"out": out, "dx": dx}
    for name, a in zip(("h_n", "c_n"), final if lstm else (final,)):
        results[name] = a
    for name, a in zip(("dh0", "dc0"), dstate0 if lstm else (dstate0,)):
        results[name] = a
    for name, g in layer.grads.items():
        results["grad " + name] = g
    if not layer.bidirectional:  # the stepper: 3 steps of token ids from the same state
        h = xp.asarray(rng.standard_normal((L, B, P)), dtype=dtype)
        state = (h, xp.asarray(rng.standard_normal((L, B, H)), dtype=dtype)) if lstm else h
        step = layer.stepper(state)
        for t in range(3):
            results[f"step {t}"] = step(xp.asarray(rng.integers(0, I, size=B)))
    return {k: backend.to_numpy(v).copy() for k, v in results.items()}


def _compare(fused, plain, tol, kind):
    assert fused.keys() == plain.keys()
    for name in plain:
        err = rel_err(fused[name], plain[name])
        record(kind, err)
        assert err <= tol, f"{name}: fused kernels vs array operations, relative error {err:.2e} > {tol:.0e}"


class _Emulated:
    """A kernel factory whose 'kernels' are the array-op twins; counts the launches per kernel."""

    def __init__(self):
        self.calls = {}

    def __call__(self, spec, xp=None, dtype=None):
        def kernel(*args):
            self.calls[spec.name] = self.calls.get(spec.name, 0) + 1
            spec.reference(backend.get_array_module(args[0]), *args)

        return kernel


@pytest.fixture
def emulated(monkeypatch):
    """Fused loops on any backend: kernels are on, and every kernel is its array-op twin."""
    factory = _Emulated()
    monkeypatch.setattr(kernels, "_has_kernels", lambda xp: True)
    monkeypatch.setattr(kernels, "_build", factory)
    return factory


# ------------------------------------------------------------------ the fused loops, everywhere
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("with_final_grads", [False, True], ids=["no-dh_n", "dh_n"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_fused_loops_match_array_ops(cfg, with_final_grads, dtype, emulated):
    """The cells' fused loops, with array-op kernels, give the plain loops' numbers (forward, backward, stepper)."""
    _, cls, kwargs, used = cfg
    kernels.set_enabled(False)
    plain = _run(cls, kwargs, dtype, with_final_grads)
    assert emulated.calls == {}, "set_enabled(False) must keep the cells off the kernels"
    kernels.set_enabled(True)
    fused = _run(cls, kwargs, dtype, with_final_grads)
    assert set(emulated.calls) == used, f"kernels launched: {sorted(emulated.calls)}, expected {sorted(used)}"
    assert kernels.status().startswith("on (probed"), kernels.status()
    # the same operations in the same order: equal up to a few roundings of tanh on other memory layouts
    _compare(fused, plain, 1e-13 if dtype == "float64" else 1e-5, f"fused loops (array-op kernels), {dtype}")


@st.composite
def _configs(draw):
    cls = draw(st.sampled_from([RNN, GRU, LSTM]))
    H = draw(st.integers(1, 5))
    kwargs = {"num_layers": draw(st.integers(1, 2)), "bidirectional": draw(st.booleans()), "bias": draw(st.booleans())}
    if cls is RNN:
        kwargs["nonlinearity"] = draw(st.sampled_from(["tanh", "relu"]))
    if cls is GRU:
        kwargs["reset_after"] = draw(st.booleans())
    if cls is LSTM:
        kwargs["proj_size"] = draw(st.integers(0, H - 1))
    sizes = (draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 4)), H)
    return cls, kwargs, sizes, draw(st.booleans())


@settings(derandomize=True, max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=_configs())
def test_fused_loops_match_array_ops_property(cfg, emulated):
    """Random cells and sizes (T, B, H = 1 included): the fused loops give the plain loops' numbers."""
    cls, kwargs, sizes, with_final_grads = cfg
    kernels._reset()
    kernels.set_enabled(False)
    plain = _run(cls, kwargs, "float64", with_final_grads, sizes)
    kernels.set_enabled(True)
    fused = _run(cls, kwargs, "float64", with_final_grads, sizes)
    assert emulated.calls, "the fused loops did not run"
    _compare(fused, plain, 1e-13, "fused loops (array-op kernels), float64")


def test_every_kernel_is_used_by_some_cell():
    used = set().union(*(c[3] for c in CONFIGS))
    assert used == set(kernels.SPECS)


# ------------------------------------------------------------------ the switch
def _raise(*args, **kwargs):
    raise AssertionError("a cell consulted the fused kernels although they are switched off")


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("how", ["env", "set_enabled"])
def test_switched_off_cells_call_no_kernel(cfg, how, monkeypatch):
    """NPYRNN_FUSED=0 and set_enabled(False) keep every cell on array operations, even 'on a device'."""
    _, cls, kwargs, _ = cfg
    monkeypatch.setattr(kernels, "_has_kernels", lambda xp: True)
    monkeypatch.setattr(kernels, "_probe", _raise)
    monkeypatch.setattr(kernels, "_build", _raise)
    if how == "env":
        monkeypatch.setenv(kernels.ENV, "0")
        assert kernels.status() == "off (NPYRNN_FUSED=0)"
    else:
        kernels.set_enabled(False)
        assert kernels.status() == "off (set_enabled(False))"
    assert not kernels.enabled()
    _run(cls, kwargs, "float64", True)


def test_set_enabled_overrides_the_environment(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "0")
    kernels.set_enabled(True)
    assert kernels.enabled()
    kernels.set_enabled(None)
    assert not kernels.enabled()
    monkeypatch.setenv(kernels.ENV, "1")
    assert kernels.enabled()
    kernels.set_enabled(False)
    assert not kernels.enabled()


def test_bad_switch_values_raise_one_line(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "maybe")
    with pytest.raises(BackendError) as exc:
        kernels.enabled()
    assert "NPYRNN_FUSED must be 0" in one_line(exc)
    with pytest.raises(TypeError) as exc:
        kernels.set_enabled("yes")
    assert "True, False or None" in one_line(exc)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_numpy_without_numba_never_reaches_past_the_backend_check(cfg, monkeypatch):
    """Without Numba, on NumPy `get` answers None before looking at the probe or the factory."""
    _, cls, kwargs, _ = cfg
    backend.set_backend("numpy")  # the conftest fixture restores the previous backend
    monkeypatch.setattr(kernels, "_numba_installed", lambda: False)
    for name in ("_probe", "_build"):
        monkeypatch.setattr(kernels, name, _raise)
    _run(cls, kwargs, "float64", True)
    assert kernels.get(np, "rnn_fwd_tanh", "float64") is None
    assert kernels.status(np) == "unavailable (on NumPy they need Numba: pip install 'npyrnn[fast]')"


def test_backends_keep_their_own_failures(monkeypatch, emulated):
    """A kernel that fails on one backend (the stand-in for CuPy, say) leaves the other's kernels on."""
    other = type("cupy", (), {"__name__": "cupy"})
    kernels._failures["cupy"] = "lstm_fwd could not be built or launched: NotImplementedError: no"
    assert kernels.get(other, "lstm_fwd", "float32") is None
    assert kernels.status(other).startswith("unavailable (lstm_fwd could not be built")
    assert kernels.get(np, "lstm_fwd", "float32") is not None
    assert kernels.status(np) == "on (probed: lstm_fwd float32)"


# ------------------------------------------------------------------ the probe
class _Failing:
    def __init__(self, exc):
        self.exc, self.built = exc, 0

    def __call__(self, spec, xp=None, dtype=None):
        self.built += 1

        def kernel(*args):
            raise self.exc

        return kernel


LAUNCH_ERRORS = [NotImplementedError("fakecupy: cupy.ElementwiseKernel ..."), RuntimeError("nvrtc: not found")]


@pytest.mark.parametrize("exc", LAUNCH_ERRORS)
def test_probe_falls_back_silently_when_a_kernel_cannot_launch(exc, monkeypatch):
    factory = _Failing(exc)
    monkeypatch.setattr(kernels, "_has_kernels", lambda xp: True)
    monkeypatch.setattr(kernels, "_build", factory)
    xp = backend.xp
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.get(xp, "lstm_fwd", "float32") is None
        assert kernels.get(xp, "rnn_fwd_tanh", "float64") is None  # off for the rest of the process
        _run(GRU, {}, "float64", True)  # the cells run on array operations, without a warning
    assert factory.built == 1, "after one failure nothing is built again"
    status = kernels.status()
    assert status.startswith("unavailable (lstm_fwd could not be built or launched") and type(exc).__name__ in status


def test_probe_warns_once_and_falls_back_when_a_kernel_disagrees(monkeypatch):
    def wrong(spec, xp=None, dtype=None):
        n_in = len(spec.inputs.split(","))

        def kernel(*args):
            xp = backend.get_array_module(args[0])
            spec.reference(xp, *args)
            first_output = args[n_in]
            first_output *= 1.001  # off by 1e-3

        return kernel

    monkeypatch.setattr(kernels, "_has_kernels", lambda xp: True)
    monkeypatch.setattr(kernels, "_build", wrong)
    xp = backend.xp
    with pytest.warns(RuntimeWarning, match="gru_after_fwd .float64. disagrees with the array operations"):
        assert kernels.get(xp, "gru_after_fwd", "float64") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning only: later look-ups are quiet
        assert kernels.get(xp, "gru_after_fwd", "float64") is None
        assert kernels.get(xp, "lstm_fwd", "float32") is None
    assert kernels.status().startswith("unavailable (gru_after_fwd (float64) disagrees")


def test_probe_passes_and_caches_a_correct_kernel(monkeypatch, emulated):
    xp = backend.xp
    for dtype in ("float32", "float64"):
        first = kernels.get(xp, "lstm_bwd", dtype)
        assert first is not None and kernels.get(xp, "lstm_bwd", dtype) is first
    assert kernels.status() == "on (probed: lstm_bwd float32, lstm_bwd float64)"
    assert kernels.prepare(xp, "float32").startswith("on (probed: ")
    assert all(kernels.get(xp, name, "float32") is not None for name in kernels.SPECS)


def test_kernel_parameters_match_their_twins():
    """Each kernel's CUDA parameters are its twin's arguments, in order; CuPy reserves the name `i`."""
    import inspect

    for spec in kernels.SPECS.values():
        names = [p.split()[-1] for p in (spec.inputs + "," + spec.outputs).split(",")]
        assert list(inspect.signature(spec.reference).parameters)[1:] == names, spec.name
        assert "i" not in names and all(p.split()[0] == "T" for p in (spec.inputs + "," + spec.outputs).split(","))


# ------------------------------------------------------------------ the CPU stand-in for CuPy
def test_stand_in_falls_back_silently():
    """Under fakecupy, ElementwiseKernel refuses to run: no warning, and the cells keep working."""
    if backend.name != "cupy" or REAL_CUPY:
        pytest.skip("runs under the CPU stand-in for CuPy only (NPYRNN_BACKEND=cupy with fakecupy first on PYTHONPATH)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(LSTM, {}, "float32", False)
    assert kernels.status().startswith("unavailable (lstm_fwd could not be built or launched: NotImplementedError")


# ------------------------------------------------------------------ a real GPU
gpu = pytest.mark.skipif(not REAL_CUPY, reason="needs real CuPy and a CUDA device (not the CPU stand-in)")


@gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_compiled_kernels_match_array_ops_on_gpu(cfg, dtype):
    _, cls, kwargs, used = cfg
    backend.set_backend("cupy")
    kernels.set_enabled(False)
    plain = _run(cls, kwargs, dtype, True)
    kernels.set_enabled(True)
    fused = _run(cls, kwargs, dtype, True)
    status = kernels.status()
    assert status.startswith("on (probed"), status
    assert all(f"{name} {dtype}" in status for name in used), status
    _compare(fused, plain, 1e-12 if dtype == "float64" else 1e-5, f"fused CuPy kernels, {dtype}")


@gpu
def test_prepare_probes_every_kernel_on_gpu():
    import cupy

    for dtype in ("float32", "float64"):
        status = kernels.prepare(cupy, dtype)
        assert status.startswith("on (probed"), status
    assert len(kernels._ready) == 2 * len(kernels.SPECS)


# ------------------------------------------------------------------ the CUDA bodies, on the CPU
def _source(dtypes, cuda=False):
    """Each kernel's CUDA body inside a loop shaped like CuPy's (a reference per parameter).

    `cuda=False`: C++ for the host compiler, one `extern "C"` function per kernel and dtype;
    `cuda=True`: `__global__` kernels for nvcc.
    """
    lines = ["typedef float T;", kernels.PREAMBLE]  # CuPy may emit its typedef of T before the preamble
    if not cuda:
        lines[:0] = ["#include <cmath>", "using std::tanh; using std::isnan;", "#define __device__",
                     "#define __forceinline__ inline"]
    for ctype in dtypes:
        lines.append(f"namespace ns_{ctype} {{ typedef {ctype} T;")
        for spec in kernels.SPECS.values():
            ins = [p.split()[-1] for p in spec.inputs.split(",")]
            outs = [p.split()[-1] for p in spec.outputs.split(",")]
            params = ", ".join([f"const T* _raw_{n}" for n in ins] + [f"T* _raw_{n}" for n in outs])
            refs = " ".join([f"const T& {n} = _raw_{n}[_i];" for n in ins] + [f"T& {n} = _raw_{n}[_i];" for n in outs])
            if cuda:
                head = f"__global__ void {spec.name}(long _n, {params})"
                loop = "for (long _i = blockIdx.x * blockDim.x + threadIdx.x; _i < _n; _i += blockDim.x * gridDim.x)"
            else:
                head = f'extern "C" void {spec.name}_{ctype}(long _n, {params})'
                loop = "for (long _i = 0; _i < _n; ++_i)"
            lines.append(f"{head} {{ {loop} {{ {refs}\n{spec.body}\n}} }}")
        lines.append("}")
    return "\n".join(lines)


def test_cuda_bodies_compile_with_nvcc(tmp_path):
    """The kernels' CUDA text compiles as CUDA, warnings as errors, with CuPy's options here."""
    import shutil
    import subprocess

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on PATH")
    src = tmp_path / "kernels.cu"
    src.write_text(_source(("float", "double"), cuda=True))
    result = subprocess.run([nvcc, "-c", *kernels.OPTIONS, "-Werror", "all-warnings", str(src), "-o", str(tmp_path / "k.o")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_cuda_bodies_compiled_on_the_cpu_match_their_twins(tmp_path):
    """The kernels' CUDA C++ (not only their twins) computes the array operations' numbers.

    Compiled with the host C++ compiler and `-ffp-contract=off` (the CPU's `--fmad=false`), run
    on contiguous NumPy arrays; this checks the formulas and the operation order of the CUDA
    text itself, everything but NVRTC and the GPU's `tanh`.
    """
    import ctypes
    import shutil
    import subprocess

    compiler = shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler (g++ or clang++) on PATH")
    src, lib = tmp_path / "kernels.cpp", tmp_path / "kernels.so"
    src.write_text(_source(("float", "double")))
    subprocess.run([compiler, "-O0", "-ffp-contract=off", "-shared", "-fPIC", str(src), "-o", str(lib)],
                   check=True, capture_output=True)
    so = ctypes.CDLL(str(lib))
    B, Hk = 4, 9
    for dtype, ctype, tol in (("float64", "double", 1e-13), ("float32", "float", 1e-6)):
        for spec in kernels.SPECS.values():
            names = [p.split()[-1] for p in (spec.inputs + "," + spec.outputs).split(",")]
            rng = np.random.default_rng(len(spec.name))
            args = [rng.uniform(-1.5, 1.5, size=(Hk,) if n.startswith("b_") else (B, Hk)).astype(dtype) for n in names]
            ref = [a.copy() for a in args]
            spec.reference(np, *ref)
            flat = [np.ascontiguousarray(np.broadcast_to(a, (B, Hk))) for a in args]
            fn = getattr(so, f"{spec.name}_{ctype}")
            fn(ctypes.c_long(B * Hk), *[a.ctypes.data_as(ctypes.c_void_p) for a in flat])
            n_in = len(spec.inputs.split(","))
            for name, got, want in zip(names[n_in:], flat[n_in:], ref[n_in:]):
                err = rel_err(got, want)
                record(f"CUDA bodies as C++ on the CPU, {dtype}", err)
                assert err <= tol, f"{spec.name} ({dtype}) output {name}: relative error {err:.2e}"
