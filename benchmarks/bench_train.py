#!/usr/bin/env python
"""npyrnn against d2l's PyTorch versions of chapters 8 and 9 (RNN, GRU, LSTM), in one run.

Sections (``--only`` picks one; each is a module of ``benchmarks/sections/``); ``--cells`` picks
the cells (default all three):

train     training tokens/s, float32, same thread count, same data:
          ``scratch``: d2l's scratch model under autograd (hidden 512) vs npyrnn RNNLM(512, init='normal');
          ``concise``: d2l's RNNModel, nn.RNN + nn.Linear (hidden 256) vs npyrnn RNNLM(256, init='uniform');
          ``gru-scratch``, ``lstm-scratch``: d2l's scratch gru / lstm under autograd (hidden 256) vs
          RNNLM(256, cell='gru', reset_after=False) / RNNLM(256, cell='lstm'), init='normal';
          ``gru-concise``, ``lstm-concise``: RNNModel(nn.GRU / nn.LSTM) (hidden 256) vs
          RNNLM(256, cell='gru' / 'lstm', init='uniform').
generate  greedy generation at batch 1 after ``'time traveller '``: npyrnn ``predict`` vs d2l's
          ``predict_ch8`` loop (one step at a time, under ``torch.no_grad``), for every model.
memory    peak resident memory of each implementation's training, one subprocess each: the rise of
          VmHWM (Linux peak RSS) over the RSS after imports and corpus loading.
floor     the matrix-product floor of one npyrnn training minibatch, per cell (the RNN at the scratch
          size, the GRU and LSTM at 256): NumPy matmul at exactly the shapes one step uses, summed,
          against npyrnn's measured time per minibatch.

The torch models are the ones the tests check npyrnn against (``tests/reference.py``); each starts
from the npyrnn model's initial weights, so both sides do the same arithmetic on the same minibatches
(each side has its own ``SeqDataLoader`` with the same seed). Measurements alternate per pair:
npyrnn then torch, torch then npyrnn, and so on, after one warm-up epoch (or generation) per
implementation. See ``benchmarks/README.md`` for what each number means.

Usage:

    NPYRNN_DATA_DIR=../shared/data python benchmarks/bench_train.py            # 5 pairs, all sections
    python benchmarks/bench_train.py --quick --json /tmp/bench.json            # smoke test, seconds
    python benchmarks/bench_train.py --only floor --pairs 3 --threads 1
    python benchmarks/bench_train.py --only train --cells gru,lstm --pairs 5 --threads 2
"""

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    # the repository root: this checkout's npyrnn, the benchmarks package and tests/reference.py
    sys.path.insert(0, str(ROOT))

from benchmarks.common import QUICK, Config, limit_threads, load_data  # noqa: E402
from benchmarks.peers import CELLS  # noqa: E402
from benchmarks.report import metadata, render  # noqa: E402
from benchmarks.sections import floor, generate, memory, train  # noqa: E402

