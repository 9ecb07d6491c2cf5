"""Optimizer and LR schedule from config (`_target_`), and global-norm gradient clipping."""

from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.distributed as dist


def build_optimizer(params, optimizer_cfg, lr_mult=None, weight_decay=None, modules=None) -> torch.optim.Optimizer:
    """The configured optimizer (`_target_`) over the trainable parameters this rank owns.

    `params`: parameters, or (module, parameter) pairs (`Trainer.module_params`):
    then each module's trainable parameters are one param group, in `modules`
    order, with lr = optimizer lr x `lr_mult[module]` and `weight_decay[module]`
    where given (keys must be in `modules`, the family's modules). Frozen
    parameters are in no group. A stage whose modules are all frozen owns no
    trainable parameter: it gets an optimizer over an empty group, whose step
    is a no-op, instead of failing.
    """
    from hydra.utils import instantiate

    params = list(params)
    lr_mult, weight_decay = dict(lr_mult or {}), dict(weight_decay or {})
    if modules is not None:
        from omnitrain.config import ConfigError

        for key, d in (("optim.lr_mult", lr_mult), ("optim.module_weight_decay", weight_decay)):
            unknown = sorted(set(d) - set(modules))
            if unknown:
                raise ConfigError(f"{key}.{unknown[0]}: unknown module; the model has {', '.join(modules)}")
    if not params or not isinstance(params[0], tuple):
        trainable = [p for p in params if p.requires_grad]
        return instantiate(optimizer_cfg, [{"params": trainable}], _convert_="all")
    order = list(modules) if modules is not None else list(dict.fromkeys(m for m, _ in params))
    lr = optimizer_cfg.get("lr") if hasattr(optimizer_cfg, "get") else None
    groups = []
    for m in order:
        ps = [p for mod, p in params if mod == m and p.requires_grad]
        if not ps:
            continue
        g = {"params": ps}
        if m in lr_mult:
            if lr is None:
                raise ValueError(f"optim.lr_mult.{m}: the optimizer config has no lr to multiply")
            g["lr"] = float(lr) * float(lr_mult[m])
        if m in weight_decay:
            g["weight_decay"] = float(weight_decay[m])
        groups.append(g)
    return instantiate(optimizer_cfg, groups or [{"params": []}], _convert_="all")


def lr_lambda(step: int, *, warmup: int, total: int, min_ratio: float, kind: str) -> float:
    """LR multiplier at `step` (0-based): linear warmup, then cosine to min_ratio."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.1):
    """Linear warmup, then cosine decay to min_lr_ratio x lr at total_steps."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_lambda, warmup=warmup_steps, total=total_steps, min_ratio=min_lr_ratio, kind="cosine")
    )


def warmup_constant(optimizer, total_steps: int, warmup_steps: int = 0):
    """Linear warmup, then the base lr."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_lambda, warmup=warmup_steps, total=total_steps, min_ratio=1.0, kind="constant")
    )


def build_scheduler(optimizer, scheduler_cfg, total_steps: int):
    """The configured scheduler (`_target_`); `total_steps` is passed where it takes one."""
    from hydra.utils import get_method, instantiate

    fn = get_method(scheduler_cfg["_target_"]) if "_target_" in scheduler_cfg else None
    takes_total = fn is not None and "total_steps" in inspect.signature(fn).parameters
    return instantiate(scheduler_cfg, optimizer, **({"total_steps": total_steps} if takes_total else {}))


def sum_of_squares(g: torch.Tensor) -> torch.Tensor:
    """Sum of squared elements as an fp64 scalar.

    torch's fp32 vector norm is ~3e-4 off on a 9.7M-element lm_head grad on
    CPU, enough to move the clip factor between layouts; an fp32 `sum` (which
    sums in blocks) of the squares is ~1e-8 off and 3x cheaper than fp64.
    """
    return g.detach().float().square().sum().double()


def clip_grad_norm(params, max_norm: float, group=None) -> torch.Tensor:
    """Global grad norm over all ranks of `group` (pipeline stages, shards),
    then scale every gradient by the same factor. Returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    sq = sum((sum_of_squares(g).cpu() for g in grads), torch.zeros((), dtype=torch.float64))
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(sq, group=group)
    norm = sq.sqrt().float()
    if max_norm > 0 and grads:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm.to(grads[0].device))
    return norm.detach().float().cpu()
