"""Runs one optimizer step's pipeline schedule on one rank.

The schedule (`omnitrain.pipeline.schedule`) says what to run; this module
does it: stage forwards and backwards, bundle transfers, bookkeeping of saved
activations, and timing. The communication rules are the ones the
schedule simulator assumes, so a schedule it accepts does not hang here:

- sends are non-blocking (isend) and only waited for at the end of the step,
  so two neighbours sending to each other (1F1B's steady state) cannot block;
- receives block; a bundle that arrives before it is needed (a peer can send
  both activations and grads over one link, e.g. interleaved with 2 ranks)
  is kept until its action asks for it.

A stage object has `forward(mb, inputs) -> dict[str, Tensor]`, or a scalar
loss tensor on the last stage. The first stage gets empty inputs: every stage
reads its micro-batch's raw data itself; only what crosses a cut is sent.
Received floating tensors require grad iff they did on the sender; backward
sends back the grads of exactly those (zeros where the stage did not use one).
The last stage's loss must already be scaled for the step (e.g. divided by the
global label-token count): the executor sums nothing and scales nothing.

Split backward (zero-bubble schedules, actions "B" then "W"): B runs autograd
from the stage's outputs to its received inputs only and sends those grads
back at once; W later computes the grads of the stage's parameters
(`stage.parameters()`) into `.grad`, restarting from the nodes where the
input and weight paths part (`split_backward`), and frees the graph. The
first stage sends no input grads: its B is empty and its W the plain
backward. Grads end as with one backward (the parity tests check it);
FSDP's per-unit reduce-scatter hooks assume one backward per forward, so
layouts reject zero_bubble with dp_mode=fsdp.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

import torch
import torch.distributed as dist

from omnitrain import device as omnitrain_device
from omnitrain.pipeline import p2p, split_backward
from omnitrain.pipeline.schedule import Action, stage_rank

ACT, GRAD = 0, 1  # bundle kinds, first word of the p2p key
_BATCH_READY: set = set()  # process groups whose first op was a collective (see run_pipeline)


class Stage(Protocol):
    def forward(self, mb: int, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | torch.Tensor: ...

    # Needed only by schedules with W actions: the parameters whose grads W computes.
    # def parameters(self) -> Iterable[torch.Tensor]: ...


@dataclass
class PipelineResult:
    losses: list[torch.Tensor]  # detached, one per micro-batch, on the rank with the last stage; else []
    forward_s: dict[int, float]  # per stage on this rank
    backward_s: dict[int, float]  # B and W together
    idle_s: float  # step wall time not spent in forward/backward: waiting (bubble) + communication
    total_s: float
    timeline: list[tuple[float, float, Action]] = field(default_factory=list)  # (start, end) from step start


class _Mailbox:
    """Receives bundles from peers and hands them out by key.

    With `prefetch` (CPU), one thread per peer receives the step's bundles as
    they come, so a transfer overlaps the compute before the action that
    needs it: the CPU backend moves data only once the receive is posted, so
    a receive posted only when needed costs a rendezvous on the critical
    path. Accelerator backends need one op order per communicator, so there
    the main thread receives, in action order.
    """

    def __init__(
        self, group, device: torch.device, expected: dict[int, int], prefetch: bool, batch: bool = False, up_group=None
    ):
        self.group = group
        self.device = device
        self.me = dist.get_rank(group)
        self.kept: dict[tuple[int, p2p.Key], dict[str, torch.Tensor]] = {}
        self.sends: list[p2p.SendHandle] = []
        self.posted: dict[int, p2p.RecvHandle] = {}  # per peer, at most one (see p2p)
        # Without prefetch threads, a slot's send and the next receive go out as one batch
        # (`batch`), on the device's communication stream where it has streams.
        self.batch = batch and not prefetch
        # Main-thread p2p without batching: messages to a lower rank go over
        # `up_group` (the same ranks), so on NCCL / HCCL a pair's two directions
        # run on separate communicators and streams; on one, a send queued
        # before a receive of the other direction waits for the peer's
        # matching receive, which its own such send can hold back (large
        # messages: a hang). Each direction alone is first-in first-out on
        # both ends, and the schedule's order is deadlock-free (simulator).
        self.up = up_group if up_group is not None and not prefetch and not self.batch else group
        self.stream = omnitrain_device.comm_stream(device) if not prefetch else None
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self.threads = []
        if prefetch:
            for peer, n in expected.items():
                t = threading.Thread(target=self._receive, args=(peer, n), daemon=True, name=f"pp-recv-{peer}")
                t.start()
                self.threads.append(t)

    def _receive(self, src: int, n: int) -> None:
        try:
            for _ in range(n):
                key, bundle = p2p.recv_bundle(src, group=self.group, device=self.device)
                with self.cond:
                    self.kept[(src, tuple(key))] = bundle
                    self.cond.notify_all()
        except BaseException as e:  # surfaces in the main thread's next recv
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def send(self, bundle: dict[str, torch.Tensor], dst: int, key: p2p.Key, then: tuple | None = None) -> None:
        """Send `bundle`; `then` = (src, key) of the next action's receive, posted in the same batch."""
        if dst == self.me:  # two stages of one rank (interleaved, 1 rank): hand over locally
            self.kept[(dst, key)] = {
                k: v.detach().requires_grad_(v.requires_grad and v.is_floating_point()) for k, v in bundle.items()
            }
            return
        src = self._lookahead(then)
        if self.batch:
            handles, recv = p2p.exchange(
                [(bundle, dst, key)], src, group=self.group, device=self.device, stream=self.stream
            )
            self.sends += handles
            if recv is not None:
                self.posted[src] = recv
        else:
            self.sends.append(
                p2p.isend_bundle(bundle, dst, group=self._way(self.me, dst), key=key, device=self.device, stream=self.stream)
            )
        self.sends = [h for h in self.sends if not h.is_completed()]

    def _way(self, src: int, dst: int):
        """The group a message from group rank `src` to `dst` travels in."""
        return self.up if dst < src else self.group

    def _lookahead(self, then: tuple | None) -> int | None:
        """The peer whose next bundle to post a receive for now, if batching and none is outstanding."""
        if not self.batch or then is None:
            return None
        src, key = then
        if src == self.me or (src, key) in self.kept or src in self.posted:
            return None
        return src

    def recv(self, src: int, key: p2p.Key) -> dict[str, torch.Tensor]:
        if src == self.me:
            if (src, key) not in self.kept:
                raise RuntimeError(f"pipeline: local bundle {key} was never produced")
        elif self.threads:
            with self.cond:
                self.cond.wait_for(lambda: (src, key) in self.kept or self.error is not None)
                if (src, key) not in self.kept:
                    raise RuntimeError(f"pipeline: receiving from rank {src} failed") from self.error
        else:
            while (src, key) not in self.kept:
                h = self.posted.pop(src, None) or p2p.irecv_bundle(
                    src, group=self._way(src, self.me), device=self.device, stream=self.stream
                )
                got, bundle = h.wait()
                self.kept[(src, tuple(got))] = bundle
        with self.cond:
            return self.kept.pop((src, key))

    def finish(self) -> None:
        # On the comm stream: its later allocations may reuse the send buffers only after the transfers.
        with omnitrain_device.use_stream(self.device, self.stream):
            for h in self.sends:
                h.wait()
        self.sends = []
        for t in self.threads:
            t.join()
        if self.error is not None:
            raise RuntimeError("pipeline: a receive failed") from self.error
        if self.kept or self.posted:
            raise RuntimeError(
                f"pipeline: bundles received but never used: {sorted(k for _, k in self.kept)}, "
                f"receives posted but never taken from ranks {sorted(self.posted)}"
            )


