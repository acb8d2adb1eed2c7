"""generate: greedy generation at batch 1, characters/s, npyrnn's ``predict`` against d2l's ``predict_ch8``.

One row per kind of ``benchmarks.peers`` whose cell is in ``cfg.cells``.
"""

from benchmarks.common import pair_order, pause, ratio_summary, summary
from benchmarks.peers import KINDS, hidden, kinds, make_pair


def run(cfg, corpus, vocab, log):
    results = {}
    impls = {kind: make_pair(cfg, vocab, corpus, kind) for kind in kinds(cfg.cells)}
    texts = {}
    for kind, pair in impls.items():
        for impl in pair:  # warm-up
            texts[(kind, impl.name)] = impl.generate()[1]
    rec = {kind: {"npyrnn": [], "torch": []} for kind in impls}
    for i in range(cfg.pairs):
        for kind, pair in impls.items():
            for impl in pair_order(i, *pair):
                pause(cfg)
                seconds, _ = impl.generate()
                rec[kind][impl.name].append(cfg.num_preds / seconds)
        log(f"  generate pair {i + 1}/{cfg.pairs}: " + ", ".join(
            f"{kind} npyrnn {r['npyrnn'][-1]:,.0f} / torch {r['torch'][-1]:,.0f} chars/s" for kind, r in rec.items()))
    for kind, r in rec.items():
        results[kind] = {
            "cell": KINDS[kind][0],
            "hidden": hidden(cfg, kind),
            "num_preds": cfg.num_preds,
            "prefix": cfg.prefix,
            "chars_per_s": {"npyrnn": summary(r["npyrnn"]), "torch": summary(r["torch"])},
            "ratio_npyrnn_over_torch": ratio_summary(r["npyrnn"], r["torch"]),
            "same_text": texts[(kind, "npyrnn")] == texts[(kind, "torch")],  # same untrained weights, greedy
        }
    return results
