"""data.balance across data-parallel ranks without loading a sample twice.

Each rank loads and processes only its own share of the global batch (the
samples it would train on unbalanced), with each sample's predicted cost.
The ranks then gather the costs (a few floats), all compute the same
assignment (`balance.assign`), and swap the samples that change rank in one
all-to-all (OrchMLLM's post-balancing). Decoding media is what costs in an
omni pipeline; moving the decoded tensors between ranks is cheap next to it,
and costing a sample needs it processed.

The exchange of the next step runs in a background thread while the
current step trains (`prefetched`), on a gloo group of its own (`own_group`:
collectives of two threads on one group could pair up differently on
different ranks).
"""

from __future__ import annotations

import pickle
import queue
import threading
from typing import Any, Callable, Iterator, List, Sequence

import torch
import torch.distributed as dist

from omnitrain import device
from omnitrain.data import balance


def own_group(dp_group):
    """A gloo group of `dp_group`'s ranks (None: every rank) for one loader's
    exchanges; made by those ranks alone, when each builds its loader."""
    ranks = list(range(dist.get_world_size())) if dp_group is None else dist.get_process_group_ranks(dp_group)
    return dist.new_group(ranks, backend=device.cpu_backend(), use_local_synchronization=True)


def prefetched(make_next: Callable[[], Any]) -> Iterator[Any]:
    """`make_next()` results until it raises StopIteration, each made in a
    daemon thread while the caller uses the one before; another exception
    there is raised here, in its turn. Closing the iterator waits for the one
    being made (every rank makes the same ones, so its collectives finish)
    and ends the thread."""
    q: "queue.Queue" = queue.Queue(maxsize=1)
    stop = threading.Event()

    def run():
        ok = True
        while ok and not stop.is_set():
            try:
                item = (True, make_next())
            except BaseException as e:  # noqa: BLE001  (raised in the caller's thread)
                item = (False, e)
            ok = item[0]
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    pass

    t = threading.Thread(target=run, daemon=True, name="data-balance")
    t.start()
    try:
        while True:
            ok, item = q.get()
            if isinstance(item, StopIteration):
                return
            if not ok:
                raise item
            yield item
    finally:
        stop.set()
        t.join()


def balanced_micro_batches(
    samples: Sequence[Any],
    costs: Sequence[float],
    *,
    group,
    dp_rank: int,
    dp_size: int,
    micro_batches: int,
    micro_batch_size: int,
) -> List[List[Any]]:
    """This rank's micro-batches of the step (lists of samples), from its own
    share `samples` (with `costs`): positions dp_rank x share ... of the global
    batch, which is the ranks' shares in rank order."""
    if dp_size == 1:
        plan = balance.assign(list(costs), 1, micro_batches, micro_batch_size)
        return [[samples[i] for i in mb] for mb in plan[0]]
    share = len(samples)
    gathered: List[Any] = [None] * dp_size
    dist.all_gather_object(gathered, [float(c) for c in costs], group=group)
    if any(len(part) != share for part in gathered):
        raise RuntimeError(f"data.balance: dp ranks loaded shares of {[len(p) for p in gathered]} samples; all must load {share}")
    plan = balance.assign([c for part in gathered for c in part], dp_size, micro_batches, micro_batch_size)
    lo = dp_rank * share
    outgoing = [{i: samples[i - lo] for mb in plan[r] for i in mb if lo <= i < lo + share} for r in range(dp_size)]
    have: dict = {}
    for part in exchange_objects(outgoing, group=group, rank=dp_rank):
        have.update(part)
    return [[have[i] for i in mb] for mb in plan[dp_rank]]


def exchange_objects(outgoing: Sequence[Any], *, group, rank: int) -> List[Any]:
    """All-to-all of picklable objects: `outgoing[r]` goes to group rank r;
    returns what each rank sent here (this rank's own entry stays in place)."""
    payload = [b"" if r == rank else pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) for r, obj in enumerate(outgoing)]
    sizes = torch.tensor([len(p) for p in payload], dtype=torch.int64)
    got_sizes = torch.empty_like(sizes)
    dist.all_to_all_single(got_sizes, sizes, group=group)
    blob = b"".join(payload)
    send = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.empty(0, dtype=torch.uint8)
    recv = torch.empty(int(got_sizes.sum()), dtype=torch.uint8)
    dist.all_to_all_single(recv, send, output_split_sizes=got_sizes.tolist(), input_split_sizes=sizes.tolist(), group=group)
    out, off = [], 0
    for r, n in enumerate(got_sizes.tolist()):
        out.append(outgoing[r] if r == rank else pickle.loads(recv[off : off + n].numpy().tobytes()))
        off += n
    return out
