"""Measure how close the real executor comes to a schedule's ideal step time.

Stages with fixed per-micro-batch costs (sleeps: on a shared 2-core machine
real compute would measure the scheduler, not the schedule) run through the
real executor and p2p on forked CPU workers. For GPipe and 1F1B the ideal
step is (m + p - 1) x (f + b); interleaved 1F1B with v chunks per rank does
the same work in (m + (p - 1) / v) x (f + b).

    python scripts/bench_schedule.py            # p=4, m=8, f=20 ms, b=40 ms
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from omnitrain import device, launch
from omnitrain.pipeline import schedule as sched
from omnitrain.pipeline.executor import run_pipeline


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fwd_s, bwd_s):
        ctx.bwd_s = bwd_s
        time.sleep(fwd_s)
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        time.sleep(ctx.bwd_s)
        return g, None, None


class SleepStage:
    def __init__(self, fwd_s: float, bwd_s: float, last: bool, kib: int):
        self.fwd_s, self.bwd_s, self.last, self.kib = fwd_s, bwd_s, last, kib

    def forward(self, mb, inputs):
        x = inputs.get("h")
        if x is None:
            x = torch.zeros(self.kib, 256, requires_grad=True)  # the "activations" sent on
        y = _Sleep.apply(x, self.fwd_s, self.bwd_s)
        return y.sum() if self.last else {"h": y}


def _worker(names, m, fwd_s, bwd_s, v, steps, kib):
    rank, p = launch.init_distributed(device.detect("cpu"), timeout_s=60)
    out = {}
    for name in names:
        s = sched.build(name, p, m, v if name == "interleaved_1f1b" else 1)
        k = s.num_stages // p  # chunks per rank: each does 1/k of the rank's work
        stages = {
            st: SleepStage(fwd_s / k, bwd_s / k, st == s.num_stages - 1, kib) for st in s.stages_of(rank)
        }
        times, idle = [], []
        for step in range(steps + 1):  # step 0 warms up connections
            dist.barrier()
            t0 = time.perf_counter()
            res = run_pipeline(
                s.actions[rank],
                stages,
                prev_rank=(rank - 1) % p,
                next_rank=(rank + 1) % p,
                num_microbatches=m,
                num_stages=s.num_stages,
            )
            t = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank does
            if step:
                times.append(t.item())
                idle.append(res.idle_s)
        out[name] = (statistics.median(times), statistics.median(idle))
    launch.destroy()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--p", type=int, default=4)
    ap.add_argument("--m", type=int, default=8)
    ap.add_argument("--fwd-ms", type=float, default=20)
    ap.add_argument("--bwd-ms", type=float, default=40)
    ap.add_argument("--virtual-stages", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--kib", type=int, default=64, help="activations per micro-batch (p2p: <= 64 KiB in one message)")
    ap.add_argument("--schedules", default="gpipe,1f1b,interleaved_1f1b")
    a = ap.parse_args()
    names = a.schedules.split(",")
    f, b = a.fwd_ms / 1e3, a.bwd_ms / 1e3
    res = launch.launch(_worker, a.p, names, a.m, f, b, a.virtual_stages, a.steps, a.kib, layout="bench_schedule")
    for name in names:
        measured, idle = res[name]
        bubble = (a.p - 1) / (a.virtual_stages if name == "interleaved_1f1b" else 1)
        ideal = (a.m + bubble) * (f + b)
        print(
            f"{name:17s} p={a.p} m={a.m} {a.kib} KiB: step {measured * 1e3:6.1f} ms, ideal {ideal * 1e3:6.1f} ms, "
            f"rank-0 idle {idle * 1e3:5.1f} ms, schedule_efficiency={ideal / measured:.3f}"
        )


if __name__ == "__main__":
    main()
