"""Qwen3-Omni's thinker (MoE LLM, DeepStack vision, AuT audio) and Qwen3-VL
(tiny widths, real depths) compute what HF's monolithic model computes: the
loss, every gradient including the router load-balancing term (HF's
load_balancing_loss_func per MoE layer, models/moe.py's normalisation), and
stages materialize layout-independent values."""

import pytest
import torch

import _synth
from conftest import compose_cfg
from omnitrain.models.family import IGNORE_INDEX, build_family, import_object
from omnitrain.parallel.context import check_layout
from omnitrain.parallel.layout import whole_plan

COEF = 0.05  # large enough that the aux term moves the router gradients visibly
CASES = {
    "qwen3_omni": ({"vision": 27, "audio": 32, "llm": 48}, _synth.KINDS_Q3_OMNI),
    "qwen3_vl": ({"vision": 27, "llm": 36}, _synth.KINDS_Q3_VL),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    name = request.param
    over = [f"model={name}"] + ([f"model.moe.aux_loss_coef={COEF}"] if name == "qwen3_omni" else [])
    family = build_family(compose_cfg(over).model)
    whole = family.build(whole_plan(family.depths), torch.device("cpu"), seed=7)
    return name, family, whole


def _hf(family, ref, mb, n):
    """HF's forward; CE summed as family.loss does, plus coef x the mean over MoE
    layers of HF's load-balancing loss of that layer alone (one micro-batch = the
    global batch)."""
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
            "input_features", "feature_attention_mask")
    kw = {k: mb[k] for k in keys if k in mb}
    omni = "Omni" in family.hf_class
    if omni:
        if "video_second_per_grid" in mb:
            kw["video_second_per_grid"] = mb["video_second_per_grid"]
        out = ref(**kw, use_audio_in_video=False, use_cache=False, output_router_logits=True)
    else:
        out = ref(**kw, mm_token_type_ids=family.mm_token_types(mb), use_cache=False)
    logits = out.logits.float()
    shift = torch.nn.functional.pad(mb["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift, reduction="sum") / n
    aux = torch.zeros(())
    if omni:
        from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import load_balancing_loss_func

        t = family.hf_config.text_config
        per_layer = [load_balancing_loss_func((g,), t.num_experts, t.num_experts_per_tok, mb["attention_mask"]) for g in out.router_logits]
        aux = torch.stack(per_layer).mean()
    return ce, aux


def test_matches_hf_forward_loss_aux_and_grads(case):
    name, family, whole = case
    depths, kinds = CASES[name]
    assert family.depths == depths
    ref = import_object(family.hf_class)._from_config(family.hf_config)
    ref.load_state_dict(whole.state_dict())
    ref.train()
    seg = whole_plan(family.depths)
    # micro-batches of 2 mixing every kind (image+video, text-only, audio), one sample alone
    mbs = _synth.micro_batches(3, batch=2, kinds=kinds) + [_synth.collate(_synth.samples(1, offset=5, kinds=kinds))]
    assert any("pixel_values_videos" in mb and "pixel_values" in mb for mb in mbs)
    for mb in mbs:
        n = family.count_label_tokens(mb)
        family.begin_step(int(mb["attention_mask"].sum()))
        whole.zero_grad()
        loss = family.stage_forward(whole, seg, mb, {}, n)
        loss.backward()
        ref.zero_grad()
        ce, aux = _hf(family, ref, mb, n)
        (ce + family.aux_loss_coef * aux).backward()
        assert torch.allclose(loss, ce, rtol=1e-6, atol=0), (loss, ce)
        if family.moe_stats is not None:
            assert abs(family.moe_stats.aux - float(aux)) < 1e-6 * float(aux), (family.moe_stats.aux, float(aux))
            assert family.moe_stats.counts.sum() == mb["attention_mask"].sum() * family.hf_config.text_config.num_experts_per_tok * len(family.moe_layers)
        got = {k: p.grad for k, p in whole.named_parameters() if p.grad is not None}
        want = {k: p.grad for k, p in ref.named_parameters() if p.grad is not None}
        assert got.keys() == want.keys()
        for k in want:
            assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-7), k
        # DeepStack's mergers get gradients whenever there is vision input
        assert any("merger_list.2." in k for k in want) == ("pixel_values" in mb or "pixel_values_videos" in mb)


def test_aux_term_reaches_the_router(case):
    # the router gradient with the aux term differs from the one without it
    name, family, whole = case
    if family.moe_stats is None:  # dense Qwen3-VL: nothing to log, nothing to add
        assert family.step_stats() is None and not family.moe_layers
        return
    mb = _synth.micro_batches(1, kinds=CASES[name][1])[0]
    grads = []
    for coef in (0.0, COEF):
        family.aux_loss_coef = coef
        family.begin_step(int(mb["attention_mask"].sum()))
        whole.zero_grad()
        family.stage_forward(whole, whole_plan(family.depths), mb, {}, family.count_label_tokens(mb)).backward()
        grads.append(whole.model.language_model.layers[40].mlp.gate.weight.grad.clone())
    family.aux_loss_coef = COEF
    assert not torch.allclose(grads[0], grads[1])


def test_stage_build_is_layout_independent(case):
    name, family, whole = case
    llm = family.depths["llm"]
    layers = {"vision": [27, 0], "llm": [1, llm - 1]}
    if "audio" in family.depths:
        layers["audio"] = [32, 0]
    over = [f"model={name}", "parallel=pp2" if "audio" in layers else "parallel=vl7b_pp2", "parallel.pp.layers=" + "{" + ",".join(f"{k}:{v}" for k, v in layers.items()).replace(" ", "") + "}"]
    plans = check_layout(compose_cfg(over))
    full = dict(whole.named_parameters())
    seen = set()
    for plan in plans:
        local = dict(family.local_parameters(family.build(plan, torch.device("cpu"), seed=7)))
        for k, p in local.items():
            assert torch.equal(p, full[k]), k
        assert not seen & local.keys()
        seen |= local.keys()
    assert seen == set(full)


def test_tp_rules_name_the_module_and_the_sizes_that_fit():
    from omnitrain.config import ConfigError

    with pytest.raises(ConfigError, match=r"parallel.tp.audio=3: .*encoder_attention_heads=20.*1, 2, 4, 5, 10, 20"):
        check_layout(compose_cfg(["model=qwen3_omni_30b_a3b", "parallel=tp2", "parallel.tp={vision: 1, audio: 3, llm: 1}"]))
    with pytest.raises(ConfigError, match=r"parallel.tp.llm=8: .*num_key_value_heads=4.*1, 2, 4"):
        check_layout(compose_cfg(["model=qwen3_omni_30b_a3b", "parallel=tp2", "parallel.tp={vision: 1, audio: 1, llm: 8}"]))


def test_hf_tensors_load_in_plain_transformers(case, tmp_path):
    # What `convert mm_to_hf` writes (family.to_hf_tensors: per-expert weights as HF
    # folders store them) loads into the HF class with no missing or unexpected
    # key and the same tensors.
    from safetensors.torch import save_file

    name, family, whole = case
    files = {hk: hv.contiguous() for k, v in whole.state_dict().items() for hk, hv in family.to_hf_tensors(k, v).items()}
    if family.moe_layers:
        assert "model.layers.47.mlp.experts.7.up_proj.weight" in files
    save_file(files, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    cfg = family.hf_config
    cfg.architectures = [family.hf_architecture]
    cfg.save_pretrained(tmp_path)
    ref, info = import_object(family.hf_class).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    want = whole.state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(v, want[k]), k


# Import of HF folders is about names, not depth: a shallow tiny thinker.
OMNI_SHALLOW = ["model=qwen3_omni", "model.config.vision_config.depth=4", "model.config.vision_config.deepstack_visual_indexes=[1,2,3]",
                "model.config.audio_config.encoder_layers=2", "model.config.text_config.num_hidden_layers=2"]


def test_per_expert_and_fused_folders_import_bitwise(tmp_path):
    # Folders with the experts per expert (the hub's and save_pretrained's layout,
    # which is also what export writes) or fused (omnitrain's in-memory names) load
    # through model.init_from (convert.hf.materialize) bit for bit; what is loaded
    # exports to a folder plain transformers reads with no missing key; an absent
    # expert or a wrong per-expert shape is one line naming the key.
    from safetensors.torch import save_file

    from omnitrain.convert.hf import HFFormatError, check_folder

    family = build_family(compose_cfg(OMNI_SHALLOW).model)
    src = family.build(whole_plan(family.depths), torch.device("cpu"), seed=3)
    want = src.state_dict()
    cfg = family.hf_config
    cfg.architectures = [family.hf_architecture]

    def folder(name, files):
        path = tmp_path / name
        path.mkdir()
        save_file({k: v.contiguous() for k, v in files.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
        cfg.save_pretrained(path)
        return path

    def load(path):
        fam = build_family(compose_cfg(OMNI_SHALLOW + [f"model.init_from={path}"]).model)
        return fam.build(whole_plan(fam.depths), torch.device("cpu"), seed=0).state_dict()

    split = {hk: hv for k, v in want.items() for hk, hv in family.to_hf_tensors(k, v).items()}
    src.save_pretrained(tmp_path / "saved")
    from safetensors import safe_open

    with safe_open(tmp_path / "saved" / "model.safetensors", "pt") as f:
        saved_keys = set(f.keys())
    # transformers 5 reverts its expert fusion on save: the files name each expert.
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in saved_keys and saved_keys <= set(split)
    fused = {family.to_hf_name(k): v for k, v in want.items()}
    for path in (folder("split", split), tmp_path / "saved", folder("fused", fused)):
        check_folder(family, family.build_meta(), path)
        got = load(path)
        for k, v in want.items():
            assert torch.equal(got[k], v), (path.name, k)

    # `mm_to_hf --base` reads a per-expert base's names, shapes and dtypes too.
    from omnitrain.convert.__main__ import _base_plan

    _, dtypes, _ = _base_plan(str(tmp_path / "split"), family, {k: tuple(v.shape) for k, v in want.items()})
    assert dtypes["model.language_model.layers.1.mlp.experts.gate_up_proj"] == "F32"

    # Round trip: the loaded model exported (to_hf_tensors) -> plain transformers.
    out = folder("export", {hk: hv for k, v in got.items() for hk, hv in family.to_hf_tensors(k, v).items()})
    ref, info = import_object(family.hf_class).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for k, v in ref.state_dict().items():
        assert torch.equal(v, want[k]), k

    gone = "model.layers.1.mlp.experts.3.up_proj.weight"
    bad = folder("bad", {k: v for k, v in split.items() if k != gone})
    with pytest.raises(HFFormatError, match=r"1 missing: model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight$") as e:
        check_folder(family, family.build_meta(), bad)
    assert "\n" not in str(e.value)
    with pytest.raises(HFFormatError, match="1 missing: " + gone.replace(".", r"\.")):
        load(bad)
    key = "model.layers.0.mlp.experts.2.down_proj.weight"
    short = folder("short", {**split, key: split[key][:, :-1]})
    h, i = split[key].shape
    with pytest.raises(HFFormatError, match=rf"1 shape mismatches: {key.replace('.', '[.]')} \({h}, {i - 1}\) vs config \({h}, {i}\)$"):
        check_folder(family, family.build_meta(), short)
