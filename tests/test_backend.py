"""The backend switch, its errors, and the rule that compute modules never import numpy/cupy."""

import ast
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from npyrnn import backend

PACKAGE = Path(backend.__file__).resolve().parent
# Host-side modules may import numpy; every other module is compute code, which may touch arrays
# that live on the GPU, and gets its array module from npyrnn.backend.
HOST_SIDE = {
    "backend.py": "the one place that chooses numpy or cupy",
    "nn/init.py": "draws initial weights on the host, so both backends start from the same numbers",
    "checkpoint.py": "reads and writes safetensors files through numpy",
    "data/corpus.py": "turns text into a host array of token ids",
    "data/batches.py": "gathers each epoch's windows on the host before one copy to the backend",
    "generate.py": "draws sampled tokens on the host, so both backends give the same text from one seed",
    "nn/cpu_kernels.py": "the Numba-compiled kernels, which run on NumPy arrays only (kernels.get hands them out on NumPy)",
    "nn/cpu_gemm.py": "the split products, NumPy's OpenBLAS called on NumPy arrays only (backend.matmul hands them out on NumPy)",
    "nn/cpu_loops.py": "the compiled time loops, on NumPy arrays only (Recurrent._cpu_loops hands them out on NumPy)",
    "nn/cpu_greedy.py": "greedy generation compiled whole, on NumPy arrays only (RNNLM._greedy_compiled runs it on NumPy)",
}
COMPUTE_MODULES = sorted({path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")} - set(HOST_SIDE))


def test_numpy_is_the_default():
    out = subprocess.run(
        [sys.executable, "-c", "from npyrnn import backend; print(backend.name, backend.xp.__name__)"],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, check=True,
    )
    assert out.stdout.split() == ["numpy", "numpy"]


def test_unknown_backend_is_one_clear_error():
    previous = backend.name
    with pytest.raises(backend.BackendError, match=r"unknown backend 'tensorflow'; choose one of numpy, cupy"):
        backend.set_backend("tensorflow")
    assert backend.name == previous


def test_unknown_backend_from_environment():
    out = subprocess.run(
        [sys.executable, "-c", "from npyrnn import backend"],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "NPYRNN_BACKEND": "jax"},
    )
    assert out.returncode != 0
    assert "unknown backend 'jax'" in out.stderr and "NPYRNN_BACKEND=numpy" in out.stderr


def test_cupy_that_cannot_import(monkeypatch):
    previous = backend.set_backend("numpy")  # a failed switch must leave this backend in place
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    with pytest.raises(backend.BackendError, match=r"cupy cannot be imported.*pip install npyrnn\[gpu\]"):
        backend.set_backend("cupy")
    assert backend.name == "numpy" and backend.xp is previous is np
    assert not backend.is_cupy_available()


@pytest.mark.parametrize("count,match", [(0, "CUDA sees 0 devices"), (RuntimeError("no CUDA driver"), "no usable device")])
def test_cupy_without_a_device(monkeypatch, count, match):
    def get_device_count():
        if isinstance(count, Exception):
            raise count
        return count

    backend.set_backend("numpy")  # a failed switch must leave this backend in place
    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_device_count))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(backend.BackendError, match=match) as err:
        backend.set_backend("cupy")
    assert "NPYRNN_BACKEND=numpy" in str(err.value)
    assert backend.name == "numpy"


def test_set_backend_numpy_and_helpers(xp):
    a = backend.asarray([1.0, 2.0])
    assert backend.get_array_module(a) is xp
    assert isinstance(backend.to_numpy(a), np.ndarray)
    np.testing.assert_array_equal(backend.to_numpy(a), [1.0, 2.0])


def test_index_add_sums_repeated_rows(xp):
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 7, size=50)
    src = rng.standard_normal((50, 3))
    expected = np.zeros((7, 3))
    np.add.at(expected, idx, src)
    out = xp.zeros((7, 3))
    backend.index_add(out, xp.asarray(idx), xp.asarray(src))
    np.testing.assert_allclose(backend.to_numpy(out), expected, rtol=1e-13, atol=1e-13)


def _imported_roots(path):
    tree = ast.parse(path.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("module", COMPUTE_MODULES)
def test_compute_modules_do_not_import_numpy_or_cupy(module):
    path = PACKAGE / module
    assert path.exists(), f"{module} is listed as a compute module but does not exist"
    bad = _imported_roots(path) & {"numpy", "cupy", "cupyx", "torch"}
    assert not bad, f"{module} imports {sorted(bad)}; get the array module from npyrnn.backend"


@pytest.mark.parametrize("module", sorted(HOST_SIDE))
def test_host_side_exceptions_are_real(module):
    """Each exception names a module that exists and needs it, so the list cannot go stale."""
    path = PACKAGE / module
    assert path.exists(), f"{module} is listed in HOST_SIDE but does not exist"
    assert "numpy" in _imported_roots(path), f"{module} no longer imports numpy; drop it from HOST_SIDE"


def test_compute_modules_are_found():
    assert {"nn/rnn.py", "losses.py", "optim/adam.py", "models.py", "data/vocab.py", "cli.py"} <= set(COMPUTE_MODULES)


def test_the_import_check_can_fail(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import numpy as np\nfrom cupy import ndarray\n")
    assert _imported_roots(f) >= {"numpy", "cupy"}


def test_no_module_imports_torch():
    for path in PACKAGE.rglob("*.py"):
        assert "torch" not in _imported_roots(path), path


def test_import_npyrnn_does_not_import_torch():
    code = (
        "import sys, npyrnn, npyrnn.nn, npyrnn.losses, npyrnn.optim, npyrnn.gradcheck\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_take_rows_gathers_into_out(xp):
    rng = np.random.default_rng(1)
    table = rng.standard_normal((7, 3))
    ids = rng.integers(0, 7, size=(4, 5))
    out = xp.empty((4, 5, 3))
    result = backend.take_rows(xp.asarray(table), xp.asarray(ids), out=out)
    assert result is out
    np.testing.assert_array_equal(backend.to_numpy(out), table[ids])
