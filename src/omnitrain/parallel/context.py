"""Per-rank view of the layout: which stage and data-parallel replica this
rank is, its process groups, and the collectives the training loop needs.

Rank order: pipeline outermost, then data parallel, tensor parallel innermost
(rank = pp_rank * dp * tp + dp_rank * tp + tp_rank), as in Megatron and
MindSpeed-MM; the groups are slices of one (pp, dp, tp) DeviceMesh
(parallel/mesh.py). Gradients are summed (not averaged) over data-parallel
replicas because each micro-batch loss is already divided by the global
batch's label-token count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from hydra.utils import instantiate

from omnitrain import device
from omnitrain.config import ConfigError, validate
from omnitrain.parallel.layout import StagePlan, validate_layout
from omnitrain.parallel.mesh import MODULES, Sizes, build_mesh
from omnitrain.parallel.tp import check_divisible as check_tp_divisible

DP_MODES = ("replicate", "fsdp")


def check_encoder_dp(sizes: Sizes, micro_batch_size: int) -> None:
    """MindSpeed-MM's rule: the LLM's dp x micro-batch divides evenly over each
    encoder's dp replicas, so every encoder sample's features land on the LLM
    rank that holds the sample."""
    llm = sizes.dp_of("llm") * micro_batch_size
    for enc in ("vision", "audio"):
        d = sizes.dp_of(enc)
        if llm % d:
            raise ConfigError(
                f"parallel: the LLM's dp x train.micro_batch_size = {sizes.dp_of('llm')} x {micro_batch_size} = {llm} "
                f"is not divisible by the {enc} encoder's dp = {d} (parallel.tp.{enc}={sizes.tp[enc]} vs "
                f"parallel.tp.llm={sizes.tp['llm']}): raise train.micro_batch_size to a multiple of "
                f"{d // math.gcd(d, sizes.dp_of('llm'))} or make the TP sizes equal"
            )


def _depths(cfg) -> dict[str, int]:
    return instantiate(cfg.model, _convert_="all").depths


def dp_size_for(cfg, world_size: int | None = None) -> int:
    return Sizes.from_cfg(cfg, world_size).dp


def world_size_for(cfg) -> int:
    return Sizes.from_cfg(cfg).world


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
    if cfg.parallel.dp_mode not in DP_MODES:
        raise ConfigError(f"parallel.dp_mode={cfg.parallel.dp_mode!r}: use one of {', '.join(DP_MODES)}")
    if cfg.parallel.fsdp.mixed_precision not in ("none", "bf16"):
        raise ConfigError(f"parallel.fsdp.mixed_precision={cfg.parallel.fsdp.mixed_precision!r}: use none or bf16")
    sizes = Sizes.from_cfg(cfg)
    dp = sizes.dp
    adapter = instantiate(cfg.model, _convert_="all")
    check_tp_divisible(sizes.tp, adapter.tp_sizes())
    check_encoder_dp(sizes, cfg.train.micro_batch_size)
    if not sizes.uniform_tp:
        raise ConfigError(
            f"parallel.tp={dict(cfg.parallel.tp)}: different TP sizes per module are not implemented yet "
            "(no redistribution between modules); give every module the same TP size"
        )
    pp = cfg.parallel.pp
    layers = None if pp.layers is None else {k: list(v) for k, v in pp.layers.items()}
    return validate_layout(
        pp.size,
        layers,
        depths or adapter.depths,
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
    tp_rank: int = 0
    tp_size: int = 1
    tp_group: object = None
    mesh: object = None  # DeviceMesh ("pp", "dp", "tp"), built once
    dp_mode: str = "replicate"
    fsdp_opts: object = None

    @classmethod
    def build(cls, cfg, depths: dict[str, int]) -> "ParallelContext":
        rank, world = dist.get_rank(), dist.get_world_size()
        sizes = Sizes.from_cfg(cfg, world)
        if sizes.world != world:
            raise ConfigError(
                f"parallel: pp x dp x tp = {sizes.pp} x {sizes.dp} x {sizes.tp_max} but the world has {world} processes"
            )
        plans = check_layout(cfg, depths)
        tp = sizes.tp_max
        mesh = build_mesh(device.detect(cfg.train.device).type, sizes, tp)
        pp_rank, rest = divmod(rank, sizes.width)
        dp_rank, tp_rank = divmod(rest, tp)
        pp_mesh = mesh["pp"]
        pp_ranks = [int(r) for r in pp_mesh.mesh.tolist()]
        mine = [s for s in plans if s.rank == pp_rank]
        return cls(
            rank, world, pp_rank, sizes.pp, dp_rank, sizes.dp, mine, len(plans), cfg.parallel.pp.schedule,
            pp_mesh.get_group(), mesh["dp"].get_group(), pp_ranks, tp_rank, tp, mesh["tp"].get_group(),
            mesh, cfg.parallel.dp_mode, cfg.parallel.fsdp,
        )

    # ---- what the loop asks -------------------------------------------------
    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0

    @property
    def grad_norm_group(self):
        # Kept for callers of optim.clip_grad_norm; `clip_grad_norm` below covers TP/FSDP shards.
        return self.pp_group

    def parallelize(self, adapter, model, segs):
        """TP then FSDP on the modules this rank materialized (others stay on meta)."""
        from omnitrain.parallel.fsdp import apply_fsdp
        from omnitrain.parallel.tp import apply_tp

        owned = list(dict.fromkeys(p for seg in segs for p in adapter.owned_prefixes(seg)))
        if self.tp_size > 1:
            for module in MODULES:
                apply_tp(model, adapter, module, self.mesh["tp"], [p for p in owned if adapter.module_of(p + ".") == module])
        if self.dp_mode == "fsdp":
            dev = next((p.device for p in model.parameters() if not p.is_meta), None)
            apply_fsdp(model, owned, self.mesh["dp"], self.fsdp_opts, dev)
        return model

    def prepare_micro_batches(self, adapter, micro_batches: list[dict], dev) -> list[dict]:
        """Give every dp replica the same encoder passes (dummy media where missing):
        FSDP's per-unit collectives, and the replicate all-reduce's grad set, need it."""
        if self.dp_size == 1:
            return micro_batches
        from omnitrain.parallel.fsdp import align_media

        return align_media(adapter, micro_batches, self.dp_group, dev)

    def dp_sum_ints(self, *values: int) -> tuple[int, ...]:
        t = torch.tensor(values, dtype=torch.int64)
        if self.dp_size > 1:
            dist.all_reduce(t, group=self.dp_group)
        return tuple(int(v) for v in t)

    @staticmethod
    def _dp_sharded(t) -> bool:
        from torch.distributed.tensor import DTensor

        if not isinstance(t, DTensor):
            return False
        names = t.device_mesh.mesh_dim_names or ()
        return any(n == "dp" and pl.is_shard() for n, pl in zip(names, t.placements))

    def reduce_grads(self, params) -> None:
        """Sum grads over dp replicas; FSDP's grads are already reduce-scattered."""
        if self.dp_size == 1:
            return
        grads = [p.grad for p in params if p.grad is not None and not self._dp_sharded(p.grad)]
        if not grads:
            return
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        # One flat buffer: one collective instead of one per parameter.
        flat = torch.cat([g.reshape(-1) for g in local])
        dist.all_reduce(flat, group=self.dp_group)
        offset = 0
        for g in local:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def clip_grad_norm(self, params, max_norm: float) -> torch.Tensor:
        """Global grad norm over every shard (pp stages, TP and FSDP shards), then
        scale all grads by the same factor; returns the norm before clipping.

        Each element is counted once: a rank adds a tensor's squares only if it
        is coordinate 0 along every mesh dim the tensor is replicated over.
        """
        from torch.distributed.tensor import DTensor

        from omnitrain.train.optim import sum_of_squares

        coord = {"dp": self.dp_rank, "tp": self.tp_rank}
        grads = [p.grad for p in params if p.grad is not None]
        dev = grads[0].device if grads else device.detect(self.mesh.device_type).torch_device(device.local_rank())
        sq = torch.zeros((), dtype=torch.float64, device=dev)
        for g in grads:
            sharded = set()
            if isinstance(g, DTensor):
                names = g.device_mesh.mesh_dim_names or ()
                sharded = {n for n, pl in zip(names, g.placements) if pl.is_shard()}
                g = g.to_local()
            if all(c == 0 or d in sharded for d, c in coord.items()):
                sq += sum_of_squares(g).to(dev)
        dist.all_reduce(sq)
        norm = sq.sqrt().float().cpu()
        if max_norm > 0:
            coef = float(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
            for g in grads:
                g.mul_(coef)
        return norm

    def reduce_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The step loss on every rank: sum over replicas and over the pipeline
        (only the last stage holds a non-zero part)."""
        loss = loss.detach().float().cpu().reshape(())
        if self.tp_rank:  # every rank of a TP group holds the same loss: count it once
            loss.zero_()
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
