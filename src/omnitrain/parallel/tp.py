"""Tensor parallelism: apply a model adapter's TP plan (data) with DTensor.

The adapter lists, per module, FQN patterns and a style; this file maps the
styles to torch.distributed.tensor.parallel and applies them to the modules
this stage materialized (others are on the meta device and stay untouched).
Activations between layers stay plain, replicated tensors, so the adapter's
segment code runs unchanged on local shards.
"""

from __future__ import annotations

import fnmatch

from torch import nn

from omnitrain.config import ConfigError


def check_divisible(tp: dict[str, int], sizes: dict[str, dict[str, int]]) -> None:
    """Every size a module's TP shards must be a multiple of its TP size."""
    for module, t in tp.items():
        if t == 1:
            continue
        for name, n in sizes.get(module, {}).items():
            if n % t:
                raise ConfigError(
                    f"parallel.tp.{module}={t}: the {module} module's {name}={n} is not divisible by {t}; "
                    f"use a TP size that divides {n}"
                )


def _styles():
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {
        "colwise": lambda: ColwiseParallel(),
        "rowwise": lambda: RowwiseParallel(),
        # Embedding sharded over vocab rows: each rank looks up its rows, the sum is the embedding.
        "vocab_embed": lambda: RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        # Logits computed per vocab shard and gathered: the loss code sees full logits.
        "vocab_head": lambda: ColwiseParallel(output_layouts=Replicate()),
    }


def _matches(pattern: str, name: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern.replace("*", "[0-9]*")) and name.count(".") == pattern.count(".")


def apply_tp(model: nn.Module, adapter, module: str, tp_mesh, owned: list[str]) -> int:
    """Shard `module`'s planned submodules under the `owned` prefixes over `tp_mesh`.

    Returns how many submodules were sharded. Head-count attributes listed by
    the adapter are divided by the TP size (HF's encoders reshape by them).
    """
    from torch.distributed.tensor.parallel import parallelize_module

    t = tp_mesh.size()
    if t == 1:
        return 0
    styles = _styles()
    plan = {}
    for name, sub in model.named_modules():
        if not any(name == p or name.startswith(p + ".") for p in owned):
            continue
        for pattern, style in adapter.TP_PLAN.get(module, ()):
            if _matches(pattern, name):
                plan[name] = styles[style]()
        for pattern, attr in adapter.TP_HEAD_ATTRS.get(module, ()):
            if _matches(pattern, name):
                setattr(sub, attr, getattr(sub, attr) // t)
    if plan:
        parallelize_module(model, tp_mesh, plan)
    return len(plan)
