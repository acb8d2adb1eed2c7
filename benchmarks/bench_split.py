#!/usr/bin/env python
"""An experiment for issue 12: the RNN's forward time loop with its product split over two Python threads.

The Elman RNN's forward loop at d2l's scratch size (B = 32, H = 512, T = 35, float32): per step
``gh = h_{t-1} W_hh^T`` then ``h_t = tanh(x_t + gh)``. Three ways to use two cores:

- ``blas-2``: OpenBLAS with 2 threads, as npyrnn does by default;
- ``blas-1``: OpenBLAS with 1 thread (``npyrnn train --threads 1``);
- ``split``: OpenBLAS with 1 thread, each step's output columns cut into ``--chunks`` pieces that
  the main thread and one worker thread claim one by one (whoever is running takes the next
  piece, so a worker that has lost its core holds up at most the piece it is in); each piece is
  its product and its tanh. The same pieces every time, so the result does not depend on the
  load (it is not bit-identical to the unsplit product: OpenBLAS's float32 bits depend on shape).

Each is timed ``--reps`` times in rotation, with 0, 1 and 2 busy processes; printed: median
microseconds per time loop.

    python benchmarks/bench_split.py --reps 7 --chunks 4
"""

import argparse
import multiprocessing as mp
import statistics
import threading
import time

import numpy as np
from threadpoolctl import ThreadpoolController

BLAS = next(c for c in ThreadpoolController().lib_controllers if c.user_api == "blas")


class Split:
    """One worker thread; `run(pieces)` runs every piece once, on this thread and the worker."""

    def __init__(self):
        self.lock = threading.Lock()
        self.go = threading.Condition(self.lock)
        self.pieces, self.next, self.done, self.generation = [], 0, 0, 0
        self.all_done = threading.Event()
        self.worker = threading.Thread(target=self._work, daemon=True)
        self.worker.start()

    def _claim(self):
        with self.lock:
            if self.next >= len(self.pieces):
                return None
            i, self.next = self.next, self.next + 1
            return self.pieces[i]

    def _finish(self):
        with self.lock:
            self.done += 1
            if self.done == len(self.pieces):
                self.all_done.set()

    def _drain(self):
        while (piece := self._claim()) is not None:
            piece()
            self._finish()

    def _work(self):
        seen = 0
        while True:
            with self.go:
                self.go.wait_for(lambda: self.generation != seen)
                seen = self.generation
            self._drain()

    def run(self, pieces):
        with self.go:
            self.pieces, self.next, self.done = pieces, 0, 0
            self.all_done.clear()
            self.generation += 1
            self.go.notify()
        self._drain()
        self.all_done.wait()


def make_loops(T=35, B=32, H=512, chunks=4, seed=0):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((H, H)) / np.sqrt(H)).astype(np.float32)
    X = (rng.standard_normal((T, B, H)) * 0.1).astype(np.float32)
    Hs = np.zeros((T + 1, B, H), np.float32)
    gh = np.empty((B, H), np.float32)
    WT = W.T

    def plain():
        for t in range(T):
            np.matmul(Hs[t], WT, out=gh)
            np.add(X[t], gh, out=Hs[t + 1])
            np.tanh(Hs[t + 1], out=Hs[t + 1])

    split = Split()
    cols = np.array_split(np.arange(H), chunks)
    bounds = [(c[0], c[-1] + 1) for c in cols]
    step = {"t": 0}

    def piece(lo, hi):
        def run():
            t = step["t"]
            np.matmul(Hs[t], WT[:, lo:hi], out=gh[:, lo:hi])
            np.add(X[t, :, lo:hi], gh[:, lo:hi], out=Hs[t + 1, :, lo:hi])
            np.tanh(Hs[t + 1, :, lo:hi], out=Hs[t + 1, :, lo:hi])
        return run

    pieces = [piece(lo, hi) for lo, hi in bounds]

    def split_loop():
        for t in range(T):
            step["t"] = t
            split.run(pieces)

    return plain, split_loop, Hs


def _busy():
    while True:
        pass


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    plain, split_loop, Hs = make_loops(chunks=args.chunks)
    BLAS.set_num_threads(1)
    plain()
    reference = Hs.copy()
    split_loop()
    print(f"split equals unsplit bit for bit: {np.array_equal(Hs, reference)}; "
          f"largest difference {np.abs(Hs - reference).max():.2e}")
    ways = {"blas-2": (2, plain), "blas-1": (1, plain), "split": (1, split_loop)}
    for busy in args.busy:
        procs = [mp.Process(target=_busy, daemon=True) for _ in range(busy)]
        for proc in procs:
            proc.start()
        time.sleep(0.3)
        times = {name: [] for name in ways}
        for _ in range(args.reps):
            for name, (threads, loop) in ways.items():
                BLAS.set_num_threads(threads)
                loop()
                start = time.perf_counter()
                loop()
                times[name].append((time.perf_counter() - start) * 1e6)
        print(f"busy={busy}: " + ", ".join(f"{n} {statistics.median(v):,.0f} us" for n, v in times.items()), flush=True)
        for proc in procs:
            proc.terminate()


if __name__ == "__main__":
    main()
