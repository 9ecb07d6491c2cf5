"""Run a function in N forked CPU workers joined in one process group.

Forking from the pytest process that already imported torch starts a worker
in milliseconds (torchrun-style spawning re-imports torch: seconds each).
Each worker calls `fn(rank, world_size, *args)`; its return value comes back
pickled by value (torch's shared-memory pickling would outlive the worker).
A worker that raises fails the call with its traceback; a worker that hangs
is stopped by the process-group timeout, and by `timeout_s` as a backstop.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import sys
import time
import traceback
from multiprocessing import get_context

import torch
import torch.distributed as dist

from omnitrain import device

PG_TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn, args, conn) -> None:
    code = 0
    try:
        torch.set_num_threads(1)  # 2 shared cores: threads would only fight
        dist.init_process_group(
            device.cpu_backend(),
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
        )
        result = fn(rank, world_size, *args)
        conn.send_bytes(pickle.dumps(("ok", result)))
    except BaseException:
        code = 1
        try:
            conn.send_bytes(pickle.dumps(("error", (time.time(), traceback.format_exc()))))
        except Exception:
            pass
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # never run the forked pytest's exit handlers


def run_workers(fn, world_size: int, *args, timeout_s: float = PG_TIMEOUT_S + 30) -> list:
    """Run `fn(rank, world_size, *args)` on `world_size` forked CPU ranks; return results by rank."""
    ctx = get_context("fork")
    port = _free_port()
    procs, conns = [], []
    for rank in range(world_size):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, child), daemon=True)
        p.start()
        child.close()
        procs.append(p)
        conns.append(parent)
    results: dict[int, tuple] = {}
    deadline = time.monotonic() + timeout_s
    first_error_at = None
    while len(results) < world_size and time.monotonic() < deadline:
        for rank, c in enumerate(conns):
            if rank in results:
                continue
            if c.poll(0.05):
                try:
                    results[rank] = pickle.loads(c.recv_bytes())
                except EOFError:
                    results[rank] = ("error", (time.time(), f"rank {rank} died (exit code {procs[rank].exitcode})"))
                if results[rank][0] == "error" and first_error_at is None:
                    first_error_at = time.monotonic()
            elif not procs[rank].is_alive() and not c.poll(0):
                results[rank] = ("error", (time.time(), f"rank {rank} died (exit code {procs[rank].exitcode})"))
                first_error_at = first_error_at or time.monotonic()
        # Peers of a failed rank normally fail within ~2 s; do not wait for the backstop.
        if first_error_at is not None and time.monotonic() - first_error_at > 10:
            break
    grace = time.monotonic() + (2 if len(results) == world_size else 0.2)  # finished ranks exit at once
    for p in procs:
        p.join(timeout=max(0.0, grace - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    # The first error to arrive is the cause; its peers then fail on a closed connection.
    errors = sorted(((v[0], r, v[1]) for r, (k, v) in results.items() if k == "error"))
    hung = [r for r in range(world_size) if r not in results]
    if errors:
        _, r, tb = errors[0]
        others = [o for _, o, _ in errors[1:]]
        raise AssertionError(f"rank {r} of {world_size} failed first (then failed: {others}, hung: {hung}):\n{tb}")
    if hung:
        raise AssertionError(f"ranks {hung} of {world_size} hung for {timeout_s:.0f} s")
    return [results[r][1] for r in range(world_size)]
