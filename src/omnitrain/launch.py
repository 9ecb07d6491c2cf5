"""Start the processes a layout needs and set up torch.distributed in each.

`python -m omnitrain` with a layout of N > 1 processes forks N local workers
through torch.distributed.elastic (forking the parent that already imported
torch and transformers costs < 1 s, torchrun ~4 s per process). Under
torchrun the environment already names the ranks and `launch` only checks
that the world size matches the layout.

A failing worker is reported once, as `WorkerFailed` in the parent, carrying
the first failing rank's exception and traceback; elastic's own per-rank
report is silenced because it repeats the same failure several times.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# The c10d rendezvous modules are imported lazily by elastic; import them now so
# their loggers exist when `_quiet_elastic` lowers them.
import torch.distributed.elastic.rendezvous.c10d_rendezvous_backend  # noqa: F401
import torch.distributed.elastic.rendezvous.dynamic_rendezvous  # noqa: F401
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from omnitrain import device
from omnitrain.errors import UserError

__all__ = ["LaunchError", "WorkerFailed", "destroy", "in_distributed_env", "init_distributed", "launch"]

logger = logging.getLogger(__name__)

# Seconds between elastic's checks of the workers: a failure is noticed this fast.
_MONITOR_S = 0.1
# Seconds a stopped worker gets between SIGTERM and SIGKILL. Workers die on
# SIGTERM at once (see `_worker`), so this only matters for one stuck in the kernel.
_SHUTDOWN_S = 5
# Seconds between a worker's heartbeats (a file the parent watches).
_BEAT_S = 2.0
# The step a worker is at, for the parent's message when it stops answering.
_progress = {"step": 0}


def report_step(step: int) -> None:
    """The training loop says where it is (written with the next heartbeat)."""
    _progress["step"] = step


class LaunchError(UserError, RuntimeError):
    """The processes that were started do not fit the layout."""

    kind = "launch error"


class WorkerFailed(RuntimeError):
    """A worker process failed; holds the first failing rank's error.

    The message is the summary line followed by the worker's traceback, so
    printing the exception shows the failure exactly once.
    """

    def __init__(self, rank: int, world_size: int, exc_type: str, message: str, tb: str):
        self.rank, self.world_size = rank, world_size
        self.exc_type, self.message, self.traceback = exc_type, message, tb
        head = f"rank {rank} of {world_size} failed"
        super().__init__(f"{head}; its traceback:\n{tb.rstrip()}" if tb else f"{head}: {message}")


def in_distributed_env() -> bool:
    """True when a launcher (torchrun, our own workers) named this process's rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(
    fn: Callable[..., Any],
    nprocs: int,
    *args: Any,
    timeout_s: float = 300,
    layout: str = "this layout",
    start_method: str | None = None,
    heartbeat_s: float = 60,
) -> Any:
    """Run `fn(*args)` on `nprocs` ranks and return rank 0's result.

    - Under torchrun (RANK/WORLD_SIZE set): run in this process; WORLD_SIZE
      must equal nprocs. Returns this rank's result.
    - nprocs == 1 without that environment: run in this process.
    - Otherwise fork nprocs local workers; `timeout_s` bounds their start-up.
      `fn` calls `init_distributed` itself.

    `layout` names the layout in the world-size error. `start_method` defaults
    to fork, or spawn when this process already holds an accelerator context
    (a forked child cannot use it). A local worker whose heartbeat is older
    than `heartbeat_s` (stopped, frozen) ends the launch, naming its rank and
    step, long before a collective would time out.
    """
    if nprocs < 1:
        raise LaunchError(f"{layout} needs {nprocs} processes: must be >= 1")
    if in_distributed_env():
        world = int(os.environ["WORLD_SIZE"])
        if world != nprocs:
            raise LaunchError(
                f"{layout} needs {nprocs} processes but WORLD_SIZE={world}: "
                f"start torchrun with nnodes x nproc-per-node = {nprocs}"
            )
        return _run_inline(fn, args)
    if nprocs == 1:
        return _run_inline(fn, args)
    if start_method is None:
        start_method = "spawn" if device.accelerator_initialized() else "fork"
    return _launch_local(fn, nprocs, args, timeout_s, start_method, heartbeat_s)


def init_distributed(dev: device.DeviceInfo, timeout_s: float = 300) -> tuple[int, int]:
    """Create the default process group for `dev`; returns (rank, world_size).

    Without a launcher environment this is a world of one on an in-memory
    store, so single-process code paths can use collectives unchanged.
    A collective that waits longer than `timeout_s` raises (ends hung ranks).
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    device.set_device(dev.torch_device(device.local_rank()))
    timeout = timedelta(seconds=timeout_s)
    backend = device.backend_for(dev)
    if in_distributed_env():
        dist.init_process_group(backend, timeout=timeout)
    else:
        # No env, no port: a world of one needs no rendezvous.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def destroy() -> None:
    """Tear down the default process group if there is one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _run_inline(fn: Callable[..., Any], args: tuple) -> Any:
    try:
        return fn(*args)
    finally:
        # A group left behind would make the next multirun job's init fail.
        destroy()


