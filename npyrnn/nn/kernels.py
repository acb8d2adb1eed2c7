"""Fused element-wise kernels for the recurrent cells on CuPy (and on NumPy with Numba), with the array-op path as reference.

On CuPy every array operation is one kernel launch, and a cell's step does several small ones
(an add, the gate activations, the products of the backward pass). Here each step's
element-wise work is one `cupy.ElementwiseKernel` that does exactly the array-op path's
arithmetic, operation for operation, in the layer's dtype: the same formulas in the same order,
sigma(a) as 0.5 tanh(0.5 a) + 0.5 (8.13), each product and sum rounded on its own (compiled with
`--fmad=false`, so no multiply-add is contracted into an FMA). The matrix products stay with
cuBLAS. The cells ask `get(xp, name, dtype)` for a kernel and run their array-op code when it
answers None.

On NumPy the same kernels exist compiled for the CPU by Numba (`cpu_kernels.py`, the optional
`fast` extra: `pip install "npyrnn[fast]"`); without Numba `get` answers None on NumPy.

When the kernels are used (all must hold):

- the arrays are CuPy arrays, or NumPy arrays with Numba installed;
- `set_enabled(False)` was not called, and the environment variable `NPYRNN_FUSED` is not `0`
  (`set_enabled(True)` / `set_enabled(False)` override the variable, `set_enabled(None)` restores it);
- the one-time probe passed. The first time a kernel is needed for a dtype it is built and run
  on small inputs beside the array-op code on the same device; the relative error of every
  output must be at most 1e-5 (float32) or 1e-12 (float64). The comparison reads one number
  back to the host: a single device sync per kernel and dtype in the life of the process
  (`prepare` runs all probes at once, e.g. before a timed or sync-free region).
  If a kernel cannot be built or launched (no NVRTC, or a CPU stand-in for CuPy that refuses
  user kernels with NotImplementedError), the fused kernels are switched off for the rest of
  the process, silently; if one disagrees, they are switched off with one warning, since that
  is a bug. `status()` says which case holds. Each backend keeps its own probes and failures.

Each kernel is registered with `_fused(name, inputs, outputs, body)` on its array-op twin
(`reference(xp, *inputs, *outputs)`), which the probe compares against and which the tests use
to run the cells' fused loops on any backend.
"""

import functools
import os
import warnings
from types import SimpleNamespace

from npyrnn import backend
from npyrnn.nn.recurrent import sigmoid_  # the array-op sigmoid the twins share with the cells

__all__ = ["get", "enabled", "set_enabled", "status", "prepare", "ENV"]

ENV = "NPYRNN_FUSED"
OPTIONS = ("--fmad=false",)  # every * and + rounded on its own, as in the array-op path
TOLERANCE = {"float32": 1e-5, "float64": 1e-12}

PREAMBLE = r"""
template <typename U> __device__ __forceinline__ U sigmoid_(U a) {  // (8.13), as recurrent.sigmoid_
    a = a * U(0.5);
    a = tanh(a);
    a = a * U(0.5);
    return a + U(0.5);
}
"""

SPECS = {}  # name -> SimpleNamespace(name, inputs, outputs, body, reference)

_override = None  # set_enabled's value; None: the environment decides
_ready = {}  # (backend, name, dtype) -> probed kernel
_built = {}  # (backend, name, dtype) -> kernel object
_failures = {}  # backend -> why its fused kernels are off for the rest of the process


# ------------------------------------------------------------------------------ the switch
def enabled():
    """Whether fused kernels may be used: `set_enabled`'s value, else `NPYRNN_FUSED` (default on)."""
    if _override is not None:
        return _override
    return backend.env_switch(ENV, "array operations", "fused kernels")


def set_enabled(flag):
    """Turn the fused kernels on (True) or off (False), or leave it to `NPYRNN_FUSED` (None)."""
    global _override
    if flag is not None and not isinstance(flag, bool):
        raise TypeError(f"set_enabled takes True, False or None, got {flag!r}")
    _override = flag


