"""A training minibatch replayed from one CUDA graph on CuPy (opt-in: `--cuda-graph`, `Trainer(cuda_graph=True)`).

At the book's settings a minibatch is a few hundred small kernels and products, each queued from
Python for a few microseconds of work, so the GPU mostly waits for Python. `CudaGraphStep` runs the
first minibatch of each shape eagerly (kernels compiled, buffers allocated), captures the second
into a CUDA graph, and from then on replays that graph: one launch per minibatch, plus the copies
of the minibatch and of a fresh state into the graph's fixed input buffers. The arithmetic is the
eager step's, kernel for kernel, so a replay gives the same bits as an eager step with the same
products (`benchmarks/graph_experiment.py` checked it on an H100; `tests/test_cuda_graph.py` checks
it wherever a GPU is).

Three things make capture possible with CuPy:

- CuPy refuses cuBLAS during capture (cupy/cupy#6290), so while a step runs here `cupy.matmul`
  (npyrnn writes every product as `xp.matmul`) goes to cuBLAS's own `cublas<S|D>gemm_v2`,
  called through ctypes on a handle of this module's, with its own workspace, from the cuBLAS
  library CuPy has loaded; `cupy.vdot` (the clipping norm) becomes an element-wise sum.
- Every address a graph touches must stay its own: the capture allocates from a private
  `cupy.cuda.MemoryPool` that nothing else uses, and the graph keeps its inputs, its outputs and
  every work array the model and optimiser held when it was captured.
- Host values are baked into a capture: the learning rate (a new graph when it changes) and the
  optimiser's step count, so an optimiser whose update reads the step count every step (Adam,
  Adagrad with `lr_decay`) is refused, and so is dropout between layers (its masks are drawn
  on the host).
"""

import contextlib
import ctypes
import threading
import types
from pathlib import Path

from npyrnn import backend
from npyrnn.errors import BackendError, UsageError

# --------------------------------------------------------------------------- cuBLAS through ctypes


def _loaded_library(prefix):
    """Path of a shared library of this process whose file name starts with `prefix`, or None."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if path.startswith("/") and Path(path).name.startswith(prefix):
                return path
    return None


class DirectGemm:
    """`matmul(a, b, out=None)` of 2-D float arrays by `cublas<S|D>gemm_v2` on a handle of its own."""

    def __init__(self, cupy):
        self.cupy = cupy
        self.original_matmul, self.original_vdot = cupy.matmul, cupy.vdot
        cupy.matmul(cupy.ones((2, 2), "f"), cupy.ones((2, 2), "f"))  # CuPy loads cuBLAS now
        path = _loaded_library("libcublas.so")
        if path is None:
            raise BackendError("cuda_graph: CuPy's cuBLAS library is not loaded in this process; leave --cuda-graph out")
        self.path = path
        lib = self.lib = ctypes.CDLL(path)
        handle = ctypes.c_void_p()
        self._check(lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate_v2")
        self.handle = handle
        # A workspace of its own, so that cuBLAS does not allocate while a graph is being captured;
        # set again after every cublasSetStream, which resets it to the default (as PyTorch does).
        self.workspace = cupy.empty(32 << 20, dtype=cupy.uint8)
        self.lock = threading.RLock()  # cupy.matmul is replaced for the whole process while patched
        args = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                ctypes.c_void_p, ctypes.c_int]
        self.gemm, self.scalars = {}, {}
        for dtype, name, ctype in (("float32", "cublasSgemm_v2", ctypes.c_float),
                                   ("float64", "cublasDgemm_v2", ctypes.c_double)):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
            self.gemm[cupy.dtype(dtype)] = fn
            one, zero = ctype(1.0), ctype(0.0)  # host scalars: read when the call is made (or captured)
            self.scalars[cupy.dtype(dtype)] = (one, zero, ctypes.addressof(one), ctypes.addressof(zero))

    @staticmethod
    def _check(status, what):
        if status != 0:
            raise RuntimeError(f"{what} returned cuBLAS status {status}")

    @staticmethod
    def layout(x, itemsize):
        """`(op, ld)` that describes 2-D `x` to column-major cuBLAS as its transpose, or None.

        Rows contiguous (C order, or rows further apart than their length): x^T is column-major
        with ld = the row stride, op N. Columns contiguous (a transposed view such as W.T): x is
        column-major with ld = the column stride, and op T gives x^T.
        """
        r, c = x.shape
        s0, s1 = x.strides
        if s0 % itemsize or s1 % itemsize:
            return None
        s0, s1 = s0 // itemsize, s1 // itemsize
        if s1 == 1 or c == 1:
            ld = s0 if r > 1 else c
            if ld >= max(1, c):
                return 0, ld  # CUBLAS_OP_N
        if s0 == 1 or r == 1:
            ld = s1 if c > 1 else r
            if ld >= max(1, r):
                return 1, ld  # CUBLAS_OP_T
        return None

    def matmul(self, a, b, out=None, **kwargs):
        """`cupy.matmul` for 2-D float arrays of one dtype; anything else goes to CuPy's own."""
        cupy = self.cupy
        ok = (not kwargs and isinstance(a, cupy.ndarray) and isinstance(b, cupy.ndarray) and a.ndim == 2
              and b.ndim == 2 and a.dtype == b.dtype and a.dtype in self.gemm and a.shape[1] == b.shape[0])
        if ok and out is None:
            out = cupy.empty((a.shape[0], b.shape[1]), dtype=a.dtype)
        ok = ok and out.ndim == 2 and out.dtype == a.dtype and out.shape == (a.shape[0], b.shape[1])
        if ok:
            la, lb, lc = (self.layout(x, a.dtype.itemsize) for x in (a, b, out))
            ok = la is not None and lb is not None and lc is not None and lc[0] == 0
        if not ok:
            return self.original_matmul(a, b, out=out, **kwargs)
        M, K = a.shape
        N = b.shape[1]
        _, _, p_one, p_zero = self.scalars[a.dtype]
        # row-major C = A B is column-major C^T = B^T A^T
        self._check(self.gemm[a.dtype](self.handle, lb[0], la[0], N, M, K, p_one, b.data.ptr, lb[1], a.data.ptr,
                                       la[1], p_zero, out.data.ptr, lc[1]), "cublasXgemm_v2")
        return out

    def vdot(self, a, b):
        """`cupy.vdot` of real 1-D arrays as an element-wise product and a sum (no cuBLAS)."""
        if a.ndim == 1 and b.ndim == 1 and a.dtype == b.dtype and a.dtype.kind == "f":
            return (a * b).sum()
        return self.original_vdot(a, b)

    @contextlib.contextmanager
    def patched(self, stream):
        """`cupy.matmul` and `cupy.vdot` replaced while inside; the handle's work queued on `stream`.

        One thread at a time: the replacement is process-wide, and other threads wait.
        """
        cupy, lib = self.cupy, self.lib
        with self.lock:
            self._check(lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(stream.ptr)), "cublasSetStream_v2")
            if hasattr(lib, "cublasSetWorkspace_v2"):  # CUDA 11.4 and later
                self._check(lib.cublasSetWorkspace_v2(self.handle, ctypes.c_void_p(self.workspace.data.ptr),
                                                      ctypes.c_size_t(self.workspace.nbytes)), "cublasSetWorkspace_v2")
            cupy.matmul, cupy.vdot = self.matmul, self.vdot
            try:
                yield
            finally:
                cupy.matmul, cupy.vdot = self.original_matmul, self.original_vdot