def _launch_local(fn: Callable[..., Any], nprocs: int, args: tuple, timeout_s: float, start_method: str, heartbeat_s: float) -> Any:
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nprocs,
        run_id=f"omnitrain-{uuid.uuid4().hex[:12]}",
        # Port 0: the agent's store picks a free port and the workers join it
        # (TORCHELASTIC_USE_AGENT_STORE), so there is no port to race for.
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        rdzv_configs={"timeout": int(timeout_s)},
        max_restarts=0,
        monitor_interval=_MONITOR_S,
        start_method=start_method,
        shutdown_timeout=_SHUTDOWN_S,
    )
    # Elastic changes env vars and signal handlers of this process; undo both so
    # a later launch (the next multirun job) starts from the same state.
    env_before = dict(os.environ)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)}
    if start_method == "fork":
        _import_for_workers()
    # Buffered output would otherwise be copied into every forked child.
    sys.stdout.flush()
    sys.stderr.flush()
    # Free garbage here, not in a forked child: a dead launch's store still has
    # C++ threads in this process, and destroying it in a child segfaults.
    gc.collect()
    with tempfile.TemporaryDirectory(prefix="omnitrain-launch-") as tmp:
        config.logs_specs = DefaultLogsSpecs(log_dir=str(Path(tmp) / "elastic"))
        err_dir = Path(tmp) / "errors"
        err_dir.mkdir()
        (Path(tmp) / "started").mkdir()
        (Path(tmp) / "beats").mkdir()
        threads = _worker_threads(nprocs)
        watch = _Watchdog(Path(tmp), nprocs, heartbeat_s)
        try:
            with _quiet_elastic(), watch:
                results = elastic_launch(config, _worker)(fn, tmp, nprocs, threads, timeout_s, *args)
        except ChildFailedError as e:
            raise _first_failure(e, err_dir, nprocs) from None
        except SignalException as e:
            # Ctrl-C / SIGTERM to the parent: elastic already stopped the workers.
            raise KeyboardInterrupt(str(e)) from None
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            for k in set(os.environ) - set(env_before):
                del os.environ[k]
            os.environ.update(env_before)
    return results[0]


def _import_for_workers() -> None:
    """Import once, before forking, what every worker would otherwise import
    on its own after the fork: DTensor and the device mesh, which imports
    torch._dynamo (and sympy) lazily on its first sub-mesh. ~2 s of CPU per
    worker, paid by each of N workers sharing the cores."""
    import torch._dynamo  # noqa: F401
    import torch.distributed.device_mesh  # noqa: F401
    import torch.distributed.tensor  # noqa: F401


