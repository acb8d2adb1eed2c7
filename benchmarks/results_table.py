"""Full runs at the book's settings over several seeds, summarised as README's results table.

Each configuration is trained with `npyrnn train` (500 epochs, lr 1, batch 32, 35 steps,
clipping at 1, the first 10,000 characters for training and the next 5,000 for validation)
once per seed; the table gives the median and range over seeds of the final training
perplexity and of the best validation perplexity (with its epoch).

    python benchmarks/results_table.py --out runs/table --seeds 0 1 2 --jobs 2   # runs what is missing
    python benchmarks/results_table.py --out runs/table --report                 # only the table

Runs already finished in OUT are not repeated; an interrupted one is resumed. With
`--jobs 2` two runs go side by side with one BLAS thread each (OPENBLAS_NUM_THREADS=1),
which changes speed, not results.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# name, flags, what d2l reports for it
CONFIGS = [
    ("rnn-h512-seq", ["--hidden", "512"], "1.0 (ch. 8.5 scratch)"),
    ("rnn-h512-rand", ["--hidden", "512", "--random-iter"], "1.5 (ch. 8.5 scratch)"),
    ("rnn-h256-seq", ["--hidden", "256"], ""),
    ("rnn-h256-rand", ["--hidden", "256", "--random-iter"], ""),
    ("rnn-h256-seq-uniform", ["--hidden", "256", "--init", "uniform"], "1.3 (ch. 8.6 concise)"),
    ("gru-h256-seq-before", ["--cell", "gru", "--gru-reset", "before", "--hidden", "256"], "1.1 (ch. 9.1 scratch)"),
    ("gru-h256-seq-uniform", ["--cell", "gru", "--hidden", "256", "--init", "uniform"], "1.0 (ch. 9.1 concise)"),
    ("lstm-h256-seq", ["--cell", "lstm", "--hidden", "256"], "1.1 (ch. 9.2 scratch)"),
]


def run(out, name, flags, seed):
    folder = out / f"{name}-s{seed}"
    if (folder / "summary.json").exists() and json.loads((folder / "summary.json").read_text())["status"] == "finished":
        return folder
    env = dict(os.environ, OPENBLAS_NUM_THREADS=os.environ.get("OPENBLAS_NUM_THREADS", "1"))
    if (folder / "checkpoint.safetensors").exists():
        cmd = ["train", "--resume", str(folder), "--quiet"]
    else:
        cmd = ["train", *flags, "--seed", str(seed), "--out", str(folder), "--quiet", "--overwrite"]
    result = subprocess.run([sys.executable, "-m", "npyrnn", *cmd], env=env, capture_output=True, text=True)
    print(f"{folder.name}: exit {result.returncode} {result.stdout.strip()} {result.stderr.strip()}", flush=True)
    return folder


def report(out, seeds):
    lines = ["| configuration | d2l reports | seeds | final training perplexity | final validation perplexity | "
             "best validation perplexity (epoch) |", "|---|---|---|---|---|---|"]
    for name, flags, d2l in CONFIGS:
        rows = []
        for seed in seeds:
            path = out / f"{name}-s{seed}" / "summary.json"
            if path.exists():
                s = json.loads(path.read_text())
                if s.get("status") == "finished":
                    rows.append(s)
        if not rows:
            continue

        def fmt(values):
            return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"

        best = fmt([r["best_val_perplexity"] for r in rows])
        epochs = sorted(r["best_epoch"] for r in rows)
        seeds_done = ", ".join(str(r["seed"]) for r in rows)
        lines.append(f"| `{' '.join(flags)}` | {d2l} | {seeds_done} | {fmt([r['perplexity'] for r in rows])} | "
                     f"{fmt([r['val_perplexity'] for r in rows])} | {best} (epochs {', '.join(map(str, epochs))}) |")
    lines.append("\nmedian [min, max] over the seeds listed")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/table"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--only", nargs="*", default=None, help="configuration names to run")
    p.add_argument("--report", action="store_true", help="only print the table of what has finished")
    args = p.parse_args()
    if not args.report:
        todo = [(n, f, s) for s in args.seeds for n, f, _ in CONFIGS if args.only is None or n in args.only]
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda job: run(args.out, *job), todo))
    print(report(args.out, args.seeds))


if __name__ == "__main__":
    main()
