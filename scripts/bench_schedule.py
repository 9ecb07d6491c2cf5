"""Measure how close the real executor comes to a schedule's ideal step time, and torch's.

Stages with fixed per-micro-batch costs (sleeps: on a shared 2-core machine
real compute would measure the scheduler, not the schedule) run through the
real executor and p2p on forked CPU workers. A stage is one "linear layer":
its backward is an input-grad half and a weight-grad half (b / 2 each), which
a zero-bubble schedule runs as separate passes (the first stage sends no input
grads: it runs both halves in W). The ideal step of each
schedule comes from the simulator on those costs (for GPipe and 1F1B about
(m + p - 1) x (f + b); interleaved 1F1B about (m + (p - 1) / v) x (f + b);
zero-bubble about m (f + b) + (p - 1) f).

The bubble is the share of the step a rank is not computing, from the
nominal costs: 1 - m (f + b) / step, so every overhead (communication,
sleeps that overshoot on a loaded machine) counts as bubble, for torch's runs
too. Next to it: the executor's own idle share (what training logs as
`bubble`; it books an overshooting sleep as compute). The same stages then run under
torch.distributed.pipelining (Schedule1F1B, ScheduleInterleavedZeroBubble,
ScheduleZBVZeroBubble with two half-cost chunks per rank; gloo) in the same
processes, and omnitrain's step time over torch's is printed. Every schedule
runs one step per round, in turn, so ratios are taken within a round (the
same host state) and the median over rounds is printed. torch's own
zero-bubble schedules' bubble over its 1F1B's is printed as the reference for
what this host's per-message and per-action costs leave of a schedule's gain.

    python scripts/bench_schedule.py            # p=4, m=8, f=20 ms, b=40 ms, 7 rounds

Last lines: bubble_1f1b=, bubble_zero_bubble= (ZB-H1), bubble_zbv= (of the
median steps); zero_bubble_over_1f1b=, zbv_over_1f1b= (bubble ratios, target
at most 0.5); vs_torch_1f1b= (omnitrain's 1F1B step over torch's; target <= 1).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

from omnitrain import device, launch
from omnitrain.pipeline import schedule as sched
from omnitrain.pipeline.executor import run_pipeline


_BOOKED = [0.0]  # perf_counter time until which this process's "device" is busy


def _work(start: float, seconds: float) -> float:
    """Book `seconds` of stage work that could start at `start` and return when it ends.

    A stage's cost is wall time on a serial device, its own torch and
    autograd work included: on this VM an op right after a sleep takes
    ~50 us instead of ~5 us, so sleeping a fixed time around the ops would
    bill that to every action as bubble. Work booked back to back (several
    micro-batches' weight grads in one autograd call) ends one after another.
    """
    _BOOKED[0] = max(_BOOKED[0], start) + seconds
    return _BOOKED[0]


def _sleep_until(deadline: float) -> None:
    left = deadline - time.perf_counter()
    if left > 0:
        time.sleep(left)


class _SleepLinear(torch.autograd.Function):
    """y = x * w with fixed costs: the backward's input-grad half runs only when
    autograd asks for x's grad, the weight-grad half only for w's (a linear
    layer's two matmuls), so a split backward pays each half in its own pass."""

    @staticmethod
    def forward(ctx, x, w, fwd_s, bwd_s, t0):
        ctx.bwd_s = bwd_s
        ctx.save_for_backward(x, w)
        y = x * w
        _sleep_until(_work(t0, fwd_s))
        return y

    @staticmethod
    def backward(ctx, g):
        t0 = time.perf_counter()
        x, w = ctx.saved_tensors
        # needs_input_grad is fixed at forward time; which branch this backward
        # pass (all, inputs only, weights only) reaches is what autograd's own
        # nodes check (torch.utils.checkpoint asks the engine the same way).
        want = [n is not None and torch._C._will_engine_execute_node(n) for n, _ in ctx.next_functions[:2]]
        gx = g * w if want[0] else None
        gw = (g * x).sum().reshape(w.shape) if want[1] else None
        # The halves' cost ends the autograd pass (after this stage's own nodes below this one).
        _work(t0, sum(want) * ctx.bwd_s / 2)
        torch.autograd.Variable._execution_engine.queue_callback(lambda: _sleep_until(_BOOKED[0]))
        return gx, gw, None, None, None


class SleepModule(nn.Module):
    """One pipeline stage of the bench, for omnitrain's executor and for torch's schedules alike."""

    def __init__(self, fwd_s: float, bwd_s: float, first: bool = False):
        super().__init__()
        self.fwd_s, self.bwd_s, self.first = fwd_s, bwd_s, first
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        t0 = time.perf_counter()
        if self.first:  # a stage of several layers computes activation grads inside it: both halves, like every stage
            x = x.detach().requires_grad_(True)
        # (x * 1, w * 1): autograd.grad (torch's split backward) cannot ask the engine about leaves
        return _SleepLinear.apply(x * 1.0, self.w * 1.0, self.fwd_s, self.bwd_s, t0)


class SleepStage:
    """The executor's stage protocol around a SleepModule."""

    def __init__(self, module: SleepModule, first: bool, last: bool, kib: int):
        self.module, self.first, self.last = module, first, last
        self.x = torch.zeros(kib, 256)  # the first stage's input: made once, as torch's schedules get theirs

    def forward(self, mb, inputs):
        y = self.module(self.x if self.first else inputs["h"])  # the "activations" sent on
        return y.sum() if self.last else {"h": y}

    def parameters(self):
        return self.module.parameters()


def _timed(run) -> float:
    """One step's time, the slowest rank's (the step ends when the slowest rank does)."""
    dist.barrier()
    t0 = time.perf_counter()
    run()
    t = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _omnitrain(name, rank, p, m, fwd_s, bwd_s, v, kib):
    """(step function, executor idle share of its steps so far) for one of omnitrain's schedules."""
    s = sched.build(name, p, m, _virtual(name, v))
    k = s.num_stages // p  # chunks per rank: each does 1/k of the rank's work
    stages = {
        st: SleepStage(SleepModule(fwd_s / k, bwd_s / k, st == 0), st == 0, st == s.num_stages - 1, kib)
        for st in s.stages_of(rank)
    }
    res = []

    def run():
        res.append(
            run_pipeline(
                s.actions[rank],
                stages,
                rank_of=s.rank_of,
                num_microbatches=m,
                num_stages=s.num_stages,
            )
        )

    def idle():
        # The executor's bubble, as training logs it: the share of the step this
        # rank spent outside forward/backward (waiting and communication), mean over ranks.
        t = torch.tensor([statistics.median(r.idle_s / r.total_s for r in res[1:])])
        dist.all_reduce(t)
        return t.item() / p

    return run, idle


def _torch(name, rank, p, m, fwd_s, bwd_s, kib):
    """The same stages under torch.distributed.pipelining (fixed shapes, which these are)."""
    from torch.distributed import pipelining as tp

    cls = {
        "1f1b": tp.Schedule1F1B,
        "gpipe": tp.ScheduleGPipe,
        "interleaved_zb": tp.ScheduleInterleavedZeroBubble,
        "zbv": tp.ScheduleZBVZeroBubble,
    }[name]
    ids = [rank, 2 * p - 1 - rank] if name == "zbv" else [rank]  # ZBV: two chunks per rank, in a V
    n = p * len(ids)
    dev = torch.device("cpu")
    stages = [
        tp.PipelineStage(SleepModule(fwd_s / len(ids), bwd_s / len(ids), i == 0), i, n, dev) for i in ids
    ]
    loss_fn = lambda y, target: y.sum()  # noqa: E731
    schedule = cls(stages if name in ("interleaved_zb", "zbv") else stages[0], n_microbatches=m, loss_fn=loss_fn)
    x = torch.zeros(m * kib, 256)
    target = torch.zeros(m, 1)
    first, last = 0 in ids, n - 1 in ids

    def run():
        kw = {"target": target, "losses": []} if last else {}
        schedule.step(*((x,) if first else ()), **kw)

    return run


def _worker(names, torch_names, m, fwd_s, bwd_s, v, steps, kib):
    """Every schedule's step times, the schedules taking turns step by step.

    Round-robin, so that a change in the host's speed (this VM's varies by
    the minute) hits every schedule alike and per-round ratios compare like
    with like; round 0 warms up connections and is dropped.
    """
    rank, p = launch.init_distributed(device.detect("cpu"), timeout_s=60)
    ours = {name: _omnitrain(name, rank, p, m, fwd_s, bwd_s, v, kib) for name in names}
    runs = {name: run for name, (run, _) in ours.items()}
    runs.update({f"torch_{name}": _torch(name, rank, p, m, fwd_s, bwd_s, kib) for name in torch_names})
    times = {name: [] for name in runs}
    for step in range(steps + 1):
        for name, run in runs.items():
            t = _timed(run)
            if step:
                times[name].append(t)
    out = {"times": times, "idle": {name: idle() for name, (_, idle) in ours.items()}}
    launch.destroy()
    return out


def _virtual(name: str, v: int) -> int:
    """Stages per rank: v for interleaved 1F1B, 2 for ZBV (a V), else 1."""
    return v if name == "interleaved_1f1b" else 2 if name == "zbv" else 1


def _ideal(name: str, p: int, m: int, f: float, b: float, v: int) -> tuple[float, float]:
    """(step time, bubble fraction) the simulator predicts for these costs, without communication.

    The first stage sends no input grads: a split backward runs all of it in W.
    """
    s = sched.build(name, p, m, _virtual(name, v))
    k = s.num_stages // p
    share = [1.0 if st == 0 else 0.5 for st in range(s.num_stages)]
    r = sched.simulate(s, fwd=f / k, bwd=b / k, weight_share=share)
    return r.makespan, _bubble(r.makespan, p, m, f, b)


def _bubble(step: float, p: int, m: int, f: float, b: float) -> float:
    """Share of the p ranks' step time spent idle: 1 - (work of all stages) / (p x step)."""
    return 1.0 - m * (f + b) / step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--p", type=int, default=4)
    ap.add_argument("--m", type=int, default=8)
    ap.add_argument("--fwd-ms", type=float, default=20)
    ap.add_argument("--bwd-ms", type=float, default=40)
    ap.add_argument("--virtual-stages", type=int, default=2)
    ap.add_argument("--steps", type=int, default=7, help="rounds (each schedule one step per round)")
    ap.add_argument("--kib", type=int, default=64, help="activations per micro-batch (p2p: <= 64 KiB in one message)")
    ap.add_argument("--schedules", default="gpipe,1f1b,interleaved_1f1b,zero_bubble,zbv")
    ap.add_argument(
        "--torch-schedules",
        default="1f1b,interleaved_zb,zbv",
        help="torch.distributed.pipelining schedules on the same stages: 1f1b, gpipe, interleaved_zb, zbv ('' for none)",
    )
    a = ap.parse_args()
    names = a.schedules.split(",")
    torch_names = [n for n in a.torch_schedules.split(",") if n]
    f, b = a.fwd_ms / 1e3, a.bwd_ms / 1e3
    res = launch.launch(
        _worker, a.p, names, torch_names, a.m, f, b, a.virtual_stages, a.steps, a.kib, layout="bench_schedule"
    )
    times = res["times"]
    step = {name: statistics.median(t) for name, t in times.items()}

    def paired(num, den):
        """Per-round ratios of two series (same rounds, so the same host state): (median, min, max)."""
        r = [x / y for x, y in zip(num, den)]
        return statistics.median(r), min(r), max(r)

    bubbles = {name: [_bubble(t, a.p, a.m, f, b) for t in ts] for name, ts in times.items()}  # per round; torch's as torch_<name>
    ideal_steps, ideal_bubbles = {}, {}
    for name in names:
        ideal, ideal_bubbles[name] = _ideal(name, a.p, a.m, f, b, a.virtual_stages)
        ideal_steps[name] = ideal
        print(
            f"{name:17s} p={a.p} m={a.m} {a.kib} KiB: step {step[name] * 1e3:6.1f} ms, ideal {ideal * 1e3:6.1f} ms, "
            f"bubble {_bubble(step[name], a.p, a.m, f, b):.3f} (ideal {ideal_bubbles[name]:.3f}; "
            f"executor idle {res['idle'][name]:.3f}), schedule_efficiency={ideal / step[name]:.3f}"
        )
    for name in torch_names:
        bubble = _bubble(step[f"torch_{name}"], a.p, a.m, f, b)
        print(f"torch {name:11s} p={a.p} m={a.m}: step {step[f'torch_{name}'] * 1e3:6.1f} ms, bubble {bubble:.3f}")
    ours = {"1f1b": "1f1b", "gpipe": "gpipe", "interleaved_zb": "zero_bubble", "zbv": "zbv"}
    ratios = {}
    for name in torch_names:
        if ours[name] in times:
            ratios[name], lo, hi = paired(times[ours[name]], times[f"torch_{name}"])
            print(f"omnitrain {ours[name]} over torch {name}: {ratios[name]:.4f} (rounds {lo:.4f}-{hi:.4f})")
    over_1f1b = {}
    for zb in ("zero_bubble", "zbv"):
        if "1f1b" in bubbles and zb in bubbles:
            over_1f1b[zb], lo, hi = paired(bubbles[zb], bubbles["1f1b"])
            over = {n: (step[n] - ideal_steps[n]) * 1e3 for n in (zb, "1f1b")}
            print(
                f"{zb} bubble over 1f1b's: {over_1f1b[zb]:.3f} (rounds {lo:.3f}-{hi:.3f}; target <= 0.5; "
                f"simulated without latency {ideal_bubbles[zb] / ideal_bubbles['1f1b']:.3f}; "
                f"over ideal: {zb} {over[zb]:.0f} ms, 1f1b {over['1f1b']:.0f} ms)"
            )
    # The reference: torch's own zero-bubble schedules over its 1F1B, in the same rounds
    # (what the host's per-message and per-action costs leave of the schedules' gain).
    if "1f1b" in torch_names:
        for name in ("interleaved_zb", "zbv"):
            if name in torch_names:
                r, lo, hi = paired(bubbles[f"torch_{name}"], bubbles["torch_1f1b"])
                print(f"torch {name} bubble over torch 1f1b's: {r:.3f} (rounds {lo:.3f}-{hi:.3f})")
    # machine-readable last lines: bubbles of the median steps, ratios the medians of per-round ratios
    for name in ("1f1b", "zero_bubble", "zbv"):
        if name in bubbles:
            print(f"bubble_{name}={_bubble(step[name], a.p, a.m, f, b):.4f}")
    for zb in over_1f1b:
        print(f"{zb}_over_1f1b={over_1f1b[zb]:.4f}")
    if "1f1b" in ratios:
        print(f"vs_torch_1f1b={ratios['1f1b']:.4f}")


if __name__ == "__main__":
    main()
