"""memory: peak resident memory of each implementation's training, one subprocess each.

The parent runs ``bench_train.py --_memory-child NAME`` for each of ``CHILDREN``; the child
measures the rise of VmHWM (Linux peak RSS) over the RSS after imports and corpus loading.
"""

import dataclasses
import json
import subprocess
import sys

from benchmarks.common import ROOT, limit_threads, load_data, proc_status_kb, reset_peak_rss

CHILDREN = ("npyrnn-scratch", "torch-scratch", "npyrnn-concise", "torch-concise")
SCRIPT = ROOT / "benchmarks" / "bench_train.py"

METHOD = (
    "one subprocess per implementation; baseline = VmRSS after imports (for torch including the lazy import of "
    "torch._dynamo that the first torch.optim optimizer triggers) and corpus loading; then VmHWM is reset "
    "(echo 5 > /proc/self/clear_refs), the model is built and trained for two measurements' worth of "
    "minibatches (warm-up + one), and the increase is VmHWM - baseline. Includes parameters, gradients, "
    "activations, autograd graph, allocator caches and thread stacks; RSS counts pages touched, not bytes "
    "requested."
)


def child(cfg, which, threads):
    """Run in a subprocess: peak RSS rise of one implementation's training (warm-up + one measurement)."""
    from benchmarks.peers.npyrnn_peer import NpyrnnLM

    with_torch = which.startswith("torch")
    if with_torch:
        import torch

        from benchmarks.peers.torch_peers import TorchConcise, TorchScratch

        # torch.optim imports torch._dynamo lazily, on the first optimizer (~60 MiB): count it as an import
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    import npyrnn.data  # noqa: F401
    import npyrnn.models  # noqa: F401
    import npyrnn.train  # noqa: F401

    with limit_threads(threads, with_torch):
        corpus, vocab = load_data(cfg)
        baseline = proc_status_kb("VmRSS")
        hwm_before = proc_status_kb("VmHWM")
        reset = reset_peak_rss()
        lib, kind = which.split("-")
        hidden = cfg.hidden_scratch if kind == "scratch" else cfg.hidden_concise
        if lib == "npyrnn":
            impl = NpyrnnLM(cfg, vocab, corpus, hidden, init="normal" if kind == "scratch" else "uniform")
        else:  # the framework's own initialisation: no npyrnn model in this process
            impl = (TorchScratch if kind == "scratch" else TorchConcise)(cfg, vocab, corpus, hidden)
        impl.train()
        impl.train()
        peak = proc_status_kb("VmHWM")
    return {
        "implementation": which,
        "hidden": hidden,
        "baseline_rss_kb": baseline,
        "hwm_before_reset_kb": hwm_before,
        "hwm_reset": reset,
        "peak_rss_kb": peak,
        "increase_kb": None if peak is None or baseline is None else peak - baseline,
    }


def run(cfg, threads, log):
    results = {}
    for which in CHILDREN:
        cmd = [sys.executable, str(SCRIPT), "--_memory-child", which, "--threads", str(threads),
               "--_config", json.dumps(dataclasses.asdict(cfg))]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"memory child {which} failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results[which] = r
        log(f"  memory {which}: +{r['increase_kb'] / 1024:.1f} MiB over {r['baseline_rss_kb'] / 1024:.1f} MiB "
            f"(peak reset {'ok' if r['hwm_reset'] else 'FAILED'})")
    for kind in ("scratch", "concise"):
        a, b = results[f"npyrnn-{kind}"]["increase_kb"], results[f"torch-{kind}"]["increase_kb"]
        results[f"ratio_{kind}_npyrnn_over_torch"] = a / b if a is not None and b else None
    results["method"] = METHOD
    return results
