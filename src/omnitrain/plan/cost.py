"""Cost model: time and memory of each pipeline stage, from FLOPs and bytes
per layer type.

Inputs:
- the model's segments (a module's pre part, each layer, its post part) with
  their parameters, from the meta model;
- one sample's load: LLM tokens per media kind and text, from a scan of the
  data config's samples (mean or 90th percentile) or `plan.tokens.*`;
- the family's cost hooks (`ModelFamily.layer_work / layer_cost / part_cost`):
  tokens and attention pairs per layer, FLOPs, bytes, kept activations;
- a time model: a roofline (`plan.peak_tflops` x `plan.efficiency`,
  `plan.mem_gbps`, `plan.link_gbps` for TP all-reduces) or a `Fit` measured
  on this machine (plan/calibrate.py): per layer type t = c + a x FLOPs, plus
  a per-call cost per module.

A stage's time is the sum of its segments'; a step's is the pipeline
schedule's simulated makespan (pipeline/schedule.py) over those per-stage times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

from omnitrain.models.family import Work

KINDS = ("image", "video", "audio")
BYTES_STATE = 16  # per trained parameter: fp32 weight, grad, AdamW exp_avg and exp_avg_sq


# ----------------------------------------------------------------------------- segments


@dataclass(frozen=True)
class Segment:
    module: str
    part: str  # pre | layer | post
    index: int  # layer index; -1 for a pre / post part
    type: str  # cost type: the family's layer type, or merge / head / <module>_pre / <module>_post
    params: int
    sharded: int  # of which TP shards over the module's TP ranks


def part_type(family, module: str, part: str) -> str:
    if module == family.decoder:
        return "merge" if part == "pre" else "head"
    return f"{module}_{part}"


def segments(family, model) -> list[Segment]:
    """Every segment of the model in data-flow order, with its parameters."""
    from omnitrain.parallel.tp import _matches
    from omnitrain.plan import _layer_re, _owner

    rx = _layer_re(family)
    params: dict[tuple, list[int]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        module, part, idx = _owner(family, name, rx)
        if part == "shared":
            continue
        key = (module, "layer" if part == "layers" else part, -1 if idx is None else idx)
        fqn, _, leaf = name.rpartition(".")
        plan = family.tp_plan.get(module, ())
        sharded = any(_matches(pat, fqn) and not (st == "rowwise" and leaf == "bias") for pat, st in plan)
        acc = params.setdefault(key, [0, 0])
        acc[0] += p.numel()
        acc[1] += p.numel() if sharded else 0
    out = []
    for spec in family.modules:
        m = spec.name
        depth = family.depths[m]
        keys = [(m, "pre", -1)] + [(m, "layer", i) for i in range(depth)] + [(m, "post", -1)]
        for key in keys:
            if key[1] != "layer" and key not in params and not (m == family.decoder):
                continue
            n, sh = params.get(key, (0, 0))
            t = family.layer_type(m, key[2]) if key[1] == "layer" else part_type(family, m, key[1])
            out.append(Segment(m, key[1], key[2], t, n, sh))
    return out


# ----------------------------------------------------------------------------- load


@dataclass(frozen=True)
class Load:
    """One sample's LLM tokens by kind (and items per kind), and where they came from."""

    tokens: Mapping[str, float]
    source: str
    stats: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # key -> {mean, p90} of the scan

    @property
    def sequence(self) -> float:
        return sum(self.tokens.get(k, 0.0) for k in (*KINDS, "text"))


def sample_load(family, ids, grids: Mapping[str, int], audio_items: int) -> dict[str, float]:
    """LLM tokens per kind of one processed sample (or micro-batch): its placeholder tokens."""
    out = {}
    total = float(ids.numel())
    media = 0.0
    for kind in family.media_kinds():
        tid = family.token_id(kind)
        n = float((ids == tid).sum()) if tid is not None else 0.0
        out[kind] = n
        out[f"{kind}_items"] = float(audio_items if kind == "audio" else grids.get(kind, 0))
        media += n
    out["text"] = total - media
    return out