_DIRECT = {}


def direct_gemm(cupy):
    """The process's `DirectGemm` for the current device (made once)."""
    device = cupy.cuda.Device().id
    if device not in _DIRECT:
        _DIRECT[device] = DirectGemm(cupy)
    return _DIRECT[device]


# --------------------------------------------------------------------------- what can be captured


def why_not(model, optimizer):
    """None when `CudaGraphStep` can train `model` with `optimizer`, else the reason (one line)."""
    from npyrnn.optim import SGD, Adagrad, RMSprop

    xp = model.xp
    if xp.__name__ != "cupy":
        return f"the model is on {xp.__name__}; CUDA graphs need NPYRNN_BACKEND=cupy on a CUDA device"
    if hasattr(xp, "_fake"):
        return "cupy here is the CPU stand-in fakecupy, which has no CUDA graphs"
    if model.training and model.rnn.dropout > 0 and model.rnn.num_layers > 1:
        return "dropout masks are drawn on the host every minibatch; use --dropout 0 or leave --cuda-graph out"
    if isinstance(optimizer, Adagrad) and optimizer.hyper.get("lr_decay", 0) != 0:
        return "Adagrad's lr_decay changes the step every minibatch; use lr_decay 0 or leave --cuda-graph out"
    if not isinstance(optimizer, (SGD, Adagrad, RMSprop)):
        return (f"{type(optimizer).__name__}'s update reads the step count every minibatch; "
                "use sgd, adagrad or rmsprop, or leave --cuda-graph out")
    return None


# --------------------------------------------------------------------------- the step


class _Captured:
    """One captured minibatch: its graph, its private memory and its fixed inputs and outputs."""

    def __init__(self, hyper, X, Y, state):
        cupy = backend.get_array_module(X)
        self.hyper = hyper
        self.X, self.Y = cupy.empty_like(X), cupy.empty_like(Y)
        self.state = tuple(cupy.empty_like(s) for s in _parts(state))
        self.state_is_tuple = isinstance(state, tuple)  # the LSTM's (h, c)
        self.pool = cupy.cuda.MemoryPool()  # the graph's own memory: nothing else allocates from it
        self.graph = None
        self.outputs = None
        self.pinned = ()  # every array the model and optimiser held after the capture

    def carried(self):
        """The carried-state buffers in the form the model takes: an array, or the LSTM's tuple."""
        return self.state if self.state_is_tuple else self.state[0]


