"""Every layout reproduces the single-process losses and final parameters
(CPU, gloo, fp32): 3 optimizer steps of 4+ micro-batches mixing images,
video, audio and text-only samples of varying lengths, through the real
training loop and the real worker launch."""

from __future__ import annotations

import pytest
import torch

from _layouts import check_parity, run_layout, run_layouts, selected
from _layouts import rel as _rel

STEPS, GLOBAL = 3, 6
REL = 1e-5


def _run(tmp_path, name, overrides, micro=1):
    return run_layout(tmp_path / name, overrides, steps=STEPS, global_batch=GLOBAL, micro=micro)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("ref"), "single", ["parallel=single"])


LAYOUTS = {
    "pp2_1f1b": ["parallel=pp2"],
    "pp2_gpipe": ["parallel=pp2", "parallel.pp.schedule=gpipe"],
    "pp4_hetero_1f1b": ["parallel=pp4_hetero"],
    "pp4_hetero_gpipe": ["parallel=pp4_hetero", "parallel.pp.schedule=gpipe"],
    "pp4_uniform": ["parallel=pp4_uniform"],
    # split backward; stages 1-2 hold encoders on raw data next to received activations
    "pp4_hetero_zero_bubble": ["parallel=pp4_hetero", "parallel.pp.schedule=zero_bubble"],
    # vision split over two stages; audio and LLM share stage 2
    "vision_split": [
        "parallel=pp4_hetero",
        "parallel.pp.layers.vision=[20,12,0,0]",
        "parallel.pp.layers.audio=[0,16,16,0]",
        "parallel.pp.layers.llm=[0,0,10,18]",
    ],
    # everything shares stage 0 with the first LLM layers
    "encoders_with_llm": ["parallel=pp2", "parallel.pp.layers.llm=[3,25]"],
    "dp2": ["parallel=dp2"],
    "pp2_dp2": ["parallel=pp2", "parallel.dp=2"],
    # two stages per rank in a V: rank 0 holds the encoders and the head, rank 1 the V's turn
    "zbv": [
        "parallel=pp2",
        "parallel.pp.schedule=zbv",
        "parallel.pp.virtual_stages=2",
        "parallel.pp.layers.vision=[32,0,0,0]",
        "parallel.pp.layers.audio=[16,16,0,0]",
        "parallel.pp.layers.llm=[0,4,12,12]",
    ],
    "interleaved": [
        "parallel=pp2",
        "parallel.pp.schedule=interleaved_1f1b",
        "parallel.pp.virtual_stages=2",
        "parallel.pp.layers.vision=[32,0,0,0]",
        "parallel.pp.layers.audio=[16,16,0,0]",
        "parallel.pp.layers.llm=[0,4,12,12]",
    ],
}


FROZEN = ["model.trainable.vision=false"]


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """The selected layouts (and the frozen pp4 and micro-batch-3 runs if their
    tests are selected), one launch per process count (_layouts.run_layouts): each as alone."""
    extra = {"pp4_frozen": ["parallel=pp4_hetero", *FROZEN], "micro3_dp2": (["parallel=dp2"], {"micro": 3})}
    by_test = {"test_frozen_vision_stage_gets_a_noop_optimizer": ["pp4_frozen"], "test_micro_batch_size_does_not_change_the_step": ["micro3_dp2"]}
    needs = lambda test, params: by_test.get(test, [params.get("name")])  # noqa: E731
    layouts = selected(request, {**LAYOUTS, **extra}, needs)
    return run_layouts(tmp_path_factory.mktemp("layouts"), layouts, steps=STEPS, global_batch=GLOBAL)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(runs, reference, name):
    check_parity(runs[name], reference, STEPS, name)


def test_micro_batch_size_does_not_change_the_step(runs, reference):
    # Padded batches of 2 or 3 change the kernels' shapes (rounding), so only
    # the losses are compared here; the layouts above use one sample per micro-batch.
    losses, _, _ = runs["micro3_dp2"]
    assert len(losses) == STEPS, losses
    for a, b in zip(losses, reference[0]):
        assert abs(a - b) / abs(b) < REL


def test_frozen_vision_stage_gets_a_noop_optimizer(tmp_path, runs):
    # pp4_hetero puts only vision on stage 0: frozen, that stage owns no
    # trainable parameter and must still run its part of every step.
    ref_losses, _, ref_params = _run(tmp_path, "single_frozen", ["parallel=single", *FROZEN])
    losses, _, params = runs["pp4_frozen"]
    assert len(losses) == len(ref_losses) == STEPS, (losses, ref_losses)
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) / abs(b) < REL
    vision = [k for k in ref_params if k.startswith("model.visual.")]
    assert vision and all(torch.equal(params[k], ref_params[k]) for k in vision)
    assert max(_rel(params[k], ref_params[k]) for k in ref_params) < REL