def scan_load(cfg, family) -> Load:
    """Mean and 90th percentile of each kind's tokens over the data config's first
    `plan.scan_samples` samples (processed as training does)."""
    import numpy as np

    from omnitrain.data import build_dataset, load_processor

    processor = load_processor(cfg.model)
    data = build_dataset(cfg.data, family, processor)
    keys = [(d, i) for d, size in enumerate(data.index.sizes) for i in range(size)][: int(cfg.plan.scan_samples)]
    rows = []
    for key in keys:
        s = data[key]
        if s["meta"].get("error") is not None:
            continue
        grids = {k: int(s[f"{k}_grid_thw"].shape[0]) for k in ("image", "video") if f"{k}_grid_thw" in s}
        rows.append(sample_load(family, s["input_ids"], grids, len(s.get("audio_features") or ())))
    if not rows:
        from omnitrain.config import ConfigError

        raise ConfigError(f"plan: data={cfg.data.name} gave no usable sample to count tokens; fix the data or set plan.tokens.*")
    keys = list(rows[0])
    stats = {}
    for k in keys:
        v = np.array([r[k] for r in rows], dtype=float)
        stats[k] = {"mean": float(v.mean()), "p90": float(np.percentile(v, 90))}
    stat = cfg.plan.stat
    if stat not in ("mean", "p90"):
        from omnitrain.config import ConfigError

        raise ConfigError(f"plan.stat={stat!r}: use mean or p90")
    tokens = {k: stats[k][stat] for k in keys}
    for kind in KINDS:  # items as the mean over all samples, so tokens / items is the mean item's size
        if f"{kind}_items" in tokens:
            tokens[f"{kind}_items"] = stats[f"{kind}_items"]["mean"] or 1.0
    return Load(tokens, f"data={cfg.data.name}: {stat} of {len(rows)} samples", stats)


def explicit_load(cfg, family) -> Load | None:
    t = cfg.plan.tokens
    if all(t.get(k) is None for k in (*KINDS, "text")):
        return None
    tokens = {"text": float(t.text or 0)}
    for kind in family.media_kinds():
        tokens[kind] = float(t.get(kind) or 0)
        tokens[f"{kind}_items"] = float(t.get(f"{kind}_items") or 1)
    extra = [k for k in KINDS if t.get(k) and k not in family.media_kinds()]
    if extra:
        from omnitrain.config import ConfigError

        raise ConfigError(f"plan.tokens.{extra[0]}: model={cfg.model.name} has no {extra[0]} input; set it to null")
    return Load(tokens, "plan.tokens")


def load_for(cfg, family) -> Load:
    return explicit_load(cfg, family) or scan_load(cfg, family)


# ----------------------------------------------------------------------------- time models


@dataclass(frozen=True)
class Roofline:
    peak_flops: float
    efficiency: float
    mem_bw: float  # bytes/s
    link_bw: float  # bytes/s
    latency: float = 10e-6  # per collective

    @classmethod
    def from_cfg(cls, p) -> "Roofline":
        return cls(float(p.peak_tflops) * 1e12, float(p.efficiency), float(p.mem_gbps) * 1e9, float(p.link_gbps) * 1e9)

    def describe(self) -> str:
        return (
            f"roofline: {self.peak_flops / 1e12:.0f} TFLOP/s x {self.efficiency:.2f}, {self.mem_bw / 1e9:.0f} GB/s memory, "
            f"{self.link_bw / 1e9:.0f} GB/s TP links (plan.peak_tflops, plan.efficiency, plan.mem_gbps, plan.link_gbps)"
        )


@dataclass(frozen=True)
class Fit:
    """Measured on a device: per cost type (c, a) for forward and backward
    (t = c + a x FLOPs), and per module the cost of one call (set-up a stage
    pays once per module it runs: positions, masks, window indices)."""

    fwd: Mapping[str, tuple[float, float]]
    bwd: Mapping[str, tuple[float, float]]
    call_fwd: Mapping[str, float]
    call_bwd: Mapping[str, float]
    where: str

    def describe(self) -> str:
        return f"calibrated: {self.where}"


