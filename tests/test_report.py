"""A sweep of two layouts end to end (one with `parallel.pp.layers=auto`):
the report lists both, the auto split is stored in the job's config, and
the planner compares its prediction with the pipeline job's measured times.
Runs the thinker at 4 blocks per module: the sweep, report and auto split are
the subject; test_plan_auto.py covers auto at the shipped families' depths."""

import subprocess
import sys

import yaml

from conftest import OMNI_SMALL

TOKENS = ["plan.tokens.image=16", "plan.tokens.audio=50", "plan.tokens.video=12", "plan.tokens.text=60"]


def test_sweep_report_and_compare(tmp_path):
    sweep = tmp_path / "sweep"
    r = subprocess.run(
        [sys.executable, "-m", "omnitrain", "-m", "parallel=single,pp2", "parallel.pp.layers=auto", "train.steps=2",
         "data.max_samples=4", *OMNI_SMALL, *TOKENS, f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "parallel.pp.layers=auto ->" in r.stdout + r.stderr
    saved = yaml.safe_load((sweep / "1" / "config.yaml").read_text())["parallel"]
    assert saved["pp"]["size"] == 2 and sum(saved["pp"]["layers"]["llm"]) == 4  # the run can be repeated as is

    from omnitrain import report

    jobs = report.collect(sweep)
    assert sorted(j.name for j in jobs) == ["0", "1"]
    assert jobs[0].tokens_per_s >= jobs[1].tokens_per_s  # fastest first
    assert all(j.predicted_s and j.predicted_s > 0 for j in jobs)
    text = report.table(jobs)
    assert "single" in text and "pp2 vision=" in text
    pp2 = next(j for j in jobs if j.name == "1")
    assert len(pp2.stage_mem_gib) == 2 and pp2.final_loss > 0
    assert report.main([str(sweep), "--png", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.png").stat().st_size > 1000

    from omnitrain.plan.compare import compare

    out = compare(sweep / "1")
    assert "predicted vs measured" in out and "fwd run" in out and "bubble: predicted" in out
