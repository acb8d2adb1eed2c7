#!/usr/bin/env python
"""One of npyrnn's generation switches on and off, call by call in one process: us a character.

``predict`` (greedy, batch 1, 500 characters after d2l's prefix, on the cores as ``npyrnn
generate --threads`` sets them) for each of d2l's models, untrained (float32, seed 0, d2l's
normal initialisation), the switch flipped between consecutive calls so both sides see the same
machine. Prints the median microseconds a character (the warm-up on the prefix included) on
each side and their ratio.

    python benchmarks/bench_generate_ab.py --switch compiled            # and --threads 1
    python benchmarks/bench_generate_ab.py --switch cut                 # and --stepper

Switches: ``compiled`` (``cpu_greedy.enabled``: the warm-up and the greedy loop compiled whole;
off: the stepper a token at a time), ``cut`` (one-row products of 192K items or more, in rows
of 256 or more, cut in two between the cores, ``cpu_gemm.MATVEC_SPLIT_ITEMS`` and
``MATVEC_SPLIT_K``; off: 128K items in rows of 512 or more, as before 2026-12-07's last
session, which cut the scratch RNN's (512, 512) alone). ``--stepper``: both sides with the
stepper (``cpu_greedy.enabled = False``), as sampling runs.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {  # d2l's models at its sizes: (cell, hidden, options)
    "rnn-scratch": ("rnn", 512, {}),
    "rnn": ("rnn", 256, {}),
    "gru-scratch": ("gru", 256, {"reset_after": False}),
    "gru": ("gru", 256, {}),
    "lstm": ("lstm", 256, {}),
}


def switch_setter(name):
    """A function that turns the switch on (True) or off (False)."""
    from npyrnn.nn import cpu_gemm, cpu_greedy

    if name == "compiled":
        return lambda on: setattr(cpu_greedy, "enabled", on)
    if name == "cut":
        now = cpu_gemm.MATVEC_SPLIT_ITEMS, cpu_gemm.MATVEC_SPLIT_K

        def turn(on):
            cpu_gemm.MATVEC_SPLIT_ITEMS, cpu_gemm.MATVEC_SPLIT_K = now if on else (128 * 1024, 512)
            cpu_gemm.blocks.cache_clear()  # the plans are cached by shape

        return turn
    raise SystemExit(f"bench_generate_ab: unknown switch {name!r}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--switch", choices=("compiled", "cut"), required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=30, help="calls a side for each model")
    p.add_argument("--length", type=int, default=500)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--stepper", action="store_true", help="with --switch cut: the stepper on both sides")
    args = p.parse_args(argv)
    if args.stepper and args.switch != "cut":
        p.error("--stepper goes with --switch cut")

    from npyrnn import backend
    from npyrnn.data import load_corpus
    from npyrnn.models import RNNLM
    from npyrnn.train import predict

    _, vocab = load_corpus(max_tokens=10000)
    backend.set_cpu_threads(args.threads)  # as `npyrnn generate --threads` does
    turn = switch_setter(args.switch)
    if args.stepper:
        from npyrnn.nn import cpu_greedy

        cpu_greedy.enabled = False
    prefix = "time traveller "
    print(f"switch {args.switch}{' (the stepper)' if args.stepper else ''}, {args.threads} thread(s), "
          f"{args.calls} calls a side, us a character (median)")
    print(f"{'model':12s} {'on':>7s} {'off':>7s} {'off/on':>7s}  same text")
    for name in args.models.split(","):
        cell, hidden, options = MODELS[name]
        model = RNNLM(len(vocab), hidden, dtype="float32", seed=0, cell=cell, init="normal", **options)
        times, texts = {True: [], False: []}, {}
        for on in (True, False):  # compile and warm up both sides
            turn(on)
            texts[on] = predict(prefix, args.length, model, vocab)
        for i in range(2 * args.calls):
            on = i % 2 == 0
            turn(on)
            start = time.perf_counter()
            predict(prefix, args.length, model, vocab)
            times[on].append((time.perf_counter() - start) / args.length * 1e6)
        turn(True)
        t_on, t_off = statistics.median(times[True]), statistics.median(times[False])
        print(f"{name:12s} {t_on:7.2f} {t_off:7.2f} {t_off / t_on:7.2f}  {texts[True] == texts[False]}")


if __name__ == "__main__":
    main()