# ----------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class StageCost:
    fwd: float  # seconds per micro-batch
    bwd: float
    flops: float  # forward + backward FLOPs per micro-batch (whole stage, all TP ranks)
    act_bytes: float  # kept activations per micro-batch, one rank
    state_bytes: float  # parameters + grads + optimizer state, one rank


class CostModel:
    """Per-segment forward / backward seconds, FLOPs and bytes for one micro-batch
    of `micro` samples of `load`, under TP sizes `tp` (and FSDP over `fsdp` replicas)."""

    def __init__(self, family, segs: list[Segment], load: Load, *, micro: int, dtype_bytes: int, time_model,
                 tp: Mapping[str, int] | None = None, fsdp: Mapping[str, int] | None = None, ep: int = 1):
        self.family, self.segs, self.load, self.micro = family, segs, load, micro
        self.ep = int(ep)  # parallel.ep.llm: a rank holds 1/ep of each MoE layer's experts
        self.time_model = time_model
        self.tp = {m: 1 for m in family.module_names} | dict(tp or {})
        self.fsdp = dict(fsdp or {})
        self.dtype_bytes = dtype_bytes
        self.fwd: dict[tuple, float] = {}
        self.bwd: dict[tuple, float] = {}
        self.flops: dict[tuple, float] = {}
        self.act: dict[tuple, float] = {}
        self.state: dict[tuple, float] = {}
        for s in segs:
            self._add(s)
        self.call_fwd = {m: 0.0 for m in family.module_names}
        self.call_bwd = dict(self.call_fwd)
        if isinstance(time_model, Fit):
            self.call_fwd.update(time_model.call_fwd)
            self.call_bwd.update(time_model.call_bwd)

    @staticmethod
    def key(s: Segment) -> tuple:
        return (s.module, s.part, s.index)

    def work(self, s: Segment) -> Work:
        f = self.family
        w = f.layer_work(s.module, s.index, self.load.tokens) if s.part == "layer" else f.part_work(s.module, s.part, self.load.tokens)
        return Work(w.tokens * self.micro, w.pairs * self.micro)

    def _add(self, s: Segment) -> None:
        f, k, t = self.family, self.key(s), self.tp[s.module]
        w = self.work(s)
        cost = (f.layer_cost if s.part == "layer" else f.part_cost)(s.module, s.index if s.part == "layer" else s.part, w, s.params, self.dtype_bytes)
        flops = cost.flops / t  # per TP rank
        width = f.layer_width(s.module)
        # Megatron-style TP: two all-reduces of the activations per layer each way (attention, MLP), one at the head
        n_reduce = 2 if s.part == "layer" else (1 if s.part == "post" and s.module == f.decoder else 0)
        comm_bytes = n_reduce * w.tokens * width * self.dtype_bytes
        tm = self.time_model
        if isinstance(tm, Fit):
            c, a = tm.fwd.get(s.type, (0.0, 0.0))
            cb, ab = tm.bwd.get(s.type, (0.0, 0.0))
            fwd, bwd = c + a * flops, cb + ab * 2 * flops
            comm = 0.0
        else:
            fwd = max(flops / (tm.peak_flops * tm.efficiency), cost.bytes / t / tm.mem_bw)
            bwd = max(2 * flops / (tm.peak_flops * tm.efficiency), 2 * cost.bytes / t / tm.mem_bw)
            comm = (2 * (t - 1) / t * comm_bytes / tm.link_bw + n_reduce * tm.latency) if t > 1 else 0.0
        self.fwd[k] = fwd + comm
        self.bwd[k] = bwd + comm
        self.flops[k] = 3 * cost.flops
        # activations are sharded by TP inside the layer; the residual stream is not (no sequence parallelism)
        self.act[k] = cost.act / t if s.part == "layer" else cost.act / (t if s.module == f.decoder and s.part == "post" else 1)
        experts = f.expert_params(s.module, s.index) if s.part == "layer" else 0  # replicated over TP, split by EP
        # under FSDP x EP the experts are sharded over edp x ep = the module's dp ranks (the division below)
        ep = self.ep if self.fsdp.get(s.module, 1) == 1 else 1
        per_rank = (s.params - s.sharded - experts) + s.sharded / t + experts / ep
        self.state[k] = per_rank * BYTES_STATE / self.fsdp.get(s.module, 1)

    # ---- per stage ----------------------------------------------------------
    def stage_keys(self, plan) -> list[tuple]:
        out = []
        for m in self.family.module_names:
            if m in plan.pre:
                out.append((m, "pre", -1))
            out += [(m, "layer", i) for i in plan.layers.get(m, range(0))]
            if m in plan.post:
                out.append((m, "post", -1))
        return [k for k in out if k in self.fwd]

    def stage(self, plan) -> StageCost:
        keys = self.stage_keys(plan)
        calls = [m for m in self.family.module_names if plan.has(m)]
        return StageCost(
            fwd=sum(self.fwd[k] for k in keys) + sum(self.call_fwd[m] for m in calls),
            bwd=sum(self.bwd[k] for k in keys) + sum(self.call_bwd[m] for m in calls),
            flops=sum(self.flops[k] for k in keys),
            act_bytes=sum(self.act[k] for k in keys),
            state_bytes=sum(self.state[k] for k in keys),
        )


