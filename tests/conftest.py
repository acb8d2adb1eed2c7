"""Shared fixtures: the backend switch (numpy always, cupy where it runs), no internet for the data tests, helpers."""

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from npyrnn import backend

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Tests find the corpus through NPYRNN_DATA_DIR and never download; default to ../shared/data.
if "NPYRNN_DATA_DIR" not in os.environ and (SHARED_DATA / "timemachine.txt").exists():
    os.environ["NPYRNN_DATA_DIR"] = str(SHARED_DATA)
elif os.environ.get("NPYRNN_DATA_DIR"):  # absolute, as child processes and notebook kernels run elsewhere
    os.environ["NPYRNN_DATA_DIR"] = str(Path(os.environ["NPYRNN_DATA_DIR"]).expanduser().resolve())

# torch is the oracle on tiny tensors: with one thread it skips OpenMP's spin-waits, which on a
# busy 2-core machine made a 3-layer nn.GRU forward and backward 50x slower (23 ms -> 1.8 s)
torch.set_num_threads(1)

CUPY_OK = backend.is_cupy_available()
BACKENDS = [
    "numpy",
    pytest.param("cupy", marks=pytest.mark.skipif(not CUPY_OK, reason="cupy cannot import or sees no CUDA device")),
]


@pytest.fixture(params=BACKENDS)
def xp(request):
    """Run the test body on each backend; restore the previous backend afterwards."""
    previous = backend.name
    module = backend.set_backend(request.param)
    yield module
    backend.set_backend(previous)


@pytest.fixture(autouse=True)
def _restore_backend():
    previous = backend.name
    yield
    if backend.name != previous:
        backend.set_backend(previous)


@pytest.fixture(autouse=True)
def _restore_split_products():
    """A test that starts npyrnn's split products (`npyrnn train` in process does) stops them after."""
    yield
    if backend.split_products() is not None:
        backend.set_cpu_threads(None, split=False)


def closed_port_url():
    """A URL on 127.0.0.1 whose port nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/timemachine.txt"


@pytest.fixture
def no_internet(monkeypatch, tmp_path):
    """Download sources are a dead local port, the cache is a fresh temp dir, no proxies.

    The data tests use it for every test (`pytestmark`). The sources are replaced in
    npyrnn.data.corpus, the module whose download reads them.
    """
    from npyrnn.data import corpus

    monkeypatch.setattr(corpus, "SOURCES", [closed_port_url()])
    monkeypatch.delenv(corpus.URL_ENV, raising=False)
    monkeypatch.setenv(corpus.CACHE_DIR_ENV, str(tmp_path / "cache"))
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def skip_unless_installed(*names):
    """Skip the calling test (or fixture) where an optional package it needs is not installed."""
    import importlib

    missing = []
    for n in names:
        try:
            importlib.import_module(n)
        except ImportError:
            missing.append(n)
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (optional; needed only to download the corpus): "
                    f"pip install {' '.join(missing)}")


def one_line(exc_info):
    """The error's message, after checking that it is a single line."""
    msg = str(exc_info.value)
    assert "\n" not in msg, f"message spans lines: {msg!r}"
    return msg


def rel_err(a, b):
    """Norm-wise relative error ||a - b|| / max(||a||, ||b||); 0 when both are zero."""
    a = np.asarray(backend.to_numpy(a), dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    denom = max(np.linalg.norm(a), np.linalg.norm(b))
    return 0.0 if denom == 0 else float(np.linalg.norm(a - b) / denom)


# Every test that measures a relative error records it here; the session prints the largest.
MEASURED = {}


def record(kind, value):
    MEASURED[kind] = max(MEASURED.get(kind, 0.0), value)


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.write_sep("-", "largest relative errors measured")
        for kind, value in sorted(MEASURED.items()):
            terminalreporter.write_line(f"{kind}: {value:.3e}")
