"""train: training tokens/s of npyrnn and its peers, alternating pairs, same threads, same data and weights.

With ``cfg.load`` (``--load N``) the pairs run a second time while N busy processes compete for
the cores, and each library's loaded tokens/s and the fraction of its quiet throughput it kept
go into ``<kind>.loaded``.

Each measurement is a whole run: ``cfg.epochs`` epochs from the initial weights with a fresh loader
(every peer is reset before it is timed), tokens/s over all of them. Peers: d2l's scratch model
in torch and, where jax imports, in JAX (``scratch``); d2l's concise model in torch (``concise``);
chapter 9's scratch and concise GRU and LSTM in torch (``gru-scratch``, ``gru-concise``,
``lstm-scratch``, ``lstm-concise``; see ``benchmarks.peers``), for the cells in ``cfg.cells``.
With ``cfg.arrayops`` (``--arrayops``) npyrnn is timed a second time with its fused kernels off
(``npyrnn-arrayops``), so ``ratio_npyrnn_over_npyrnn-arrayops`` is what the kernels pay; with
``cfg.openblas`` (``--openblas``) once more with OpenBLAS's own threads instead of the split
products (``npyrnn-openblas``), so ``ratio_npyrnn_over_npyrnn-openblas`` is what those pay; with
``cfg.pyloops`` (``--pyloops``) once more with the compiled time loops off (``npyrnn-pyloops``).
"""

import statistics

from benchmarks.common import busy_processes, pair_order, pause, ratio_summary, summary
from benchmarks.peers import KINDS, hidden, jax_rnn, kinds, make_pair, npyrnn_options


def peers(cfg, corpus, vocab, threads, with_jax):
    """``{kind: [npyrnn, torch(, jax)]}``, all starting from the same initial weights."""
    impls = {kind: list(make_pair(cfg, vocab, corpus, kind)) for kind in kinds(cfg.cells)}
    if cfg.arrayops:  # npyrnn once more with its fused kernels off, to measure what they pay
        from benchmarks.peers.npyrnn_peer import NpyrnnArrayOps

        for kind, group in impls.items():
            group.append(NpyrnnArrayOps(cfg, vocab, corpus, hidden(cfg, kind), **npyrnn_options(kind)))
    if cfg.openblas:  # npyrnn once more with OpenBLAS's own threads, to measure what the split products pay
        from benchmarks.peers.npyrnn_peer import NpyrnnOpenBLAS

        for kind, group in impls.items():
            group.append(NpyrnnOpenBLAS(cfg, vocab, corpus, hidden(cfg, kind), **npyrnn_options(kind)))
    if cfg.pyloops:  # npyrnn once more with its compiled loops off, to measure what they pay
        from benchmarks.peers.npyrnn_peer import NpyrnnPythonLoops

        for kind, group in impls.items():
            group.append(NpyrnnPythonLoops(cfg, vocab, corpus, hidden(cfg, kind), **npyrnn_options(kind)))
    if with_jax:
        impls["scratch"].append(jax_rnn.JaxPeer(cfg, cfg.hidden_scratch, threads))
    return impls


def run(cfg, corpus, vocab, log, threads=1):
    with_jax = jax_rnn.available() and "rnn" in cfg.cells  # the JAX peer is chapter 8's scratch job
    results = {}
    impls = peers(cfg, corpus, vocab, threads, with_jax)
    for kind, group in impls.items():
        ours = group[0]
        for impl in group:  # warm-up measurement per implementation (the JAX child warms itself up)
            if not getattr(impl, "warm_up_in_child", False):
                impl.train()
        results[kind] = {
            "cell": KINDS[kind][0],
            "style": KINDS[kind][1],
            "hidden": hidden(cfg, kind),
            "minibatches_per_measurement": cfg.epochs * ours.num_batches(),
            "tokens_per_measurement": cfg.epochs * ours.num_batches() * cfg.batch_size * cfg.num_steps,
            "epochs_per_measurement": cfg.epochs,
            "clipping": "d2l grad_clipping (torch); npyrnn.optim.clip_grad_norm (npyrnn); "
                        "min(1, theta / (norm + 1e-6)) inside the jitted step (jax)",
        }
    if with_jax:
        log("  jax: perplexity-trajectory check ...")
        check = impls["scratch"][-1].check()
        results["scratch"]["jax_trajectory"] = check
        log(f"  jax: {check['epochs']} epochs, largest relative perplexity difference from npyrnn "
            f"{check['max_rel_diff']:.1e} ({'agree' if check['agree'] else 'DISAGREE'})")
    elif "rnn" in cfg.cells:
        log("  jax is not installed: no JAX peer (pip install -e '.[bench]')")
    rec = measure_pairs(cfg, impls, log, "train")
    for kind, r in rec.items():
        results[kind].update(summarise(r))
    if cfg.load:
        log(f"  train with {cfg.load} busy process(es) competing ...")
        with busy_processes(cfg.load):
            loaded = measure_pairs(cfg, impls, log, f"train, {cfg.load} busy,")
        for kind, r in loaded.items():
            quiet = rec[kind]
            results[kind]["loaded"] = {
                "busy_processes": cfg.load,
                **summarise(r),
                # whole-run tokens/s with the busy processes over tokens/s without them (medians over pairs)
                "throughput_kept": {name: statistics.median(v["tokens_per_s"])
                                    / statistics.median(quiet[name]["tokens_per_s"]) for name, v in r.items()},
            }
    if with_jax:
        children = impls["scratch"][-1].children
        results["scratch"]["jax_process"] = {
            "jax": children[0]["jax"], "devices": children[0]["devices"], "pinning": children[0]["pinning"],
            "affinity": children[0]["affinity"],
            "compile_seconds": summary([c["compile_seconds"] for c in children]),
        }
    return results


def measure_pairs(cfg, impls, log, label):
    """``cfg.pairs`` alternating pairs; ``{kind: {name: {'tokens_per_s', 'ppl', 'cpu_util'}}}`` per measurement."""
    rec = {kind: {impl.name: {"tokens_per_s": [], "ppl": [], "cpu_util": []} for impl in group}
           for kind, group in impls.items()}
    for i in range(cfg.pairs):
        for kind, group in impls.items():
            for impl in pair_order(i, *group):
                if hasattr(impl, "reset"):
                    impl.reset()
                pause(cfg)
                seconds, tokens, ppl, cpu = impl.train()
                r = rec[kind][impl.name]
                r["tokens_per_s"].append(tokens / seconds)
                r["ppl"].append(ppl)
                r["cpu_util"].append(cpu / seconds)
            log(f"  {label} {kind} pair {i + 1}/{cfg.pairs}: " + ", ".join(
                f"{name} {r['tokens_per_s'][-1]:,.0f} tok/s" for name, r in rec[kind].items()))
    return rec


def summarise(r):
    """The JSON of one kind's measurements: tokens/s, per-pair ratios npyrnn / each peer, perplexities, CPU use."""
    others = [name for name in r if name != "npyrnn"]
    return dict(
        tokens_per_s={name: summary(v["tokens_per_s"]) for name, v in r.items()},
        **{f"ratio_npyrnn_over_{name}": ratio_summary(r["npyrnn"]["tokens_per_s"], r[name]["tokens_per_s"])
           for name in others},
        perplexity={name: v["ppl"] for name, v in r.items()},
        cpu_seconds_per_wall_second={name: summary(v["cpu_util"]) for name, v in r.items()},
    )
