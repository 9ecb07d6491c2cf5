"""Qwen3-Omni's thinker and Qwen3-VL reproduce the single-process run under
pipeline and TP layouts (CPU, gloo, fp32, 3 optimizer steps of micro-batches
of 2 mixing image, audio, video and text-only samples, the router aux loss
on), through the real training loop and worker launch. Same bounds as the
other parity files (1e-5; TP layouts per tensor 1e-4).

The pp2 layouts put only LLM layer 0 on the merge stage, so DeepStack levels
1 and 2 (added after LLM layers 1 and 2) cross the cut with the hidden states.
The logged aux loss and expert load (summed over ranks) match as well.
"""

from __future__ import annotations

import json

import pytest

import _synth
from _layouts import check_parity, run_layout, run_layouts, selected, worst_tensor
from conftest import compose_cfg
from omnitrain.models.family import build_family

STEPS, GLOBAL, MICRO = 3, 8, 2  # 4 micro-batches: 2 per dp rank under dp2, 1F1B's least over 2 stages


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] if (out / "metrics.jsonl").exists() else []


def _run(tmp, model, name, overrides, kinds):
    out = tmp / name
    run = run_layout(out, [f"model={model}", *overrides], steps=STEPS, global_batch=GLOBAL, micro=MICRO, kinds=kinds)
    return run, _rows(out)


def _check(run, reference, name, model, tp=False):
    (r, rows), (ref, ref_rows) = run, reference
    diffs = check_parity(r, ref, STEPS, name, tensor_tol=1e-4 if tp else 1e-5, family=build_family(compose_cfg([f"model={model}"]).model))
    for a, b in zip(rows, ref_rows):
        for key in ("moe_aux", "moe_load_max_mean"):
            if key in b:
                assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]), (name, key, a[key], b[key])
    print(f"\n{model} {name}: " + ", ".join(f"{k} {v[0]:.1e} ({v[1]})" if isinstance(v, tuple) else f"{k} {v:.1e}" for k, v in diffs.items()))


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("q3")


# Parity is about the layout, not the depth: 4 vision blocks (DeepStack taps
# after 1, 2, 3), 2 audio layers, 4 MoE LLM layers (the real depths are built
# by tests/test_model_qwen3.py and the default run).
OMNI = ["model.moe.aux_loss_coef=0.01", "model.config.vision_config.depth=4",
        "model.config.vision_config.deepstack_visual_indexes=[1,2,3]",
        "model.config.audio_config.encoder_layers=2", "model.config.text_config.num_hidden_layers=4"]
OMNI_PP2 = ["parallel=pp2", "parallel.pp.layers={vision:[4,0],audio:[2,0],llm:[1,3]}"]
VL = ["model.config.vision_config.depth=4", "model.config.vision_config.deepstack_visual_indexes=[1,2,3]",
      "model.config.text_config.num_hidden_layers=4"]
VL_PP2 = ["parallel=vl7b_pp2", "parallel.pp.layers={vision:[4,0],llm:[2,2]}"]
EP2 = ["parallel.ep.llm=2"]
# name -> overrides; every one checked against the one single-process reference
OMNI_LAYOUTS = {
    "pp2": OMNI_PP2,  # LLM layer 0 on stage 0: DeepStack levels 1, 2 cross the cut
    "ep2": ["parallel=dp2", *EP2],
    "tp2_ep2": ["parallel=tp2", "parallel.dp=2", *EP2],
    "pp2_ep2": [*OMNI_PP2, "parallel.dp=2", *EP2],
    "fsdp2_ep2": ["parallel=dp2", "parallel.dp_mode=fsdp", *EP2],  # edp 1: dense FSDP over dp, experts only EP
    # dp4 = edp2 x ep2: experts FSDP-sharded over edp on top of their ep shard
    "fsdp4_ep2": ["parallel=dp2", "parallel.dp=4", "parallel.dp_mode=fsdp", "train.save_every=2", *EP2],
}


@pytest.fixture(scope="module")
def omni_ref(tmp):
    """The one single-process Omni reference every Omni layout is checked against."""
    ref = _run(tmp, "qwen3_omni", "single", ["parallel=single", "train.save_every=2", *OMNI], _synth.KINDS_Q3_OMNI)
    assert ref[1] and "moe_aux" in ref[1][0], ref[1][:1]
    return ref


