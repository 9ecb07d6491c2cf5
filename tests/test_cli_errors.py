"""What the user sees: a mistake is one line on stderr naming the key, file or
rank, exit code 2 and no traceback, in one process and under a pipeline; a
worker that dies or stops is named; a normal run says what it trains, where
it writes and how it ended; a resumed run's metrics hold each step once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from test_resume import SMALL

PP2 = ["parallel=pp2", "parallel.pp.layers.vision=[4,0]", "parallel.pp.layers.audio=[4,0]", "parallel.pp.layers.llm=[2,2]"]
QUICK = ["train.steps=2", "train.global_batch_size=2", "data.max_samples=2", "train.progress=false", *SMALL]


def _omnitrain(args, cwd, timeout=240, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    return subprocess.run([sys.executable, "-m", "omnitrain", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env, **kw)


def _one_line_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    out = r.stdout + r.stderr
    assert "Traceback" not in out, out[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("omnitrain: ")]
    assert len(lines) == 1, r.stderr[-3000:]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("layout", [[], PP2], ids=["single", "pp2"])
def test_config_mistakes_are_one_line(tmp_path, layout):
    r = _omnitrain([*QUICK, *layout, "optim.optimizer.lr=-1", f"hydra.run.dir={tmp_path}/a"], tmp_path)
    _one_line_error(r, "optim.optimizer.lr=-1", "must be > 0")
    # a dataset_info.json whose file_name names a folder
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps({"ds": {"file_name": "sub"}}))
    r = _omnitrain([*QUICK, *layout, f"data.dataset_dir={tmp_path}/data", "data.dataset=ds", f"hydra.run.dir={tmp_path}/c"], tmp_path)
    _one_line_error(r, "dataset 'ds'", "is a folder", "file_name")
    vl = ["model=qwen25_vl", "train.steps=1"] + (["parallel=vl7b_pp2"] if layout else [])
    r = _omnitrain([*vl, "parallel.tp={audio: 1}", f"hydra.run.dir={tmp_path}/b"], tmp_path)
    _one_line_error(r, "parallel.tp.audio", "no audio module", "vision, llm")


def test_resume_with_another_global_batch_is_refused_in_one_line(tmp_path):
    run = tmp_path / "run"
    ok = _omnitrain([*QUICK, "train.save_every=2", f"train.output_dir={run}", f"hydra.run.dir={tmp_path}/h1"], tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    out = ok.stdout + ok.stderr
    # the console: header, run directory, a line per checkpoint, a summary; no deprecation noise
    for word in ("model qwen25_omni", "parameters (vision", "layout single", "run directory: " + str(run),
                 "checkpoint: step 2", "done: 2 steps", "metrics: "):
        assert word in out, (word, out[-3000:])
    assert "FutureWarning" not in out, out[-3000:]
    for layout in ([], PP2):
        r = _omnitrain([*QUICK, *layout, "train.global_batch_size=4", "train.steps=3", f"train.resume={run}",
                        f"train.output_dir={tmp_path}/again", f"hydra.run.dir={tmp_path}/h2"], tmp_path)
        _one_line_error(r, "train.global_batch_size=2", "set train.global_batch_size=2")
    # a checkpoint that does not fit the model (one LLM layer more)
    r = _omnitrain([*QUICK, "model.config.text_config.num_hidden_layers=5", f"train.resume={run}",
                    f"train.output_dir={tmp_path}/deeper", f"hydra.run.dir={tmp_path}/h3"], tmp_path)
    _one_line_error(r, "checkpoint error", "missing")


def test_help_lists_the_user_facing_groups(tmp_path):
    r = _omnitrain(["--help"], tmp_path, timeout=60)
    assert r.returncode == 0
    for word in ("model:", "parallel:", "data:", "qwen25_vl", "vl7b_pp4", "demo_vl", "docs/ADDING_A_MODEL.md"):
        assert word in r.stdout, word
    assert "schema" not in r.stdout


def test_resume_with_more_steps_warns_and_keeps_each_step_once(tmp_path):
    run = tmp_path / "run"
    base = [*QUICK, "train.save_every=1", f"train.output_dir={run}", f"hydra.run.dir={tmp_path}/h"]
    assert _omnitrain(base, tmp_path).returncode == 0
    # a killed run may have logged steps past its last checkpoint: simulate step 3 of 2
    metrics = run / "metrics.jsonl"
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    metrics.write_text(metrics.read_text() + json.dumps({**rows[-1], "step": 3}) + "\n")
    r = _omnitrain([*base[:-2], "train.steps=4", "train.save_every=1", f"train.output_dir={run}", "train.resume=auto",
                    f"hydra.run.dir={tmp_path}/h2"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train.steps 2 -> 4" in r.stdout + r.stderr
    steps = [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4], steps


def _workers_of(parent: subprocess.Popen, deadline: float) -> dict[int, int]:
    """rank -> pid of a self-launched run's 2 workers: the parent's forked
    children (same command line), started in rank order."""
    while time.monotonic() < deadline and parent.poll() is None:
        cmdline = open(f"/proc/{parent.pid}/cmdline", "rb").read()  # read after the exec
        kids = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                status = open(f"/proc/{pid}/status").read()
                same = open(f"/proc/{pid}/cmdline", "rb").read() == cmdline
            except OSError:
                continue
            ppid = next(ln.split()[1] for ln in status.splitlines() if ln.startswith("PPid:"))
            if int(ppid) == parent.pid and same:
                kids.append(int(pid))
        if len(kids) == 2:
            return dict(enumerate(sorted(kids)))
        time.sleep(0.5)
    raise AssertionError(f"workers did not start: {parent.poll()} {parent.stderr.read()[-3000:] if parent.poll() is not None else ''}")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["SIGKILL", "SIGSTOP"])
def test_a_dead_or_stopped_worker_is_named_and_everything_stops(tmp_path, sig):
    args = [*QUICK, *PP2, "train.steps=200", "parallel.heartbeat_s=8", f"hydra.run.dir={tmp_path}/h"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "omnitrain", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        workers = _workers_of(p, time.monotonic() + 180)
        time.sleep(3)
        t0 = time.monotonic()
        os.kill(workers[1], sig)
        _, err = p.communicate(timeout=90)
        assert time.monotonic() - t0 < 90
    finally:
        if p.poll() is None:
            p.kill()
        for pid in locals().get("workers", {}).values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert p.returncode == 2, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("omnitrain: ")]
    assert len(lines) == 1 and lines[0].startswith("omnitrain: rank 1: "), err[-3000:]
    assert ("SIGKILL" if sig == signal.SIGKILL else "stopped responding at step") in lines[0]
    assert "Traceback" not in err
    for pid in workers.values():  # every worker is gone
        assert not os.path.exists(f"/proc/{pid}") or "State:\tZ" in open(f"/proc/{pid}/status").read()
