"""TP and FSDP layouts reproduce the single-process losses and final
parameters (CPU, fp32), like tests/test_pipeline_parity.py: 3 steps of
mixed-modality micro-batches of one sample, through the real loop and launch.

The global batch is 4 (not 6) so that fsdp4 divides it; the reference is
computed with the same batch. Sharded (DTensor) parameters are gathered to
full tensors before they are compared.
"""

from __future__ import annotations

import pytest
from _layouts import check_parity
from _layouts import run_layout as _run_layout

STEPS, GLOBAL = 3, 4


def run_layout(tmp_path, name, overrides, micro=1):
    return _run_layout(tmp_path / name, overrides, steps=STEPS, global_batch=GLOBAL, micro=micro)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run_layout(tmp_path_factory.mktemp("ref"), "single", ["parallel=single"])


LAYOUTS = {
    "fsdp4": ["parallel=fsdp4"],
    "tp2": ["parallel=tp2"],
    "pp2_tp2": ["parallel=pp2_tp2"],
    "dp2_tp2": ["parallel=tp2", "parallel.dp=2"],
    "fsdp2_pp2": ["parallel=pp2", "parallel.dp=2", "parallel.dp_mode=fsdp"],
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(tmp_path, reference, name):
    check_parity(run_layout(tmp_path, name, LAYOUTS[name]), reference, STEPS, name)
