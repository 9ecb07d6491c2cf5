"""The planner's glue: a composed config -> cost model -> per-stage prediction,
and `auto` layouts resolved in the launching process (check_layout)."""

from __future__ import annotations

import functools
import logging
import math

from omegaconf import OmegaConf, open_dict

from omnitrain.config import ConfigError
from omnitrain.plan import cost, search

log = logging.getLogger(__name__)
GIB = 2**30


@functools.lru_cache(maxsize=8)
def _scan(model_yaml: str, data_yaml: str, plan_yaml: str) -> cost.Load:
    from omnitrain.models.family import build_family

    cfg = OmegaConf.create({"model": OmegaConf.create(model_yaml), "data": OmegaConf.create(data_yaml), "plan": OmegaConf.create(plan_yaml)})
    return cost.scan_load(cfg, build_family(cfg.model))


def load_for(cfg, family) -> cost.Load:
    """One sample's tokens: plan.tokens.*, else a scan of the data config (cached per process)."""
    got = cost.explicit_load(cfg, family)
    if got is not None:
        return got
    y = lambda node: OmegaConf.to_yaml(node, resolve=True)  # noqa: E731
    return _scan(y(cfg.model), y(cfg.data), y(cfg.plan))


@functools.lru_cache(maxsize=8)
def _segments(model_yaml: str):
    from omnitrain.models.family import build_family

    family = build_family(OmegaConf.create(model_yaml))
    return cost.segments(family, family.build_meta())


def segments_for(cfg) -> list[cost.Segment]:
    return _segments(OmegaConf.to_yaml(cfg.model, resolve=True))


def time_model(cfg, family, load: cost.Load):
    if cfg.plan.calibrate:
        from omnitrain.plan.calibrate import calibrate

        return calibrate(cfg, family)
    return cost.Roofline.from_cfg(cfg.plan)


def cost_model(cfg, family, sizes, load, tm, micro: int | None = None) -> cost.CostModel:
    fsdp = {m: sizes.dp_of(m) for m in sizes.tp} if cfg.parallel.dp_mode == "fsdp" else None
    return cost.CostModel(
        family, segments_for(cfg), load, micro=micro or cfg.train.micro_batch_size, dtype_bytes=cost.dtype_bytes(cfg),
        time_model=tm, tp=sizes.tp, fsdp=fsdp, ep=int(cfg.parallel.ep.llm),
    )


def memory_cap(cfg) -> float | None:
    return None if cfg.plan.memory_gib is None else float(cfg.plan.memory_gib) * GIB


def is_auto(cfg) -> bool:
    """`parallel.pp.layers=auto` (also what conf/parallel/auto.yaml sets); false once resolved."""
    return isinstance(cfg.parallel.pp.layers, str)


def resolve_auto(cfg, family) -> str:
    """Replace `parallel.pp.layers=auto` (and, for `parallel=auto`, pp.size, tp,
    train.micro_batch_size, schedule) by the planner's choice, in `cfg`; returns
    the line that says what was chosen."""
    from omnitrain.parallel.context import num_microbatches
    from omnitrain.parallel.mesh import Sizes

    pp = cfg.parallel.pp
    if isinstance(pp.layers, str) and pp.layers != "auto":
        raise ConfigError(f"parallel.pp.layers={pp.layers!r}: give one list per module, or auto")
    if pp.virtual_stages != 1:
        raise ConfigError("parallel.pp.layers=auto plans one stage per rank: set parallel.pp.virtual_stages=1")
    load = load_for(cfg, family)
    tm = time_model(cfg, family, load)
    if cfg.parallel.name == "auto":
        return _auto_parallel(cfg, family, load, tm)
    sizes = Sizes.from_cfg(cfg, family.module_names, model=f"model={cfg.model.name}")
    m = num_microbatches(cfg, sizes.dp)
    cm = cost_model(cfg, family, sizes, load, tm)
    split = search.auto_split(cm, pp.size, schedule=pp.schedule, m=m, memory_cap=memory_cap(cfg))
    if split is None:
        raise ConfigError(
            f"parallel.pp.layers=auto: no split over parallel.pp.size={pp.size} fits plan.memory_gib={cfg.plan.memory_gib}: "
            "raise plan.memory_gib, parallel.pp.size or the TP sizes"
        )
    with open_dict(cfg):
        pp.layers = split
    return f"parallel.pp.layers=auto -> {_fmt_split(split)} ({load.source}; {tm.describe()})"


