"""The vision-language families (Qwen2.5-VL, Qwen2-VL; tiny widths, real
depths 32 vision / 28 LLM) reproduce the single-process run under every
layout written for them (CPU, gloo, fp32), like the Omni thinker's parity
tests: 3 optimizer steps of micro-batches of 2 samples mixing images,
videos, image+video and text-only samples (some micro-batches have no media
at all), through the real training loop and worker launch. Same bounds as
tests/test_pipeline_parity.py and tests/test_tp_fsdp_parity.py (1e-5; TP
layouts per tensor 1e-4, see _layouts.check_parity).

TP shards the vision tower's fused qkv projection per third
(parallel/tp.FusedColwise); the checkpoint tests show its shards are saved
in HF's row order (a checkpoint saved under TP or a pipeline resumes as one
process).
"""

from __future__ import annotations

import pytest
import torch

import _synth
from _layouts import check_parity, rel, run_layout, run_layouts, selected
from conftest import compose_cfg
from omnitrain.models.family import build_family

STEPS, GLOBAL, MICRO = 3, 8, 2
RESHARD_REL = 1e-6


def _run(tmp, model, name, overrides, steps=STEPS):
    return run_layout(
        tmp / name, [f"model={model}", *overrides], steps=steps, global_batch=GLOBAL, micro=MICRO, kinds=_synth.KINDS_VL
    )


def _family(model):
    return build_family(compose_cfg([f"model={model}"]).model)


def _check(run, reference, name, model, tp=False):
    diffs = check_parity(run, reference, STEPS, name, tensor_tol=1e-4 if tp else 1e-5, family=_family(model))
    print(f"\n{model} {name}: " + ", ".join(f"{k} {v[0]:.1e} ({v[1]})" if isinstance(v, tuple) else f"{k} {v:.1e}" for k, v in diffs.items()))


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("vl")


@pytest.fixture(scope="module")
def reference(tmp):
    run = _run(tmp, "qwen25_vl", "single", ["parallel=single", "train.save_every=2"])  # checkpoints for the TP resume
    assert "model.visual.blocks.0.attn.qkv.weight" in run[2]
    return run


LAYOUTS = {
    "pp2": ["parallel=vl7b_pp2"],
    "fsdp4": ["parallel=fsdp4"],  # one micro-batch per replica: dummy media where a peer has some
    "pp2_tp2": ["parallel=vl7b_pp2", "parallel.tp=2"],
    # vision tp1 x 2 parts (each encodes one sample of a micro-batch) beside the LLM's tp2
    "vision_tp1_llm_tp2": ["parallel=tp2", "parallel.tp={vision: 1, llm: 2}"],
}
QWEN2 = {"pp2": ["parallel=vl7b_pp2"], "tp2": ["parallel=tp2"]}
# Runs whose step-2 checkpoints the reshard tests resume from
SAVED = {
    "pp4": ["parallel=vl7b_pp4", "train.save_every=2"],
    # parallel=tp2: the vision tower tp2 too (fused qkv per third), the LLM tp2
    "tp2": ["parallel=tp2", "train.save_every=2"],
}
# test -> the runs of `runs` it uses (else its parameter: a layout name)
NEEDS = {
    "test_qwen25_pp4": ["pp4"], "test_qwen25_tp2": ["tp2"], "test_qwen25_tp2_checkpoint_holds_hf_layout": ["tp2"],
    "test_qwen25_single_checkpoint_resumes_under_tp2": ["single_to_tp2"],
}


def _needs(test, params):
    if test in NEEDS:
        return NEEDS[test]
    if "saved" in params:
        return [params["saved"]]
    return [("qwen2_" if test.startswith("test_qwen2_") else "") + str(params.get("name"))]


@pytest.fixture(scope="module")
def runs(request, tmp):
    """Every selected multi-process run of both families (Qwen2-VL's named
    qwen2_<layout>), one launch per process count (_layouts.run_layouts): each
    as alone, in tmp/<name>. single_to_tp2 resumes the reference's step 2."""
    layouts = {**{n: ["model=qwen25_vl", *ov] for n, ov in {**LAYOUTS, **SAVED}.items()},
               **{f"qwen2_{n}": ["model=qwen2_vl", *ov] for n, ov in QWEN2.items()},
               "single_to_tp2": ["model=qwen25_vl", "parallel=tp2", f"train.resume={tmp}/single/checkpoints/step_2"]}
    layouts = selected(request, layouts, _needs)
    if "single_to_tp2" in layouts:
        request.getfixturevalue("reference")  # its step-2 checkpoint first
    return run_layouts(tmp, layouts, steps=STEPS, global_batch=GLOBAL, micro=MICRO, kinds=_synth.KINDS_VL)


