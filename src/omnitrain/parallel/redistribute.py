"""Encoder features between module meshes with different TP/DP sizes.

An encoder with TP size t below the LLM's T has k = T / t times the LLM's
data-parallel replicas. All ranks of an LLM TP group hold the same
micro-batch; the k encoder replicas among them ("parts") each encode
1/k of its samples (`part_range`, the adapter's `slice_media`; pipeline
cuts pair equal positions of neighbouring stages, so a part stays a part
until the merge), and no encoder work is repeated.
Where the features meet the LLM, `gather_rows` concatenates the parts in
sample order, so every LLM TP rank holds the whole micro-batch's features.

The backward of the gather is the rank's own rows of the incoming gradient,
with no communication: DTensor TP hands the LLM input's gradient back
replicated over the LLM TP group (ColwiseParallel's input redistribution
all-reduces it), so each part already holds the exact gradient of its rows.
torch's functional collectives have an autograd all-gather, but only for
equal sizes; the row counts here differ per part, hence this small Function.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group, rank: int) -> torch.Tensor:
        k = dist.get_world_size(group)
        n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
        counts = [torch.zeros_like(n) for _ in range(k)]
        dist.all_gather(counts, n, group=group)
        counts = [int(c) for c in counts]
        # all_gather needs equal shapes: pad to the largest part, then drop the padding.
        width = max(counts)
        padded = x.new_zeros((width, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(k)]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.lo = sum(counts[:rank])
        ctx.hi = ctx.lo + counts[rank]
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[ctx.lo : ctx.hi], None, None


def gather_rows(x: torch.Tensor, group, rank: int) -> torch.Tensor:
    """Concatenate every part's rows (in part order) on every member of `group`."""
    return _GatherRows.apply(x, group, rank)


def part_range(batch: int, parts: int, part: int) -> tuple[int, int]:
    """Samples [lo, hi) of a micro-batch of `batch` samples that part `part` encodes."""
    if batch % parts:
        raise ValueError(f"a micro-batch of {batch} samples does not split into {parts} encoder parts")
    per = batch // parts
    return part * per, (part + 1) * per
