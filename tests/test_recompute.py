"""Activation recompute per module (train/recompute.py): which layers a stage
wraps, config errors, and that full / selective recompute change no loss or
gradient while the measured peak memory of a step goes down (printed)."""

from __future__ import annotations

import sys

import pytest

from conftest import TESTS, compose_cfg, stage_plan
from omnitrain.config import ConfigError
from omnitrain.models.family import build_family
from omnitrain.train import recompute
from test_resume import SMALL

sys.path.insert(0, str(TESTS.parent / "scripts"))


def test_layers_to_wrap_takes_the_first_n_of_each_stage():
    cfg = compose_cfg([*SMALL, "train.recompute.llm=full", "train.recompute_layers.llm=1", "train.recompute.vision=selective"])
    fam = build_family(cfg.model)
    plans = [stage_plan(vision=(0, 4), llm=(0, 2), merge=True), stage_plan(llm=(2, 4), head=True)]
    got = recompute.layers_to_wrap(recompute.parse(cfg.train, fam), fam, plans)
    vision = [(f"model.visual.blocks.{i}", "selective") for i in range(4)]
    llm = [("model.language_model.layers.0", "full"), ("model.language_model.layers.2", "full")]
    assert sorted(got) == sorted(vision + llm)


@pytest.mark.parametrize(
    "override, match",
    [
        ("train.recompute.llm=some", r"train.recompute.llm='some': use one of none, full, selective"),
        ("train.recompute_layers.llm=2", r"train.recompute_layers.llm=2: train.recompute.llm is none"),
    ],
)
def test_recompute_config_errors(override, match):
    cfg = compose_cfg([*SMALL, override])
    with pytest.raises(ConfigError, match=match):
        recompute.parse(cfg.train, build_family(cfg.model))
    with pytest.raises(ConfigError, match=r"train.recompute.audio: unknown module; model qwen2_vl has vision, llm"):
        c = compose_cfg(["model=qwen2_vl", "train.recompute.audio=full"])
        recompute.parse(c.train, build_family(c.model))


def test_recompute_changes_no_number_and_lowers_peak_memory():
    import _synth
    from bench_recompute import measure, saved_bytes

    # scripts/bench_recompute.py prints the peak of every mode (CPU profiler,
    # seconds per step); here the activations held for backward are measured
    # by autograd's saved-tensor hooks (exact for none and full).
    mb = _synth.collate([_synth.sample(1, image=(1, 4, 8), audio=240, text=40)])
    res = measure(SMALL, batch=mb, meter=saved_bytes)
    loss, grads, held = res["none"]
    for mode in ("full", "selective"):
        l2, g2, _ = res[mode]
        assert l2 == pytest.approx(loss, rel=1e-6)
        assert g2.keys() == grads.keys()
        for k, g in grads.items():
            assert float((g2[k] - g).norm() / g.norm().clamp_min(1e-30)) < 1e-6, (mode, k)
    full = res["full"][2]
    print(f"recompute=full: activations held for backward {full / 2**20:.2f} MiB vs none {held / 2**20:.2f} MiB ({full / held:.3f} x)")
    assert full < held  # (most of what is left is the head's logits: 152,064-wide, outside every layer)
