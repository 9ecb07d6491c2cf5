"""TP and FSDP layouts reproduce the single-process losses and final
parameters (CPU, fp32), like tests/test_pipeline_parity.py: 3 steps of
mixed-modality micro-batches of one sample, through the real loop and launch.

The global batch is 4 (not 6) so that fsdp4 divides it; the reference is
computed with the same batch. Sharded (DTensor) parameters are gathered to
full tensors before they are compared.
"""

from __future__ import annotations

import pytest
import torch
from _layouts import check_parity, run_layouts, selected
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
    # FSDP over TP shards (2-D: a colwise weight is FSDP-sharded within its TP shard)
    "fsdp2_tp2": ["parallel=tp2", "parallel.dp=2", "parallel.dp_mode=fsdp"],
    # sequence parallel: norms on sequence shards, shards cross the pipeline cut
    "tp2_sp": ["parallel=tp2", "parallel.sequence_parallel=true"],
    "pp2_tp2_sp": ["parallel=pp2_tp2", "parallel.sequence_parallel=true"],
    # split backward over DTensor weights (and SP norms' Partial grads)
    "pp2_tp2_sp_zero_bubble": ["parallel=pp2_tp2", "parallel.sequence_parallel=true", "parallel.pp.schedule=zero_bubble"],
    # sharded state in host memory: the same arithmetic, so the same parity
    "fsdp2_offload": ["parallel=fsdp4", "parallel.dp=2", "parallel.fsdp.cpu_offload=true"],
}


BF16 = ["parallel=fsdp4", "parallel.dp=2", "parallel.fsdp.mixed_precision=bf16"]


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """The selected layouts (and the bf16 run if its test is selected), run by
    one launch per process count (_layouts.run_layouts): each as alone."""
    needs = lambda test, params: ["fsdp2_bf16"] if "bf16" in test else [params.get("name")]  # noqa: E731
    layouts = selected(request, {**LAYOUTS, "fsdp2_bf16": BF16}, needs)
    return run_layouts(tmp_path_factory.mktemp("layouts"), layouts, steps=STEPS, global_batch=GLOBAL)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(runs, reference, name):
    tensor_tol = 1e-4 if "tp" in name else 1e-5  # see check_parity
    check_parity(runs[name], reference, STEPS, name, tensor_tol=tensor_tol)


def test_fsdp_bf16_mixed_precision_trains_close_to_fp32(runs, reference):
    # bf16 gathers and computes (8 mantissa bits), fp32 master weights and
    # grad reduction: close to the fp32 run, not equal (measured 5e-5 on the
    # losses, 6e-3 on grad norms), and the kept parameters stay fp32.
    losses, norms, params = runs["fsdp2_bf16"]
    ref_losses, ref_norms, ref_params = reference
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) / abs(b) < 1e-3
    for a, b in zip(norms, ref_norms):
        assert abs(a - b) / abs(b) < 5e-2
    assert all(p.dtype == torch.float32 for p in params.values())
    assert losses != ref_losses  # bf16 really ran: the numbers moved