def _expected(actions: Sequence[Action], num_stages: int, rank_of, me: int) -> dict[int, int]:
    """Bundles this rank receives from each peer in one step (implied by its actions)."""
    count: dict[int, int] = {}
    for a in actions:  # W receives nothing
        got = _recv_of(a, num_stages, rank_of)
        if got is not None and got[0] != me:
            count[got[0]] = count.get(got[0], 0) + 1
    return count


def _recv_of(a: Action | None, num_stages: int, rank_of) -> tuple[int, p2p.Key] | None:
    """(peer, key) of the bundle action `a` must receive first, if any."""
    if a is None:
        return None
    if a.op == "F" and a.stage > 0:
        return rank_of(a.stage - 1), (ACT, a.mb, a.stage)
    if a.op == "B" and a.stage < num_stages - 1:
        return rank_of(a.stage + 1), (GRAD, a.mb, a.stage)
    return None


def _autograd_roots(out, grads: dict[str, torch.Tensor] | None) -> tuple[list, list | None]:
    """What a stage's backward starts from: the loss, or the sent outputs with the grads that came back."""
    if grads is None:  # last stage: a scalar loss
        return ([out], None) if out.requires_grad else ([], None)
    tensors, grad_tensors = [], []
    for name, g in grads.items():
        t = out.get(name)
        if t is None or not t.requires_grad:
            raise RuntimeError(f"pipeline: got a grad for {name!r}, which this stage did not send as needing grad")
        tensors.append(t)
        grad_tensors.append(g)
    return tensors, grad_tensors


