"""Tensor parallelism: apply a model family's TP plan (data) with DTensor.

The family lists, per module, FQN patterns and a style; this file maps the
styles to torch.distributed.tensor.parallel and applies them to the modules
this stage materialized (others are on the meta device and stay untouched).
Activations between layers stay plain tensors (replicated; with sequence
parallelism the LLM's are this rank's part of the sequence), so the
adapter's segment code runs unchanged on local shards.
"""

from __future__ import annotations

import copy
import fnmatch

import torch
from torch import nn

from omnitrain.config import ConfigError


def check_divisible(tp: dict[str, int], sizes: dict[str, dict[str, int]]) -> None:
    """Every size a module's TP shards must be a multiple of its TP size."""
    for module, t in tp.items():
        if t == 1:
            continue
        for name, n in sizes.get(module, {}).items():
            if n % t:
                own = sizes.get(module, {}).values()
                fit = [d for d in range(1, max(own) + 1) if all(v % d == 0 for v in own)]
                raise ConfigError(
                    f"parallel.tp.{module}={t}: the {module} module's {name}={n} is not divisible by {t}; "
                    f"TP sizes that fit every size of {module} ({', '.join(f'{k}={v}' for k, v in sizes[module].items())}): "
                    f"{', '.join(map(str, fit))}"
                )


class FusedColwise:
    """Column parallel for a Linear whose output is `parts` equal blocks (a
    fused q|k|v projection): each rank keeps its 1/tp of every block, so its
    local output is [q_r | k_r | v_r], which HF's reshape into
    (parts, heads / tp, head_dim) expects. A plain colwise shard would give
    rank 0 all of q. The parameters are DTensors placed `_StridedShard(0,
    split_factor=parts)` (full_tensor() and checkpoints see HF's layout);
    the forward multiplies the local shards. torch has no ParallelStyle for
    it, hence this small one.
    Not composable with FSDP (dp_mode=fsdp): FSDP's dim-0 split of a local
    [q_r | k_r | v_r] has no DTensor placement; its steps are right, but
    full_tensor() is in the wrong row order and DCP refuses to save it."""

    def __init__(self, parts: int = 3):
        self.parts = parts

    def apply(self, module: nn.Module, mesh) -> nn.Module:
        import torch.nn.functional as F
        from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor
        from torch.distributed.tensor.placement_types import _StridedShard

        _patch_dcp_for_strided_shards()
        for name, p in list(module.named_parameters(recurse=False)):
            d = distribute_tensor(p.data, mesh, [_StridedShard(0, split_factor=self.parts)])
            module.register_parameter(name, nn.Parameter(d, requires_grad=p.requires_grad))

        def forward(x):
            # Identity forward, all-reduce backward (what ColwiseParallel's
            # Replicate input does): each rank's input gradient only holds its
            # heads' part. Without it the layers below trained on a partial sum.
            x = DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])
            b = module.bias.to_local() if module.bias is not None else None
            return F.linear(x, module.weight.to_local(), b)

        module.forward = forward
        return module


def _fused_chunks(t):
    """A FusedColwise DTensor's local shard as (global offset, local offset,
    length) runs along its sharded dim: one per part, as rank r holds rows
    [(j tp + r) c, (j tp + r + 1) c) of part j. None for any other DTensor."""
    from torch.distributed.tensor.placement_types import _StridedShard

    if t.device_mesh.ndim != 1 or len(t.placements) != 1 or type(t.placements[0]) is not _StridedShard:
        return None
    p, n, r = t.placements[0], t.device_mesh.size(), t.device_mesh.get_local_rank()
    rows = t.shape[p.dim]
    if rows % (n * p.split_factor):
        return None
    c = rows // (n * p.split_factor)
    return p.dim, [((j * n + r) * c, j * c, c) for j in range(p.split_factor)]


