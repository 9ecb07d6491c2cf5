"""The segmented adapter computes exactly what HF's monolithic thinker does,
and a stage materializes the same parameter values whatever the layout."""

import pytest
import torch
from hydra.utils import instantiate

import _synth
from conftest import compose_cfg
from omnitrain.models.family import import_object
from omnitrain.parallel.layout import whole_plan
from omnitrain.parallel.context import check_layout


@pytest.fixture(scope="module")
def adapter():
    return instantiate(compose_cfg().model, _convert_="all")


@pytest.fixture(scope="module")
def whole(adapter):
    return adapter.build(whole_plan(adapter.depths), torch.device("cpu"), seed=7)


def test_real_depths_and_token_ids(adapter):
    assert adapter.depths == {"vision": 32, "audio": 32, "llm": 28}
    assert adapter.token_id("image") == 151655
    assert adapter.token_id("video") == 151656
    assert adapter.token_id("audio") == 151646


def test_matches_hf_forward_loss_and_grads(adapter, whole):
    ref = import_object(adapter.hf_class)._from_config(adapter.hf_config)
    ref.load_state_dict(whole.state_dict())
    seg = whole_plan(adapter.depths)
    for mb in _synth.micro_batches(6, batch=1) + _synth.micro_batches(2, batch=3):
        n = adapter.count_label_tokens(mb)
        whole.zero_grad()
        loss = adapter.stage_forward(whole, seg, mb, {}, n)
        loss.backward()
        ref.zero_grad()
        kw = {k: v for k, v in mb.items() if k not in ("labels", "use_audio_in_video")}
        logits = ref(**kw, use_audio_in_video=False).logits
        ref_loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), mb["labels"][:, 1:].reshape(-1), reduction="sum"
        ) / n
        ref_loss.backward()
        assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=0)
        got = {k: p.grad for k, p in whole.named_parameters() if p.grad is not None}
        want = {k: p.grad for k, p in ref.named_parameters() if p.grad is not None}
        assert got.keys() == want.keys()
        for k in want:
            assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-7), k


def test_buffers_match_a_normal_build(adapter, whole):
    ref = import_object(adapter.hf_class)._from_config(adapter.hf_config)
    bufs = dict(ref.named_buffers())
    for name, buf in whole.named_buffers():
        assert torch.equal(buf, bufs[name]), name


def test_stage_build_is_layout_independent(adapter, whole):
    cfg = compose_cfg(["parallel=pp4_hetero"])
    plans = check_layout(cfg)
    full = dict(whole.named_parameters())
    seen = set()
    for plan in plans:
        stage = adapter.build(plan, torch.device("cpu"), seed=7)
        local = dict(adapter.local_parameters(stage))
        assert local, plan
        for name, p in local.items():
            assert torch.equal(p, full[name]), name
        assert not seen & local.keys(), "a parameter on two stages"
        seen |= local.keys()
    assert seen == set(full)


def test_token_feature_mismatch_is_an_error(adapter, whole):
    mb = _synth.micro_batches(2)[1]  # an audio sample
    mb["input_ids"][0, (mb["input_ids"][0] == _synth.AUDIO).nonzero()[0]] = 5  # drop one audio token
    with pytest.raises(ValueError, match="audio tokens"):
        adapter.stage_forward(whole, whole_plan(adapter.depths), mb, {}, 1)