@pytest.fixture(scope="module")
def pp4(tmp, runs):
    return tmp / "pp4", runs["pp4"]


@pytest.fixture(scope="module")
def tp2(tmp, runs):
    return tmp / "tp2", runs["tp2"]


def test_qwen25_pp4(reference, pp4):
    _check(pp4[1], reference, "pp4", "qwen25_vl")


def test_qwen25_tp2(reference, tp2):
    _check(tp2[1], reference, "tp2", "qwen25_vl", tp=True)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_qwen25_layout_matches_single_process(runs, reference, name):
    _check(runs[name], reference, name, "qwen25_vl", tp="tp" in name)


@pytest.mark.parametrize("saved", ["pp4", "tp2"])
def test_qwen25_checkpoint_resumes_as_one_process(tmp_path, request, saved):
    # Step 2 saved by a pipeline / by TP ranks (fused qkv shards) loads into
    # one process, which runs step 3 as the saving layout did.
    out, (losses, norms, params) = request.getfixturevalue(saved)
    resumed, r_norms, r_params = _run(tmp_path, "qwen25_vl", "single", ["parallel=single", f"train.resume={out}/checkpoints/step_2"])
    assert len(resumed) == 1
    assert abs(resumed[0] - losses[2]) / abs(losses[2]) < RESHARD_REL, (resumed, losses)
    assert abs(r_norms[0] - norms[2]) / abs(norms[2]) < 1e-5, (r_norms, norms)
    assert r_params.keys() == params.keys()
    worst = max((rel(r_params[k], params[k]), k) for k in params)
    assert worst[0] < (1e-4 if saved == "tp2" else 1e-5), worst
    print(f"\n{saved} step 2 -> single step 3: loss {abs(resumed[0] - losses[2]) / abs(losses[2]):.1e}, worst tensor {worst[0]:.1e} ({worst[1]})")


def test_qwen25_single_checkpoint_resumes_under_tp2(runs, reference):
    # One process's step 2 loads into the TP ranks' shards (fused qkv per third).
    losses, norms, params = reference
    resumed, r_norms, r_params = runs["single_to_tp2"]
    assert len(resumed) == 1
    assert abs(resumed[0] - losses[2]) / abs(losses[2]) < RESHARD_REL, (resumed, losses)
    assert abs(r_norms[0] - norms[2]) / abs(norms[2]) < 1e-5, (r_norms, norms)
    worst = max((rel(r_params[k], params[k]), k) for k in params)
    assert worst[0] < 1e-4, worst
    print(f"\nsingle step 2 -> tp2 step 3: loss {abs(resumed[0] - losses[2]) / abs(losses[2]):.1e}, worst tensor {worst[0]:.1e} ({worst[1]})")


def test_qwen25_tp2_checkpoint_holds_hf_layout(tp2):
    # The final (step 3) checkpoint of the tp2 run, read back as full tensors
    # without any process group: qkv rows in HF's order [q | k | v].
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out, (_, _, params) = tp2
    dcp_to_torch_save(out / "checkpoints" / "step_3", out / "step_3.pt")
    saved = torch.load(out / "step_3.pt")["model"]
    for k in ("model.visual.blocks.0.attn.qkv.weight", "model.visual.blocks.31.attn.qkv.bias", "model.language_model.layers.0.self_attn.q_proj.weight"):
        assert torch.equal(saved[k], params[k]), k


# ----------------------------------------------------------------------------- Qwen2-VL


@pytest.fixture(scope="module")
def reference2(tmp):
    return _run(tmp, "qwen2_vl", "single2", ["parallel=single"])


@pytest.mark.parametrize("name", list(QWEN2))
def test_qwen2_layout_matches_single_process(runs, reference2, name):
    _check(runs[f"qwen2_{name}"], reference2, name, "qwen2_vl", tp=name == "tp2")
