"""Per-module TP sizes reproduce the single-process run (CPU, fp32, 3 steps
of mixed-modality micro-batches of 2 samples): encoders with fewer TP ranks
than the LLM encode parts of each micro-batch and all-gather the features
(parallel/redistribute.py); their grads are summed over their own, larger
dp groups. Same checks as tests/test_tp_fsdp_parity.py.
"""

from __future__ import annotations

import pytest

from _layouts import check_parity, run_layout, run_layouts, selected

STEPS, GLOBAL, MICRO = 3, 8, 2


def _run(tmp_path, name, overrides):
    return run_layout(tmp_path / name, overrides, steps=STEPS, global_batch=GLOBAL, micro=MICRO)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("ref"), "single", ["parallel=single"])


LAYOUTS = {
    # one stage: vision dp4 tp1, audio and LLM dp2 tp2
    "hetero_tp": ["parallel=hetero_tp"],
    # both encoders tp1: both split their parts and gather; with sequence parallel
    "hetero_tp_audio1_sp": ["parallel=hetero_tp", "parallel.tp.audio=1", "parallel.sequence_parallel=true"],
    # four stages of (dp1, LLM tp2, encoders tp1 x 2 parts): 8 processes
    "pp4_tp2_hetero": ["parallel=pp4_tp2_hetero"],
}


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """The selected layouts, one launch per process count (_layouts.run_layouts)."""
    return run_layouts(tmp_path_factory.mktemp("layouts"), selected(request, LAYOUTS), steps=STEPS, global_batch=GLOBAL, micro=MICRO)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(runs, reference, name):
    check_parity(runs[name], reference, STEPS, name, tensor_tol=1e-4)  # see check_parity
