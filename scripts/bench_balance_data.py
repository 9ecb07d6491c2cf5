"""How even `data.balance` makes the predicted cost of data-parallel ranks
on the demo mix (default dp4): the same global batches, dealt as the
sampler deals them (contiguous shares) and as data/balance.py deals them.

Costs are the family's `batch_cost` of each sample collated alone (encoder
rows and LLM tokens x cost per token), the ones the loader balances by; each
demo sample is processed once. No training: the plans are pure functions of
the costs. (wt13's scripts/bench_balance.py is about pipeline stages.)

    python scripts/bench_balance_data.py [--dp 4] [--global-batch 16] [--steps 20] [overrides...]
last lines: `imbalance_off=<mean over steps of max/mean rank cost>`, `imbalance_on=<...>`.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

CONF = str(Path(__file__).resolve().parents[1] / "src" / "omnitrain" / "conf")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dp", type=int, default=4)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--micro", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from hydra import compose, initialize_config_dir

    from omnitrain.config import register_configs
    from omnitrain.data import balance, build_loader, load_processor
    from omnitrain.models.family import build_family

    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = compose("config", overrides=["data=demo_mix", *args.overrides])
    family = build_family(cfg.model)
    loader = build_loader(
        cfg.data, family, load_processor(cfg.model), seed=cfg.train.seed, micro_batch_size=args.micro,
        global_batch_size=args.global_batch, dp_rank=0, dp_size=args.dp,
    )
    collate, pad = loader.collate_fn, loader.dataset.builder.ids.pad
    cost_of = {}

    def cost(key):
        if key not in cost_of:
            cost_of[key] = family.batch_cost(collate([loader.dataset[key]], pad))
        return cost_of[key]

    m = loader.micro_batches_per_step
    G = args.global_batch
    results = {"off": ([], []), "on": ([], [])}
    for step in range(args.steps):
        costs = [cost(loader.key_at(p)) for p in range(step * G, (step + 1) * G)]
        plans = {"off": balance.contiguous(G, args.dp, m, args.micro), "on": balance.assign(costs, args.dp, m, args.micro)}
        for name, plan in plans.items():
            ranks, micro = balance.imbalance(costs, plan)
            results[name][0].append(ranks)
            results[name][1].append(micro)
    spread = max(cost_of.values()) / min(cost_of.values())
    print(f"demo mix: {len(cost_of)} distinct samples, predicted cost spread max/min {spread:.1f}x; dp{args.dp}, "
          f"global batch {G}, {m} micro-batches of {args.micro} per rank, {args.steps} steps")
    for name, (ranks, micro) in results.items():
        print(f"balance {name:3s}: max/mean rank cost mean {statistics.mean(ranks):.3f} (worst {max(ranks):.3f}); "
              f"max/mean micro-batch cost mean {statistics.mean(micro):.3f}")
    print(f"imbalance_off={statistics.mean(results['off'][0]):.3f}")
    print(f"imbalance_on={statistics.mean(results['on'][0]):.3f}")


if __name__ == "__main__":
    main()
