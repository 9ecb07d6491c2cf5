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

import functools
import math
from dataclasses import dataclass, field

import logging

import torch
import torch.distributed as dist
from omegaconf import open_dict

from omnitrain import device
from omnitrain.config import ConfigError, validate
from omnitrain.parallel.ep import is_expert_param
from omnitrain.parallel.layout import StagePlan, validate_layout
from omnitrain.parallel.mesh import LLM, Sizes, build_ep_mesh, build_mesh, build_part_mesh
from omnitrain.parallel.tp import check_divisible as check_tp_divisible
from omnitrain.pipeline import schedule as sched

DP_MODES = ("replicate", "fsdp")
log = logging.getLogger(__name__)


def _is_sharded(placement) -> bool:
    """Shard or _StridedShard (FSDP's dim-0 shard of a TP dim-0 shard), whose
    is_shard() is False: anything that is neither Replicate nor Partial."""
    return not placement.is_replicate() and not placement.is_partial()


def check_encoder_tp(sizes: Sizes) -> None:
    """An encoder's TP size may be below the LLM's (its extra replicas each
    encode a part of the micro-batch), not above: that would need the
    samples of several LLM replicas gathered into one encoder replica."""
    for enc, t in sizes.tp.items():
        if t > sizes.tp[LLM]:
            raise ConfigError(
                f"parallel.tp.{enc}={t} is larger than parallel.tp.llm={sizes.tp[LLM]}: an encoder's TP "
                f"size must be at most the LLM's; lower parallel.tp.{enc} or raise parallel.tp.llm"
            )


def encoder_micro_multiple(sizes: Sizes) -> int:
    """MindSpeed-MM's rule: the LLM's dp x micro-batch divides evenly over each
    encoder's dp replicas, so every encoder sample's features land on the LLM
    rank that holds the sample. The micro-batch size must be a multiple of this."""
    llm_dp = sizes.dp_of(LLM)
    need = 1
    for m in sizes.tp:
        d = sizes.dp_of(m)
        need = math.lcm(need, d // math.gcd(d, llm_dp))
    return need


def check_ep(cfg, family, sizes: Sizes) -> int:
    """`parallel.ep.llm`: it must divide the LLM's experts and its dp ranks
    (EP borrows them). With dp_mode=fsdp the experts are FSDP-sharded over
    the ranks holding the same experts ("edp"), the rest over dp."""
    ep = int(cfg.parallel.ep.llm)
    if ep < 1:
        raise ConfigError(f"parallel.ep.llm={ep}: must be >= 1")
    if ep == 1:
        return ep
    n = int(getattr(family, "num_experts", 0) or 0)
    if not getattr(family, "experts", None) or not n:
        raise ConfigError(f"parallel.ep.llm={ep}: model={cfg.model.name} has no mixture-of-experts layers; use parallel.ep.llm=1")
    if n % ep:
        works = [d for d in range(2, n + 1) if n % d == 0 and sizes.dp_of(LLM) % d == 0]
        raise ConfigError(
            f"parallel.ep.llm={ep} does not divide model={cfg.model.name}'s {n} experts per MoE layer; "
            f"sizes that divide both the experts and the LLM's {sizes.dp_of(LLM)} dp ranks: {works or 'none'}"
        )
    if sizes.dp_of(LLM) % ep:
        raise ConfigError(
            f"parallel.ep.llm={ep}: expert parallelism uses the LLM's data-parallel ranks, and {ep} does not divide "
            f"its {sizes.dp_of(LLM)} (parallel.dp); raise parallel.dp to a multiple of {ep} or lower parallel.ep.llm"
        )
    return ep


def num_microbatches(cfg, dp: int) -> int:
    t = cfg.train
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size x dp = {t.micro_batch_size} x {dp}: change one of them"
        )
    return t.global_batch_size // (t.micro_batch_size * dp)


def fit_micro_batch(cfg, sizes: Sizes) -> int:
    """The micro-batch size the layout runs: the user's, or the smallest
    multiple of what the encoders' replicas need that divides the global
    batch's per-replica share. A layout never changes the global batch
    (what a step trains on), only how it is cut."""
    t = cfg.train
    need = encoder_micro_multiple(sizes)
    micro = t.micro_batch_size
    if micro % need == 0:
        return micro
    per_replica = t.global_batch_size // sizes.dp
    fits = [m for m in range(need, per_replica + 1, need) if m >= micro and per_replica % m == 0 and t.global_batch_size % sizes.dp == 0]
    if not fits:
        raise ConfigError(
            f"parallel={cfg.parallel.name}: each encoder replica encodes a part of a micro-batch, so "
            f"train.micro_batch_size must be a multiple of {need} and divide train.global_batch_size / dp = "
            f"{t.global_batch_size} / {sizes.dp}: set train.global_batch_size to a multiple of {need * sizes.dp} "
            f"(e.g. {need * sizes.dp * max(1, -(-t.global_batch_size // (need * sizes.dp)))}) or make the TP sizes equal"
        )
    return fits[0]