def status(xp=None):
    """One line: whether the fused kernels are in use on `xp` (default: the active backend), and if not, why.

    'on (probed: ...)', 'on (nothing probed yet)', 'off (...)' for the switch, or
    'unavailable (...)' where the backend has no kernels or a probe failed.
    """
    if xp is None:
        xp = backend.xp
    key = xp.__name__
    if key in _failures:
        return f"unavailable ({_failures[key]})"
    if _override is False:
        return "off (set_enabled(False))"
    if _override is None and not enabled():
        return f"off ({ENV}={os.environ.get(ENV)})"
    if not _has_kernels(xp):
        return "unavailable (on NumPy they need Numba: pip install 'npyrnn[fast]')"
    probed = ", ".join(f"{n} {d}" for k, n, d in sorted(_ready) if k == key)
    return f"on (probed: {probed})" if probed else "on (nothing probed yet)"


def _reset():
    """Forget every probe and failure (for tests)."""
    _ready.clear()
    _built.clear()
    _failures.clear()


# ------------------------------------------------------------------------------ lookup
def _has_kernels(xp):
    """Whether the backend `xp` has fused kernels: CuPy always, NumPy when Numba is installed."""
    if xp.__name__ == "cupy":
        return True
    if xp.__name__ == "numpy":
        return _numba_installed()
    return False


@functools.lru_cache(maxsize=None)
def _numba_installed():
    """Whether Numba imports (asked once per process: a failed import searches the disk every time)."""
    try:
        import numba  # noqa: F401
    except Exception:  # not installed, or installed but broken (an LLVM that does not load): array operations
        return False
    return True


def get(xp, name, dtype):
    """The fused kernel `name` for `dtype` (probed on first use), or None: then run the array ops.

    Call it once per time loop, not per step. Kernels take their inputs, then their outputs
    (written in place; an output may be the same array as an input of the same shape).
    """
    if not enabled() or not _has_kernels(xp):
        return None
    key = xp.__name__
    kernel = _ready.get((key, name, dtype))
    if kernel is None and key not in _failures:
        kernel = _probe(xp, name, dtype)
    return None if key in _failures else kernel


def _cpu_pass(xp, name):
    """`cpu_kernels.<name>`, a compiled pass that is not a step kernel, where it may run: on NumPy
    with Numba while the fused kernels are on (`set_enabled`, `NPYRNN_FUSED`); else None."""
    if xp.__name__ != "numpy" or not enabled() or not _numba_installed():
        return None
    from npyrnn.nn import cpu_kernels

    return getattr(cpu_kernels, name)


def scatter_rows(xp):
    """`cpu_kernels.scatter_rows` (the gradient of a row gather, compiled), or None: `_cpu_pass`."""
    return _cpu_pass(xp, "scatter_rows")


def softmax_xent(xp, dtype):
    """`cpu_kernels.softmax_xent32` (the loss and its gradient in one compiled pass) for float32, or
    None: `_cpu_pass` (float64 keeps the array operations, the reference the gradient checks use)."""
    return _cpu_pass(xp, "softmax_xent32") if str(dtype) == "float32" else None


def clipped_sgd(xp):
    """`cpu_kernels.clipped_sgd` (clipping's scaling and plain SGD's update in one compiled pass), or
    None: `_cpu_pass`."""
    return _cpu_pass(xp, "clipped_sgd")


def transpose_into(xp):
    """`cpu_kernels.transpose_into` (a weight's C-ordered transpose, compiled), or None: `_cpu_pass`."""
    return _cpu_pass(xp, "transpose_into")


def prepare(xp, dtype):
    """Probe every kernel for `dtype` now (one device sync each on CuPy); return `status(xp)`."""
    for name in SPECS:
        get(xp, name, dtype)
    return status(xp)


def _build(spec, xp, dtype):
    """The kernel of a spec for the backend `xp` (the module that owns the arrays); tests replace this factory.

    CuPy: an `ElementwiseKernel` (compiled by CuPy per dtype on first launch). NumPy: the
    Numba-compiled twin from `cpu_kernels.py`.
    """
    if xp.__name__ == "numpy":
        from npyrnn.nn import cpu_kernels

        return cpu_kernels.build(spec, dtype)
    return xp.ElementwiseKernel(
        spec.inputs, spec.outputs, spec.body, spec.name, preamble=PREAMBLE, options=OPTIONS, no_return=True
    )


