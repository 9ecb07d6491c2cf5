"""The vision-language families (Qwen2.5-VL, Qwen2-VL; tiny widths, real
depths) compute exactly what HF's monolithic model does, and a stage
materializes the same parameter values whatever the layout."""

import pytest
import torch

import _synth
from conftest import compose_cfg
from omnitrain.models.family import IGNORE_INDEX, build_family, import_object
from omnitrain.parallel.context import check_layout
from omnitrain.parallel.layout import whole_plan

FAMILIES = ["qwen25_vl", "qwen2_vl"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return build_family(compose_cfg([f"model={request.param}"]).model)


@pytest.fixture(scope="module")
def whole(family):
    return family.build(whole_plan(family.depths), torch.device("cpu"), seed=7)


def test_real_depths_and_token_ids(family):
    assert family.depths == {"vision": 32, "llm": 28}
    assert family.module_names == ("vision", "llm")
    assert [family.token_id(r) for r in ("image", "video", "vision_bos")] == [_synth.IMAGE, _synth.VIDEO, _synth.V_START]


def _hf_loss(family, ref, mb, n):
    """HF's monolithic forward; the loss summed as family.loss does (HF's
    ForCausalLMLoss layout, divided by the label tokens)."""
    kw = {k: mb[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw") if k in mb}
    if "Qwen2_5" in family.hf_class and "video_second_per_grid" in mb:
        kw["second_per_grid_ts"] = mb["video_second_per_grid"]
    logits = ref(**kw, mm_token_type_ids=family.mm_token_types(mb), use_cache=False).logits.float()
    shift = torch.nn.functional.pad(mb["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift, reduction="sum") / n


def test_matches_hf_forward_loss_and_grads(family, whole):
    ref = import_object(family.hf_class)._from_config(family.hf_config)
    ref.load_state_dict(whole.state_dict())
    ref.train()
    seg = whole_plan(family.depths)
    kinds = _synth.KINDS_VL
    # padded micro-batches of 3 (image, video, text-only; text-only, image+video, image),
    # a video next to an image, two text-only samples, and one image+video sample alone
    mbs = _synth.micro_batches(2, batch=3, kinds=kinds)
    mbs += [_synth.collate(_synth.samples(2, offset=o, kinds=kinds)) for o in (6, 2)]
    mbs.append(_synth.collate(_synth.samples(1, offset=4, kinds=kinds)))
    assert any("pixel_values_videos" in mb and "pixel_values" in mb for mb in mbs)
    assert any("pixel_values_videos" not in mb and "pixel_values" not in mb for mb in mbs)
    bitwise = True
    for mb in mbs:
        n = family.count_label_tokens(mb)
        whole.zero_grad()
        loss = family.stage_forward(whole, seg, mb, {}, n)
        loss.backward()
        ref.zero_grad()
        ref_loss = _hf_loss(family, ref, mb, n)
        ref_loss.backward()
        assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=0), (loss, ref_loss)
        got = {k: p.grad for k, p in whole.named_parameters() if p.grad is not None}
        want = {k: p.grad for k, p in ref.named_parameters() if p.grad is not None}
        assert got.keys() == want.keys()
        # a micro-batch without media gives the vision tower no gradient
        assert any(k.startswith("model.visual.") for k in want) == ("pixel_values" in mb or "pixel_values_videos" in mb)
        for k in want:
            assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-7), k
        bitwise &= torch.equal(loss, ref_loss) and all(torch.equal(got[k], want[k]) for k in want)
    print(f"{family.name}: bitwise equal to HF on every micro-batch: {bitwise}")


def test_video_timing_moves_qwen25_positions(family, whole):
    # Qwen2.5-VL spaces a video's temporal positions by its seconds per grid;
    # Qwen2-VL has no such input. The family reads it from the micro-batch.
    mb = _synth.micro_batches(2, kinds=_synth.KINDS_VL)[1]  # one video, 0.5 s per grid
    pos = family.rope_positions(whole, mb)
    slower = family.rope_positions(whole, {**mb, "video_second_per_grid": mb["video_second_per_grid"] * 4})
    assert torch.equal(pos, slower) == (family.name == "qwen2_vl")


def test_buffers_match_a_normal_build(family, whole):
    ref = import_object(family.hf_class)._from_config(family.hf_config)
    bufs = dict(ref.named_buffers())
    for name, buf in whole.named_buffers():
        assert torch.equal(buf, bufs[name]), name


def test_stage_build_is_layout_independent(family, whole):
    cfg = compose_cfg([f"model={family.name}", "parallel=vl7b_pp4"])
    plans = check_layout(cfg)
    assert len(plans) == 4
    full = dict(whole.named_parameters())
    seen, modules = set(), []
    for plan in plans:
        stage = family.build(plan, torch.device("cpu"), seed=7)
        local = dict(family.local_parameters(stage))
        assert local, plan
        modules.append({family.module_of(k) for k in local})
        for name, p in local.items():
            assert torch.equal(p, full[name]), name
        assert not seen & local.keys(), "a parameter on two stages"
        seen |= local.keys()
    assert seen == set(full)
    assert modules == [{"vision", "llm"}, {"llm"}, {"llm"}, {"llm"}]  # vision and LLM layer 0 on stage 0


def test_token_feature_mismatch_is_an_error(family, whole):
    mb = _synth.micro_batches(1, kinds=_synth.KINDS_VL)[0]  # an image sample
    mb["input_ids"][0, (mb["input_ids"][0] == _synth.IMAGE).nonzero()[0]] = 5  # drop one image token
    with pytest.raises(ValueError, match="image tokens"):
        family.stage_forward(whole, whole_plan(family.depths), mb, {}, 1)
