"""Data parallelism with FSDP2 (`fully_shard`), and keeping replicas in step.

Units: every owned module the adapter's segment code calls directly (each
vision block, audio layer, LLM layer, and the small pre/post modules) is
sharded on its own over the stage's dp mesh. The segment code never calls
the thinker's root forward, so a root-level unit would never be gathered;
each unit is therefore its own FSDP root.

FSDP gathers a unit's parameters in its forward and reduce-scatters its
grads in its backward, on every dp rank at once. A micro-batch whose sample
has no image while a peer's has one would skip the vision tower and leave
the peer waiting: `align_media` gives such a rank the adapter's dummy input
for that media kind (its features join the loss with weight 0), so all
replicas run the same encoder passes in the same order (VeOmni does the same).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn

from omnitrain import device

# FSDP2 warns about any unit returning a view (an in-place op on it would skip
# the pre-backward hook). Vision patch embeddings return one; the families only
# index it (no in-place op), which the parity tests confirm.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP\w*PatchEmbed\) returned a view")


def apply_fsdp(model: nn.Module, units: list[str], dp_mesh, opts, dev: torch.device) -> list[str]:
    """fully_shard each owned unit that has parameters; returns their names."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = {
        "none": MixedPrecisionPolicy(),
        # Gather and compute in bf16; reduce grads in fp32 so accumulation stays exact-ish.
        "bf16": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
    }[opts.mixed_precision]
    # Pinned memory needs an accelerator (FACTS: pin_memory=False on CPU).
    offload = CPUOffloadPolicy(pin_memory=not device.is_cpu(dev)) if opts.cpu_offload else OffloadPolicy()
    modules = dict(model.named_modules())
    # A container the segment code iterates (e.g. a family's DeepStack mergers, a
    # ModuleList) has no forward of its own: its members are the units.
    containers = (nn.ModuleList, nn.ModuleDict)
    units = [u for n in units for u in ([f"{n}.{c}" for c in modules[n]._modules] if isinstance(modules[n], containers) else [n])]
    done = []
    for name in units:
        mod = modules[name]
        if not any(True for _ in mod.parameters()):
            continue
        fully_shard(mod, mesh=dp_mesh, reshard_after_forward=opts.reshard_after_forward, mp_policy=mp, offload_policy=offload)
        # Micro-batch losses are already divided by the global label count:
        # grads are summed over replicas, not averaged. A plain SUM (not a
        # pre-multiplied one, which some backends lack) with no division.
        mod.set_force_sum_reduction_for_comms(True)
        mod.set_gradient_divide_factor(1.0)
        done.append(name)
    return done


def align_media(adapter, views: list[dict], media, dp_group, dev: torch.device) -> list[dict]:
    """Add dummy media so every dp rank runs the same encoder passes per micro-batch.

    `views`: per micro-batch, the dict an encoder reads (the micro-batch, or
    this rank's part of it); `media`: the (kind, key) pairs of that encoder.
    """
    have = torch.tensor([[key in v for _, key in media] for v in views], dtype=torch.int64, device=dev)
    dist.all_reduce(have, group=dp_group)
    out = []
    for v, row in zip(views, have.cpu().tolist()):
        missing = [kind for (kind, key), n in zip(media, row) if n and key not in v]
        if missing:
            v = dict(v)
            for kind in missing:
                v.update({k: x.to(dev) for k, x in adapter.dummy_media(kind).items()})
            v["_dummy"] = (*v.get("_dummy", ()), *missing)
        out.append(v)
    return out