def _patch_dcp_for_strided_shards() -> None:
    """torch.distributed.checkpoint describes a DTensor's local shard as one
    chunk at one offset; a FusedColwise shard is `parts` chunks (torch 2.14
    saves it as overlapping chunks and fails). Describe those DTensors
    (parameters and the optimizer states made like them) as their chunks, so
    checkpoints hold the full tensor in HF's layout and reshard to any
    layout; every other DTensor keeps torch's own methods."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
    from torch.distributed.tensor import DTensor

    if getattr(DTensor, "_omnitrain_fused_chunks", False):
        return
    orig = DTensor.__create_write_items__, DTensor.__create_chunk_list__, DTensor.__get_tensor_shard__

    def chunks(t):
        dim, runs = _fused_chunks(t)
        out = []
        for g, _, c in runs:
            offsets, sizes = [0] * t.ndim, list(t.shape)
            offsets[dim], sizes[dim] = g, c
            out.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)))
        return out

    def create_write_items(self, fqn, object):
        if _fused_chunks(self) is None:
            return orig[0](self, fqn, object)
        props = TensorProperties.create_from_tensor(self.to_local())
        return [
            WriteItem(
                index=MetadataIndex(fqn, ch.offsets, i),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(chunk=ch, properties=props, size=self.size()),
            )
            for i, ch in enumerate(chunks(self))
        ]

    def create_chunk_list(self):
        return orig[1](self) if _fused_chunks(self) is None else chunks(self)

    def get_tensor_shard(self, index):
        found = _fused_chunks(self)
        if found is None:
            return orig[2](self, index)
        dim, runs = found
        for g, local, c in runs:
            if index.offset is None or index.offset[dim] == g:
                return self.to_local().narrow(dim, local, c)
        raise ValueError(f"{index}: no such chunk in this rank's shard")

    DTensor.__create_write_items__ = create_write_items
    DTensor.__create_chunk_list__ = create_chunk_list
    DTensor.__get_tensor_shard__ = get_tensor_shard
    DTensor._omnitrain_fused_chunks = True


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
        "colwise_fused3": lambda: FusedColwise(3),
        # A norm over each head (per-head q/k norms) on a rank's heads: its weight is
        # replicated, its grad a partial sum over the heads each rank holds (Partial,
        # summed by ParallelContext._resolve_partial_grads).
        "head_norm": lambda: SequenceParallel(sequence_dim=2, use_local_output=True),
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
    the family are divided by the TP size (HF's encoders reshape by them).
    With `sequence_parallel`, the family's sp_plan entries join the plan and
    the row-parallel / head styles hand over sequence shards.
    """
    from torch.distributed.tensor.parallel import parallelize_module

    t = tp_mesh.size()
    if t == 1:
        return 0
    styles = _styles(sequence_parallel)
    entries = list(adapter.tp_plan.get(module, ()))
    if sequence_parallel:
        entries += list(adapter.sp_plan.get(module, ()))
    plan = {}
    for name, sub in model.named_modules():
        if not any(name == p or name.startswith(p + ".") for p in owned):
            continue
        for pattern, style in entries:
            if _matches(pattern, name):
                plan[name] = (style, styles[style]())
        for pattern, attr in adapter.tp_head_attrs.get(module, ()):
            if _matches(pattern, name):
                setattr(sub, attr, getattr(sub, attr) // t)
    modules = dict(model.named_modules())
    plan = _lora_plan(plan, modules)
    torch_plan = {}
    for name, style in plan.items():
        if isinstance(style, FusedColwise):
            style.apply(modules[name], tp_mesh)
        else:
            torch_plan[name] = style
    if torch_plan:
        parallelize_module(model, tp_mesh, torch_plan)
    return len(plan)


def _lora_plan(plan: dict, modules: dict) -> dict:
    """The plan with each LoRA-wrapped target (PEFT's LoraLayer: `X.base_layer`,
    `X.lora_A.<adapter>`, `X.lora_B.<adapter>`) split over its parts, so the
    adapter path shards like its base and their outputs add up locally:
    colwise X -> base and lora_B colwise, lora_A replicated (its input is; lora_B's
    colwise input all-reduces the partial gradient flowing back into A and x);
    rowwise X -> base and lora_A rowwise (its r outputs are all-reduced, or
    reduce-scattered with sequence parallelism), lora_B replicated.
    Maps name -> style object; a fused-qkv target is refused (no such split)."""
    out = {}
    for name, (kind, style) in plan.items():
        mod = modules[name]
        if not (hasattr(mod, "base_layer") and hasattr(mod, "lora_A")):
            out[name] = style
            continue
        if kind not in ("colwise", "rowwise"):
            raise ConfigError(
                f"model.lora: {name} is a {kind} tensor-parallel layer, which LoRA does not compose with; "
                f"leave it out of model.lora.<module>.target_modules or set that module's parallel.tp to 1"
            )
        out[f"{name}.base_layer"] = style
        adapter = "lora_B" if kind == "colwise" else "lora_A"
        for key in getattr(mod, adapter):
            out[f"{name}.{adapter}.{key}"] = copy.deepcopy(style)  # same layouts as the base's
    return out
