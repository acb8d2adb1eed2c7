"""Smoke test of benchmarks/bench_train.py: tiny sizes, one pair, the JSON's structure. No timing asserted.

The benchmark imports as the package ``benchmarks`` from the repository root (which it puts on
``sys.path`` itself; these tests do the same for the parts they call directly).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import threadpoolctl  # noqa: F401  (the test extra installs it; the benchmark needs it)
import torch  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_train.py"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.peers import jax_rnn  # noqa: E402  (does not import jax)

# Skipped only where jax is not installed. Not pytest.importorskip: importing jax in this process
# would register ml_dtypes' bfloat16 with NumPy for the rest of the session (safetensors then
# reads bf16 files, which tests/test_checkpoint.py expects NumPy to refuse).
needs_jax = pytest.mark.skipif(not jax_rnn.available(), reason="jax is not installed (pip install -e '.[bench]')")


def run_bench(tmp_path, *flags):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONWARNINGS="error::UserWarning")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--json", str(out), *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def assert_summary(s, n):
    assert set(s) == {"values", "median", "min", "max"}
    assert len(s["values"]) == n
    assert s["min"] <= s["median"] <= s["max"]
    assert all(v > 0 for v in s["values"])


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """Every cell, the sections that run in this process (the memory section is in ``loaded``: each of its
    children imports torch anew, seconds each on a busy machine)."""
    return run_bench(tmp_path_factory.mktemp("bench"), "--only", "train", "--only", "generate", "--only", "floor")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """The GRU's rows only: the train section with one busy process competing, and the memory section."""
    return run_bench(tmp_path_factory.mktemp("bench"), "--only", "train", "--only", "memory", "--load", "1",
                     "--cells", "gru")


def test_meta(quick):
    results, _ = quick
    meta = results["meta"]
    for key in ("date", "numpy", "torch", "jax", "cpu_model", "blas", "env", "config", "threads", "seconds"):
        assert key in meta, key
    assert meta["threads"] == 1 and meta["config"]["pairs"] == 1
    assert "OPENBLAS_CORETYPE" in meta["env"] and "OPENBLAS_L2_SIZE" in meta["env"]
    assert set(meta["sections"]) == {"train", "generate", "floor"}
    assert meta["config"]["cells"] == ["rnn", "gru", "lstm"]  # the default


KINDS = ("scratch", "concise", "gru-scratch", "gru-concise", "lstm-scratch", "lstm-concise")


def test_train_and_generate(quick):
    results, stdout = quick
    assert list(results["train"]) == list(KINDS) and list(results["generate"]) == list(KINDS)
    for kind in KINDS:
        train = results["train"][kind]
        assert train["hidden"] == 16
        assert train["cell"] == ("rnn" if kind in ("scratch", "concise") else kind.split("-")[0])
        for impl in ("npyrnn", "torch"):
            assert_summary(train["tokens_per_s"][impl], 1)
            assert len(train["perplexity"][impl]) == 1
        # the same initial weights and minibatches on both sides (float32; d2l's scratch models hold one
        # bias per gate where npyrnn holds two, so their perplexities part slightly)
        ppl = train["perplexity"]
        assert abs(ppl["npyrnn"][0] - ppl["torch"][0]) <= 1e-3 * ppl["torch"][0], (kind, ppl)
        assert_summary(train["ratio_npyrnn_over_torch"], 1)
        assert train["epochs_per_measurement"] == 1
        gen = results["generate"][kind]
        assert gen["cell"] == train["cell"]
        for impl in ("npyrnn", "torch"):
            assert_summary(gen["chars_per_s"][impl], 1)
        assert_summary(gen["ratio_npyrnn_over_torch"], 1)
        assert gen["same_text"] is True, kind  # same untrained weights, greedy
        assert re.search(rf"^{kind} ", stdout, re.MULTILINE), kind
    assert "TRAIN tokens/s" in stdout and "GENERATE chars/s" in stdout


