"""Validation (data.eval, train.eval_every): the eval loss is forward only,
the same batches every time, logged to metrics.jsonl; under pp2 and under
ZBV's V of 4 stages on 2 ranks (forward through the pipeline) it equals the
single process's."""

from __future__ import annotations

import functools
import json

import pytest

import _synth
from omnitrain import launch
from omnitrain.config import ConfigError, validate
from omnitrain.train.worker import worker
from test_resume import PP2, _cfg, _loader

# Two stages per rank in a V: rank 0 runs the encoders (stage 0) and the head (stage 3).
PP2_ZBV = [
    "parallel=pp2", "parallel.pp.schedule=zbv", "parallel.pp.virtual_stages=2",
    "parallel.pp.layers.vision=[4,0,0,0]", "parallel.pp.layers.audio=[2,2,0,0]", "parallel.pp.layers.llm=[0,1,2,1]",
]

# Validation samples: other kinds and positions than the training stream's.
EVAL_KINDS = [dict(text=30), dict(image=(1, 4, 8), text=12), dict(audio=240, text=10)]


def _eval_loader(dp_rank, dp_size):
    return _synth.SynthLoader(global_batch_size=2, micro_batch_size=1, dp_rank=dp_rank, dp_size=dp_size, kinds=EVAL_KINDS)


def _run(tmp_path, name, layout):
    run = tmp_path / name
    cfg = _cfg(run, [*layout, "data.eval=[my_eval]", "train.eval_every=1", "train.eval_batches=2"], steps=2)
    rows = launch.launch(worker, 2 if layout != ["parallel=single"] else 1, cfg, _loader, None, _eval_loader)
    return rows, [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_eval_loss_pp2_and_zbv_equal_single_and_is_logged(tmp_path):
    single, logged = _run(tmp_path, "single", ["parallel=single"])
    ev = [r["eval_loss"] for r in single]
    assert len(ev) == 2 and ev[0] != ev[1]  # evaluated after each step, the model changed between
    assert [r["eval_tokens"] for r in single][0] > 0
    for name, layout in (("pp2", PP2), ("zbv", PP2_ZBV)):
        rows, _ = _run(tmp_path, name, layout)
        for key in ("eval_loss", "loss"):
            for a, b in zip([r[key] for r in rows], [r[key] for r in single], strict=True):
                assert abs(a - b) / abs(b) < 1e-5, (name, key, rows, single)
    rows = [r for r in logged if "eval_loss" in r]
    assert [r["step"] for r in rows] == [1, 2] and [r["eval_loss"] for r in rows] == pytest.approx(ev)
    # training losses are untouched by the evaluation in between
    assert all("loss" in r for r in logged if "eval_loss" not in r)


def test_eval_every_needs_eval_data(tmp_path):
    from conftest import compose_cfg

    with pytest.raises(ConfigError, match=r"train.eval_every=5: no validation data; set data.eval"):
        validate(compose_cfg(["train.eval_every=5"]))


def test_eval_fraction_holds_out_a_fixed_disjoint_part(tmp_path):
    """data.eval_fraction: per dataset a seed-fixed part held out, never
    trained on; the run validates on it and logs the loss."""
    from data_fixtures.helpers import data_cfg

    from omnitrain.data.dataset import build_index

    cfg = data_cfg(dataset="mllm_demo,mllm_audio_demo", eval_fraction=0.25)

    def ids(split, seed=7):
        return [[e.index for e in ex] for ex in build_index(cfg, split, seed).examples]

    full, train, held = ids(None), ids("train"), ids("eval")
    for f, t, e in zip(full, train, held):
        assert t and e and not set(t) & set(e) and sorted(t + e) == f, (f, t, e)
        assert len(e) == max(1, round(len(f) * 0.25))
    assert ids("eval") == held and ids("train") == train  # deterministic
    assert [ids("eval", seed) for seed in range(8)] != [held] * 8  # drawn by the seed
    with pytest.raises(ConfigError, match=r"data.eval_fraction=1.5: must be in \(0, 1\)"):
        validate(_cfg(tmp_path / "x", ["data.eval_fraction=1.5"]))
    with pytest.raises(ConfigError, match=r"data.eval_fraction=0.5 and data.eval=\['a'\]: .* not both"):
        validate(_cfg(tmp_path / "y", ["data.eval_fraction=0.5", "data.eval=[a]"]))

    run = tmp_path / "run"
    cfg = _cfg(run, ["parallel=single", "data.dataset=mllm_demo", "data.eval_fraction=0.5", "train.eval_every=1", "train.eval_batches=1"], steps=1)
    rows = launch.launch(worker, 1, cfg)
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["eval_loss"] > 0 and any(r.get("eval_loss") == pytest.approx(rows[0]["eval_loss"]) for r in logged)
