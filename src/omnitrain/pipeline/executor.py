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
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

import torch
import torch.distributed as dist

from omnitrain.pipeline import p2p
from omnitrain.pipeline.schedule import Action

ACT, GRAD = 0, 1  # bundle kinds, first word of the p2p key


class Stage(Protocol):
    def forward(self, mb: int, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | torch.Tensor: ...


@dataclass
class PipelineResult:
    losses: list[torch.Tensor]  # detached, one per micro-batch, on the rank with the last stage; else []
    forward_s: dict[int, float]  # per stage on this rank
    backward_s: dict[int, float]
    idle_s: float  # step wall time not spent in forward/backward: waiting (bubble) + communication
    total_s: float
    timeline: list[tuple[float, float, Action]] = field(default_factory=list)  # (start, end) from step start


class _Mailbox:
    """Receives bundles from peers in arrival order and hands them out by key."""

    def __init__(self, group, device: torch.device):
        self.group = group
        self.device = device
        self.me = dist.get_rank(group)
        self.kept: dict[tuple[int, p2p.Key], dict[str, torch.Tensor]] = {}
        self.sends: list[p2p.SendHandle] = []

    def send(self, bundle: dict[str, torch.Tensor], dst: int, key: p2p.Key) -> None:
        if dst == self.me:  # two stages of one rank (interleaved, 1 rank): hand over locally
            self.kept[(dst, key)] = {
                k: v.detach().requires_grad_(v.requires_grad and v.is_floating_point()) for k, v in bundle.items()
            }
            return
        self.sends.append(p2p.isend_bundle(bundle, dst, group=self.group, key=key, device=self.device))
        self.sends = [h for h in self.sends if not h.is_completed()]

    def recv(self, src: int, key: p2p.Key) -> dict[str, torch.Tensor]:
        while (src, key) not in self.kept:
            if src == self.me:
                raise RuntimeError(f"pipeline: local bundle {key} was never produced")
            got, bundle = p2p.recv_bundle(src, group=self.group, device=self.device)
            self.kept[(src, tuple(got))] = bundle
        return self.kept.pop((src, key))

    def finish(self) -> None:
        for h in self.sends:
            h.wait()
        self.sends = []
        if self.kept:
            raise RuntimeError(f"pipeline: bundles received but never used: {sorted(k for _, k in self.kept)}")


def _backward(outputs: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
    tensors, grad_tensors = [], []
    for name, g in grads.items():
        t = outputs.get(name)
        if t is None or not t.requires_grad:
            raise RuntimeError(f"pipeline: got a grad for {name!r}, which this stage did not send as needing grad")
        tensors.append(t)
        grad_tensors.append(g)
    if tensors:
        torch.autograd.backward(tensors, grad_tensors)


def run_pipeline(
    actions: Sequence[Action],
    stage: Stage | Mapping[int, Stage],
    *,
    prev_rank: int | None,
    next_rank: int | None,
    group=None,
    num_microbatches: int,
    num_stages: int | None = None,
    device: torch.device | None = None,
) -> PipelineResult:
    """Run this rank's `actions` for one step.

    `stage` is the rank's stage object, or {stage index: object} when it holds
    several (interleaved). `prev_rank`/`next_rank` are the group ranks of the
    neighbouring stages (None at the ends). `num_stages` defaults to the
    group size (one stage per rank).
    """
    stages = dict(stage) if isinstance(stage, Mapping) else {actions[0].stage if actions else 0: stage}
    if num_stages is None:
        num_stages = dist.get_world_size(group)
    device = device or torch.device("cpu")
    box = _Mailbox(group, device)
    saved: dict[tuple[int, int], tuple[dict, object]] = {}
    losses: dict[int, torch.Tensor] = {}
    fwd_s = {s: 0.0 for s in stages}
    bwd_s = {s: 0.0 for s in stages}
    timeline = []
    t_start = time.perf_counter()

    for a in actions:
        s, mb = a.stage, a.mb
        first, last = s == 0, s == num_stages - 1
        if a.op == "F":
            inputs = {} if first else box.recv(prev_rank, (ACT, mb, s))
            t0 = time.perf_counter()
            out = stages[s].forward(mb, inputs)
            t1 = time.perf_counter()
            fwd_s[s] += t1 - t0
            if last:
                if not isinstance(out, torch.Tensor) or out.dim() != 0:
                    raise TypeError(f"pipeline: the last stage must return a scalar loss tensor, got {type(out).__name__}")
                losses[mb] = out.detach()
            else:
                if not isinstance(out, Mapping):
                    raise TypeError(f"pipeline: stage {s} must return a dict of tensors, got {type(out).__name__}")
                box.send(dict(out), next_rank, (ACT, mb, s + 1))
            saved[(mb, s)] = (inputs, out)
        else:
            inputs, out = saved.pop((mb, s))
            grads = None if last else box.recv(next_rank, (GRAD, mb, s))
            t0 = time.perf_counter()
            if last:
                if out.requires_grad:
                    torch.autograd.backward(out)
            else:
                _backward(out, grads)
            t1 = time.perf_counter()
            bwd_s[s] += t1 - t0
            if not first:
                # Inputs the sender marked as needing grad, in its order; an unused one gets zeros.
                back = {
                    k: (v.grad if v.grad is not None else torch.zeros_like(v))
                    for k, v in inputs.items()
                    if v.requires_grad
                }
                box.send(back, prev_rank, (GRAD, mb, s - 1))
            del inputs, out, grads  # free this micro-batch's activations now
        timeline.append((t0 - t_start, t1 - t_start, a))

    box.finish()
    total = time.perf_counter() - t_start
    if saved:
        raise RuntimeError(f"pipeline: forwards without a backward: {sorted(saved)}")
    busy = sum(fwd_s.values()) + sum(bwd_s.values())
    return PipelineResult(
        losses=[losses[i] for i in sorted(losses)] if losses else [],
        forward_s=fwd_s,
        backward_s=bwd_s,
        idle_s=total - busy,
        total_s=total,
        timeline=timeline,
    )
