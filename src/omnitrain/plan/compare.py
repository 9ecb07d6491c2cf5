"""`python -m omnitrain.plan --compare <run dir>`: the plan of a finished run
(its resolved config.yaml) beside what its metrics.jsonl measured: per
pipeline rank forward and backward seconds per step, bubble, step time.
The first logged step is left out (warm-up)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from omegaconf import OmegaConf, open_dict

from omnitrain.config import ConfigError, PlanConfig


def run_config(run_dir: Path, overrides):
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--compare {run_dir}: no config.yaml there (a run directory of python -m omnitrain has one)")
    cfg = OmegaConf.load(path)
    with open_dict(cfg):
        cfg.plan = OmegaConf.merge(OmegaConf.structured(PlanConfig), cfg.get("plan") or {})
        for ov in overrides:
            key, sep, value = ov.partition("=")
            if not sep:
                raise ConfigError(f"--compare: override {ov!r} is not key=value")
            OmegaConf.update(cfg, key.lstrip("+"), yaml.safe_load(value) if value else None, merge=True)
    return cfg


def measured(run_dir: Path) -> dict:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"--compare {run_dir}: no metrics.jsonl there (did the run log a step?)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = rows[1:] if len(rows) > 1 else rows
    if not rows:
        raise ConfigError(f"--compare {run_dir}: metrics.jsonl has no steps")

    def mean(key):
        vals = [r[key] for r in rows if key in r]
        if not vals:
            return None
        if isinstance(vals[0], list):
            return [sum(v[i] for v in vals) / len(vals) for i in range(len(vals[0]))]
        return sum(vals) / len(vals)

    return {k: mean(k) for k in ("stage_forward_s", "stage_backward_s", "bubble", "step_time_s")} | {"steps": len(rows)}


def compare(run_dir, overrides=()) -> str:
    from omnitrain.models.family import build_family
    from omnitrain.parallel.context import check_layout, num_microbatches
    from omnitrain.parallel.mesh import Sizes
    from omnitrain.plan import _table
    from omnitrain.plan.layout import stage_report

    run_dir = Path(run_dir)
    cfg = run_config(run_dir, overrides)
    got = measured(run_dir)
    family = build_family(cfg.model)
    plans = check_layout(cfg, family)
    sizes = Sizes.from_cfg(cfg, family.module_names)
    text, pred = stage_report(cfg, family, plans, sizes)
    m = num_microbatches(cfg, sizes.dp)
    pp = sizes.pp
    f_pred = [0.0] * pp
    b_pred = [0.0] * pp
    for p, sc in zip(plans, pred.stages):
        f_pred[p.rank] += sc.fwd * m
        b_pred[p.rank] += sc.bwd * m
    f_meas = got["stage_forward_s"] or [None] * pp
    b_meas = got["stage_backward_s"] or [None] * pp

    def cell(x):
        return "-" if x is None else f"{x * 1e3:.1f}"

    def err(p, q):
        return "-" if not q else f"{(p - q) / q:+.0%}"

    rows = []
    for r in range(pp):
        fm, bm = (f_meas[r] if r < len(f_meas) else None), (b_meas[r] if r < len(b_meas) else None)
        tot_m = None if fm is None or bm is None else fm + bm
        rows.append([str(r), cell(f_pred[r]), cell(fm), err(f_pred[r], fm), cell(b_pred[r]), cell(bm), err(b_pred[r], bm),
                     cell(f_pred[r] + b_pred[r]), cell(tot_m), err(f_pred[r] + b_pred[r], tot_m)])
    lines = [
        f"run {run_dir}: parallel={cfg.parallel.name}, {got['steps']} steps measured (first left out), {m} micro-batches per step",
        text,
        "",
        "per pipeline rank, ms per step: predicted vs measured",
        _table(["rank", "fwd pred", "fwd run", "err", "bwd pred", "bwd run", "err", "total pred", "total run", "err"], rows),
    ]
    if got["bubble"] is not None:
        lines.append(f"bubble: predicted {pred.bubble:.1%}, measured {got['bubble']:.1%}")
    if got["step_time_s"] is not None:
        lines.append(f"step: predicted {pred.step_s:.3f} s, measured {got['step_time_s']:.3f} s (incl. data, optimizer, grad reduction)")
    return "\n".join(lines)