def _backward(out, grads, *, inputs=None, retain_graph: bool = False) -> None:
    """Backward from the stage's roots; `inputs` limits which leaves get .grad (split backward)."""
    tensors, grad_tensors = _autograd_roots(out, grads)
    if not tensors or (inputs is not None and not inputs):
        return
    torch.autograd.backward(tensors, grad_tensors, retain_graph=retain_graph, inputs=inputs)


def _input_grads(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Grads of the inputs the sender marked as needing grad, in its order; an unused one gets zeros."""
    return {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in inputs.items() if v.requires_grad}


def run_pipeline(
    actions: Sequence[Action],
    stage: Stage | Mapping[int, Stage],
    *,
    rank_of: Callable[[int], int] | None = None,
    group=None,
    up_group=None,
    num_microbatches: int,
    num_stages: int | None = None,
    device: torch.device | None = None,
    prefetch: bool | None = None,
    batch_p2p: bool | None = None,
    clock=time.perf_counter,
) -> PipelineResult:
    """Run this rank's `actions` for one step.

    `stage` is the rank's stage object, or {stage index: object} when it holds
    several (interleaved, ZBV). `rank_of(stage)` is the group rank that runs a
    stage (`Schedule.rank_of`; default: stage s on rank s % group size), so
    each stage has its own neighbours (a V's second chunk sends to the rank
    before). `num_stages` defaults to the group size (one stage per rank). `prefetch` (default: on CPU) receives
    in background threads. Without it, `batch_p2p` (default: with one stage
    per rank) posts each send together with the receive the next action needs.
    Batching is limited to one stage per rank: the stages then form a line
    in which a batch's sends are always taken by a neighbour that needs them
    (a grouped batch completes as a whole); interleaved stages wrap around
    the ranks, where no such argument holds; there `up_group` (a second
    group of the same ranks) carries the messages to a lower rank, so the two
    directions of a pair never share an ordered channel. `clock` times the compute
    (forward_s / backward_s; device.compute_clock); idle_s is wall time.
    """
    stages = dict(stage) if isinstance(stage, Mapping) else {actions[0].stage if actions else 0: stage}
    if num_stages is None:
        num_stages = dist.get_world_size(group)
    stray = [a for a in actions if not 0 <= a.mb < num_microbatches or a.stage not in stages]
    if stray:
        raise ValueError(
            f"pipeline: action {stray[0]} is outside {num_microbatches} micro-batches "
            f"or this rank's stages {sorted(stages)}"
        )
    device = device or torch.device("cpu")
    if prefetch is None:
        prefetch = omnitrain_device.is_cpu(device)
    me = dist.get_rank(group)
    if rank_of is None:
        rank_of = functools.partial(stage_rank, num_ranks=dist.get_world_size(group))
    if batch_p2p is None:
        batch_p2p = num_stages == dist.get_world_size(group)
    if batch_p2p and not prefetch and group not in _BATCH_READY:
        # NCCL: a group's first op must not be a batch some ranks lack (torch's
        # batch_isend_irecv contract); one barrier makes it an all-rank op.
        dist.barrier(group=group)
        _BATCH_READY.add(group)
    box = _Mailbox(group, device, _expected(actions, num_stages, rank_of, me), prefetch, batch_p2p, up_group)
    saved: dict[tuple[int, int], tuple[dict, object]] = {}
    losses: dict[int, torch.Tensor] = {}
    fwd_s = {s: 0.0 for s in stages}
    bwd_s = {s: 0.0 for s in stages}
    timeline = []
    wall_busy = 0.0  # idle is wall time between actions, whatever `clock` is
    t_start = time.perf_counter()

    split = any(a.op == "W" for a in actions)
    params = {}
    if split:  # leaves W computes grads for (trainable ones: frozen ones are not asked for)
        for st, obj in stages.items():
            if not hasattr(obj, "parameters"):
                raise TypeError(f"pipeline: stage {st} has no parameters(), which a split-backward schedule needs")
            params[st] = [p for p in obj.parameters() if p.requires_grad]
    pending_w: dict[tuple[int, int], object] = {}  # (mb, stage) -> WeightWork, or a callable (a plain W)
    fused_until = 0  # actions before this index already ran (a run of W's in one call)

    for i, a in enumerate(actions):
        if i < fused_until:
            continue
        s, mb = a.stage, a.mb
        first, last = s == 0, s == num_stages - 1
        then = _recv_of(actions[i + 1] if i + 1 < len(actions) else None, num_stages, rank_of)
        # Each branch: receive, compute between t0 and t1 (the timed part), send.
        if a.op == "F":
            inputs = {} if first else box.recv(rank_of(s - 1), (ACT, mb, s))
            t0, c0 = time.perf_counter(), clock()
            out = stages[s].forward(mb, inputs)
            t1, c1 = time.perf_counter(), clock()
            fwd_s[s] += c1 - c0
            if last:
                if not isinstance(out, torch.Tensor) or out.dim() != 0:
                    raise TypeError(
                        f"pipeline: the last stage must return a scalar loss tensor, got {type(out).__name__}"
                    )
                losses[mb] = out.detach()
            else:
                if not isinstance(out, Mapping):
                    raise TypeError(f"pipeline: stage {s} must return a dict of tensors, got {type(out).__name__}")
                box.send(dict(out), rank_of(s + 1), (ACT, mb, s + 1), then)
            saved[(mb, s)] = (inputs, out)
        elif a.op == "B":
            inputs, out = saved.pop((mb, s))
            grads = None if last else box.recv(rank_of(s + 1), (GRAD, mb, s))
            t0, c0 = time.perf_counter(), clock()
            if split and first:  # no input grads to send: W is the whole (plain) backward
                pending_w[(mb, s)] = functools.partial(_backward, out, grads)
            elif split:  # input grads only; the graph stays for W
                pending_w[(mb, s)] = split_backward.backward_input(
                    *_autograd_roots(out, grads), [v for v in inputs.values() if v.requires_grad], params[s]
                )
            else:
                _backward(out, grads)
            t1, c1 = time.perf_counter(), clock()
            bwd_s[s] += c1 - c0
            if not first:
                back = _input_grads(inputs)
                box.send(back, rank_of(s - 1), (GRAD, mb, s - 1), then)
                del back
            del inputs, out, grads  # free this micro-batch's activations now (split: those W does not need)
        elif a.op == "W":
            # A run of W's (nobody waits for them) goes to autograd in one call:
            # the per-call host cost is paid once (split_backward.backward_weights).
            fused_until = i + 1
            while fused_until < len(actions) and actions[fused_until].op == "W":
                fused_until += 1
            run = actions[i:fused_until]
            early = [w for w in run if (w.mb, w.stage) not in pending_w]
            if early:
                raise RuntimeError(f"pipeline: {early[0]} runs before its B")
            jobs = [pending_w.pop((w.mb, w.stage)) for w in run]
            t0, c0 = time.perf_counter(), clock()
            split_backward.backward_weights([j for j in jobs if isinstance(j, split_backward.WeightWork)])
            for j in jobs:
                if callable(j):
                    j()
            t1, c1 = time.perf_counter(), clock()
            del jobs  # frees the micro-batches' graphs
            for k, w in enumerate(run):  # the call's time, shared evenly by its W's
                bwd_s[w.stage] += (c1 - c0) / len(run)
                d = (t1 - t0) / len(run)
                timeline.append((t0 + k * d - t_start, t0 + (k + 1) * d - t_start, w))
            wall_busy += t1 - t0
            continue
        else:
            raise ValueError(f"pipeline: unknown action {a}")
        timeline.append((t0 - t_start, t1 - t_start, a))
        wall_busy += t1 - t0

    box.finish()
    total = time.perf_counter() - t_start
    if saved or pending_w:
        raise RuntimeError(f"pipeline: forwards without a backward: {sorted(saved)}, without W: {sorted(pending_w)}")
    return PipelineResult(
        losses=[losses[i] for i in sorted(losses)] if losses else [],
        forward_s=fwd_s,
        backward_s=bwd_s,
        idle_s=total - wall_busy,
        total_s=total,
        timeline=timeline,
    )
