"""memory: peak resident memory of each implementation's training, one subprocess each.

The parent runs ``bench_train.py --_memory-child NAME`` for each of ``children(cfg.cells)``
(``npyrnn-KIND`` and ``torch-KIND`` for each kind of ``benchmarks.peers``); the child
measures the rise of VmHWM (Linux peak RSS) over the RSS after imports and corpus loading.
"""

import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys

from benchmarks.common import ROOT, limit_threads, load_data, proc_status_kb, reset_peak_rss
from benchmarks.peers import KINDS, hidden, kinds, npyrnn_options, torch_peer

CHILDREN = tuple(f"{lib}-{kind}" for kind in KINDS for lib in ("npyrnn", "torch"))


def children(cells):
    """The children for the cells measured: npyrnn and torch for each of their kinds."""
    return [f"{lib}-{kind}" for kind in kinds(cells) for lib in ("npyrnn", "torch")]
SCRIPT = ROOT / "benchmarks" / "bench_train.py"

METHOD = (
    "one subprocess per implementation (as many at once as the cores hold, given the thread count: "
    "children_at_once); baseline = VmRSS after imports (for torch including the lazy import of "
    "torch._dynamo that the first torch.optim optimizer triggers, and for npyrnn with the fast extra Numba, "
    "LLVM and the compiled kernels, which the first kernel look-up loads) and corpus loading; then VmHWM is reset "
    "(echo 5 > /proc/self/clear_refs), the model is built and trained for two measurements' worth of "
    "minibatches (warm-up + one), and the increase is VmHWM - baseline. Includes parameters, gradients, "
    "activations, autograd graph, allocator caches and thread stacks; RSS counts pages touched, not bytes "
    "requested. numba_compiled: functions Numba compiled during the measurement instead of loading them from its "
    "disk cache (after a source edit; the compiler's memory is then counted: run again)."
)


def child(cfg, which, threads):
    """Run in a subprocess: peak RSS rise of one implementation's training (warm-up + one measurement)."""
    from benchmarks.peers.npyrnn_peer import NpyrnnLM

    with_torch = which.startswith("torch")
    if with_torch:
        import torch

        # torch.optim imports torch._dynamo lazily, on the first optimizer (~60 MiB): count it as an import
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    import npyrnn.data  # noqa: F401
    import npyrnn.models  # noqa: F401
    import npyrnn.train  # noqa: F401

    if not with_torch:
        import numpy as np

        from npyrnn.nn import kernels

        # with the fast extra, the first kernel look-up imports Numba and LLVM and loads the compiled
        # kernels (about 170 MiB): count it as an import, as torch's libraries are, not as training
        kernels.prepare(np, "float32")

    with limit_threads(threads, with_torch):
        corpus, vocab = load_data(cfg)
        baseline = proc_status_kb("VmRSS")
        hwm_before = proc_status_kb("VmHWM")
        reset = reset_peak_rss()
        lib, kind = which.split("-", 1)
        size = hidden(cfg, kind)
        if lib == "npyrnn":
            impl = NpyrnnLM(cfg, vocab, corpus, size, **npyrnn_options(kind))
        else:  # the framework's own initialisation: no npyrnn model in this process
            impl = torch_peer(cfg, vocab, corpus, kind)
        impl.train()
        impl.train()
        peak = proc_status_kb("VmHWM")
    return {
        "numba_compiled": None if with_torch else numba_compiled(),
        "implementation": which,
        "hidden": size,
        "baseline_rss_kb": baseline,
        "hwm_before_reset_kb": hwm_before,
        "hwm_reset": reset,
        "peak_rss_kb": peak,
        "increase_kb": None if peak is None or baseline is None else peak - baseline,
    }


def numba_compiled():
    """Functions of npyrnn's compiled CPU modules that Numba compiled in this process instead of
    loading them from its disk cache (after a source edit): the compiler's memory then counts in
    the measurement. None without Numba."""
    import sys as _sys

    try:
        from numba.core.registry import CPUDispatcher
    except ImportError:
        return None
    modules = [_sys.modules.get(f"npyrnn.nn.{name}") for name in ("cpu_kernels", "cpu_gemm", "cpu_loops", "cpu_greedy")]
    return sum(sum(d.stats.cache_misses.values()) for m in modules if m is not None
               for d in vars(m).values() if isinstance(d, CPUDispatcher))


def measure(cfg, threads, which):
    """Run one child; its JSON result."""
    cmd = [sys.executable, str(SCRIPT), "--_memory-child", which, "--threads", str(threads),
           "--_config", json.dumps(dataclasses.asdict(cfg))]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"memory child {which} failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(cfg, threads, log):
    """Every child of ``children(cfg.cells)``, as many at once as the cores hold ``threads``-thread children.

    Peak RSS is each process's own, so children running side by side do not change each other's
    number; with ``threads`` as many as the cores they run one at a time.
    """
    results = {}
    at_once = max(1, (os.cpu_count() or 1) // max(1, threads))
    with concurrent.futures.ThreadPoolExecutor(max_workers=at_once) as pool:
        names = children(cfg.cells)
        for which, r in zip(names, pool.map(lambda which: measure(cfg, threads, which), names)):
            results[which] = r
            log(f"  memory {which}: +{r['increase_kb'] / 1024:.1f} MiB over {r['baseline_rss_kb'] / 1024:.1f} MiB "
                f"(peak reset {'ok' if r['hwm_reset'] else 'FAILED'})")
            if r.get("numba_compiled"):
                log(f"  memory {which}: WARNING: Numba compiled {r['numba_compiled']} functions during the measurement "
                    "(its disk cache was stale after a source edit), which counts the compiler's memory: run again")
    results["children_at_once"] = at_once
    for kind in kinds(cfg.cells):
        a, b = results[f"npyrnn-{kind}"]["increase_kb"], results[f"torch-{kind}"]["increase_kb"]
        results[f"ratio_{kind}_npyrnn_over_torch"] = a / b if a is not None and b else None
    results["method"] = METHOD
    return results
