"""Expert parallelism (`parallel.ep.llm=N`): each MoE layer's experts are
split over N ranks of the LLM's data-parallel group, tokens go to the rank
that holds their expert and come back (all-to-all), as in torchtitan.

Layout: the LLM's dp ranks of a stage are (edp, ep) with ep innermost
(dp_rank = edp_rank * N + ep_rank); TP stays innermost of all, so an EP group
joins ranks with the same tp_rank and each TP rank exchanges its own (equal)
copy of the tokens. An EP rank holds experts [ep_rank * E/N, (ep_rank + 1) * E/N)
of every MoE layer: HF's fused `gate_up_proj` (E, 2I, H) and `down_proj`
(E, H, I) become DTensors sharded on dim 0 over the "ep" mesh, so DCP
checkpoints reshard between EP sizes and `full_tensor()` gives HF's tensor.
The router stays replicated: top-k, aux loss and expert counts are computed
on a rank's own tokens exactly as without EP.

Forward of one experts module under EP, for T local tokens and top-k k:
  1. the T*k (token, expert) assignments sorted by expert, hence by the
     destination rank (expert // (E/N)); counts per destination exchanged;
  2. the hidden rows all-to-all'd (`_AllToAll`, variable splits; gloo has
     all_to_all_single on CPU) with their local expert ids;
  3. the received rows run through the family's experts implementation
     (device.experts_implementation via HF's dispatch) on the local weights,
     with routing weight 1;
  4. the outputs all-to-all'd back and summed per token with the routing
     weights (index_add), which is HF's block: sum_k w_k * expert_k(h).
`_AllToAll`'s backward is the reverse exchange, so expert weights get the
gradients of every EP rank's tokens; the trainer then sums expert grads only
over the ranks holding the same experts (the edp group) and dense grads over
the whole dp group (ParallelContext.reduce_grads).
"""

from __future__ import annotations

import fnmatch
import types

import torch
import torch.distributed as dist
from torch import nn

EXPERT_PARAMS = ("gate_up_proj", "down_proj")


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of rows with variable splits; backward sends the
    gradients back the way the rows came."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def _exchange_counts(send: torch.Tensor, group) -> list[int]:
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.tolist()


def _local_view(experts: nn.Module, gate_up: torch.Tensor, down: torch.Tensor):
    """An object HF's experts forward (any implementation) reads like the
    module itself, holding only this rank's experts."""
    view = types.SimpleNamespace(**{k: v for k, v in vars(experts).items() if not k.startswith("_")})
    view.__dict__.update(
        gate_up_proj=gate_up, down_proj=down, num_experts=gate_up.shape[0], _is_expert_parallel=False,
        act_fn=experts.act_fn, config=experts.config,
    )
    for k in ("has_gate", "has_bias", "has_post_expert_norm", "is_transposed", "is_concatenated"):
        setattr(view, k, getattr(experts, k, None))
    view._apply_gate = types.MethodType(type(experts)._apply_gate, view) if hasattr(type(experts), "_apply_gate") else None
    return view


def ep_forward(experts: nn.Module, group, size: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """HF's experts forward (hidden (T, H), top_k_index / weights (T, k)) with
    the experts spread over `group` (`size` ranks)."""
    gate_up, down = experts.gate_up_proj.to_local(), experts.down_proj.to_local()
    per = gate_up.shape[0]
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)  # by expert, so by destination rank
    token = order // k
    expert = flat[order]
    dest = expert // per
    send_counts = torch.bincount(dest, minlength=size).to(torch.int64)
    in_splits = send_counts.tolist()
    out_splits = _exchange_counts(send_counts, group)
    rows = _AllToAll.apply(hidden[token], out_splits, in_splits, group)
    local_ids = torch.empty(sum(out_splits), dtype=expert.dtype, device=expert.device)
    dist.all_to_all_single(local_ids, (expert - dest * per).contiguous(), out_splits, in_splits, group=group)
    ones = torch.ones(rows.shape[0], 1, dtype=top_k_weights.dtype, device=rows.device)
    y = type(experts).forward(_local_view(experts, gate_up, down), rows, local_ids.unsqueeze(1), ones)
    back = _AllToAll.apply(y, in_splits, out_splits, group)
    w = top_k_weights.reshape(-1)[order].unsqueeze(1)
    out = torch.zeros_like(hidden)
    return out.index_add(0, token, (back * w).to(out.dtype))


def expert_modules(model: nn.Module, pattern: str, prefixes: list[str]):
    """(name, module) of the materialized experts modules matching the
    family's `pattern` under the owned `prefixes`."""
    for name, mod in model.named_modules():
        if fnmatch.fnmatchcase(name, pattern) and any(name.startswith(p + ".") or name == p for p in prefixes):
            if all(not getattr(mod, p).is_meta for p in EXPERT_PARAMS):
                yield name, mod


def apply_ep(model: nn.Module, pattern: str, prefixes: list[str], ep_mesh) -> list[str]:
    """Keep this rank's experts of every owned MoE layer (as Shard(0)
    DTensors over `ep_mesh`) and route their forward through `ep_forward`."""
    from torch.distributed.tensor import DTensor, Shard

    size, rank = ep_mesh.size(), ep_mesh.get_local_rank()
    group = ep_mesh.get_group()
    done = []
    for name, mod in expert_modules(model, pattern, prefixes):
        for p in EXPERT_PARAMS:
            full = getattr(mod, p)
            per = full.shape[0] // size
            local = full.detach()[rank * per : (rank + 1) * per].clone()
            dt = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride())
            setattr(mod, p, nn.Parameter(dt, requires_grad=full.requires_grad))
        mod.forward = types.MethodType(lambda self, h, i, w, _g=group, _n=size: ep_forward(self, _g, _n, h, i, w), mod)
        done.append(name)
    return done


def is_expert_param(t) -> bool:
    """A tensor (param or grad) sharded over an "ep" mesh."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor) and "ep" in (t.device_mesh.mesh_dim_names or ())