def test_memory(loaded):
    memory, stdout = loaded[0]["memory"], loaded[1]
    assert [k for k in memory if k.startswith(("npyrnn-", "torch-"))] == [
        "npyrnn-gru-scratch", "torch-gru-scratch", "npyrnn-gru-concise", "torch-gru-concise"]
    for kind in ("gru-scratch", "gru-concise"):
        for lib in ("npyrnn", "torch"):
            r = memory[f"{lib}-{kind}"]
            assert r["baseline_rss_kb"] > 0 and r["peak_rss_kb"] >= r["baseline_rss_kb"]
            assert isinstance(r["increase_kb"], int) and r["hidden"] == 16
        assert memory[f"ratio_{kind}_npyrnn_over_torch"] > 0
    assert "method" in memory and memory["children_at_once"] >= 1
    assert "MEMORY peak RSS" in stdout and re.search(r"^gru-concise ", stdout, re.MULTILINE)


def test_memory_children_cover_every_kind():
    from benchmarks.sections.memory import CHILDREN, children

    assert children(("rnn", "gru", "lstm")) == list(CHILDREN)
    assert children(("rnn",)) == ["npyrnn-scratch", "torch-scratch", "npyrnn-concise", "torch-concise"]
    assert len(CHILDREN) == 2 * len(KINDS) and all(f"npyrnn-{k}" in CHILDREN for k in KINDS)


def test_floor(quick):
    from npyrnn.backend import transposed_copies_pay

    results, stdout = quick
    assert list(results["floor"]) == ["rnn", "gru", "lstm"]
    for cell, gates in (("rnn", 1), ("gru", 3), ("lstm", 4)):
        floor = results["floor"][cell]
        assert floor["cell"] == cell and floor["shapes"]["gates"] == gates
        assert [p["calls"] for p in floor["products"]] == [5, 1, 1, 5, 1, 1]  # --quick: T = 5
        assert floor["products"][0]["shape"] == f"(4,16)@(16,{16 * gates}) x5"
        assert floor["flops_per_minibatch"] == sum(p["flops"] for p in floor["products"])
        assert_summary(floor["floor_seconds"], 1)
        assert_summary(floor["ratio_npyrnn_over_floor"], 1)
        assert_summary(floor["npyrnn_products_floor_seconds"], 1)  # the same products through npyrnn's
        assert_summary(floor["ratio_npyrnn_over_its_products_floor"], 1)
        assert [p["name"] for p in floor["npyrnn_products"]] == [p["name"] for p in floor["products"]]
        assert "npyrnn / its products' floor" in stdout
        assert set(floor["npyrnn_phase_seconds"]) == {"zero_grad", "forward", "loss", "backward", "clip_and_sgd"}
        assert f"FLOOR {cell.upper()} at hidden 16" in stdout
        # npyrnn timed as `npyrnn train --threads 1` runs it (the split products where they can run), not
        # with the OpenBLAS threads the floor's products get back after each measurement
        assert floor["npyrnn_split_products"] == split_products_expected(threads=1)
        assert floor["forward_reads_a_copy_of_w_transposed"] == transposed_copies_pay()
        parts = floor["npyrnn_parts"]
        assert {"input gather (5.1)", "input gather's gradient (5.2), with the bias's (5.3)", "loss and its gradient",
                "clipping and the optimizer step", "other"} <= set(parts)
        assert all(p["seconds"] >= 0 and p["calls"] >= 1 for p in parts.values())
        # the hidden side's products, one per step (T = 5) each way: --quick's are too small for the compiled
        # loops, which decline them (the RNN's two have the same shapes, (4,16)@(16,16))
        forward = parts[f"product (4,16)@(16,{16 * gates})"]["calls"]
        assert forward == (10 if gates == 1 else 5)
        assert gates == 1 or parts[f"product (4,{16 * gates})@({16 * gates},16)"]["calls"] == 5
    assert "part by part" in stdout


def split_products_expected(threads):
    """What `backend.split_products()` answers in the benchmark's process after `set_cpu_threads(threads)`."""
    from npyrnn import backend

    if backend.name != "numpy" or not backend.env_switch(backend.SPLIT_ENV, "off", "on"):
        return None
    return None if backend._split_module() is None else threads


