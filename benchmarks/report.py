"""The JSON's ``meta`` block and the table printed on stdout."""

import dataclasses
import datetime
import os
import platform
import sys

from benchmarks.common import cpu_model, git_commit
from benchmarks.peers import KINDS

ENV_VARS = (
    "NPYRNN_FUSED",
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "MKL_DEBUG_CPU_TYPE",
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "NPYRNN_BACKEND",
)


def installed_version(dist):
    """The installed version of a distribution, without importing it; None when absent."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def fused_status():
    """`npyrnn.nn.kernels.status()` on NumPy after probing the float32 kernels: whether the fast extra is in use."""
    import numpy as np

    from npyrnn.nn import kernels

    return kernels.prepare(np, "float32")


def metadata(cfg, threads, sections):
    import numpy as np
    import threadpoolctl
    import torch

    import npyrnn

    blas = threadpoolctl.threadpool_info()
    torch_config = torch.__config__.show()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "jax": installed_version("jax"),  # None: no JAX peer
        "numba": installed_version("numba"),  # None: npyrnn runs its array operations on NumPy
        "fused_kernels": fused_status(),
        "npyrnn": npyrnn.__version__,
        "git_commit": git_commit(),
        "threadpoolctl": threadpoolctl.__version__,
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "blas": blas,
        "numpy_blas_architecture": [b.get("architecture") for b in blas if b.get("user_api") == "blas"],
        "torch_blas": [line.strip(" -") for line in torch_config.splitlines()
                       if "Math Kernel" in line or "CPU capability" in line]
                      + [w.strip(" ,") for w in torch_config.split() if w.startswith("BLAS_INFO=")],
        "env": {k: os.environ.get(k) for k in ENV_VARS},
        "config": dataclasses.asdict(cfg),
        "argv": sys.argv[1:],
        "sections": sections,
    }


def fmt_table(rows, header):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        return "  ".join(str(c).rjust(w) if j else str(c).ljust(w) for j, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def r3(s):
    """'median [min, max]' of a summary."""
    return f"{s['median']:.2f} [{s['min']:.2f}, {s['max']:.2f}]"


def render_train(results):
    train = results["train"]
    peers = [name for name in ("torch", "jax", "npyrnn-arrayops", "npyrnn-openblas", "npyrnn-pyloops") if any(name in r["tokens_per_s"] for r in train.values())]
    rows = []
    for kind, r in train.items():
        tps = r["tokens_per_s"]
        row = [kind, r["hidden"], f"{tps['npyrnn']['median']:,.0f}"]
        for name in peers:
            row += [f"{tps[name]['median']:,.0f}", r3(r[f"ratio_npyrnn_over_{name}"])] if name in tps else ["-", "-"]
        row.append(" / ".join(f"{r['perplexity'][name][-1]:.2f}" for name in ("npyrnn", *peers)
                              if name in r["perplexity"]))
        rows.append(row)
    header = ["model", "hidden", "npyrnn"]
    for name in peers:
        header += [name, f"npyrnn/{name}"]
    header.append("last ppl " + "/".join(("npyrnn", *peers)))
    first = next(iter(train.values()))
    out = ["", f"TRAIN tokens/s (median over pairs; each measurement a run of {first['epochs_per_measurement']} "
           f"epoch(s) from the initial weights, {first['tokens_per_measurement']} tokens)", fmt_table(rows, header)]
    loaded = {kind: r["loaded"] for kind, r in train.items() if "loaded" in r}
    if loaded:
        rows = []
        for kind, r in loaded.items():
            tps, kept = r["tokens_per_s"], r["throughput_kept"]
            row = [kind, train[kind]["hidden"], f"{tps['npyrnn']['median']:,.0f}", f"{kept['npyrnn']:.2f}"]
            for name in peers:
                row += ([f"{tps[name]['median']:,.0f}", f"{kept[name]:.2f}", r3(r[f"ratio_npyrnn_over_{name}"])]
                        if name in tps else ["-", "-", "-"])
            rows.append(row)
        header = ["model", "hidden", "npyrnn", "kept"]
        for name in peers:
            header += [name, "kept", f"npyrnn/{name}"]
        n = next(iter(loaded.values()))["busy_processes"]
        out += ["", f"TRAIN with {n} busy process(es) competing: tokens/s, and kept = loaded / quiet tokens/s",
                fmt_table(rows, header)]
    check = train.get("scratch", {}).get("jax_trajectory")
    if check:
        proc = train["scratch"].get("jax_process", {})
        out.append(f"jax {proc.get('jax')} (one child process per measurement, pinning: {proc.get('pinning') or 'none'}; "
                   f"compile {proc['compile_seconds']['median']:.2f} s, not timed) follows npyrnn's perplexity over "
                   f"{check['epochs']} epochs to {check['max_rel_diff']:.1e} relative "
                   f"({'agree' if check['agree'] else 'DISAGREE'} at {check['rtol']:g})")
    return out


def render(results):
    meta = results["meta"]
    out = [
        f"npyrnn benchmark  {meta['date']}  {meta['cpu_model']}  threads={meta['threads']}  "
        f"numpy {meta['numpy']} (BLAS {', '.join(map(str, meta['numpy_blas_architecture']))})  torch {meta['torch']}",
        "env: " + (" ".join(f"{k}={v}" for k, v in meta["env"].items() if v is not None)
                   or "(none of the BLAS/OpenMP variables set)"),
        f"pairs={meta['config']['pairs']}; ratio = npyrnn / peer per pair (median [min, max]); "
        "higher is better for npyrnn",
    ]
    if "train" in results:
        out += render_train(results)
    if "generate" in results:
        rows = [[kind, r["hidden"], f"{r['chars_per_s']['npyrnn']['median']:,.0f}",
                 f"{r['chars_per_s']['torch']['median']:,.0f}", r3(r["ratio_npyrnn_over_torch"]), r["same_text"]]
                for kind, r in results["generate"].items()]
        out += ["", f"GENERATE chars/s (batch 1, greedy, {meta['config']['num_preds']} chars after "
                f"{meta['config']['prefix']!r})",
                fmt_table(rows, ["model", "hidden", "npyrnn", "torch", "ratio", "same text"])]
    if "memory" in results:
        m = results["memory"]
        rows = []
        for kind in [k for k in KINDS if f"npyrnn-{k}" in m]:
            a, b = m[f"npyrnn-{kind}"], m[f"torch-{kind}"]
            ratio = m[f"ratio_{kind}_npyrnn_over_torch"]
            rows.append([kind, a["hidden"], f"{a['increase_kb'] / 1024:.1f}", f"{b['increase_kb'] / 1024:.1f}",
                         "-" if ratio is None else f"{ratio:.2f}",
                         f"{a['baseline_rss_kb'] / 1024:.0f} / {b['baseline_rss_kb'] / 1024:.0f}"])
        out += ["", "MEMORY peak RSS increase over baseline during training, MiB (lower is better)",
                fmt_table(rows, ["model", "hidden", "npyrnn", "torch", "npyrnn/torch", "baseline npyrnn/torch"])]
    for f in results.get("floor", {}).values():
        rows = [[p["name"], p["shape"], f"{p['seconds']['median'] * 1e3:.3f}", f"{p['gflops_per_s']:.1f}"]
                for p in f["products"]]
        rows.append(["floor (sum)", "", f"{f['floor_seconds']['median'] * 1e3:.3f}", f"{f['floor_gflops_per_s']:.1f}"])
        if "npyrnn_products_floor_seconds" in f:  # results written before 2026-12-08 have not
            ours = f["npyrnn_products_floor_seconds"]["median"]
            rows.append(["floor, npyrnn's products", "", f"{ours * 1e3:.3f}", f"{f['flops_per_minibatch'] / ours / 1e9:.1f}"])
        rows.append(["npyrnn minibatch", "", f"{f['npyrnn_seconds_per_minibatch']['median'] * 1e3:.3f}",
                     f"{f['npyrnn_gflops_per_s']:.1f}"])
        ph = f["npyrnn_phase_seconds"]
        out += ["", f"FLOOR {f['cell'].upper()} at hidden {f['shapes']['hidden']} (NumPy matmul, float32; "
                f"{f['flops_per_minibatch'] / 1e9:.3f} GFLOP per minibatch)",
                fmt_table(rows, ["product", "shape", "ms", "GFLOP/s"]),
                f"npyrnn / floor: {r3(f['ratio_npyrnn_over_floor'])}"
                + (f"; npyrnn / its products' floor: {r3(f['ratio_npyrnn_over_its_products_floor'])}"
                   if "ratio_npyrnn_over_its_products_floor" in f else ""),
                "npyrnn phases, ms (median): " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in ph.items())]
        if "npyrnn_parts" in f:  # results written before 2026-12-07 have neither
            split = f["npyrnn_split_products"]
            rows = [[name, f"{p['calls']:g}", f"{p['seconds'] * 1e3:.3f}"] for name, p in f["npyrnn_parts"].items()]
            out += [f"npyrnn's minibatch part by part ({'numpy.matmul with OpenBLAS threads' if split is None else f'split products, {split} thread(s)'}; "
                    "medians over an epoch, outermost calls)",
                    fmt_table(rows, ["part", "calls", "ms"])]
    return "\n".join(out)
