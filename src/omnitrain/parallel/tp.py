"""Tensor parallelism: apply a model adapter's TP plan (data) with DTensor.

The adapter lists, per module, FQN patterns and a style; this file maps the
styles to torch.distributed.tensor.parallel and applies them to the modules
this stage materialized (others are on the meta device and stay untouched).
Activations between layers stay plain tensors (replicated; with sequence
parallelism the LLM's are this rank's part of the sequence), so the
adapter's segment code runs unchanged on local shards.
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


def _styles(sequence_parallel: bool = False):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel

    styles = {
        "colwise": lambda: ColwiseParallel(),
        "rowwise": lambda: RowwiseParallel(),
        # Embedding sharded over vocab rows: each rank looks up its rows, the sum is the embedding.
        "vocab_embed": lambda: RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        # Logits computed per vocab shard and gathered: the loss code sees full logits.
        "vocab_head": lambda: ColwiseParallel(output_layouts=Replicate()),
    }
    if sequence_parallel:
        # Between the TP blocks the residual stream is a plain local tensor
        # holding this rank's 1/tp of the sequence: row-parallel outputs are
        # reduce-scattered onto it, blocks all-gather it back on entry.
        seq = Shard(1)
        styles.update(
            {
                "rowwise": lambda: RowwiseParallel(output_layouts=seq),
                "vocab_head": lambda: ColwiseParallel(input_layouts=seq, output_layouts=Replicate()),
                "seq_norm": lambda: SequenceParallel(use_local_output=True),
                "seq_gather": lambda: PrepareModuleInput(
                    input_layouts=(seq,), desired_input_layouts=(Replicate(),), use_local_output=True
                ),
                "seq_gather_kw": lambda: PrepareModuleInput(
                    input_kwarg_layouts={"hidden_states": seq},
                    desired_input_kwarg_layouts={"hidden_states": Replicate()},
                    use_local_output=True,
                ),
            }
        )
    return styles


def shard_sequence(h, tp_mesh):
    """This rank's 1/tp of a replicated (B, S, H) along S, S a multiple of tp.
    A DTensor redistribution, so its backward all-gathers the gradient: the
    code before it (merge, encoders) runs replicated and needs the whole one."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    return DTensor.from_local(h, tp_mesh, [Replicate()], run_check=False).redistribute(tp_mesh, [Shard(1)]).to_local()


def _matches(pattern: str, name: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern.replace("*", "[0-9]*")) and name.count(".") == pattern.count(".")


def apply_tp(model: nn.Module, adapter, module: str, tp_mesh, owned: list[str], sequence_parallel: bool = False) -> int:
    """Shard `module`'s planned submodules under the `owned` prefixes over `tp_mesh`.

    Returns how many submodules were sharded. Head-count attributes listed by
    the adapter are divided by the TP size (HF's encoders reshape by them).
    With `sequence_parallel`, the adapter's SP_PLAN entries join the plan and
    the row-parallel / head styles hand over sequence shards.
    """
    from torch.distributed.tensor.parallel import parallelize_module

    t = tp_mesh.size()
    if t == 1:
        return 0
    styles = _styles(sequence_parallel)
    entries = list(adapter.TP_PLAN.get(module, ()))
    if sequence_parallel:
        entries += list(adapter.SP_PLAN.get(module, ()))
    plan = {}
    for name, sub in model.named_modules():
        if not any(name == p or name.startswith(p + ".") for p in owned):
            continue
        for pattern, style in entries:
            if _matches(pattern, name):
                plan[name] = styles[style]()
        for pattern, attr in adapter.TP_HEAD_ATTRS.get(module, ()):
            if _matches(pattern, name):
                setattr(sub, attr, getattr(sub, attr) // t)
    if plan:
        parallelize_module(model, tp_mesh, plan)
    return len(plan)