def test_load_and_some_cells(loaded):
    results, stdout = loaded
    assert set(results) == {"meta", "train", "memory"}
    assert results["meta"]["config"]["cells"] == ["gru"]
    assert list(results["train"]) == ["gru-scratch", "gru-concise"]
    assert "TRAIN" in stdout and "FLOOR" not in stdout and "GENERATE" not in stdout
    assert results["meta"]["config"]["load"] == 1
    for kind, train in results["train"].items():
        assert "jax" not in train["tokens_per_s"], "the JAX peer is chapter 8's RNN only"
        loaded = train["loaded"]
        assert loaded["busy_processes"] == 1
        assert set(loaded["throughput_kept"]) == set(train["tokens_per_s"]), kind
        assert all(v > 0 for v in loaded["throughput_kept"].values())
        for impl in train["tokens_per_s"]:
            assert_summary(loaded["tokens_per_s"][impl], 1)
        assert_summary(loaded["ratio_npyrnn_over_torch"], 1)
    assert "busy process(es) competing" in stdout


def test_cells_flag():
    import argparse

    from benchmarks.bench_train import parse_cells

    assert parse_cells("lstm, rnn") == ("rnn", "lstm")
    for bad in ("", "gru,cnn", ","):
        with pytest.raises(argparse.ArgumentTypeError, match="comma-separated list of rnn, gru, lstm"):
            parse_cells(bad)
    assert parse_cells("gru,lstm,gru") == ("gru", "lstm")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cells", "tcn"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "argument --cells" in proc.stderr


def test_busy_processes_end_on_exit():
    from benchmarks.common import busy_processes

    with busy_processes(2) as procs:
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
    assert all(p.poll() is not None for p in procs)


def test_pairs_rotate_the_order():
    from benchmarks.common import pair_order

    assert [pair_order(i, "a", "b") for i in range(3)] == [("a", "b"), ("b", "a"), ("a", "b")]
    orders = [pair_order(i, "a", "b", "c") for i in range(3)]
    assert orders == [("a", "b", "c"), ("b", "c", "a"), ("c", "a", "b")]
    assert all(sorted(o[k] for o in orders) == ["a", "b", "c"] for k in range(3))  # each place once each


@pytest.mark.parametrize("gates", [1, 3, 4], ids=["rnn", "gru", "lstm"])
def test_floor_products_are_one_minibatchs_products(gates):
    import numpy as np

    from benchmarks.sections.floor import products

    B, T, H, V, G = 3, 4, 5, 7, gates
    for copies in (True, False):  # the forward products read a copy of W^T or the view, as npyrnn's do
        prods = products(B, T, H, V, np.random.default_rng(0), gates=G, copies=copies)
        for p in prods:
            p.run()
    prods = products(B, T, H, V, np.random.default_rng(0), gates=G)
    assert [p.calls for p in prods] == [T, 1, 1, T, 1, 1]
    # forward and backward recurrences over all G gates, the output layer both ways, the two weight gradients
    assert sum(p.flops for p in prods) == 2 * (2 * B * H * G * H * T) + 2 * (2 * T * B * H * V) \
        + 2 * G * H * T * B * H + 2 * V * T * B * H
    for p in prods:
        p.run()


@pytest.mark.parametrize("gates", [1, 4], ids=["rnn", "lstm"])
def test_floor_times_npyrnns_step_products_in_a_compiled_loop(gates, monkeypatch):
    """With `loops`, the x T step products of npyrnn's floor run in one compiled loop of
    `cpu_gemm.loop_product` calls (as npyrnn's compiled time loops run them), not T Python calls of
    `backend.matmul`, whose Python is most of a step product's time; the same products, so the
    same bits as those calls."""
    import numpy as np

    pytest.importorskip("numba", reason="the compiled loops need the fast extra")
    from benchmarks.sections import floor
    from npyrnn import backend
    from npyrnn.nn import cpu_gemm

    if cpu_gemm.why_unavailable() is not None:
        pytest.skip(f"split products {cpu_gemm.why_unavailable()}")
    B, T, H, V = 32, 5, 64, 7
    ran, run_loop = [], cpu_gemm.run_loop
    monkeypatch.setattr(cpu_gemm, "run_loop", lambda *a, **k: ran.append(run_loop(*a, **k)) or ran[-1])
    floor._step_loops.cache_clear()  # (it holds run_loop)
    backend.set_backend("numpy")  # the floor's products are NumPy's, whatever NPYRNN_BACKEND says (conftest restores it)
    backend.set_cpu_threads(2, split=True)
    assert backend.split_products() == 2
    try:
        results = []
        for loops in (False, True):
            calls = []

            def matmul(a, b, out, _calls=calls):
                _calls.append(a.shape)
                return backend.matmul(a, b, out=out)

            prods = floor.products(B, T, H, V, np.random.default_rng(0), gates=gates, copies=True, matmul=matmul,
                                   loops=loops)
            forward, backward = prods[0], prods[3]
            forward.run()
            backward.run()
            cells = {id(c.cell_contents): c.cell_contents for p in (forward, backward) for c in p.run.__closure__
                     if isinstance(c.cell_contents, np.ndarray)}
            results.append((len(calls), sorted(a.tobytes() for a in cells.values())))
    finally:
        backend.set_cpu_threads(None, split=False)
        floor._step_loops.cache_clear()
    assert results[0][0] == 2 * T and results[1][0] == 0  # T Python calls each way, then none
    assert ran == [True, True]
    assert results[0][1] == results[1][1]  # every array the products read or wrote: the same bits


