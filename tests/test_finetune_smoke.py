"""Every fine-tuning option at once (LoRA, the family's SFT trainable preset,
per-module recompute, lr_mult, sample_mean loss, the non-finite guard set to
stop, TensorBoard, validation) for each model family under single, pp4_hetero
and fsdp4, 2 steps each on 4-layer models. The single run of a family is the
reference: the other layouts reproduce its losses, eval losses and
parameters (1e-5), so the options compose with the layouts, not just run."""

from __future__ import annotations

import pytest

import _synth
from _layouts import check_parity, run_layout
from conftest import compose_cfg
from omnitrain.models.family import build_family

STEPS, GLOBAL = 2, 4
OPTIONS = [
    "model.trainable=sft",
    "model.lora.llm.enabled=true", "model.lora.llm.target_modules=[q_proj,v_proj,o_proj]",  # colwise and rowwise under TP
    "train.recompute.vision=full", "train.recompute.llm=selective", "train.recompute_layers.llm=1",
    "optim.lr_mult={vision:0.5,llm:2}", "optim.scheduler.warmup_steps=0",
    "train.loss=sample_mean", "train.on_nonfinite=stop", "train.tensorboard=true",
    "data.eval=[synthetic]", "train.eval_every=1", "train.eval_batches=1",
]
VL_SMALL = ["model.config.vision_config.depth=4", "model.config.text_config.num_hidden_layers=4"]
# pp4_hetero's split without its audio list: vision on stage 0, the LLM over 1-3
VL_PP4 = ["~parallel.pp.layers.audio", "parallel.pp.layers.vision=[4,0,0,0]", "parallel.pp.layers.llm=[0,1,2,1]"]
FAMILIES = {
    "qwen25_omni": (
        ["model.config.vision_config.depth=4", "model.config.vision_config.fullatt_block_indexes=[1,3]",
         "model.config.audio_config.encoder_layers=4", "model.config.text_config.num_hidden_layers=4",
         "train.recompute.audio=full"],
        ["parallel.pp.layers.vision=[4,0,0,0]", "parallel.pp.layers.audio=[0,4,0,0]", "parallel.pp.layers.llm=[0,1,2,1]"], _synth.KINDS,
    ),
    "qwen25_vl": ([*VL_SMALL, "model.config.vision_config.fullatt_block_indexes=[1,3]"],
                  VL_PP4, _synth.KINDS_VL),
    "qwen2_vl": (VL_SMALL, VL_PP4, _synth.KINDS_VL),
}
LAYOUTS = {
    "single": lambda pp: ["parallel=single"],
    "pp4_hetero": lambda pp: ["parallel=pp4_hetero", "parallel.pp.schedule=gpipe", *pp],
    "fsdp4": lambda pp: ["parallel=fsdp4"],
}
_REFERENCE: dict = {}
TP_FAMILY = "qwen2_vl"  # LoRA under TP: one family (the split is the family-independent TP plan)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_all_options_under_each_layout(tmp_path, family, layout):
    small, pp, kinds = FAMILIES[family]
    over = [f"model={family}", *small, *OPTIONS, *LAYOUTS[layout](pp)]
    if (family, layout) == (TP_FAMILY, "single"):
        over.append("train.save_every=2")  # exported next to the tp2 run's checkpoint (below)
    rows = []
    run = run_layout(tmp_path / layout, over, steps=STEPS, global_batch=GLOBAL, kinds=kinds, eval_kinds=kinds[::-1], rows=rows)
    fam = build_family(compose_cfg(over).model)
    params = run[2]
    assert [r["step"] for r in rows] == [1, 2] and all("eval_loss" in r and not r.get("skipped") for r in rows)
    assert any(".lora_B." in k for k in params) and not any(fam.module_of(k) == "llm" and ".lora_" not in k and k in _trained(fam) for k in params)
    assert (tmp_path / layout / "tensorboard").is_dir()
    if layout == "single":
        _REFERENCE[family] = (run, [r["eval_loss"] for r in rows], tmp_path / layout)
        return
    if family not in _REFERENCE:
        pytest.skip("the single-process reference of this family did not run in this session (-k)")
    ref, ref_eval, _ = _REFERENCE[family]
    check_parity(run, ref, STEPS, f"{family} {layout}", family=fam)
    for a, b in zip([r["eval_loss"] for r in rows], ref_eval):
        assert abs(a - b) / abs(b) < 1e-5, (family, layout, rows, ref_eval)


def test_lora_under_tensor_parallelism(tmp_path):
    """The same options with the LLM's LoRA adapters split over TP ranks
    (parallel/tp.py: lora_B colwise next to q_proj/v_proj, lora_A
    replicated; o_proj: lora_A rowwise, lora_B replicated), against the
    single run above at the TP tolerances; the TP checkpoint (full tensors)
    exports the same adapter folder and merged folder as the single one."""
    from safetensors.torch import load_file

    from omnitrain.convert.__main__ import mm_to_hf

    family = TP_FAMILY
    small, _, kinds = FAMILIES[family]
    if family not in _REFERENCE:
        pytest.skip("the single-process reference of this family did not run in this session (-k)")
    ref, ref_eval, ref_dir = _REFERENCE[family]
    for name, extra in [("tp2", ["train.save_every=2"])]:
        over = [f"model={family}", *small, *OPTIONS, "parallel=tp2", *extra]
        rows = []
        run = run_layout(tmp_path / name, over, steps=STEPS, global_batch=GLOBAL, kinds=kinds, eval_kinds=kinds[::-1], rows=rows)
        assert any(".o_proj.lora_A." in k for k in run[2]) and any(".q_proj.lora_B." in k for k in run[2])
        diffs = check_parity(run, ref, STEPS, f"{family} {name}", tensor_tol=1e-4, family=build_family(compose_cfg(over).model))
        print(name, diffs)
        for a, b in zip([r["eval_loss"] for r in rows], ref_eval):
            assert abs(a - b) / abs(b) < 1e-5, (family, name, rows, ref_eval)
    # merged only: the sft preset trains the vision merger, which an adapter folder cannot carry
    got, want = ({k: v for f in sorted(mm_to_hf(str(d), str(tmp_path / f"{d.name}_merged"), merge_lora=True).glob("*.safetensors"))
                  for k, v in load_file(f).items()} for d in (tmp_path / "tp2", ref_dir))
    assert got.keys() == want.keys() and not any("lora_" in k for k in got), sorted(set(got) ^ set(want))[:4]
    moved = 0
    for k, v in want.items():
        assert float((got[k] - v).norm() / v.norm().clamp_min(1e-12)) < 1e-4, k
        moved += ".o_proj." in k or ".q_proj." in k
    assert moved


def _trained(fam):
    """LLM base parameters that would train (none: LoRA freezes the LLM's base)."""
    return {n for n, _ in fam.build_meta().named_parameters() if fam.module_of(n) == "llm" and fam.is_trainable(n)}