def check_layout(cfg, family=None) -> list[StagePlan]:
    """Every rule that needs no process: run once, before any worker starts.

    Where the layout needs larger micro-batches than `train.micro_batch_size`
    (an encoder split in parts), it sets the derived size in `cfg` and says so.
    """
    from omnitrain.models.family import build_family

    validate(cfg)
    if cfg.parallel.dp_mode not in DP_MODES:
        raise ConfigError(f"parallel.dp_mode={cfg.parallel.dp_mode!r}: use one of {', '.join(DP_MODES)}")
    if cfg.parallel.fsdp.mixed_precision not in ("none", "bf16"):
        raise ConfigError(f"parallel.fsdp.mixed_precision={cfg.parallel.fsdp.mixed_precision!r}: use none or bf16")
    family = family or build_family(cfg.model)
    from omnitrain.plan.layout import is_auto, resolve_auto

    if is_auto(cfg):  # the planner picks the split (and sizes): stored in cfg, so the run's config repeats it
        log.warning("%s", resolve_auto(cfg, family))
    sizes = Sizes.from_cfg(cfg, family.module_names, model=f"model={cfg.model.name}")
    if cfg.parallel.sequence_parallel and sizes.tp[LLM] == 1:
        raise ConfigError(
            "parallel.sequence_parallel=true shards the LLM's sequence over its TP ranks, but parallel.tp.llm=1: "
            "raise parallel.tp.llm or set parallel.sequence_parallel=false"
        )
    check_tp_divisible(sizes.tp, family.tp_sizes())
    if cfg.parallel.sequence_parallel and LLM in getattr(family, "lora", {}):
        # the rowwise targets' lora_B would run on sequence shards: its grad is not yet reduced over them
        raise ConfigError(
            "model.lora.llm.enabled=true with parallel.sequence_parallel=true: LoRA is not composed with sequence "
            "parallelism yet; set parallel.sequence_parallel=false (tensor parallelism alone works with LoRA)"
        )
    for m, spec in getattr(family, "lora", {}).items():
        # LoRA splits over a colwise / rowwise base (parallel/tp.py); a fused-qkv shard has no such split
        fused = [p for p, style in family.tp_plan.get(m, ()) if style == "colwise_fused3" and p.rsplit(".", 1)[-1] in spec.targets]
        if sizes.tp[m] > 1 and fused:
            raise ConfigError(
                f"model.lora.{m}.target_modules={list(spec.targets)} adapts {fused[0]}, a fused q|k|v layer, under "
                f"parallel.tp.{m}={sizes.tp[m]}: LoRA does not compose with its shard; drop it from target_modules or use parallel.tp.{m}=1"
            )
    check_encoder_tp(sizes)
    check_ep(cfg, family, sizes)
    if cfg.parallel.dp_mode == "fsdp" and cfg.parallel.pp.schedule in sched.SPLIT_BACKWARD:
        # FSDP reduce-scatters (and frees) a unit's grads in hooks that assume
        # one backward per forward; a split backward would reduce before W.
        raise ConfigError(
            f"parallel.pp.schedule={cfg.parallel.pp.schedule} with parallel.dp_mode=fsdp: FSDP reduces a unit's grads in its "
            "backward hooks, before the schedule's separate weight-grad pass; use parallel.dp_mode=replicate "
            "or parallel.pp.schedule=1f1b"
        )
    if cfg.parallel.dp_mode == "fsdp":
        # FSDP would split a fused q|k|v TP shard ([q_r|k_r|v_r]) in a way no
        # DTensor placement describes: full views and checkpoints would be wrong.
        fused = [m for m, t in sizes.tp.items() if t > 1 and any(st == "colwise_fused3" for _, st in family.tp_plan.get(m, ()))]
        if fused:
            raise ConfigError(
                f"parallel.dp_mode=fsdp with parallel.tp.{fused[0]}={sizes.tp[fused[0]]}: model={cfg.model.name}'s {fused[0]} "
                f"module fuses q|k|v in one projection, whose TP shard FSDP cannot shard again; set "
                f"parallel.tp.{fused[0]}=1 or parallel.dp_mode=replicate"
            )
    micro = fit_micro_batch(cfg, sizes)
    if micro != cfg.train.micro_batch_size:
        log.info(
            "parallel=%s: train.micro_batch_size %d -> %d (encoder replicas each encode a part of a micro-batch); "
            "the global batch stays %d", cfg.parallel.name, cfg.train.micro_batch_size, micro, cfg.train.global_batch_size,
        )
        with open_dict(cfg):
            cfg.train.micro_batch_size = micro
    pp = cfg.parallel.pp
    layers = None if pp.layers is None else {k: list(v) for k, v in pp.layers.items()}
    plans = validate_layout(
        pp.size,
        layers,
        family.depths,
        num_microbatches=num_microbatches(cfg, sizes.dp),
        schedule=pp.schedule,
        virtual_stages=pp.virtual_stages,
        model=f"model={cfg.model.name}",
    )
    check_tied_embeddings(family, plans, sizes)
    return plans