@needs_jax
def test_jax_peer_in_the_train_section(quick):
    results, stdout = quick
    scratch, concise = results["train"]["scratch"], results["train"]["concise"]
    assert_summary(scratch["tokens_per_s"]["jax"], 1)
    assert_summary(scratch["ratio_npyrnn_over_jax"], 1)
    assert "jax" not in concise["tokens_per_s"]  # d2l's scratch job only
    # every peer trains from the same initial weights on the same minibatches
    ppl = scratch["perplexity"]
    assert abs(ppl["jax"][0] - ppl["npyrnn"][0]) <= 1e-3 * ppl["npyrnn"][0]
    check = scratch["jax_trajectory"]
    assert check["epochs"] == 3 and len(check["npyrnn"]) == len(check["jax"]) == 3 and check["agree"]
    assert scratch["jax_process"]["pinning"] in (None, "taskset -c 0")  # --threads 1
    assert "npyrnn/jax" in stdout and "follows npyrnn's perplexity" in stdout


@needs_jax
def test_jax_follows_npyrnn_perplexity_trajectory():
    """d2l's scratch job in JAX from npyrnn's initial weights: the same per-epoch perplexity, float32.

    In a child process, as the benchmark runs it: importing jax here would register ml_dtypes'
    bfloat16 with NumPy for the rest of the session and change what other tests see.
    """
    from benchmarks.common import QUICK

    config = {k: v for k, v in QUICK.items() if k in ("batch_size", "num_steps")} | {"max_tokens": 600}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "peers" / "jax_rnn.py"), "--mode", "check", "--hidden", "24",
         "--config", json.dumps(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS="error::UserWarning"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = json.loads(proc.stdout.strip().splitlines()[-1])
    assert check["epochs"] == 3 and len(check["npyrnn"]) == len(check["jax"]) == 3
    assert check["npyrnn"][-1] < check["npyrnn"][0] - 1, "npyrnn did not learn; the comparison would be weak"
    assert check["max_rel_diff"] <= 1e-4, check
    assert check["agree"]


def test_jax_child_is_pinned_for_fewer_threads_than_cores():
    import shutil

    from benchmarks.peers.jax_rnn import pinning

    cores = os.cpu_count() or 1
    assert pinning(cores) == []
    if cores > 1 and shutil.which("taskset"):
        assert pinning(1) == ["taskset", "-c", "0"]


# --------------------------------------------------------------------------- bench_gpu.py and gpu_check.sh

GPU_SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"
FAKECUPY = ROOT.parent / "shared" / "tools" / "fakecupy"


def real_gpu():
    """True where real CuPy sees a device and torch has CUDA (then the scripts measure instead of skipping)."""
    from benchmarks.bench_gpu import why_not

    return why_not(stand_in=False) is None


def run_gpu_bench(tmp_path, *flags, env=None):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(GPU_SCRIPT), "--json", str(out), *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env or dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc


@pytest.mark.skipif(real_gpu(), reason="a GPU is here: bench_gpu.py measures instead of skipping")
def test_bench_gpu_skips_cleanly_without_a_gpu(tmp_path):
    results, proc = run_gpu_bench(tmp_path, "--quick")
    assert set(results) == {"skipped"} and results["skipped"]
    assert proc.stderr.startswith("bench_gpu: SKIPPED: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def check_gpu_results(results, stand_in):
    assert results["meta"]["stand_in"] is stand_in and results["meta"]["complete"]
    assert [s["name"] for s in results["settings"]] == ["quick-16", "quick-32"]
    for s in results["settings"]:
        rnn = s["cells"]["rnn"]
        for impl in ("npyrnn", "cudnn", "scratch"):
            assert_summary(rnn["tokens_per_s"][impl], 1)
        assert_summary(rnn["ratio_npyrnn_over_cudnn"], 1)
        assert_summary(rnn["ratio_npyrnn_over_scratch"], 1)
        # the same initial weights and minibatches: npyrnn and torch's nn.RNN compute the same first losses
        first = rnn["first_loss"]
        assert abs(first["npyrnn"] - first["cudnn"]) <= 1e-4 * first["cudnn"], first
        assert abs(first["npyrnn"] - first["scratch"]) <= 2e-2 * first["scratch"], first  # d2l's one bias: see README


@pytest.mark.skipif(not (FAKECUPY / "cupy").is_dir(), reason="the CPU stand-in ../shared/tools/fakecupy is not here")
def test_bench_gpu_logic_on_the_cpu_stand_in(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(FAKECUPY), str(ROOT)]))
    results, proc = run_gpu_bench(tmp_path, "--quick", "--stand-in", env=env)
    check_gpu_results(results, stand_in=True)
    assert "| quick-16 (B 4, T 5, H 16) | rnn |" in proc.stdout


