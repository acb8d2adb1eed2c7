"""SGD with the book's learning rate against Adam at its best learning rate, over seeds.

Trains d2l's scratch RNN (hidden 256 here, to keep it short) with `npyrnn train`:
first Adam at each learning rate of `--adam-lrs` (seed 0; the best is the one with the lowest
best validation perplexity), then SGD lr 1 and Adam at that rate for every seed of `--seeds`.
Writes one plot of validation perplexity against epochs (median over seeds, the range shaded)
and prints a table.

    python benchmarks/compare_optimizers.py --out runs/optimizers --epochs 200 --plot docs/img/sgd-vs-adam.png
"""

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def run(folder, flags):
    summary = folder / "summary.json"
    if summary.exists() and json.loads(summary.read_text())["status"] == "finished":
        return folder
    env = dict(os.environ, OPENBLAS_NUM_THREADS=os.environ.get("OPENBLAS_NUM_THREADS", "1"))
    cmd = [sys.executable, "-m", "npyrnn", "train", *flags, "--out", str(folder), "--quiet", "--overwrite"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    print(f"{folder.name}: exit {result.returncode} {result.stdout.strip()} {result.stderr.strip()}", flush=True)
    return folder


def val_curve(folder):
    with open(folder / "metrics.csv", newline="") as f:
        return [float(r["val_perplexity"]) for r in csv.DictReader(f)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/optimizers"))
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--adam-lrs", type=float, nargs="+", default=[0.001, 0.002, 0.005, 0.01])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--plot", type=Path, default=None)
    args = p.parse_args()
    base = ["--hidden", str(args.hidden), "--epochs", str(args.epochs), "--checkpoint-every", "0"]
    with ThreadPoolExecutor(args.jobs) as pool:
        sweep = list(pool.map(lambda lr: run(args.out / f"adam-lr{lr:g}-s{args.seeds[0]}",
                                             [*base, "--optimizer", "adam", "--lr", str(lr), "--seed",
                                              str(args.seeds[0])]), args.adam_lrs))
        best_of = {lr: json.loads((f / "summary.json").read_text())["best_val_perplexity"]
                   for lr, f in zip(args.adam_lrs, sweep)}
        best_lr = min(best_of, key=best_of.get)
        jobs = [(args.out / f"sgd-lr1-s{s}", [*base, "--seed", str(s)]) for s in args.seeds]
        jobs += [(args.out / f"adam-lr{best_lr:g}-s{s}", [*base, "--optimizer", "adam", "--lr", str(best_lr),
                                                          "--seed", str(s)]) for s in args.seeds]
        list(pool.map(lambda job: run(*job), jobs))
    print("Adam learning-rate sweep, seed", args.seeds[0], ":",
          ", ".join(f"lr {lr:g}: best validation perplexity {v:.2f}" for lr, v in best_of.items()))
    print("| optimiser | final training perplexity | best validation perplexity (epoch) |\n|---|---|---|")
    curves = {}
    for label, prefix in (("SGD, lr 1 (the book)", "sgd-lr1"), (f"Adam, lr {best_lr:g}", f"adam-lr{best_lr:g}")):
        summaries = [json.loads((args.out / f"{prefix}-s{s}" / "summary.json").read_text()) for s in args.seeds]
        curves[label] = [val_curve(args.out / f"{prefix}-s{s}") for s in args.seeds]

        def fmt(values):
            return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"

        print(f"| {label} | {fmt([x['perplexity'] for x in summaries])} | "
              f"{fmt([x['best_val_perplexity'] for x in summaries])} "
              f"(epochs {', '.join(str(x['best_epoch']) for x in summaries)}) |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
        for label, runs in curves.items():
            epochs = range(1, len(runs[0]) + 1)
            per_epoch = list(zip(*runs))
            ax.plot(epochs, [statistics.median(v) for v in per_epoch], label=label)
            ax.fill_between(epochs, [min(v) for v in per_epoch], [max(v) for v in per_epoch], alpha=0.25)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation perplexity")
        ax.set_title(f"The Time Machine, RNN h={args.hidden}: median and range over seeds "
                     f"{', '.join(map(str, args.seeds))}", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot)


if __name__ == "__main__":
    main()