def check_tied_embeddings(family, plans, sizes: Sizes) -> None:
    """A tied lm_head is the embedding's tensor: it cannot live on two pipeline
    stages (their updates would drift apart) nor be sharded two ways by TP
    (over the vocabulary as an embedding and as a head)."""
    if not getattr(family.hf_config, "tie_word_embeddings", False):
        return
    split = not any(p.merge and p.head for p in plans)
    if split or sizes.tp[LLM] > 1:
        why = "the merge and the head are on different pipeline stages" if split else f"parallel.tp.{LLM}={sizes.tp[LLM]}"
        raise ConfigError(
            f"model.config.tie_word_embeddings=true: the LLM's head shares the embedding's tensor, but {why}; "
            f"use one stage with parallel.tp.{LLM}=1, or untie it (model.config.tie_word_embeddings=false)"
        )


def world_size_for(cfg, family=None) -> int:
    from omnitrain.models.family import build_family

    return Sizes.from_cfg(cfg, (family or build_family(cfg.model)).module_names).world


@dataclass
class ModuleMesh:
    """One module's (pp, dp, tp) view of the stage's ranks.

    `parts` > 1 when the module's TP size is below the LLM's: the `parts`
    replicas inside one LLM TP group each encode part `part` of the samples,
    and `part_group` joins their features (parallel/redistribute.py).
    """

    mesh: object
    dp_rank: int
    dp_size: int
    tp_rank: int
    tp_size: int
    parts: int = 1
    part: int = 0
    part_group: object = None
    ep_mesh: object = None  # ("pp", "edp", "ep", "tp") where parallel.ep > 1 (the LLM's)
    edp_rank: int = 0
    edp_size: int = 1

    @property
    def edp_group(self):
        """The ranks that hold the same experts: expert grads are summed over them."""
        return self.ep_mesh["edp"].get_group()

    @property
    def dp_group(self):
        return self.mesh["dp"].get_group()


