"""train: training tokens/s of npyrnn and its peers, alternating pairs, same threads, same data and weights."""

import time

from benchmarks.common import pair_order, pause, ratio_summary, summary
from benchmarks.peers import make_pair

KINDS = ("scratch", "concise")


def run(cfg, corpus, vocab, log):
    results = {}
    impls = {kind: make_pair(cfg, vocab, corpus, kind) for kind in KINDS}
    for kind, peers in impls.items():
        ours = peers[0]
        for impl in peers:  # warm-up measurement per implementation
            impl.train_epoch()
        results[kind] = {
            "hidden": cfg.hidden_scratch if kind == "scratch" else cfg.hidden_concise,
            "minibatches_per_measurement": ours.num_batches(),
            "tokens_per_measurement": ours.num_batches() * cfg.batch_size * cfg.num_steps,
            "clipping": "d2l grad_clipping (torch); npyrnn.optim.clip_grad_norm (npyrnn)",
        }
    rec = {kind: {impl.name: {"tokens_per_s": [], "ppl": [], "cpu_util": []} for impl in peers}
           for kind, peers in impls.items()}
    for i in range(cfg.pairs):
        for kind, peers in impls.items():
            for impl in pair_order(i, *peers):
                pause(cfg)
                cpu0 = time.process_time()
                seconds, tokens, ppl = impl.train_epoch()
                cpu = time.process_time() - cpu0
                r = rec[kind][impl.name]
                r["tokens_per_s"].append(tokens / seconds)
                r["ppl"].append(ppl)
                r["cpu_util"].append(cpu / seconds)
            log(f"  train {kind} pair {i + 1}/{cfg.pairs}: " + ", ".join(
                f"{name} {r['tokens_per_s'][-1]:,.0f} tok/s" for name, r in rec[kind].items()))
    for kind, r in rec.items():
        others = [name for name in r if name != "npyrnn"]
        results[kind].update(
            tokens_per_s={name: summary(v["tokens_per_s"]) for name, v in r.items()},
            **{f"ratio_npyrnn_over_{name}": ratio_summary(r["npyrnn"]["tokens_per_s"], r[name]["tokens_per_s"])
               for name in others},
            perplexity={name: v["ppl"] for name, v in r.items()},
            cpu_seconds_per_wall_second={name: summary(v["cpu_util"]) for name, v in r.items()},
        )
    return results