def _fmt_split(split) -> str:
    return "{" + ", ".join(f"{m}: {list(c)}" for m, c in split.items()) + "}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _auto_parallel(cfg, family, load, tm) -> str:
    """Every (pp, TP sizes, micro-batch) for the world size: its best split,
    its simulated step time, its memory; the fastest that fits wins (ties:
    fewer stages, smaller TP, larger micro-batches, in that order)."""
    import os

    from omnitrain.parallel.context import check_encoder_tp, encoder_micro_multiple
    from omnitrain.parallel.layout import validate_layout
    from omnitrain.parallel.mesh import Sizes
    from omnitrain.parallel.tp import check_divisible

    world = cfg.plan.world_size or (int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None)
    if not world:
        raise ConfigError("parallel=auto needs the world size: set plan.world_size=N (or run under torchrun)")
    G = cfg.train.global_batch_size
    cap = memory_cap(cfg)
    tied = bool(getattr(family.hf_config, "tie_word_embeddings", False))
    best = None
    depth_total = sum(family.depths.values())
    for pp in _divisors(world):
        if pp > min(8, depth_total):
            continue
        width = world // pp
        for t_llm in _divisors(width):
            for t_enc in sorted({1, t_llm}):
                tp = {m: (t_llm if m == family.decoder else t_enc) for m in family.module_names}
                try:
                    check_divisible(tp, family.tp_sizes())
                    sizes = Sizes(pp, width // t_llm, tp)
                    check_encoder_tp(sizes)
                except ConfigError:
                    continue
                if tied and (t_llm > 1 or pp > 1):
                    continue
                need = encoder_micro_multiple(sizes)
                if G % sizes.dp:
                    continue
                for micro in _divisors(G // sizes.dp):
                    if micro % need:
                        continue
                    m = G // (micro * sizes.dp)
                    schedule = "1f1b" if m >= pp else "gpipe"
                    cm = cost.CostModel(
                        family, segments_for(cfg), load, micro=micro, dtype_bytes=cost.dtype_bytes(cfg), time_model=tm, tp=tp,
                        fsdp={k: sizes.dp_of(k) for k in tp} if cfg.parallel.dp_mode == "fsdp" else None,
                        ep=int(cfg.parallel.ep.llm) if sizes.dp_of(family.decoder) % int(cfg.parallel.ep.llm) == 0 else 1,
                    )
                    split = search.best_split(cm, pp, schedule=schedule, m=m, memory_cap=cap) if pp > 1 else {k: [d] for k, d in family.depths.items()}
                    if split is None:
                        continue
                    plans = validate_layout(pp, split, family.depths, num_microbatches=m, schedule=schedule)
                    pred = cost.predict(cm, plans, schedule=schedule, pp=pp, m=m)
                    if cap is not None and max(pred.memory) > cap:
                        continue
                    key = (round(pred.step_s, 12), pp, t_llm, t_enc, -micro)
                    if best is None or key < best[0]:
                        best = (key, pp, tp, micro, schedule, split, pred, sizes, cm, m)
    if best is None:
        raise ConfigError(
            f"parallel=auto: no layout of {world} ranks fits plan.memory_gib={cfg.plan.memory_gib}: raise plan.memory_gib or the world size"
        )
    _, pp, tp, micro, schedule, split, pred, sizes, cm, m = best
    if pp > 1:  # the winner's split, refined for step time (the candidates compared by their balanced split)
        split = search.refine(cm, split, pp, schedule=schedule, m=m, memory_cap=cap)
        plans = validate_layout(pp, split, family.depths, num_microbatches=m, schedule=schedule)
        pred = cost.predict(cm, plans, schedule=schedule, pp=pp, m=m)
    with open_dict(cfg):
        cfg.parallel.pp.size = pp
        cfg.parallel.pp.schedule = schedule
        cfg.parallel.pp.layers = split if pp > 1 else None
        cfg.parallel.tp = dict(tp)
        cfg.parallel.dp = sizes.dp
        cfg.train.micro_batch_size = micro
    return (
        f"parallel=auto ({world} ranks) -> pp {pp} ({schedule}), tp {dict(tp)}, dp {sizes.dp}, micro-batch {micro}, "
        f"layers {_fmt_split(split)}; predicted step {pred.step_s:.3g} s, peak {max(pred.memory) / GIB:.1f} GiB "
        f"({load.source}; {tm.describe()})"
    )


# ----------------------------------------------------------------------------- the stage table


def _fmt_t(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"


def stage_report(cfg, family, plans, sizes, load=None, tm=None) -> tuple[str, cost.StepPrediction]:
    from omnitrain.parallel.context import num_microbatches
    from omnitrain.plan import _table

    load = load or load_for(cfg, family)
    tm = tm or time_model(cfg, family, load)
    cm = cost_model(cfg, family, sizes, load, tm)
    pp = cfg.parallel.pp
    m = num_microbatches(cfg, sizes.dp)
    pred = cost.predict(cm, plans, schedule=pp.schedule, pp=pp.size, m=m, v=pp.virtual_stages)
    rows = []
    for p, sc in zip(plans, pred.stages):
        held = [f"{mod} {rg.start}-{rg.stop - 1}" for mod, rg in p.layers.items() if len(rg)]
        extras = [k for k in ("merge", "head") if getattr(p, k)]
        in_fl = cost.in_flight(pp.schedule, pp.size, m, p.rank, pp.virtual_stages)
        rows.append([
            str(p.index), ", ".join(held + extras), f"{sc.flops / 1e12:.3g}", f"{sc.act_bytes / GIB:.2f} x{in_fl}",
            f"{sc.state_bytes / GIB:.2f}", _fmt_t(sc.fwd), _fmt_t(sc.bwd), _fmt_t(sc.fwd + sc.bwd),
        ])
    tok = ", ".join(f"{k} {v:.0f}" for k, v in load.tokens.items() if not k.endswith("_items"))
    lines = [
        f"tokens per sample ({load.source}): {tok}; micro-batch {cfg.train.micro_batch_size} samples, {m} per step",
    ]
    if load.stats:
        lines.append("  scan: " + ", ".join(f"{k} mean {v['mean']:.0f} p90 {v['p90']:.0f}" for k, v in load.stats.items() if not k.endswith("_items")))
    lines.append(f"time model: {tm.describe()}")
    lines.append(_table(
        ["stage", "holds", "TFLOP/mb", "act GiB/mb x in-flight", "state GiB/rank", "fwd/mb", "bwd/mb", "fwd+bwd"], rows
    ))
    mem = ", ".join(f"{b / GIB:.1f}" for b in pred.memory)
    lines.append(
        f"bottleneck {pred.bottleneck:.3f} (slowest / mean stage); predicted step {_fmt_t(pred.step_s)} "
        f"({pp.schedule}, {m} micro-batches), bubble {pred.bubble:.1%}; peak GiB per pipeline rank: {mem}"
    )
    return "\n".join(lines), pred


def bottleneck_of(cm, family, pp: int, split) -> float:
    from omnitrain.parallel.layout import validate_layout

    plans = validate_layout(pp, split, family.depths, num_microbatches=pp, schedule="gpipe")
    t = [s.fwd + s.bwd for s in (cm.stage(p) for p in plans)]
    return max(t) / (sum(t) / len(t)) if all(math.isfinite(x) for x in t) else math.inf