@dataclass
class ParallelContext:
    rank: int
    world_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int  # the LLM's; the data loader is sharded by it
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
    mesh: object = None  # the LLM's DeviceMesh ("pp", "dp", "tp"), built once
    dp_mode: str = "replicate"
    fsdp_opts: object = None
    modules: dict = field(default_factory=dict)  # module -> ModuleMesh
    sequence_parallel: bool = False
    pp_up_group: object = None  # the pp ranks again, for messages to a lower rank (executor: `up_group`)

    @classmethod
    def build(cls, cfg, family) -> "ParallelContext":
        """`cfg` as `check_layout` left it (it already ran in the launching process)."""
        rank, world = dist.get_rank(), dist.get_world_size()
        sizes = Sizes.from_cfg(cfg, family.module_names, world)
        if sizes.world != world:
            raise ConfigError(
                f"parallel: pp x dp x tp = {sizes.pp} x {sizes.dp} x {sizes.tp_max} but the world has {world} processes"
            )
        pp = cfg.parallel.pp
        plans = validate_layout(
            pp.size, None if pp.layers is None else {k: list(v) for k, v in pp.layers.items()}, family.depths,
            num_microbatches=num_microbatches(cfg, sizes.dp), schedule=pp.schedule, virtual_stages=pp.virtual_stages,
        )
        info = device.detect(cfg.train.device)
        dev_type = info.type
        pp_rank, local = divmod(rank, sizes.width)
        # One mesh per distinct TP size (modules with equal sizes share it), built
        # in the same order on every rank.
        meshes, modules = {}, {}
        t_llm = sizes.tp[LLM]
        for m in family.module_names:
            t = sizes.tp[m]
            if t not in meshes:
                meshes[t] = build_mesh(dev_type, sizes, t)
                if t < t_llm:
                    meshes[t, "part"] = build_part_mesh(dev_type, sizes, t)
            mm = ModuleMesh(meshes[t], local // t, sizes.width // t, local % t, t)
            if t < t_llm:
                mm.parts, mm.part = t_llm // t, (local % t_llm) // t
                mm.part_group = meshes[t, "part"]["part"].get_group()
            modules[m] = mm
        llm = modules[LLM]
        ep = int(cfg.parallel.ep.llm)
        if ep > 1:  # built after the others, in the same order on every rank
            llm.ep_mesh = build_ep_mesh(dev_type, sizes, ep)
            llm.edp_rank, llm.edp_size = llm.dp_rank // ep, llm.dp_size // ep
        pp_mesh = llm.mesh["pp"]
        pp_ranks = [int(r) for r in pp_mesh.mesh.tolist()]
        mine = [s for s in plans if s.rank == pp_rank]
        up = None
        if len(plans) > sizes.pp and not device.is_cpu(info):
            # several stages per rank on an accelerator: the executor sends without
            # batching, each direction of a pair in its own group (executor._Mailbox)
            up = dist.new_group(pp_ranks, use_local_synchronization=True)
        return cls(
            rank, world, pp_rank, sizes.pp, llm.dp_rank, llm.dp_size, mine, len(plans), cfg.parallel.pp.schedule,
            pp_mesh.get_group(), llm.dp_group, pp_ranks, llm.tp_rank, llm.tp_size,
            llm.mesh["tp"].get_group(), llm.mesh, cfg.parallel.dp_mode, cfg.parallel.fsdp, modules,
            bool(cfg.parallel.sequence_parallel), up,
        )

    # ---- what the loop asks -------------------------------------------------
    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0

    def parallelize(self, adapter, model, plans):
        """TP then FSDP on the modules this rank materialized (others stay on meta),
        each over its own module mesh."""
        from omnitrain.parallel.fsdp import apply_fsdp
        from omnitrain.parallel.tp import apply_tp

        owned = list(dict.fromkeys(p for plan in plans for p in adapter.owned_prefixes(plan)))
        per_module = {m: [p for p in owned if adapter.module_of(p + ".") == m] for m in self.modules}
        experts = {}
        for m, mm in self.modules.items():
            if mm.tp_size > 1:
                apply_tp(model, adapter, m, mm.mesh["tp"], per_module[m], sequence_parallel=self.sequence_parallel and m == LLM)
            if mm.ep_mesh is not None:
                from omnitrain.parallel.ep import apply_ep

                experts[m] = apply_ep(model, adapter.experts, per_module[m], mm.ep_mesh["ep"])
        if self.dp_mode == "fsdp":
            dev = next((p.device for p in model.parameters() if not p.is_meta), None)
            for m, mm in self.modules.items():
                # Experts first, over their replicas only (the "edp" dim of the
                # mesh their Shard(0) over "ep" lives on, as FSDP + TP): the
                # enclosing layer's unit then leaves their parameters alone.
                if experts.get(m):
                    apply_fsdp(model, experts[m], mm.ep_mesh["edp"], self.fsdp_opts, dev)
                apply_fsdp(model, per_module[m], mm.mesh["dp"], self.fsdp_opts, dev)
        return model

    def prepare_micro_batches(self, adapter, micro_batches: list[dict], dev) -> list[dict]:
        """Per encoder: take this rank's part of the samples where the encoder has
        more replicas than the LLM, then give every replica of the encoder the
        same passes (dummy media where missing): FSDP's per-unit collectives,
        and the replicate all-reduce's grad set, need it."""
        from omnitrain.models.family import MEDIA
        from omnitrain.parallel.fsdp import align_media
        from omnitrain.parallel.redistribute import part_range

        out = []
        for mb in micro_batches:
            if self.sequence_parallel:  # equal sequence shards
                mb = adapter.pad_sequence(mb, self.tp_size)
            slices = {}
            for m, mm in self.modules.items():
                if mm.parts > 1:
                    lo, hi = part_range(mb["input_ids"].shape[0], mm.parts, mm.part)
                    slices[m] = adapter.slice_media(mb, m, lo, hi)
            out.append({**mb, "_slices": slices} if slices else dict(mb))
        for m in adapter.encoders:
            mm = self.modules[m]
            if mm.dp_size == 1:
                continue
            media = [(kind, MEDIA[kind].trigger) for kind in adapter.spec(m).media]
            if mm.parts > 1:
                views = align_media(adapter, [mb["_slices"][m] for mb in out], media, mm.dp_group, dev)
                for mb, v in zip(out, views):
                    mb["_slices"] = {**mb["_slices"], m: v}
            else:
                out = align_media(adapter, out, media, mm.dp_group, dev)
        return out

    def stage_hooks(self) -> dict:
        """What the adapter's stage_forward calls between modules: per module
        split in parts, the join of the parts' features; with sequence
        parallelism, "seq_shard" (this rank's part of the LLM's sequence)."""
        from omnitrain.parallel.redistribute import gather_rows
        from omnitrain.parallel.tp import shard_sequence

        hooks = {m: functools.partial(gather_rows, group=mm.part_group, rank=mm.part) for m, mm in self.modules.items() if mm.parts > 1}
        if self.sequence_parallel:
            hooks["seq_shard"] = functools.partial(shard_sequence, tp_mesh=self.mesh["tp"])
        return hooks

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
        # "edp": FSDP-sharded experts under EP (already reduce-scattered over their replicas)
        return any(n in ("dp", "edp") and _is_sharded(pl) for n, pl in zip(names, t.placements))

    @staticmethod
    def _resolve_partial_grads(module_params) -> None:
        """Sequence-parallel norms leave their weights' grads Partial (each TP rank
        holds its sequence part's sum): reduce them, so the grad norm and the
        dp all-reduce see whole gradients (the optimizer alone would cope)."""
        from torch.distributed.tensor import DTensor, Replicate

        for _, p in module_params:
            g = p.grad
            if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
                p.grad = g.redistribute(g.device_mesh, [Replicate() if pl.is_partial() else pl for pl in g.placements])

    def reduce_grads(self, module_params) -> None:
        """Sum grads over each module's dp replicas; FSDP's are already reduce-scattered.

        `module_params`: (module name, parameter) pairs.
        """
        self._resolve_partial_grads(module_params)
        for m, mm in self.modules.items():
            if mm.dp_size == 1:
                continue
            grads = [p.grad for mod, p in module_params if mod == m and p.grad is not None and not self._dp_sharded(p.grad)]
            dense = [g for g in grads if not is_expert_param(g)]
            _all_reduce_flat(dense, mm.dp_group)
            if mm.edp_size > 1:  # an expert shard's replicas: the ranks with the same ep_rank
                _all_reduce_flat([g for g in grads if is_expert_param(g)], mm.edp_group)

    def clip_grad_norm(self, module_params, max_norm: float) -> torch.Tensor:
        """Global grad norm over every shard (pp stages, TP and FSDP shards), then
        scale all grads by the same factor; returns the norm before clipping.

        Each element is counted once: a rank adds a tensor's squares only if it
        is coordinate 0 along every dim of its module's mesh the tensor is
        replicated over.
        """
        from torch.distributed.tensor import DTensor

        from omnitrain.train.optim import sum_of_squares

        pairs = [(m, p.grad) for m, p in module_params if p.grad is not None]
        dev = pairs[0][1].device if pairs else device.detect(self.mesh.device_type).torch_device(device.local_rank())
        sq = torch.zeros((), dtype=torch.float64, device=dev)
        for m, g in pairs:
            mm = self.modules[m]
            coord = {"dp": mm.dp_rank, "tp": mm.tp_rank}
            if is_expert_param(g):  # replicated only over the edp ranks (and TP)
                coord = {"edp": mm.edp_rank, "tp": mm.tp_rank}
            sharded = set()
            if isinstance(g, DTensor):
                names = g.device_mesh.mesh_dim_names or ()
                sharded = {n for n, pl in zip(names, g.placements) if _is_sharded(pl)}
                g = g.to_local()
            if all(c == 0 or d in sharded for d, c in coord.items()):
                sq += sum_of_squares(g).to(dev)
        dist.all_reduce(sq)
        norm = sq.sqrt().float().cpu()
        if max_norm > 0:
            coef = float(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
            for _, g in pairs:
                g.mul_(coef)
        return norm

    def reduce_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The step loss on every rank: sum over replicas and over the pipeline
        (only the last stage holds a non-zero part)."""
        # also a float64 vector of per-rank sums (ModelFamily.step_stats), summed the same way
        loss = loss.detach().cpu().to(torch.float64 if loss.dtype == torch.float64 else torch.float32)
        loss = loss.reshape(()) if loss.numel() == 1 else loss.clone()
        if self.tp_rank:  # every rank of a TP group holds the same loss: count it once
            loss.zero_()
        dist.all_reduce(loss)
        return loss

    def run_pipeline(self, trainer, micro_batches: list[dict], num_label_tokens: int):
        from omnitrain.pipeline.executor import run_pipeline

        m = len(micro_batches)
        plan = sched.build(self.schedule, self.pp_size, m, len(self.stage_plans))
        stages = {}
        for sp in self.stage_plans:
            stages[sp.index] = _Stage(trainer, sp, micro_batches, num_label_tokens)
        res = run_pipeline(
            plan.actions[self.pp_rank],
            stages,
            rank_of=plan.rank_of,
            group=self.pp_group,
            up_group=self.pp_up_group,
            num_microbatches=m,
            num_stages=self.num_stages,
            device=trainer.dev,
            clock=device.compute_clock(trainer.dev),
        )
        loss = torch.stack(res.losses).sum() if res.losses else torch.zeros(())
        # Per-stage times, gathered so the logging rank reports every stage.
        t = torch.zeros(4, self.pp_size, dtype=torch.float64)
        t[0, self.pp_rank] = sum(res.forward_s.values())
        t[1, self.pp_rank] = sum(res.backward_s.values())
        t[2, self.pp_rank] = res.idle_s / max(res.total_s, 1e-9)
        t[3, self.pp_rank] = device.peak_memory_bytes(trainer.dev) / 2**30
        dist.all_reduce(t, group=self.pp_group)
        extra = {
            "stage_forward_s": [round(v, 4) for v in t[0].tolist()],
            "stage_backward_s": [round(v, 4) for v in t[1].tolist()],
            "bubble": float(t[2].mean()),
            "stage_peak_mem_gib": [round(v, 4) for v in t[3].tolist()],  # for sweep reports (omnitrain.report)
        }
        return loss, extra


    def run_forward_only(self, trainer, micro_batches: list[dict], num_label_tokens) -> torch.Tensor:
        """Validation through the pipeline: every micro-batch runs the stages in
        order (GPipe's forward half, no backward); each rank receives a stage's
        inputs from the rank of the stage before and sends its outputs on. The
        loss sums on the last stage (zero elsewhere, for reduce_loss)."""
        from omnitrain.pipeline import p2p

        mine = {sp.index: _Stage(trainer, sp, micro_batches, num_label_tokens) for sp in self.stage_plans}
        rank_of = functools.partial(sched.stage_rank, num_ranks=self.pp_size, placement=sched.placement_of(self.schedule))
        loss = torch.zeros(())
        for i in range(len(micro_batches)):
            out = {}
            for s in range(self.num_stages):
                if s not in mine:
                    continue
                inputs = {}
                if s > 0:  # from this rank's previous stage (the turn of a V) or the rank before
                    prev = rank_of(s - 1)
                    inputs = out if prev == self.pp_rank else p2p.recv_bundle(prev, group=self.pp_group, device=trainer.dev)[1]
                out = mine[s].forward(i, inputs)
                if s == self.num_stages - 1:
                    loss += out.detach().float().cpu()
                elif rank_of(s + 1) != self.pp_rank:
                    p2p.send_bundle(out, rank_of(s + 1), group=self.pp_group, key=(i, s, 0), device=trainer.dev)
                else:
                    out = {k: v.detach() for k, v in out.items()}
        return loss


def _all_reduce_flat(grads, group) -> None:
    """Sum `grads` (local tensors or DTensors' local shards) over `group` in
    one flat buffer: one collective instead of one per parameter."""
    if not grads:
        return
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    flat = torch.cat([g.reshape(-1) for g in local])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in local:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


class _Stage:
    """Adapts a Trainer's segment forward to the executor's stage protocol."""

    def __init__(self, trainer, plan, micro_batches, num_label_tokens):
        self.trainer, self.plan, self.mbs, self.n = trainer, plan, micro_batches, num_label_tokens

    def forward(self, mb: int, inputs: dict):
        t = self.trainer
        from omnitrain import device

        with device.autocast(t.dev, t.dtype):
            return t.adapter.stage_forward(t.model, self.plan, self.mbs[mb], inputs, self.n, hooks=t.hooks)

    def parameters(self):
        """What a split backward's W computes grads for: the rank's trainable parameters
        (one stage per rank in split schedules; ones this stage does not use get none)."""
        return self.trainer.params
