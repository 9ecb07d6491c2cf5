"""Activation recompute per module (`train.recompute.<module>`), with torch's
checkpoint utilities.

    train.recompute.<m>:        none | full | selective
    train.recompute_layers.<m>: null (every layer of the module this rank runs)
                                or N: the first N of them on each pipeline stage
                                (where memory is tight: the stage holds the
                                most micro-batches in flight at its start)

full: a layer keeps only its inputs; its whole forward is rerun in backward
(torch.utils.checkpoint, non-reentrant). selective: torch's selective
activation checkpointing inside the layer: the outputs of matmuls,
attention and convolutions are kept, everything else (norms, activations,
rope, elementwise ops) is recomputed; less memory saved than full, less
recompute. Neither changes a number: the recomputed forward is the same
ops on the same inputs (fp32 on CPU: bitwise).

A layer is wrapped by replacing its instance `forward`, so module names,
FSDP units and TP plans stay as they are.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

MODES = ("none", "full", "selective")

# Ops whose outputs selective recompute keeps (the expensive ones).
_SAVE = (
    "mm", "addmm", "bmm", "baddbmm", "convolution", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_cudnn_attention",
)


def _save_ops() -> set:
    aten = torch.ops.aten
    return {getattr(aten, n).default for n in _SAVE if hasattr(aten, n)}


def parse(train_cfg, family) -> dict[str, tuple[str, int | None]]:
    """{module: (mode, layers per stage or None)} for modules with recompute on."""
    from omnitrain.config import ConfigError

    modes = dict(train_cfg.get("recompute") or {})
    counts = dict(train_cfg.get("recompute_layers") or {})
    out = {}
    for m, mode in modes.items():
        mode = str(mode or "none")
        if mode not in MODES:
            raise ConfigError(f"train.recompute.{m}={mode!r}: use one of {', '.join(MODES)}")
        if mode == "none":
            continue
        if m not in family.module_names:
            raise ConfigError(f"train.recompute.{m}: unknown module; model {family.name} has {', '.join(family.module_names)}")
        n = counts.get(m)
        if n is not None and int(n) < 0:
            raise ConfigError(f"train.recompute_layers.{m}={n}: must be >= 0 (null = every layer)")
        out[m] = (mode, None if n is None else int(n))
    for m in counts:
        if counts[m] is not None and m not in out:
            raise ConfigError(f"train.recompute_layers.{m}={counts[m]}: train.recompute.{m} is none; set it to full or selective")
    return out


def layers_to_wrap(settings: dict, family, plans) -> list[tuple[str, str]]:
    """(layer FQN, mode) this rank recomputes: pure, from the stage plans."""
    out = []
    for m, (mode, n) in settings.items():
        for plan in plans:
            idx = list(plan.layers.get(m, range(0)))
            out += [(f"{family.spec(m).layers}.{i}", mode) for i in (idx if n is None else idx[:n])]
    return out


def apply(model: nn.Module, family, plans, train_cfg) -> list[str]:
    """Wrap this rank's layers as `train.recompute` says; returns their FQNs."""
    wrapped = []
    for fqn, mode in layers_to_wrap(parse(train_cfg, family), family, plans):
        layer = model.get_submodule(fqn)
        layer.forward = functools.partial(_recomputed, layer.forward, mode)
        wrapped.append(fqn)
    return wrapped


def _policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS() else CheckpointPolicy.PREFER_RECOMPUTE


@functools.lru_cache(maxsize=1)
def _SAVE_OPS():
    return _save_ops()


def _recomputed(forward, mode: str, *args, **kwargs):
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts, noop_context_fn

    if not torch.is_grad_enabled():  # eval: nothing to keep
        return forward(*args, **kwargs)
    ctx = functools.partial(create_selective_checkpoint_contexts, _policy) if mode == "selective" else noop_context_fn
    return checkpoint(forward, *args, use_reentrant=False, context_fn=ctx, **kwargs)
