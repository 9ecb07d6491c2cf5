"""Self-launch of local workers: results, repeat launches, failures, inline runs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from omnitrain import device, launch

SRC = str(Path(__file__).resolve().parents[1] / "src")
CPU = device.detect("cpu")


def _all_reduce(tag):
    rank, world = launch.init_distributed(CPU, timeout_s=30)
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {"rank": rank, "world": world, "sum": t.item(), "tag": tag, "pid": os.getpid()}


def test_four_workers_all_reduce_twice_from_one_process():
    env_before = dict(os.environ)
    first = launch.launch(_all_reduce, 4, "a", timeout_s=30)
    assert first["rank"] == 0 and first["world"] == 4 and first["sum"] == 10.0 and first["tag"] == "a"
    assert first["pid"] != os.getpid()
    # A second launch from the same parent (the next multirun job) must work.
    second = launch.launch(_all_reduce, 4, "b", timeout_s=30)
    assert second["sum"] == 10.0 and second["tag"] == "b"
    assert dict(os.environ) == env_before
    assert not dist.is_initialized()


def _raise_on_rank_2():
    rank, _ = launch.init_distributed(CPU, timeout_s=30)
    if rank == 2:
        raise ValueError(f"bad batch on rank {rank}")
    dist.barrier()  # the others wait on the failed rank
    return rank


def test_failing_rank_stops_all_and_is_reported_once():
    start = time.monotonic()
    with pytest.raises(launch.WorkerFailed) as info:
        launch.launch(_raise_on_rank_2, 4, timeout_s=30)
    assert time.monotonic() - start < 60
    e = info.value
    assert (e.rank, e.exc_type, e.message) == (2, "ValueError", "bad batch on rank 2")
    text = str(e)
    assert text.count("bad batch on rank 2") == 1
    assert "Traceback" in text and "_raise_on_rank_2" in text
    # The process still works afterwards.
    assert launch.launch(_all_reduce, 2, "c", timeout_s=30)["sum"] == 3.0


def _hang_on_rank_1():
    rank, _ = launch.init_distributed(CPU, timeout_s=2)
    if rank == 1:
        time.sleep(120)
    dist.barrier()


def test_hung_rank_is_ended_by_the_group_timeout():
    start = time.monotonic()
    with pytest.raises(launch.WorkerFailed, match="Timed out|timed out|Timeout"):
        launch.launch(_hang_on_rank_1, 2, timeout_s=30)
    assert time.monotonic() - start < 30


def test_one_process_runs_inline_and_can_init_a_world_of_one():
    assert launch.launch(_all_reduce, 1, "inline") == {
        "rank": 0, "world": 1, "sum": 1.0, "tag": "inline", "pid": os.getpid()
    }
    assert not dist.is_initialized()


def test_under_torchrun_world_size_must_match(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", "0")
    with pytest.raises(launch.LaunchError, match=r"parallel=pp4 needs 4 processes but WORLD_SIZE=1"):
        launch.launch(_all_reduce, 4, "x", layout="parallel=pp4")
    # WORLD_SIZE=1 under torchrun: inline, no new processes.
    assert launch.launch(lambda: os.getpid(), 1) == os.getpid()


_MULTIRUN_APP = textwrap.dedent(
    """
    import logging
    import hydra
    from omegaconf import DictConfig
    from omnitrain import device, launch

    log = logging.getLogger("app")

    def work(tag):
        rank, world = launch.init_distributed(device.detect("cpu"), 30)
        log.info("worker %s rank %d of %d", tag, rank, world)
        return world

    @hydra.main(version_base=None, config_path=None, config_name=None)
    def main(cfg: DictConfig) -> None:
        assert launch.launch(work, cfg.n, cfg.tag, timeout_s=30) == cfg.n
        log.info("job %s done", cfg.tag)

    if __name__ == "__main__":
        main()
    """
)


def test_hydra_multirun_launches_per_job_and_workers_log_to_the_job_log(tmp_path):
    app = tmp_path / "app.py"
    app.write_text(_MULTIRUN_APP)
    sweep = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, str(app), "-m", "+n=2", "+tag=j0,j1", f"hydra.sweep.dir={sweep}", "hydra.job.chdir=false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=50,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, tag in enumerate(("j0", "j1")):
        text = (sweep / str(job) / "app.log").read_text()
        assert f"job {tag} done" in text
        assert f"worker {tag} rank 0 of 2" in text and f"worker {tag} rank 1 of 2" in text