def _reachable_arrays(root, ndarray):
    """Every `ndarray` reachable from `root` through npyrnn objects' attributes, dicts, lists and tuples."""
    found, seen, todo = [], set(), [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, ndarray):
            found.append(obj)
        elif isinstance(obj, dict):
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            todo.extend(obj)
        elif isinstance(obj, types.SimpleNamespace) or (type(obj).__module__.startswith("npyrnn")
                                                         and hasattr(obj, "__dict__")):
            todo.extend(vars(obj).values())  # npyrnn's objects, and the caches it keeps in namespaces
    return found


def _parts(state):
    return state if isinstance(state, tuple) else (state,)


class CudaGraphStep:
    """`step(X, Y, state) -> (loss, state, norm)`: `npyrnn.train`'s minibatch step, replayed from a CUDA graph.

    Parameters
    ----------
    model : RNNLM
        On CuPy with a CUDA device; no dropout between layers while training.
    optimizer : SGD, Adagrad (lr_decay 0) or RMSprop
    clip : float or None, default 1.0

    Raises
    ------
    BackendError
        Not on real CuPy (NumPy, or the CPU stand-in).
    UsageError
        Dropout, or an optimiser whose update reads the step count (see `why_not`).

    Notes
    -----
    The first call for each minibatch shape runs eagerly; the second captures and replays;
    later ones replay. A change of the learning rate (schedules) captures a new graph for the
    shape. The returned state is the graph's carried-state buffer, overwritten by the next call
    (passing it back in costs no copy); `loss` and `norm` are fresh 0-d arrays. The graph is
    replayed on the caller's current stream, which is part of a graph's key; call it from one
    thread at a time (while a step runs, `cupy.matmul` is replaced for the whole process).
    """

    def __init__(self, model, optimizer, clip=1.0):
        self._check(model, optimizer)
        self.model, self.optimizer, self.clip = model, optimizer, clip
        self.xp = model.xp
        self.direct = direct_gemm(self.xp)
        self.capture_stream = self.xp.cuda.Stream(non_blocking=True)
        self._graphs = {}  # minibatch shapes -> _Captured
        self.replays = 0
        self.captures = 0

    @staticmethod
    def _check(model, optimizer):
        reason = why_not(model, optimizer)
        if reason is not None:
            error = BackendError if model.xp.__name__ != "cupy" or hasattr(model.xp, "_fake") else UsageError
            raise error(f"cuda graph: {reason}")

    def _eager(self, X, Y, state):
        from npyrnn.train import _step

        with self.direct.patched(self.xp.cuda.get_current_stream()):
            return _step(self.model, X, Y, state, self.optimizer, self.clip)

    def _capture(self, entry):
        from npyrnn.train import _step

        xp, stream = self.xp, self.capture_stream
        with stream, self.direct.patched(stream), xp.cuda.using_allocator(entry.pool.malloc):
            stream.begin_capture()
            try:
                loss, new_state, norm = _step(self.model, entry.X, entry.Y, entry.carried(), self.optimizer,
                                              self.clip)
                for into, value in zip(entry.state, _parts(new_state)):
                    into[...] = value  # the carried state, where the next replay reads it            (3.1)
            except BaseException:
                with contextlib.suppress(Exception):
                    stream.end_capture()
                raise
            entry.graph = stream.end_capture()
        entry.outputs = (loss, norm)  # addresses the graph writes: kept as long as the graph
        # The model's work arrays from the eager step live in CuPy's default pool; an eager call
        # of another shape (validation) would replace and free them, and the pool would hand their
        # memory out while the graph still writes there. The graph holds on to all of them.
        entry.pinned = _reachable_arrays((self.model, self.optimizer), xp.ndarray)
        self.captures += 1

    def __call__(self, X, Y, state):
        """One minibatch: forward, loss, backward, clip, update. Returns `(loss, state, norm)` as `_step`."""
        xp = self.xp
        parts = _parts(state)
        stream = xp.cuda.get_current_stream()
        key = (X.shape, str(X.dtype), Y.shape, str(Y.dtype), tuple((s.shape, str(s.dtype)) for s in parts),
               stream.ptr)
        hyper = tuple(sorted(self.optimizer.hyper.items()))
        entry = self._graphs.get(key)
        if entry is None or entry.hyper != hyper:
            self._graphs.pop(key, None)  # an older graph of this shape is freed
            self._check(self.model, self.optimizer)  # the model and optimiser may have changed since
            result = self._eager(X, Y, state)  # kernels compiled, buffers allocated, outside any capture
            # Only after a whole eager step: a capture then never holds an optimiser's first step
            # (SGD's momentum buffer starts as the gradient then, and a replay would repeat that).
            self._graphs[key] = _Captured(hyper, X, Y, state)
            return result
        entry.X[...] = X
        entry.Y[...] = Y
        for into, value in zip(entry.state, parts):
            if into is not value:
                into[...] = value
        if entry.graph is None:
            self._capture(entry)  # the optimiser counted this step while it was captured
        else:
            self.optimizer.step_count += 1  # what _step's optimizer.step does on the host
        entry.graph.launch(stream)
        self.replays += 1
        loss, norm = entry.outputs
        return loss.copy(), entry.carried(), norm.copy()
