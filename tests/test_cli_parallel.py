"""`python -m omnitrain` from a plain shell: self-launched pipeline workers,
Hydra multirun over layouts, and a failing rank reported once."""

import json
import subprocess
import sys


def _omnitrain(args, cwd, timeout=400):
    return subprocess.run([sys.executable, "-m", "omnitrain", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def test_multirun_over_layouts(tmp_path):
    r = _omnitrain(
        ["-m", "parallel=pp2,pp4_hetero", "train.steps=2", "data.max_samples=4", f"hydra.sweep.dir={tmp_path}/sweep"],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    losses = []
    for job in ("0", "1"):
        rows = [json.loads(line) for line in (tmp_path / "sweep" / job / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == [1, 2]
        assert len(rows[0]["stage_forward_s"]) == (2 if job == "0" else 4)
        assert 0 <= rows[0]["bubble"] < 1
        losses.append([row["loss"] for row in rows])
    # same data, same seed: the layout does not change the losses
    assert all(abs(a - b) / b < 1e-5 for a, b in zip(*losses))


def test_failing_rank_reported_once_with_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(
        '[{"messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "A cat."}],'
        ' "images": ["nope/missing.jpg"]}]'
    )
    r = _omnitrain(["parallel=pp2", f"data.dataset={bad}", "train.steps=1", f"hydra.run.dir={tmp_path}/run"], tmp_path, timeout=120)
    assert r.returncode == 2
    out = r.stdout + r.stderr
    assert out.count("missing.jpg") == 1, out[-3000:]
    assert "sample 0" in out and "Traceback" not in out
