"""Sample order as pure functions of (seed, epoch): mixing, shuffling, and the
slice of a global batch that a data-parallel rank's micro-batch holds.

The stream is infinite: position p is sample `epoch_order(p // L)[p % L]`.
Global step k owns positions [k*G, (k+1)*G); rank r of dp takes its
contiguous G/dp share, cut into micro-batches. So which samples form step k
depends only on the seed and G, never on micro-batch size or dp.
"""

from __future__ import annotations

from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import torch


def epoch_counts(sizes: Sequence[int], weights: Optional[Sequence[float]]) -> List[int]:
    """Samples each dataset contributes per epoch.

    No weights: every sample once. Weights: the epoch keeps its length
    (sum of sizes) and dataset i fills weight_i / sum(weights) of it,
    repeating or subsampling its own samples.
    """
    total = sum(sizes)
    if weights is None:
        return list(sizes)
    live = [w if n > 0 else 0.0 for w, n in zip(weights, sizes)]
    norm = sum(live)
    if norm <= 0:
        return [0] * len(sizes)
    raw = [total * w / norm for w in live]
    counts = [int(x) for x in raw]
    # Hand the rounding remainder to the largest fractional parts (deterministic).
    rest = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in rest[: total - sum(counts)]:
        counts[i] += 1
    return counts


def epoch_order(
    sizes: Sequence[int], weights: Optional[Sequence[float]], seed: int, epoch: int, shuffle: bool = True
) -> Tuple[Tuple[int, int], ...]:
    """(dataset, sample) pairs of one epoch; the same for the same arguments.

    Cached (a few epochs): the loader looks up one position at a time.
    """
    return _epoch_order(tuple(sizes), None if weights is None else tuple(weights), seed, epoch, shuffle)


@lru_cache(maxsize=4)
def _epoch_order(sizes, weights, seed, epoch, shuffle) -> Tuple[Tuple[int, int], ...]:
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    items: List[Tuple[int, int]] = []
    for d, (n, want) in enumerate(zip(sizes, epoch_counts(sizes, weights))):
        picked: List[int] = []
        while len(picked) < want:  # repeat a dataset's own permutation as needed
            perm = torch.randperm(n, generator=g).tolist() if shuffle else list(range(n))
            picked += perm[: want - len(picked)]
        items += [(d, i) for i in picked]
    if shuffle:
        items = [items[i] for i in torch.randperm(len(items), generator=g).tolist()]
    return tuple(items)


def micro_batch_positions(
    micro_step: int, *, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int
) -> List[int]:
    """Stream positions of this rank's `micro_step`-th micro-batch."""
    per_rank = global_batch_size // dp_size
    per_step = per_rank // micro_batch_size
    step, j = divmod(micro_step, per_step)
    start = step * global_batch_size + dp_rank * per_rank + j * micro_batch_size
    return list(range(start, start + micro_batch_size))


def check_batch_sizes(global_batch_size: int, micro_batch_size: int, dp_size: int) -> None:
    if global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a multiple of micro_batch_size x dp "
            f"= {micro_batch_size} x {dp_size}"
        )
