"""The one place that chooses NumPy or CuPy.

Every compute module asks this module for its array module instead of importing
numpy or cupy itself:

```python
from npyrnn import backend
xp = backend.xp                      # the active array module
xp = backend.get_array_module(a)     # the module that owns array `a`
```

The backend is chosen at import from the environment variable
``NPYRNN_BACKEND`` (``numpy``, the default, or ``cupy``) and can be switched at
run time with `set_backend`. Arrays made before a switch stay where they
are; move them with `asarray` (to the active backend) or `to_numpy`
(to the host).

Attributes
----------
name : str
    ``'numpy'`` or ``'cupy'``.
xp : module
    ``numpy`` or ``cupy``.
"""

import os

import numpy

from npyrnn.errors import BackendError

__all__ = [
    "BackendError",
    "name",
    "xp",
    "set_backend",
    "get_array_module",
    "to_numpy",
    "asarray",
    "index_add",
    "take_rows",
    "matmul",
    "is_cupy_available",
    "default_rng",
    "memory_bytes",
    "set_cpu_threads",
    "cpu_threads",
    "numpy_blas",
    "split_products",
    "SPLIT_ENV",
]

SPLIT_ENV = "NPYRNN_SPLIT_PRODUCTS"

BACKENDS = ("numpy", "cupy")


name = "numpy"
xp = numpy
_split = None  # npyrnn.nn.cpu_gemm while set_cpu_threads has the split products on