def _probe_args(xp, spec, dtype, salt):
    """Deterministic device inputs of shape (3, 7) (strided views, like the gate slices), (7,) for biases."""
    args = []
    for j, param in enumerate(_names(spec.inputs) + _names(spec.outputs)):
        B, H = 3, 7
        shape = (H,) if param.startswith("b_") else (B, H + 2)
        n = shape[0] * (shape[1] if len(shape) == 2 else 1)
        a = xp.sin(xp.arange(n, dtype=dtype) * (0.37 + 0.11 * j) + salt + j).reshape(shape) * 1.7
        args.append(a if len(shape) == 1 else a[:, 1 : H + 1])
    return args


def _names(params):
    return [p.split()[-1] for p in params.split(",")]


def _probe(xp, name, dtype):
    """Build kernel `name`, run it beside its array-op twin; keep it, or switch fusion off for `xp`."""
    key = xp.__name__
    spec = SPECS[name]
    n_in = len(_names(spec.inputs))
    fused_args = _probe_args(xp, spec, dtype, 0.5)
    ref_args = _probe_args(xp, spec, dtype, 0.5)
    try:
        kernel = _built.get((key, name, dtype))
        if kernel is None:
            kernel = _built[(key, name, dtype)] = _build(spec, xp, dtype)
        kernel(*fused_args)
    except Exception as exc:  # NotImplementedError from a CPU stand-in, no NVRTC, a compile error
        first_line = (str(exc).splitlines() or [""])[0]
        _failures[key] = f"{name} could not be built or launched: {type(exc).__name__}: {first_line}"
        return None
    spec.reference(xp, *ref_args)
    errors = []
    for a, b in zip(fused_args[n_in:], ref_args[n_in:]):
        a, b = a.astype("float64"), b.astype("float64")
        scale = xp.maximum(xp.maximum(xp.linalg.norm(a), xp.linalg.norm(b)), 1e-300)
        errors.append(xp.linalg.norm(a - b) / scale)
    err = float(xp.max(xp.stack(errors)))  # the probe's one device sync
    if not err <= TOLERANCE[dtype]:
        _failures[key] = f"{name} ({dtype}) disagrees with the array operations: relative error {err:.2e}"
        warnings.warn(
            f"npyrnn: the fused kernel {name} ({dtype}) disagrees with the array operations "
            f"(relative error {err:.2e} > {TOLERANCE[dtype]:.0e}); using array operations for the rest "
            "of this process. Please report this as a bug.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    _ready[(key, name, dtype)] = kernel
    return kernel


def _fused(name, inputs, outputs, body):
    """Register the kernel `name`; the decorated function is its array-op twin."""

    def register(reference):
        SPECS[name] = SimpleNamespace(name=name, inputs=inputs, outputs=outputs, body=body, reference=reference)
        return reference

    return register


# ------------------------------------------------------------------------------ RNN
# forward: h = f(x + gh), x the input side x_t W_ih^T + b, gh = h_{t-1} W_hh^T
@_fused("rnn_fwd_tanh", "T x, T gh", "T h", """
    T a = x + gh;  // a_t (2.1)
    h = tanh(a);   // (2.2)
""")
def _rnn_fwd_tanh(xp, x, gh, h):
    xp.add(x, gh, out=h)
    xp.tanh(h, out=h)


@_fused("rnn_fwd_relu", "T x, T gh", "T h", """
    T a = x + gh;                                     // a_t (2.1)
    h = (a > T(0) || isnan(a)) ? a : T(0);            // (2.2), NaN kept as numpy.maximum does
""")
def _rnn_fwd_relu(xp, x, gh, h):
    xp.add(x, gh, out=h)
    xp.maximum(h, 0, out=h)


# backward: da = (da + carry) * f'(a), f' from the cached output y = h_t
@_fused("rnn_bwd_tanh", "T y, T carry", "T da", """
    T s = y * y;
    s = T(1) - s;      // tanh'(a_t) = 1 - h_t^2 (2.5a)
    T d = da + carry;  // (2.3)
    da = d * s;        // (2.4)
""")
def _rnn_bwd_tanh(xp, y, carry, da):
    s = xp.multiply(y, y)
    xp.subtract(1, s, out=s)
    da += carry
    da *= s


@_fused("rnn_bwd_relu", "T y, T carry", "T da", """
    T s = y > T(0) ? T(1) : T(0);  // relu'(a_t) = 1[h_t > 0] (2.5b)
    T d = da + carry;              // (2.3)
    da = d * s;                    // (2.4)
""")
def _rnn_bwd_relu(xp, y, carry, da):
    s = xp.greater(y, 0).astype(da.dtype)
    da += carry
    da *= s


# ------------------------------------------------------------------------------ GRU
_GRU_AFTER_FWD = """
    T ar = r + ghr;
    T az = z + ghz;
    ar = sigmoid_(ar);      // r_t (8.1)
    az = sigmoid_(az);      // z_t (8.2)
    r = ar;
    z = az;
    T hn = {hn};      // h_{{t-1}} W_hn^T + b_hn, kept for backward
    ghn = hn;
    T an = ar * hn;
    an = n + an;
    T nt = tanh(an);        // n_t (8.3a)
    n = nt;
    T d = h_prev - nt;
    d = d * az;
    h = nt + d;             // h_t = n_t + z_t (h_{{t-1}} - n_t) (8.4)
"""


def _gru_after_fwd_ref(xp, ghr, ghz, h_prev, b_hn, r, z, n, ghn, h):
    r += ghr
    z += ghz
    sigmoid_(r, xp)
    sigmoid_(z, xp)
    if b_hn is not None:
        ghn += b_hn
    tmp = xp.multiply(r, ghn)
    n += tmp
    xp.tanh(n, out=n)
    xp.subtract(h_prev, n, out=tmp)
    tmp *= z
    xp.add(n, tmp, out=h)


@_fused("gru_after_fwd", "T ghr, T ghz, T h_prev, T b_hn", "T r, T z, T n, T ghn, T h",
        _GRU_AFTER_FWD.format(hn="ghn + b_hn"))
def _gru_after_fwd(xp, ghr, ghz, h_prev, b_hn, r, z, n, ghn, h):
    _gru_after_fwd_ref(xp, ghr, ghz, h_prev, b_hn, r, z, n, ghn, h)


@_fused("gru_after_fwd_nobias", "T ghr, T ghz, T h_prev", "T r, T z, T n, T ghn, T h",
        _GRU_AFTER_FWD.format(hn="ghn"))
def _gru_after_fwd_nobias(xp, ghr, ghz, h_prev, r, z, n, ghn, h):
    _gru_after_fwd_ref(xp, ghr, ghz, h_prev, None, r, z, n, ghn, h)


@_fused("gru_before_rz", "T ghr, T ghz, T h_prev", "T r, T z, T rh", """
    T ar = r + ghr;
    T az = z + ghz;
    ar = sigmoid_(ar);  // r_t (8.1)
    az = sigmoid_(az);  // z_t (8.2)
    r = ar;
    z = az;
    rh = ar * h_prev;   // r_t * h_{t-1}, the input of W_hn (8.3b)
""")
def _gru_before_rz(xp, ghr, ghz, h_prev, r, z, rh):
    r += ghr
    z += ghz
    sigmoid_(r, xp)
    sigmoid_(z, xp)
    xp.multiply(r, h_prev, out=rh)


@_fused("gru_before_n", "T ghn, T z, T h_prev", "T n, T h", """
    T an = n + ghn;
    T nt = tanh(an);  // n_t (8.3b)
    n = nt;
    T d = h_prev - nt;
    d = d * z;
    h = nt + d;       // (8.4)
""")
def _gru_before_n(xp, ghn, z, h_prev, n, h):
    n += ghn
    xp.tanh(n, out=n)
    tmp = xp.subtract(h_prev, n)
    tmp *= z
    xp.add(n, tmp, out=h)


# The slopes, as GRU._scan_back computes them for all steps at once:
# S_n = (1 - n^2)(1 - z) (8.6), S_z = z (1 - z)(h_{t-1} - n) (8.7)
_GRU_SLOPES = """
    T sn = n * n;
    sn = T(1) - sn;
    T omz = T(1) - z;
    sn = sn * omz;      // (8.6)
    T sz = z * omz;
    T hmn = h_prev - n;
    sz = sz * hmn;      // (8.7)
"""


def _gru_slopes_ref(xp, z, n, h_prev):
    sn = xp.multiply(n, n)
    xp.subtract(1, sn, out=sn)
    tmp = xp.subtract(1, z)
    sn *= tmp
    sz = xp.multiply(z, tmp)
    xp.subtract(h_prev, n, out=tmp)
    sz *= tmp
    return sn, sz


# carry: h W_hh-side part of dL/dh_t (the matrix product); zdh: dh_{t+1} * z_{t+1}, in/out
@_fused("gru_after_bwd", "T dy, T carry, T r, T z, T n, T h_prev, T ghn", "T da_r, T da_z, T da_n, T dghn, T zdh",
        _GRU_SLOPES + """
    T sr = T(1) - r;
    sr = sr * r;
    sr = sr * ghn;        // S_r (8.9a)
    T c = carry + zdh;    // (8.10a)
    T dh = dy + c;        // (8.5)
    T dan = dh * sn;      // (8.6)
    da_n = dan;
    da_z = dh * sz;       // (8.7)
    dghn = dan * r;       // (8.8a)
    da_r = dan * sr;      // (8.9a)
    zdh = dh * z;         // via z_t * h_{t-1} (8.10a)
""")
def _gru_after_bwd(xp, dy, carry, r, z, n, h_prev, ghn, da_r, da_z, da_n, dghn, zdh):
    sn, sz = _gru_slopes_ref(xp, z, n, h_prev)
    sr = xp.subtract(1, r)
    sr *= r
    sr *= ghn
    c = xp.add(carry, zdh)
    dh = xp.add(dy, c)
    xp.multiply(dh, sn, out=da_n)
    xp.multiply(dh, sz, out=da_z)
    xp.multiply(da_n, r, out=dghn)
    xp.multiply(da_n, sr, out=da_r)
    xp.multiply(dh, z, out=zdh)


# carry: the product through r's and z's rows; rdh, zdh: the previous step's drh * r, dh * z
@_fused("gru_before_bwd_a", "T dy, T carry, T rdh, T z, T n, T h_prev", "T da_z, T da_n, T zdh",
        _GRU_SLOPES + """
    T c = carry + rdh;    // (8.10b)
    c = c + zdh;          // (8.10b)
    T dh = dy + c;        // (8.5)
    da_n = dh * sn;       // (8.6)
    da_z = dh * sz;       // (8.7)
    zdh = dh * z;
""")
def _gru_before_bwd_a(xp, dy, carry, rdh, z, n, h_prev, da_z, da_n, zdh):
    sn, sz = _gru_slopes_ref(xp, z, n, h_prev)
    c = xp.add(carry, rdh)
    c += zdh
    dh = xp.add(dy, c)
    xp.multiply(dh, sn, out=da_n)
    xp.multiply(dh, sz, out=da_z)
    xp.multiply(dh, z, out=zdh)


@_fused("gru_before_bwd_b", "T drh, T r, T h_prev", "T da_r, T rdh", """
    T sr = T(1) - r;
    sr = sr * r;
    sr = sr * h_prev;  // S_r (8.9b)
    da_r = drh * sr;   // (8.9b)
    rdh = drh * r;     // via r_t * h_{t-1} (8.10b)
""")
def _gru_before_bwd_b(xp, drh, r, h_prev, da_r, rdh):
    sr = xp.subtract(1, r)
    sr *= r
    sr *= h_prev
    xp.multiply(drh, sr, out=da_r)
    xp.multiply(drh, r, out=rdh)


# ------------------------------------------------------------------------------ LSTM
@_fused("lstm_fwd", "T ghi, T ghf, T ghg, T gho, T c_prev", "T gi, T gf, T gg, T go, T c, T tc, T m", """
    T ai = gi + ghi;       // a_t (9.1)
    T af = gf + ghf;
    T ag = gg + ghg;
    T ao = go + gho;
    ai = sigmoid_(ai);     // (9.2)
    af = sigmoid_(af);
    ag = tanh(ag);
    ao = sigmoid_(ao);
    gi = ai;
    gf = af;
    gg = ag;
    go = ao;
    T ct = af * c_prev;
    T ig = ai * ag;
    ct = ct + ig;          // c_t = f * c_{t-1} + i * g (9.3)
    c = ct;
    T tct = tanh(ct);
    tc = tct;
    m = ao * tct;          // m_t = o * tanh(c_t) (9.4)
""")
def _lstm_fwd(xp, ghi, ghf, ghg, gho, c_prev, gi, gf, gg, go, c, tc, m):
    for a, gh in ((gi, ghi), (gf, ghf), (gg, ghg), (go, gho)):
        a += gh
    sigmoid_(gi, xp)
    sigmoid_(gf, xp)
    xp.tanh(gg, out=gg)
    sigmoid_(go, xp)
    xp.multiply(gf, c_prev, out=c)
    c += xp.multiply(gi, gg)
    xp.tanh(c, out=tc)
    xp.multiply(go, tc, out=m)


_LSTM_BWD = """
    T k = tc * tc;
    k = T(1) - k;
    k = k * go;           // o (1 - tanh^2(c_t)) (9.10)
    T so = T(1) - go;
    so = so * go;
    so = so * tc;         // tanh(c_t) o (1 - o) (9.9)
    T si = T(1) - gi;
    si = si * gi;
    si = si * gg;         // (9.11)
    T sf = T(1) - gf;
    sf = sf * gf;
    sf = sf * c_prev;     // (9.11)
    T sg = gg * gg;
    sg = T(1) - sg;
    sg = sg * gi;         // (9.11)
    {dm}
    da_o = dm * so;       // (9.9)
    T dc = dm * k;
    dc = dc + cc;         // (9.10)
    da_i = dc * si;       // (9.11)
    da_f = dc * sf;
    da_g = dc * sg;
    cc = dc * gf;         // (9.12)
"""


def _lstm_bwd_ref(xp, dm, gi, gf, gg, go, tc, c_prev, da_i, da_f, da_g, da_o, cc):
    k = xp.multiply(tc, tc)
    xp.subtract(1, k, out=k)
    k *= go
    so = xp.subtract(1, go)
    so *= go
    so *= tc
    si = xp.subtract(1, gi)
    si *= gi
    si *= gg
    sf = xp.subtract(1, gf)
    sf *= gf
    sf *= c_prev
    sg = xp.multiply(gg, gg)
    xp.subtract(1, sg, out=sg)
    sg *= gi
    xp.multiply(dm, so, out=da_o)
    dc = xp.multiply(dm, k)
    dc += cc
    xp.multiply(dc, si, out=da_i)
    xp.multiply(dc, sf, out=da_f)
    xp.multiply(dc, sg, out=da_g)
    xp.multiply(dc, gf, out=cc)


# cc: the carry of dL/dc, in (from step t+1) and out (to step t-1)
@_fused("lstm_bwd", "T dm, T gi, T gf, T gg, T go, T tc, T c_prev", "T da_i, T da_f, T da_g, T da_o, T cc",
        _LSTM_BWD.format(dm=""))
def _lstm_bwd(xp, dm, gi, gf, gg, go, tc, c_prev, da_i, da_f, da_g, da_o, cc):
    _lstm_bwd_ref(xp, dm, gi, gf, gg, go, tc, c_prev, da_i, da_f, da_g, da_o, cc)


# without a projection dm_t = dh_t = dout_t + carry_h (9.6)
@_fused("lstm_bwd_noproj", "T dy, T ch, T gi, T gf, T gg, T go, T tc, T c_prev", "T da_i, T da_f, T da_g, T da_o, T cc",
        _LSTM_BWD.format(dm="T dm = dy + ch;       // (9.6)"))
def _lstm_bwd_noproj(xp, dy, ch, gi, gf, gg, go, tc, c_prev, da_i, da_f, da_g, da_o, cc):
    _lstm_bwd_ref(xp, xp.add(dy, ch), gi, gf, gg, go, tc, c_prev, da_i, da_f, da_g, da_o, cc)
