"""Per-rank view of the layout: which stage and data-parallel replica this
rank is, its process groups, and the collectives the training loop needs.

Rank order: pipeline outermost, data parallel inside it
(rank = pp_rank * dp + dp_rank), as in Megatron and MindSpeed-MM.
Gradients are summed (not averaged) over data-parallel replicas because each
micro-batch loss is already divided by the global batch's label-token count.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from hydra.utils import instantiate

from omnitrain.config import ConfigError, validate
from omnitrain.parallel.layout import StagePlan, validate_layout


def _depths(cfg) -> dict[str, int]:
    return instantiate(cfg.model, _convert_="all").depths


def _tp_product(cfg) -> int:
    tp = dict(cfg.parallel.tp)
    if any(int(v) != 1 for v in tp.values()):
        raise ConfigError(f"parallel.tp={tp}: tensor parallelism is not implemented yet; set every entry to 1")
    return 1


def dp_size_for(cfg, world_size: int | None = None) -> int:
    dp = cfg.parallel.dp
    pp = cfg.parallel.pp.size
    if dp == "auto":
        if world_size is None:
            world_size = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else pp * _tp_product(cfg)
        if world_size % (pp * _tp_product(cfg)):
            raise ConfigError(f"parallel.dp=auto: world size {world_size} is not a multiple of pp x tp = {pp}")
        return world_size // (pp * _tp_product(cfg))
    if not isinstance(dp, int) or dp < 1:
        raise ConfigError(f"parallel.dp={dp!r}: use auto or a positive integer")
    return dp


def world_size_for(cfg) -> int:
    return cfg.parallel.pp.size * _tp_product(cfg) * dp_size_for(cfg)


def num_microbatches(cfg, dp: int) -> int:
    t = cfg.train
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size x dp = {t.micro_batch_size} x {dp}: change one of them"
        )
    return t.global_batch_size // (t.micro_batch_size * dp)


def check_layout(cfg, depths: dict[str, int] | None = None) -> list[StagePlan]:
    """Every rule that needs no process: run before any worker starts."""
    validate(cfg)
    if cfg.parallel.dp_mode not in ("replicate",):
        raise ConfigError(f"parallel.dp_mode={cfg.parallel.dp_mode!r}: only replicate is implemented yet")
    dp = dp_size_for(cfg)
    pp = cfg.parallel.pp
    layers = None if pp.layers is None else {k: list(v) for k, v in pp.layers.items()}
    return validate_layout(
        pp.size,
        layers,
        depths or _depths(cfg),
        num_microbatches=num_microbatches(cfg, dp),
        schedule=pp.schedule,
        virtual_stages=pp.virtual_stages,
    )


@dataclass
class ParallelContext:
    rank: int
    world_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    stage_plans: list[StagePlan]  # the (virtual) stages this rank runs
    num_stages: int
    schedule: str
    pp_group: object = None
    dp_group: object = None
    pp_ranks: list[int] = field(default_factory=list)

    @classmethod
    def build(cls, cfg, depths: dict[str, int]) -> "ParallelContext":
        rank, world = dist.get_rank(), dist.get_world_size()
        pp = cfg.parallel.pp.size
        dp = dp_size_for(cfg, world)
        if pp * dp != world:
            raise ConfigError(f"parallel: pp x dp = {pp} x {dp} but the world has {world} processes")
        plans = check_layout(cfg, depths)
        pp_rank, dp_rank = divmod(rank, dp)
        # new_group must be called by every rank for every group, in the same order.
        pp_group = dp_group = None
        pp_ranks = []
        for d in range(dp):
            ranks = [p * dp + d for p in range(pp)]
            g = dist.new_group(ranks)
            if d == dp_rank:
                pp_group, pp_ranks = g, ranks
        for p in range(pp):
            g = dist.new_group([p * dp + d for d in range(dp)])
            if p == pp_rank:
                dp_group = g
        mine = [s for s in plans if s.rank == pp_rank]
        return cls(rank, world, pp_rank, pp, dp_rank, dp, mine, len(plans), cfg.parallel.pp.schedule, pp_group, dp_group, pp_ranks)

    # ---- what the loop asks -------------------------------------------------
    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0

    @property
    def grad_norm_group(self):
        # Replicas hold identical grads after the dp sum: the norm spans one pipeline.
        return self.pp_group

    def dp_sum_ints(self, *values: int) -> tuple[int, ...]:
        t = torch.tensor(values, dtype=torch.int64)
        if self.dp_size > 1:
            dist.all_reduce(t, group=self.dp_group)
        return tuple(int(v) for v in t)

    def reduce_grads(self, params) -> None:
        if self.dp_size == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        # One flat buffer: one collective instead of one per parameter.
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.dp_group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def reduce_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The step loss on every rank: sum over replicas and over the pipeline
        (only the last stage holds a non-zero part)."""
        loss = loss.detach().float().cpu().reshape(())
        dist.all_reduce(loss)
        return loss

    def run_pipeline(self, trainer, micro_batches: list[dict], num_label_tokens: int):
        from omnitrain.models.qwen25_omni import Segments
        from omnitrain.pipeline import schedule as sched
        from omnitrain.pipeline.executor import run_pipeline

        m = len(micro_batches)
        plan = sched.build(self.schedule, self.pp_size, m, len(self.stage_plans))
        stages = {}
        for sp in self.stage_plans:
            seg = Segments.from_plan(sp)
            stages[sp.index] = _Stage(trainer, seg, micro_batches, num_label_tokens)
        res = run_pipeline(
            plan.actions[self.pp_rank],
            stages,
            prev_rank=(self.pp_rank - 1) % self.pp_size if self.num_stages > 1 else None,
            next_rank=(self.pp_rank + 1) % self.pp_size if self.num_stages > 1 else None,
            group=self.pp_group,
            num_microbatches=m,
            num_stages=self.num_stages,
            device=trainer.dev,
        )
        loss = torch.stack(res.losses).sum() if res.losses else torch.zeros(())
        # Per-stage times, gathered so the logging rank reports every stage.
        t = torch.zeros(3, self.pp_size, dtype=torch.float64)
        t[0, self.pp_rank] = sum(res.forward_s.values())
        t[1, self.pp_rank] = sum(res.backward_s.values())
        t[2, self.pp_rank] = res.idle_s / max(res.total_s, 1e-9)
        dist.all_reduce(t, group=self.pp_group)
        extra = {
            "stage_forward_s": [round(v, 4) for v in t[0].tolist()],
            "stage_backward_s": [round(v, 4) for v in t[1].tolist()],
            "bubble": float(t[2].mean()),
        }
        return loss, extra


class _Stage:
    """Adapts a Trainer's segment forward to the executor's stage protocol."""

    def __init__(self, trainer, seg, micro_batches, num_label_tokens):
        self.trainer, self.seg, self.mbs, self.n = trainer, seg, micro_batches, num_label_tokens

    def forward(self, mb: int, inputs: dict):
        t = self.trainer
        from omnitrain import device

        with device.autocast(t.dev, t.dtype):
            return t.adapter.stage_forward(t.model, self.seg, self.mbs[mb], inputs, self.n)