VL_LAYOUTS = {"vl_pp2": VL_PP2, "vl_tp2": ["parallel=tp2"]}
NEEDS = {"test_qwen3_omni_ep_checkpoints_reshard_both_ways": ["fsdp4_ep2", "single_to_ep2"], "test_qwen3_vl_pp2_and_tp2": list(VL_LAYOUTS)}


@pytest.fixture(scope="module")
def runs(request, tmp):
    """Every selected multi-process run of both families, one launch per
    process count (_layouts.run_layouts): each as alone, in tmp/<name>, with
    its metric rows. single_to_ep2 resumes the reference's step 2."""
    omni = {n: ["model=qwen3_omni", *ov, *OMNI] for n, ov in OMNI_LAYOUTS.items()}
    omni["single_to_ep2"] = ["model=qwen3_omni", "parallel=dp2", *EP2, f"train.resume={tmp}/single/checkpoints/step_2", *OMNI]
    vl = {n: (["model=qwen3_vl", *ov, *VL], {"kinds": _synth.KINDS_Q3_VL}) for n, ov in VL_LAYOUTS.items()}
    layouts = selected(request, {**omni, **vl}, lambda test, params: NEEDS.get(test, [params.get("name")]))
    if "single_to_ep2" in layouts:
        request.getfixturevalue("omni_ref")  # its step-2 checkpoint first
    done = run_layouts(tmp, layouts, steps=STEPS, global_batch=GLOBAL, micro=MICRO, kinds=_synth.KINDS_Q3_OMNI)
    return {n: (run, _rows(tmp / n)) for n, run in done.items()}


@pytest.mark.parametrize("name", list(OMNI_LAYOUTS))
def test_qwen3_omni_layouts(runs, omni_ref, name):
    _check(runs[name], omni_ref, name, "qwen3_omni", tp="tp" in name)


def _resume_step3(name, run, ref):
    """`run`, step 3 resumed from a step-2 checkpoint, equals the reference's step 3."""
    losses, _, params = run
    ref_losses, _, ref_params = ref[0]
    assert len(losses) == 1 and abs(losses[0] - ref_losses[-1]) <= 1e-5 * abs(ref_losses[-1]), (name, losses, ref_losses)
    worst = worst_tensor(params, ref_params)  # as check_parity
    assert params.keys() == ref_params.keys() and worst[0] < 1e-5, (name, worst)
    print(f"\nqwen3_omni {name}: step-3 loss {abs(losses[0] - ref_losses[-1]) / abs(ref_losses[-1]):.1e}, worst tensor {worst[0]:.1e} ({worst[1]})")


def test_qwen3_omni_ep_checkpoints_reshard_both_ways(tmp, runs, omni_ref):
    """The fsdp4 x ep2 run's step-2 DCP checkpoint (experts saved as (edp, ep)
    shards) resumes single-process for step 3, and the single run's step-2
    checkpoint resumes under dp2 x ep2."""
    assert runs["fsdp4_ep2"][0][0]  # its checkpoints are written
    ckpt = tmp / "fsdp4_ep2" / "checkpoints" / "step_2"
    to_single = run_layout(
        tmp / "fsdp4_ep2_to_single", ["model=qwen3_omni", "parallel=single", f"train.resume={ckpt}", *OMNI],
        steps=STEPS, global_batch=GLOBAL, micro=MICRO, kinds=_synth.KINDS_Q3_OMNI,
    )
    _resume_step3("fsdp4_ep2_to_single", to_single, omni_ref)
    _resume_step3("single_to_ep2", runs["single_to_ep2"][0], omni_ref)


def test_qwen3_vl_pp2_and_tp2(tmp, runs):
    ref = _run(tmp, "qwen3_vl", "vl_single", ["parallel=single", *VL], _synth.KINDS_Q3_VL)
    _check(runs["vl_pp2"], ref, "pp2", "qwen3_vl")
    _check(runs["vl_tp2"], ref, "tp2", "qwen3_vl", tp=True)