SECTIONS = ("train", "generate", "memory", "floor")
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "latest.json"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, help="A/B pairs per measurement (default 5; 1 with --quick)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for NumPy's BLAS and torch (default os.cpu_count())")
    p.add_argument("--quick", action="store_true", help="tiny sizes for smoke tests (hidden 16, 200 tokens, 1 pair)")
    p.add_argument("--only", choices=SECTIONS, action="append", help="run only this section (repeatable)")
    p.add_argument("--cells", type=parse_cells, help="comma-separated cells whose rows to measure: rnn, gru, "
                   "lstm (default all)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON,
                   help=f"where to write the results (default {DEFAULT_JSON.relative_to(ROOT)})")
    p.add_argument("--batches", type=int, help="minibatches per epoch of a training measurement (default: all)")
    p.add_argument("--epochs", type=int, help="whole epochs per training measurement, each a run from the "
                   "initial weights (default 1)")
    p.add_argument("--load", type=int, nargs="?", const=os.cpu_count() or 1, metavar="N",
                   help="train section: run the pairs again with N busy processes competing "
                   "(N defaults to the number of cores: one per core)")
    p.add_argument("--arrayops", action="store_true", default=None,
                   help="train section: also time npyrnn with its fused kernels off (npyrnn-arrayops), "
                   "to measure what the fused CPU kernels of the fast extra pay")
    p.add_argument("--openblas", action="store_true", default=None,
                   help="train section: also time npyrnn with OpenBLAS's own threads instead of its split products "
                        "(npyrnn-openblas), to measure what the split products pay")
    p.add_argument("--pyloops", action="store_true", default=None,
                   help="train section: also time npyrnn with its compiled time loops off (npyrnn-pyloops), "
                        "to measure what the compiled loops pay")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-steps", type=int)
    p.add_argument("--hidden-scratch", type=int)
    p.add_argument("--hidden-concise", type=int)
    p.add_argument("--num-preds", type=int)
    p.add_argument("--floor-reps", type=int, help="calls per product in each floor measurement (default 20)")
    p.add_argument("--seed", type=int)
    p.add_argument("--_memory-child", dest="memory_child", choices=memory.CHILDREN, help=argparse.SUPPRESS)
    p.add_argument("--_config", dest="config", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def parse_cells(text):
    """'gru,lstm' -> ('gru', 'lstm'), in CELLS' order; an unknown or missing cell is an argparse error."""
    cells = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in cells if c not in CELLS]
    if bad or not cells:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(CELLS)}, got {text!r}")
    return tuple(c for c in CELLS if c in cells)


def make_config(args):
    if args.config:
        return Config(**json.loads(args.config))
    values = dict(QUICK) if args.quick else {}
    for field in dataclasses.fields(Config):
        v = getattr(args, field.name, None)
        if v is not None:
            values[field.name] = v
    cfg = Config(**values)
    if cfg.pairs < 1 or cfg.epochs < 1 or cfg.load < 0:
        raise SystemExit("bench_train: --pairs and --epochs must be at least 1, --load at least 0")
    return cfg


def write_json(path, results):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = make_config(args)
    threads = args.threads or os.cpu_count() or 1
    cfg = dataclasses.replace(cfg, threads=threads)
    if args.memory_child:
        print(json.dumps(memory.child(cfg, args.memory_child, threads)))
        return 0
    try:
        import threadpoolctl  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        print(f"bench_train: needs torch and threadpoolctl ({exc}); pip install torch==2.13.0 threadpoolctl",
              file=sys.stderr)
        return 2
    sections = args.only or list(SECTIONS)
    results = {"meta": metadata(cfg, threads, sections)}
    progress = results["meta"]["progress"] = []  # every progress line with the 1-minute load average then

    def log(msg):
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        progress.append({"message": msg.strip(), "loadavg_1min": load})
        print(msg if load is None else f"{msg}  [load {load:.2f}]", file=sys.stderr, flush=True)

    start = time.perf_counter()
    with limit_threads(threads, with_torch=True):
        import threadpoolctl
        import torch

        results["meta"]["threads_in_effect"] = {  # what the limits actually set, per library
            "torch.get_num_threads": torch.get_num_threads(),
            **{f"{b['prefix']} ({b['user_api']})": b["num_threads"] for b in threadpoolctl.threadpool_info()},
        }
        corpus, vocab = load_data(cfg)
        if "train" in sections:
            log("train ...")
            results["train"] = train.run(cfg, corpus, vocab, log, threads)
        for name, section in (("generate", generate), ("floor", floor)):
            if name in sections:
                log(f"{name} ...")
                results[name] = section.run(cfg, corpus, vocab, log)
    if "memory" in sections:
        log("memory ...")
        results["memory"] = memory.run(cfg, threads, log)
    results["meta"]["seconds"] = time.perf_counter() - start
    results["meta"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    write_json(args.json, results)
    print(render(results))
    print(f"\n{results['meta']['seconds']:.0f} s; loadavg {results['meta']['loadavg_start']} -> "
          f"{results['meta']['loadavg_end']}; JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
