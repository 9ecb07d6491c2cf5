"""Sizes of the (pp, dp, tp) layout and the device mesh that realises it.

Pure part: `Sizes.from_cfg` turns `parallel.{pp,dp,tp}` plus a world size into
per-module tp/dp sizes. Each pipeline stage is `width = dp x tp` ranks;
`parallel.dp` is the data-parallel size of the module with the largest TP
(the LLM in every shipped layout), and a module with a smaller TP gets
`width / tp` data-parallel replicas (MindSpeed-MM's "only DP/TP differ").

Rank order: pp outermost, then dp, then tp innermost
(rank = pp_rank * width + dp_rank * tp + tp_rank), as in Megatron; with
tp = 1 it is the order ParallelContext always used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from omnitrain.config import ConfigError

LLM = "llm"  # the decoder module (every family's)


@dataclass(frozen=True)
class Sizes:
    pp: int
    dp: int  # data-parallel size of the widest-TP module
    tp: dict  # module -> TP size

    @property
    def tp_max(self) -> int:
        return max(self.tp.values())

    @property
    def width(self) -> int:
        """Ranks per pipeline stage."""
        return self.dp * self.tp_max

    @property
    def world(self) -> int:
        return self.pp * self.width

    def dp_of(self, module: str) -> int:
        return self.width // self.tp[module]

    @classmethod
    def from_cfg(cls, cfg, modules, world_size: int | None = None, model: str = "this model") -> "Sizes":
        """`modules`: the model family's module names. `parallel.tp` is one
        size for every module or a size per module (unlisted ones: 1)."""
        p = cfg.parallel
        per = p.tp if hasattr(p.tp, "keys") else {m: p.tp for m in modules}
        extra = sorted(set(per) - set(modules))
        if extra:
            raise ConfigError(
                f"parallel.tp.{extra[0]}: {model} has no {extra[0]} module; its modules are {', '.join(modules)}: "
                f"remove parallel.tp.{extra[0]}"
            )
        tp = {m: int(per.get(m, 1)) for m in modules}
        bad = [m for m, v in tp.items() if v < 1]
        if bad:
            raise ConfigError(f"parallel.tp.{bad[0]}={tp[bad[0]]}: must be >= 1")
        tmax = max(tp.values())
        odd = [m for m, v in tp.items() if tmax % v]
        if odd:
            raise ConfigError(
                f"parallel.tp.{odd[0]}={tp[odd[0]]} does not divide the largest TP size {tmax}: "
                "each module's TP group must tile the stage's ranks; use sizes that divide each other"
            )
        pp = int(p.pp.size)
        dp = p.dp
        if dp == "auto":
            if world_size is None:
                world_size = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else pp * tmax
            if world_size % (pp * tmax):
                raise ConfigError(
                    f"parallel.dp=auto: world size {world_size} is not a multiple of pp x tp = {pp} x {tmax}"
                )
            dp = world_size // (pp * tmax)
        if not isinstance(dp, int) or dp < 1:
            raise ConfigError(f"parallel.dp={dp!r}: use auto or a positive integer")
        return cls(pp, dp, tp)


def build_mesh(device_type: str, sizes: Sizes, tp: int):
    """A (pp, dp, tp) DeviceMesh over the world with TP size `tp` per group.

    DeviceMesh creates a process group per dimension slice, and every rank must
    create them in the same order: call it on every rank, once per size.
    """
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (sizes.pp, sizes.width // tp, tp), mesh_dim_names=("pp", "dp", "tp"))


def build_part_mesh(device_type: str, sizes: Sizes, tp: int):
    """(pp, dp, part, tp) for a module with TP size `tp` below the LLM's: its
    "part" dim joins the tp_llm / tp encoder replicas inside one LLM TP group,
    which together encode one micro-batch (parallel/redistribute.py)."""
    from torch.distributed.device_mesh import init_device_mesh

    t_llm = sizes.tp[LLM]
    shape = (sizes.pp, sizes.width // t_llm, t_llm // tp, tp)
    return init_device_mesh(device_type, shape, mesh_dim_names=("pp", "dp", "part", "tp"))


def build_ep_mesh(device_type: str, sizes: Sizes, ep: int):
    """(pp, edp, ep, tp) for expert parallelism over the LLM's dp ranks: "ep"
    joins the ranks that split one MoE layer's experts (consecutive dp ranks),
    "edp" those holding the same experts (parallel/ep.py)."""
    from torch.distributed.device_mesh import init_device_mesh

    t_llm = sizes.tp[LLM]
    dp = sizes.width // t_llm
    return init_device_mesh(device_type, (sizes.pp, dp // ep, ep, t_llm), mesh_dim_names=("pp", "edp", "ep", "tp"))