def _import_cupy():
    """Import cupy and make sure it sees a CUDA device; raise BackendError otherwise."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install raising anything
        raise BackendError(
            f"backend 'cupy' was requested but cupy cannot be imported ({exc.__class__.__name__}: {exc}); "
            "install it with `pip install npyrnn[gpu]` (or the cupy wheel for your CUDA version), "
            "or use NPYRNN_BACKEND=numpy"
        ) from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        raise BackendError(
            f"backend 'cupy' was requested but CUDA reports no usable device ({exc.__class__.__name__}: {exc}); "
            "run on a machine with an NVIDIA GPU and driver, or use NPYRNN_BACKEND=numpy"
        ) from None
    if count < 1:
        raise BackendError(
            "backend 'cupy' was requested but CUDA sees 0 devices; "
            "run on a machine with an NVIDIA GPU, or use NPYRNN_BACKEND=numpy"
        )
    return cupy


def is_cupy_available():
    """True when cupy imports and sees at least one CUDA device."""
    try:
        _import_cupy()
    except BackendError:
        return False
    return True


def set_backend(new_name):
    """Switch the active backend.

    Parameters
    ----------
    new_name : {'numpy', 'cupy'}

    Raises
    ------
    BackendError
        For an unknown name, or for 'cupy' where cupy cannot import or sees no device.
    """
    global name, xp
    key = str(new_name).strip().lower()
    if key not in BACKENDS:
        raise BackendError(
            f"unknown backend {new_name!r}; choose one of {', '.join(BACKENDS)} "
            "(set NPYRNN_BACKEND=numpy or NPYRNN_BACKEND=cupy)"
        )
    module = numpy if key == "numpy" else _import_cupy()
    if key != "numpy" and _split is not None:  # the split products are NumPy's: OpenBLAS gets its count back
        set_cpu_threads(None, split=False)
    name, xp = key, module
    return module


def get_array_module(*arrays):
    """Return numpy or cupy, whichever owns the given arrays (chainer's idiom).

    Falls back to numpy when cupy is not installed or no argument is a cupy array.
    """
    for a in arrays:
        module = type(a).__module__
        if module.startswith("cupy"):
            import cupy

            return cupy
    return numpy


def to_numpy(a):
    """Host (NumPy) copy of an array from either backend; numpy arrays pass through."""
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return numpy.asarray(a)


def asarray(a, dtype=None):
    """The array ``a`` on the active backend (copied to the device for cupy)."""
    return xp.asarray(a, dtype=dtype)


def take_rows(table, ids, out):
    """``out[...] = table[ids]``: gather rows of ``table`` into an existing array.

    NumPy buffers ``take(..., out=)`` in its default ``mode='raise'`` (about 4x
    slower); the ids are checked by the caller, so ``mode='clip'`` is used.
    CuPy's ``take`` has no ``mode`` and writes straight into ``out``.

    Parameters
    ----------
    table : array, shape (V, H)
    ids : integer array, any shape S, values in [0, V)
    out : array, shape S + (H,)
    """
    module = get_array_module(table)
    if module is numpy:
        return numpy.take(table, ids, axis=0, out=out, mode="clip")
    return module.take(table, ids, axis=0, out=out)


def matmul(a, b, out=None):
    """``a @ b`` (into ``out``), as ``numpy.matmul`` or ``cupy.matmul`` of the module that owns ``a``.

    On NumPy, while `set_cpu_threads` has the split products on, 2-D float products go to
    ``npyrnn.nn.cpu_gemm`` (blocks fixed by the product's shape, shared by two cores: the same
    bits at every thread count and load); anything it does not take goes to ``numpy.matmul``.
    """
    if _split is not None and type(a) is numpy.ndarray and type(b) is numpy.ndarray:
        if out is None and a.ndim == 2 and b.ndim == 2 and a.dtype == b.dtype:
            out = numpy.empty((a.shape[0], b.shape[1]), dtype=a.dtype)
        if type(out) is numpy.ndarray and _split.matmul(a, b, out):
            return out
    return get_array_module(a).matmul(a, b, out=out)


def index_add(out, idx, src):
    """``out[idx[n]] += src[n]`` for every row n, summing repeated indices.

    This is the scatter that the gradient of a row gather needs (the gradient of
    one-hot input). ``np.add.at`` is slow, so on NumPy the rows are sorted by
    index and summed per segment with ``np.add.reduceat``; on CuPy
    ``cupyx.scatter_add`` does the same with atomics.

    Parameters
    ----------
    out : array, shape (V, H)
        Accumulated in place.
    idx : integer array, shape (N,)
        Row of ``out`` for each row of ``src``; values in [0, V).
    src : array, shape (N, H)
    """
    module = get_array_module(out)
    if module is not numpy:
        import cupyx

        cupyx.scatter_add(out, idx, src)
        return out
    if idx.size == 0:
        return out
    order = numpy.argsort(idx, kind="stable")
    sorted_idx = idx[order]
    starts = numpy.flatnonzero(numpy.r_[True, sorted_idx[1:] != sorted_idx[:-1]])
    out[sorted_idx[starts]] += numpy.add.reduceat(src[order], starts, axis=0)
    return out


def memory_bytes():
    """Total memory of the active backend's device: the machine's RAM on NumPy, the GPU's on CuPy (None if unknown)."""
    try:
        if name == "cupy":
            return int(xp.cuda.runtime.memGetInfo()[1])
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except Exception:  # an unknown platform or a CUDA error: no estimate, no refusal
        return None


def set_cpu_threads(n, split=None):
    """Set how many cores NumPy's matrix products use: n, or None for every core this process may use.

    With the ``fast`` extra (Numba) and NumPy's OpenBLAS, on NumPy, the layers' products are
    split into at most two blocks fixed by their shape, computed by the calling thread and, for
    n > 1, one helper thread (``npyrnn.nn.cpu_gemm``); OpenBLAS itself runs at one thread. The
    result is then the same bit for bit at every thread count, and a busy machine slows a
    product down to about one thread's speed, never far below. ``split=False``, or the
    environment variable ``NPYRNN_SPLIT_PRODUCTS=0`` with ``split=None``, turns this off;
    ``split=True`` asks for it whatever the variable says.

    Otherwise this limits the BLAS (and OpenMP) thread pools to n threads with threadpoolctl
    (n None leaves them as they are). OpenBLAS's threads wait for each other, so on a machine
    where other processes compete for the cores one thread is steadier (docs/performance.md
    measures both); float32 products may then differ in their last bits between thread counts.
    Either way, n given also limits the other thread pools threadpoolctl finds.
    """
    global _split
    if _split is not None:
        _split.stop()
        _split = None
    if n is not None:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            raise BackendError("setting the thread count needs threadpoolctl: pip install threadpoolctl") from None
        threadpool_limits(limits=int(n))
    wanted = env_switch(SPLIT_ENV, "OpenBLAS's own threads", "split products") if split is None else bool(split)
    cpu_gemm = _split_module() if wanted and name == "numpy" else None  # a bad variable fails on CuPy too
    if cpu_gemm is not None:
        cpu_gemm.start((_usable_cores() if n is None else int(n)) - 1)  # NumPy's OpenBLAS now at one thread
        _split = cpu_gemm


def split_products():
    """How NumPy's products are shared: the number of threads (caller and helpers) while the
    split products are on, else None (``numpy.matmul`` with OpenBLAS's own threads)."""
    helpers = None if _split is None else _split.helpers()
    return None if helpers is None else helpers + 1


def split_products_tiled():
    """Whether the split products are on and compute a step's product (a few rows, neither operand
    transposed) in their own tiles (``cpu_gemm.tiles_on()``: x86-64 with AVX-512, not turned off),
    which take the C-ordered W^T a layer copies for them, not the view."""
    return _split is not None and _split.tiles_on()


def env_switch(variable, off, on):
    """An on/off environment variable, on by default: unset, 1, true, on or yes; 0, false, off or no.

    Anything else is one clear error that names `off` and `on`, what 0 and 1 choose.
    """
    value = os.environ.get(variable, "").strip().lower()
    if value in ("", "1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise BackendError(f"{variable} must be 0 ({off}) or 1 ({on}, the default), got {value!r}")


def _split_module():
    """``npyrnn.nn.cpu_gemm`` when the split products can run here, else None."""
    try:
        import numba  # noqa: F401  (the fast extra)
    except ImportError:
        return None
    from npyrnn.nn import cpu_gemm

    return cpu_gemm if cpu_gemm.why_unavailable() is None else None


def _usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_threads():
    """The thread count of NumPy's own BLAS now, or None where threadpoolctl does not find one."""
    blas = numpy_blas()
    return None if blas is None else blas["num_threads"]


def numpy_blas():
    """threadpoolctl's record of NumPy's own BLAS (in numpy.libs beside the package, or inside it),
    else of the BLAS libraries loaded (SciPy's may be too) the one with most threads; None without
    threadpoolctl or a BLAS."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    package = os.path.dirname(numpy.__file__)
    blas = [lib for lib in threadpool_info() if lib.get("user_api") == "blas"]
    numpys = [lib for lib in blas
              if os.path.dirname(lib.get("filepath", "")) in (package + ".libs", package)
              or lib.get("filepath", "").startswith(package + os.sep)]
    if numpys:
        return numpys[0]
    return max(blas, key=lambda lib: lib["num_threads"]) if blas else None


_AVX512_KERNELS = {"skylakex", "cooperlake", "sapphirerapids"}
_copies_pay = None


def transposed_copies_pay():
    """Whether the recurrent layers' step products should read a C-ordered copy of W^T on NumPy.

    NumPy's OpenBLAS, with its AVX-512 kernels (the core types SkylakeX, Cooperlake and
    SapphireRapids), multiplies a few rows by a transposed operand 1.2 to 1.5 times slower than
    by a C-ordered one (B = 32: 218 against 152 us for the GRU's h W_hh^T at H = 256, 1 thread);
    with its AVX2 kernels (Haswell, Zen) the two take the same time, or the view less (the LSTM's:
    206 against 238 us), so there the view stays (docs/performance.md). Decided once per process
    from the kernels OpenBLAS reports (threadpoolctl), never from a timing: the layout can change
    a product's bits, so it must not depend on how busy the machine is.
    """
    global _copies_pay
    if _copies_pay is None:
        blas = numpy_blas()
        _copies_pay = bool(blas and blas.get("internal_api") == "openblas"
                           and str(blas.get("architecture", "")).lower() in _AVX512_KERNELS)
    return _copies_pay


def default_rng(seed=None):
    """A host ``numpy.random.Generator``.

    Parameters are drawn on the host and then copied to the backend, so that the
    same seed gives the same weights on NumPy and on CuPy.
    """
    return numpy.random.default_rng(seed)


_requested = os.environ.get("NPYRNN_BACKEND", "").strip()
if _requested:
    set_backend(_requested)