def test_bench_gpu_bad_flags(tmp_path):
    for flags, message in ((["--pairs", "0"], "at least 1"), (["--only", "nope"], "unknown setting 'nope'")):
        proc = subprocess.run([sys.executable, str(GPU_SCRIPT), "--stand-in", "--json", str(tmp_path / "x.json"),
                               *flags], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.skipif(real_gpu(), reason="a GPU is here: gpu_check.sh would run for minutes")
def test_gpu_check_reports_no_gpu_and_dry_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(GPU_CHECK), str(tmp_path / "out")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.startswith("gpu_check: no GPU: ") and "Traceback" not in proc.stderr
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "## no GPU" in summary and "Nothing was run." in summary and "- numpy " in summary

    proc = subprocess.run(["bash", str(GPU_CHECK), "--dry-run", str(tmp_path / "dry")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if "| dry run: `" in line]
    assert [r.split("|")[1].strip() for r in rows] == ["kernels", "parity", "suite", "cli_train", "cli_generate", "bench",
                                                  "graph"]
    assert "NPYRNN_BACKEND" not in rows[1] and "bench_gpu.py --json" in rows[-2] and "graph_experiment.py" in rows[-1]

    proc = subprocess.run(["bash", str(GPU_CHECK)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: bash benchmarks/gpu_check.sh")


# --------------------------------------------------------------------------- graph_experiment.py

GRAPH_SCRIPT = ROOT / "benchmarks" / "graph_experiment.py"


@pytest.mark.skipif(real_gpu(), reason="a GPU is here: graph_experiment.py measures instead of skipping")
def test_graph_experiment_skips_cleanly_without_a_gpu(tmp_path):
    proc = subprocess.run([sys.executable, str(GRAPH_SCRIPT), "--json", str(tmp_path / "g.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr.startswith("graph_experiment: SKIPPED: "), proc.stderr
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "g.json").exists()


@pytest.mark.skipif(real_gpu(), reason="a GPU is here: gpu_launch_probe.py measures instead of skipping")
def test_gpu_launch_probe_skips_cleanly_without_a_gpu():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_launch_probe.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    assert proc.stderr.startswith("gpu_launch_probe: SKIPPED: ") and proc.stderr.count("\n") == 1, proc.stderr


# ------------------------------------------------------------------ the small benchmark scripts
def run_script(name, *flags):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_kernels_prints_every_kernel():
    pytest.importorskip("numba", reason="bench_kernels.py times the fused CPU kernels of the fast extra")
    from npyrnn.nn import kernels

    out = run_script("bench_kernels.py", "--hidden", "8", "--calls", "2")
    for name in kernels.SPECS:
        assert re.search(rf"^{name}\s+[\d.]+\s+[\d.]+\s+[\d.]+$", out, re.M), (name, out)
    for shape in ("(8, 8)", "(24, 8)", "(32, 8)"):  # W_hh^T's copies, --hidden 8
        assert re.search(rf"^transpose_into {re.escape(shape)}\s+[\d.]+\s+[\d.]+\s+[\d.]+$", out, re.M), (shape, out)


def test_bench_split_runs_quiet():
    out = run_script("bench_split.py", "--reps", "1", "--busy", "0")
    assert "split equals unsplit bit for bit:" in out
    assert re.search(r"^busy=0: blas-2 [\d,]+ us, blas-1 [\d,]+ us, split [\d,]+ us$", out, re.M), out


def test_bench_products_runs_quiet():
    pytest.importorskip("numba", reason="bench_products.py times the split products of the fast extra")
    from npyrnn.nn import cpu_gemm

    out = run_script("bench_products.py", "--reps", "1", "--calls", "1", "--gap", "0", "--copy")
    assert out.startswith("busy=0, copy=True, median us a call over 1 reps of 1 calls")
    tiles = r", tiles-1 [\d,.]+, tiles-2 [\d,.]+" if cpu_gemm.TILES else ""
    for name in ("rnn512 step forward", "gru256 dW_hh", "output logits (256)"):
        assert re.search(rf"^{re.escape(name)} \(\d+x\d+ by \d+x\d+, \d blocks? by (rows|columns|k)\): "
                         rf"openblas-1 [\d,.]+, openblas-2 [\d,.]+, split-1 [\d,.]+, split-2 [\d,.]+{tiles}$", out, re.M), out


def test_bench_thread_policies_runs_quiet():
    out = run_script("bench_thread_policies.py", "--reps", "1", "--busy", "0")
    for model in ("rnn 512", "lstm 256"):
        assert re.search(rf"^busy=0 {model}: every-core [\d,]+, recurrence-1 [\d,]+, one [\d,]+ tokens/s$", out, re.M), out


def test_npyrnn_variants(tmp_path):
    """--arrayops, --openblas and --pyloops time npyrnn again with its fused kernels, split products or
    compiled loops off, in the same pairs, and report each ratio."""
    results, stdout = run_bench(tmp_path, "--only", "train", "--cells", "gru", "--arrayops", "--openblas", "--pyloops")
    for kind in ("gru-scratch", "gru-concise"):
        row = results["train"][kind]
        variants = {"npyrnn-arrayops", "npyrnn-openblas", "npyrnn-pyloops"}
        assert {"npyrnn", "torch"} | variants <= set(row["tokens_per_s"])
        for name in variants:
            assert_summary(row[f"ratio_npyrnn_over_{name}"], 1)
    assert "npyrnn-pyloops" in stdout


@pytest.mark.parametrize("switch", ["halves", "loops", "fused", "wt", "pad", "tail", "gather", "scatter"])
def test_bench_ab_flips_a_switch_minibatch_by_minibatch(switch):
    """benchmarks/bench_ab.py at tiny sizes: both sides measured, every part printed, the switch left on."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_ab.py"), "--switch", switch, "--cell", "gru", "--hidden", "16",
         "--epochs", "3", "--max-tokens", "400", "--batch-size", "4", "--num-steps", "5", "--threads", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    counts = re.search(r"over (\d+) / (\d+) minibatches", lines[0])
    assert counts and int(counts[1]) > 0 and int(counts[2]) > 0
    assert lines[-1].strip().startswith("minibatch") and "input gather (5.1)" in proc.stdout


def test_bench_layouts_prints_every_layout():
    """benchmarks/bench_layouts.py at tiny sizes: a row per cell, three times and the bits' verdict each."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_layouts.py"), "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(("GRU", "LSTM", "RNN"))]
    assert len(rows) == 3 and all(len(r) == 8 and min(map(float, r[4:7])) > 0 and r[7] in ("True", "False") for r in rows)
