"""Predicted pipeline balance of hand-made, uniform and `auto` splits.

    python scripts/bench_balance.py                 # roofline cost model (plan.* defaults)
    python scripts/bench_balance.py plan.stat=p90   # any planner override applies to both cases

For Qwen2.5-Omni-7B's thinker over 4 stages and Qwen2.5-VL-72B over 8 (TP 2),
on the token counts of the shipped demo data (a scan, as `python -m
omnitrain.plan` does), prints the bottleneck ratio (slowest stage / mean
stage, fwd + bwd) of: the uniform split (layers cut evenly by count in data
flow order, conf/parallel/pp4_uniform), MindSpeed-MM's split, `auto`
(plan/search.best_split, with the time it took), and the exhaustive optimum
(plan/search.exhaustive: a branch-and-bound over every valid split,
independent of auto's dynamic programme). Also the predicted step time and
bubble of each. The last lines are the 7B case, machine-readable.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from omnitrain.models.family import build_family  # noqa: E402
from omnitrain.parallel.layout import validate_layout  # noqa: E402
from omnitrain.parallel.mesh import Sizes  # noqa: E402
from omnitrain.plan import compose  # noqa: E402
from omnitrain.plan import cost, layout, search  # noqa: E402

CASES = [
    ("qwen25_omni_7b pp4", ["model=qwen25_omni_7b", "parallel=pp4_hetero", "train.global_batch_size=16"],
     {"vision": [32, 0, 0, 0], "audio": [0, 32, 0, 0], "llm": [0, 7, 12, 9]}),
    ("qwen25_vl_72b pp8 tp2", ["model=qwen25_vl_72b", "parallel=vl72b_pp8_tp2", "train.global_batch_size=16"],
     {"vision": [32, 0, 0, 0, 0, 0, 0, 0], "llm": [6, 11, 11, 11, 11, 11, 11, 8]}),
]


def uniform_split(depths: dict, pp: int) -> dict:
    """All layers in data-flow order cut into pp runs of (nearly) equal count."""
    from omnitrain.parallel.layout import even_split

    per = even_split(sum(depths.values()), pp)
    out = {m: [0] * pp for m in depths}
    s, room = 0, per[0]
    for m, d in depths.items():
        for _ in range(d):
            while room == 0:
                s += 1
                room = per[s]
            out[m][s] += 1
            room -= 1
    return out


def run_case(name: str, overrides: list[str], mindspeed: dict, extra: list[str]) -> dict:
    cfg = compose(overrides + extra)
    family = build_family(cfg.model)
    sizes = Sizes.from_cfg(cfg, family.module_names)
    pp = sizes.pp
    m = cfg.train.global_batch_size // (cfg.train.micro_batch_size * sizes.dp)
    load = layout.load_for(cfg, family)
    tm = layout.time_model(cfg, family, load)
    cm = layout.cost_model(cfg, family, sizes, load, tm)
    t0 = time.perf_counter()
    auto = search.auto_split(cm, pp, schedule=cfg.parallel.pp.schedule, m=m)
    auto_s = time.perf_counter() - t0
    splits = {"uniform": uniform_split(family.depths, pp), "mindspeed": mindspeed, "auto": auto}

    def stats(split):
        plans = validate_layout(pp, split, family.depths, num_microbatches=m, schedule=cfg.parallel.pp.schedule)
        return cost.predict(cm, plans, schedule=cfg.parallel.pp.schedule, pp=pp, m=m)

    preds = {k: stats(v) for k, v in splits.items()}
    # the search starts from the better hand-made split, not from auto's
    incumbent = min(max(s.fwd + s.bwd for s in preds[k].stages) for k in ("uniform", "mindspeed"))
    t0 = time.perf_counter()
    worst, found = search.exhaustive(cm, pp, incumbent=incumbent * (1 + 1e-12))
    ex_s = time.perf_counter() - t0
    if found is None:  # nothing beats the hand-made incumbent: it is the optimum
        found = min((splits["uniform"], splits["mindspeed"]), key=lambda s: max(x.fwd + x.bwd for x in stats(s).stages))
    splits["optimum"] = found
    preds["optimum"] = stats(found)
    print(f"== {name}: {load.source}; {tm.describe()}")
    print(f"   tokens per sample: " + ", ".join(f"{k} {v:.1f}" for k, v in load.tokens.items()))
    print(f"   {m} micro-batches of {cfg.train.micro_batch_size} per step, {cfg.parallel.pp.schedule}, tp {dict(sizes.tp)}")
    for k, p in preds.items():
        split = ", ".join(f"{mod} {c}" for mod, c in splits[k].items())
        print(f"   {k:<9} bottleneck {p.bottleneck:.4f}  step {p.step_s * 1e3:8.1f} ms  bubble {p.bubble:6.1%}   {split}")
    print(f"   auto took {auto_s * 1e3:.0f} ms; the exhaustive search {ex_s:.1f} s")
    return {k: p.bottleneck for k, p in preds.items()}


def main(argv: list[str]) -> int:
    results = [run_case(name, ov, ms, argv) for name, ov, ms in CASES]
    first = results[0]
    for k in ("uniform", "mindspeed", "auto", "optimum"):
        print(f"{k}={first[k]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