def _worker_threads(nprocs: int) -> int:
    """Intra-op threads per worker: share this process's cores, unless the user set OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" in os.environ:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // nprocs)


def _worker(fn: Callable[..., Any], tmp: str, nprocs: int, threads: int, timeout_s: float, *args: Any) -> Any:
    """Body of every local worker: record the first error where the parent finds it."""
    # Die on SIGTERM at once, even inside a blocking collective, instead of
    # raising elastic's SignalException once the call returns.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    # Objects inherited from the parent are the parent's to free (see gc.collect there).
    gc.freeze()
    if threads:
        torch.set_num_threads(threads)
    try:
        _wait_for_siblings(Path(tmp) / "started", nprocs, timeout_s)
        _start_heartbeat(Path(tmp) / "beats")
        result = fn(*args)
    except Exception as e:
        record = {
            "rank": int(os.environ.get("RANK", "-1")),
            "time": time.time(),
            "type": type(e).__name__,
            "message": str(e),
            # Drop this wrapper's frame: the traceback starts in fn.
            "traceback": "".join(traceback.format_exception(type(e), e, e.__traceback__.tb_next)),
        }
        path = Path(tmp) / "errors" / f"rank{record['rank']}.json"
        path.with_suffix(".tmp").write_text(json.dumps(record))
        path.with_suffix(".tmp").rename(path)
        raise
    # Only on success: after a failure, tearing down a group whose peers are
    # gone can block, and the process exits anyway.
    destroy()
    return result


def _wait_for_siblings(started: Path, nprocs: int, timeout_s: float) -> None:
    """Return once every local worker has been forked.

    While a worker talks to the parent's store, a store thread there may hold
    glibc's resolver lock; a child forked at that moment inherits it locked
    and deadlocks in its first getaddrinfo. So nobody connects until the
    parent is done forking.
    """
    (started / os.environ.get("LOCAL_RANK", "0")).touch()
    deadline = time.monotonic() + timeout_s
    while (n := sum(1 for _ in started.iterdir())) < nprocs:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {n} of {nprocs} local workers started within {timeout_s} s")
        time.sleep(0.005)


def _start_heartbeat(beats: Path) -> None:
    """A daemon thread that touches beats/<rank> with the current step: a
    stopped or frozen process stops beating, which the parent notices."""
    import threading

    rank = os.environ.get("RANK", "0")

    def beat():
        while True:
            tmp = beats / f".{rank}"
            tmp.write_text(json.dumps({"step": _progress["step"], "pid": os.getpid(), "time": time.time()}))
            tmp.replace(beats / rank)
            time.sleep(_BEAT_S)

    threading.Thread(target=beat, name="omnitrain-heartbeat", daemon=True).start()


class _Watchdog:
    """In the parent while workers run: a worker whose heartbeat is older than
    `limit_s` is recorded as the failure and every worker is killed (elastic
    then ends the launch with ChildFailedError)."""

    def __init__(self, tmp: Path, nprocs: int, limit_s: float):
        import threading

        self.tmp, self.nprocs, self.limit = tmp, nprocs, limit_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="omnitrain-watchdog", daemon=True)

    def __enter__(self):
        if self.limit > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()

    def _run(self):
        beats = self.tmp / "beats"
        while not self._stop.wait(1.0):
            seen = {}
            for f in beats.glob("[0-9]*"):
                try:
                    seen[int(f.name)] = json.loads(f.read_text())
                except (OSError, ValueError):  # being replaced
                    continue
            now = time.time()
            stale = [(r, b) for r, b in seen.items() if now - b["time"] > self.limit]
            if not stale:
                continue
            rank, b = min(stale)
            record = {
                "rank": rank,
                "time": 0.0,  # before any error its peers raise once it is gone
                "type": "WorkerHung",
                "message": f"stopped responding at step {b['step'] + 1} (no heartbeat for {now - b['time']:.0f} s; "
                f"parallel.heartbeat_s={self.limit:g}): is it stopped (SIGSTOP), swapping or stuck?",
                "traceback": "",
            }
            (self.tmp / "errors" / f"rank{rank}.json").write_text(json.dumps(record))
            for other in seen.values():
                try:
                    os.kill(other["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return


def _first_failure(e: ChildFailedError, err_dir: Path, nprocs: int) -> WorkerFailed:
    """The root cause: a rank killed by a signal, else the earliest recorded
    exception (later ones are peers losing it)."""
    records = {r["rank"]: r for r in (json.loads(p.read_text()) for p in err_dir.glob("rank*.json"))}
    hung = [r for r in records.values() if r["type"] == "WorkerHung"]
    if hung:
        r = hung[0]
        return WorkerFailed(r["rank"], nprocs, r["type"], r["message"], "")
    # A worker that died by a signal raised nothing; its peers then fail on the lost connection.
    killed = [(f.timestamp, rank, f) for rank, f in e.failures.items() if f.exitcode < 0 and rank not in records]
    if killed:
        _, rank, failure = min(killed, key=lambda k: k[:2])
        return WorkerFailed(rank, nprocs, "ProcessExited", f"died with signal {failure.signal_name()}", "")
    if records:
        r = min(records.values(), key=lambda r: r["time"])
        return WorkerFailed(r["rank"], nprocs, r["type"], r["message"], r["traceback"])
    rank, failure = e.get_first_failure()
    how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
    return WorkerFailed(rank, nprocs, "ProcessExited", f"died with {how}", "")


class _quiet_elastic:
    """Silence elastic's loggers in this process while it runs the workers.

    Elastic logs each failure several times (agent, process context, launcher);
    `WorkerFailed` reports it once instead.
    """

    _PREFIX = "torch.distributed.elastic"

    def __enter__(self):
        loggers = [logging.getLogger(self._PREFIX)]
        loggers += [
            lg
            for name, lg in logging.root.manager.loggerDict.items()
            if name.startswith(self._PREFIX + ".") and isinstance(lg, logging.Logger)
        ]
        # torch.multiprocessing logs each worker it terminates.
        loggers += [logging.getLogger(n) for n in ("torch.distributed.launcher.api", "torch.multiprocessing.spawn")]
        self._levels = {lg: lg.level for lg in loggers}
        for lg in loggers:
            lg.setLevel(logging.CRITICAL + 1)
        return self

    def __exit__(self, *exc):
        for lg, level in self._levels.items():
            lg.setLevel(level)
