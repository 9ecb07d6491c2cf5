"""The training loop end to end on the real demo data (single process)."""

import json
import math
import subprocess
import sys

import pytest

from conftest import OMNI_SMALL, compose_cfg
from omnitrain.train.optim import lr_lambda
from omnitrain.train.worker import worker


def _train(tmp_path, *overrides):
    # 4-layer modules: these tests are about the loop (determinism, autocast,
    # accumulation, warmup); the CLI test below runs the real depths.
    cfg = compose_cfg(["data.max_samples=4", *OMNI_SMALL, *overrides], output_dir=tmp_path)
    return worker(cfg)


def test_cli_writes_run_dir_and_metrics(tmp_path):
    run = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "omnitrain", "train.steps=3", "data.max_samples=4", f"hydra.run.dir={run}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    for key in ("step", "loss", "grad_norm", "lr", "tokens", "step_time_s", "tokens_per_s"):
        assert all(math.isfinite(row[key]) for row in rows), key
    assert "step 3/3 | loss" in r.stdout
    assert "steps: 3" in (run / "config.yaml").read_text()


@pytest.fixture(scope="module")
def fp32_losses(tmp_path_factory):
    """2 fp32 steps at the default seed: the determinism test's first run and
    the bf16 test's fp32 baseline (one run fewer than each running its own)."""
    return [r["loss"] for r in _train(tmp_path_factory.mktemp("fp32"), "train.steps=2")]


def test_same_seed_same_losses_and_seed_matters(tmp_path, fp32_losses):
    a = fp32_losses
    b = [r["loss"] for r in _train(tmp_path / "b", "train.steps=2")]
    c = [r["loss"] for r in _train(tmp_path / "c", "train.steps=1", "train.seed=99")]
    assert a == b and a[0] != a[1]
    assert a[0] != c[0]  # another seed: another init, so the first loss already differs


def test_bf16_autocast_trains(tmp_path, fp32_losses):
    fp32 = fp32_losses[0]
    bf16 = _train(tmp_path / "bf16", "train.steps=1", "train.dtype=bf16")[0]["loss"]
    assert math.isfinite(bf16)
    assert bf16 != fp32 and abs(bf16 - fp32) / fp32 < 2e-2


def test_loss_falls_with_accumulation(tmp_path):
    rows = _train(tmp_path, "train.steps=5", "train.global_batch_size=4", "train.micro_batch_size=2", "optim.scheduler.warmup_steps=2")
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1
    assert rows[0]["lr"] < rows[1]["lr"]  # warmup


@pytest.mark.parametrize("kind", ["cosine", "constant"])
def test_lr_schedule_shape(kind):
    lrs = [lr_lambda(s, warmup=3, total=10, min_ratio=0.1, kind=kind) for s in range(10)]
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    if kind == "cosine":
        assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
        assert lrs[-1] > 0.1 and lr_lambda(10, warmup=3, total=10, min_ratio=0.1, kind=kind) == pytest.approx(0.1)
    else:
        assert lrs[3:] == [1.0] * 7