def in_flight(schedule: str, pp: int, m: int, rank: int, v: int = 1) -> int:
    """Micro-batches whose activations pipeline rank `rank` holds at its peak."""
    from omnitrain.pipeline.schedule import interleaved_warmup

    if schedule == "gpipe" or pp == 1:
        return m if pp > 1 else 1
    if schedule == "interleaved_1f1b":
        return min(interleaved_warmup(pp, m, v, rank) + 1, m * v)
    if schedule == "zero_bubble":  # W's wait on later ranks too: every rank holds up to min(m, p)
        return min(m, pp)
    if schedule == "zbv":  # chunk activations, at most p + 1 micro-batches' (pipeline.schedule.zbv)
        return min(2 * m, 2 * (pp + 1))
    return min(m, pp - rank)


@dataclass(frozen=True)
class StepPrediction:
    stages: tuple[StageCost, ...]
    step_s: float
    bubble: float  # mean over ranks of idle / step time (as the run's metrics count it)
    memory: tuple[float, ...]  # peak bytes per pipeline rank: state + kept activations

    @property
    def bottleneck(self) -> float:
        t = [s.fwd + s.bwd for s in self.stages]
        return max(t) / (sum(t) / len(t))


def predict(cm: CostModel, plans, *, schedule: str, pp: int, m: int, v: int = 1) -> StepPrediction:
    from omnitrain.pipeline import schedule as sched

    stages = tuple(cm.stage(p) for p in plans)
    if len(plans) == 1:
        t = m * (stages[0].fwd + stages[0].bwd)
        return StepPrediction(stages, t, 0.0, (stages[0].state_bytes + stages[0].act_bytes,))
    s = sched.build(schedule, pp, m, v)
    res = sched.simulate(s, fwd=[x.fwd for x in stages], bwd=[x.bwd for x in stages])
    bubble = sum((res.makespan - b) / res.makespan for b in res.busy) / pp if res.makespan > 0 else 0.0
    mem = []
    for r in range(pp):
        mine = [x for p, x in zip(plans, stages) if p.rank == r]
        mem.append(sum(x.state_bytes for x in mine) + in_flight(schedule, pp, m, r, v) * max((x.act_bytes for x in mine), default=0.0))
    return StepPrediction(stages, res.makespan, bubble, tuple(mem))


def dtype_bytes(cfg) -> int:
    return 2 if cfg.train.dtype == "bf16" else 4


def is_finite(x: float) -> bool:
    return math.isfinite(x)
