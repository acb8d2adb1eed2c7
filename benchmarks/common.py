"""What every section shares: the configuration, alternating pairs, thread limits, summaries, system facts."""

import dataclasses
import gc
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Config:
    """Sizes of one benchmark run (d2l chapter 8, the book's settings, by default; ``--quick`` shrinks them)."""

    max_tokens: int = 10000
    batch_size: int = 32
    num_steps: int = 35
    hidden_scratch: int = 512
    hidden_concise: int = 256
    lr: float = 1.0
    clip: float = 1.0
    num_preds: int = 500
    prefix: str = "time traveller "
    seed: int = 0
    pairs: int = 5
    batches: int = 0  # minibatches per epoch of a training measurement; 0 = the whole epoch
    epochs: int = 1  # whole epochs per training measurement (tokens/s over all of them)
    load: int = 0  # busy processes competing during a second round of training pairs; 0 = no loaded round
    floor_reps: int = 20
    gap_s: float = 0.1  # pause (and gc) before each measurement, so the other side's worker threads go idle
    cells: tuple = ("rnn", "gru", "lstm")  # which cells' rows every section measures (--cells)
    arrayops: bool = False  # train: also time npyrnn with its fused kernels off (--arrayops)
    openblas: bool = False  # train: also time npyrnn with OpenBLAS's own threads instead of split products (--openblas)
    pyloops: bool = False  # train: also time npyrnn with its compiled time loops off (--pyloops)
    threads: int = 1  # cores for every library (bench_train's --threads)


QUICK = dict(max_tokens=200, batch_size=4, num_steps=5, hidden_scratch=16, hidden_concise=16, num_preds=20,
             pairs=1, floor_reps=3, gap_s=0.0)


# --------------------------------------------------------------------------- pairs and summaries


def summary(values):
    """``{'values', 'median', 'min', 'max'}`` of a list of numbers."""
    values = [float(v) for v in values]
    return {"values": values, "median": statistics.median(values), "min": min(values), "max": max(values)}


def ratio_summary(a, b):
    """Per-pair ratios a[i] / b[i] and their summary."""
    return summary([x / y for x, y in zip(a, b)])


def pause(cfg):
    """Before each measurement: collect garbage and wait ``cfg.gap_s`` so the other side's worker threads go idle."""
    gc.collect()
    if cfg.gap_s:
        time.sleep(cfg.gap_s)


def pair_order(i, *impls):
    """The order in which pair i runs ``impls``: rotated by i, so each takes each place equally often.

    With two: (a, b) when i is even, (b, a) when odd.
    """
    k = i % len(impls)
    return impls[k:] + impls[:k]


class busy_processes:
    """Context manager: ``n`` child processes that each spin on a core (a Python ``while True``) until exit.

    They compete with the measured process as other users' work would on a shared machine.
    Each is ended by its own pid on exit, even when the body raises.
    """

    def __init__(self, n):
        self.n, self.procs = n, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        time.sleep(0.2)  # let them reach the loop
        return self.procs

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        return False


# --------------------------------------------------------------------------- threads and data


def limit_threads(n, with_torch):
    """Limit NumPy's BLAS (and every OpenMP runtime) to n threads, and torch's intra-op pool; return the limiter."""
    from threadpoolctl import threadpool_limits

    if with_torch:
        import torch

        torch.set_num_threads(n)
    return threadpool_limits(limits=n)


def load_data(cfg):
    from npyrnn.data import load_corpus

    return load_corpus("timemachine", token="char", max_tokens=cfg.max_tokens)


# --------------------------------------------------------------------------- system facts


def proc_status_kb(field):
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs); True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = proc_status_kb("VmHWM"), proc_status_kb("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit():
    try:  # read-only
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
