"""Cost-balanced micro-batches: deal the samples of one global batch to
data-parallel ranks, then each rank's share to its micro-batches, so that
the predicted costs (the family's `batch_cost`: encoder and LLM tokens x
cost per token) come out even. Pure functions of the costs, so every rank
computes the same assignment; the global batch (and so the step's loss and
gradients) stays the same, only who computes which sample changes.

Greedy LPT with a cardinality limit: the most expensive sample first, into
the least-loaded group that still has room (ties: the lower group, then the
lower sample index). A micro-batch keeps `micro_batch_size` samples and a
rank `global / dp`, so every layout rule about batch sizes still holds.
"""

from __future__ import annotations

from typing import List, Sequence


def lpt(costs: Sequence[float], groups: int, capacity: int) -> List[List[int]]:
    """Indices of `costs` in `groups` groups of exactly `capacity` items
    (len(costs) == groups x capacity), loads as even as greedy LPT makes them;
    each group's indices ascending."""
    if len(costs) != groups * capacity:
        raise ValueError(f"{len(costs)} costs do not fill {groups} groups of {capacity}")
    out: List[List[int]] = [[] for _ in range(groups)]
    load = [0.0] * groups
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        g = min((g for g in range(groups) if len(out[g]) < capacity), key=lambda g: (load[g], g))
        out[g].append(i)
        load[g] += costs[i]
    return [sorted(g) for g in out]


def assign(costs: Sequence[float], dp: int, micro_batches: int, micro_batch_size: int) -> List[List[List[int]]]:
    """[rank][micro-batch] -> indices into `costs` (one global batch in
    sampler order): ranks balanced first, then each rank's micro-batches."""
    ranks = lpt(costs, dp, micro_batches * micro_batch_size)
    out = []
    for idx in ranks:
        local = lpt([costs[i] for i in idx], micro_batches, micro_batch_size)
        out.append([[idx[j] for j in mb] for mb in local])
    return out


def contiguous(n: int, dp: int, micro_batches: int, micro_batch_size: int) -> List[List[List[int]]]:
    """The unbalanced assignment (data/sampler.py): rank r takes the r-th
    contiguous share, cut in order into micro-batches."""
    per_rank = n // dp
    return [
        [list(range(r * per_rank + j * micro_batch_size, r * per_rank + (j + 1) * micro_batch_size)) for j in range(micro_batches)]
        for r in range(dp)
    ]


def max_over_mean(loads: Sequence[float]) -> float:
    """1.0 = perfectly even; what the step waits for over what it would with even loads."""
    mean = sum(loads) / len(loads) if loads else 0.0
    return max(loads) / mean if mean > 0 else 1.0


def imbalance(costs: Sequence[float], plan: List[List[List[int]]]) -> tuple[float, float]:
    """(max/mean over ranks, max/mean over all micro-batches) of a plan."""
    micro = [sum(costs[i] for i in mb) for rank in plan for mb in rank]
    ranks = [sum(costs[i] for mb in rank for i in mb) for rank in plan]
    return max_over_mean(ranks), max_over_mean(micro)
