"""The demo set through the Qwen3 families' shipped processors: Qwen3-Omni's
audio placeholders follow the AuT encoder's length rule and Qwen3-VL's videos
are laid out per temporal patch with timestamps, so the real encoders' outputs
fill exactly the placeholders (the merge refuses any mismatch) when the model
runs on collated demo micro-batches mixing images, videos, audio and text."""

from __future__ import annotations

import shutil

import pytest
import torch

from data_fixtures.helpers import data_cfg, demo_dir, processor

from omnitrain.data import build_dataset, collate
from omnitrain.parallel.layout import whole_plan

# What is checked here is the data layout the encoders fill, not depth: 4
# vision blocks (DeepStack after 1, 2, 3), 2 audio layers, 4 LLM layers.
SMALL = ["model.config.vision_config.depth=4", "model.config.vision_config.deepstack_visual_indexes=[1,2,3]",
         "model.config.text_config.num_hidden_layers=4"]


def small_family(name):
    from conftest import compose_cfg
    from omnitrain.models.family import build_family

    audio = ["model.config.audio_config.encoder_layers=2"] if name == "qwen3_omni" else []
    return build_family(compose_cfg([f"model={name}", *SMALL, *audio]).model)


CASES = {
    "qwen3_omni": ["mllm_demo", "mllm_audio_demo", "mllm_video_demo"],
    "qwen3_vl": ["mllm_demo", "mllm_video_demo"],
}


@pytest.mark.parametrize("name", list(CASES))
def test_demo_micro_batches_run_through_the_model(name):
    fam = small_family(name)
    ds = build_dataset(data_cfg(dataset=",".join(CASES[name])), fam, processor(name))
    samples = [ds[(d, 0)] for d in range(len(CASES[name]))] + [ds[(d, 1)] for d in range(len(CASES[name]))]
    for s in samples:
        assert "error" not in s["meta"], s["meta"].get("error")
    tok = processor(name).tokenizer
    if name == "qwen3_vl":  # a video: one "<t seconds>" + vision start/end per temporal patch
        vid = next(s for s in samples if "video_grid_thw" in s)
        t = int(vid["video_grid_thw"].reshape(-1, 3)[0, 0])
        assert int((vid["input_ids"] == fam.token_id("vision_bos")).sum()) == t
        assert tok.decode(vid["input_ids"]).count(" seconds>") == t
    else:
        assert any("audio_features" in s for s in samples)
    model = fam.build(whole_plan(fam.depths), torch.device("cpu"), seed=0)
    for pair in (samples[i : i + 2] for i in range(0, len(samples), 2)):
        mb = collate(pair, pad_id=tok.pad_token_id if tok.pad_token_id is not None else 151643)
        fam.begin_step(int(mb["attention_mask"].sum()))
        with torch.no_grad():
            loss = fam.stage_forward(model, whole_plan(fam.depths), mb, {}, max(fam.count_label_tokens(mb), 1))
        assert torch.isfinite(loss)


def test_qwen3_omni_audio_in_video_and_long_audio(tmp_path):
    """use_audio_in_video per sample: a video and its audio merged token by
    token in time order, equal to HF's processor's layout, with HF's rope
    index giving both streams one time axis; a micro-batch mixing such a
    sample with a plain one runs through the model (every placeholder filled).
    Long audio: chunked into whole windows (every frame kept), or refused
    where a video pairs with it; never cut."""
    from data_fixtures.helpers import write_dataset, write_wav

    from omnitrain.models.qwen3_omni.family import aut_output_length

    fam, proc = small_family("qwen3_omni"), processor("qwen3_omni")
    tok = proc.tokenizer
    ds = build_dataset(
        data_cfg(dataset="mllm_video_audio_demo,mllm_demo", dataset_options={"mllm_video_audio_demo": {"use_audio_in_video": True}}),
        fam, proc,
    )
    s, plain = ds[(0, 0)], ds[(1, 0)]
    assert "error" not in s["meta"], s["meta"].get("error")
    assert s["use_audio_in_video"] is True and plain["use_audio_in_video"] is False
    ids = s["input_ids"].tolist()
    start = ids.index(fam.token_id("vision_bos"))
    assert ids[start + 1] == fam.token_id("audio_bos") and ids.count(fam.token_id("audio_bos")) == 1  # the <audio> was absorbed
    block = ids[start + 1 : ids.index(fam.token_id("audio_eos")) + 1]
    n_audio = block.count(fam.token_id("audio"))
    assert n_audio == aut_output_length(s["audio_features"][0].shape[-1])
    ref = proc.replace_video_with_audio_token(
        {"video_grid_thw": s["video_grid_thw"], "video_second_per_grid": s["video_second_per_grid"].tolist()}, 0,
        {"num_audio_tokens": [n_audio]}, 0, position_id_per_seconds=fam.hf_config.position_id_per_seconds,
    )
    assert tok(ref, add_special_tokens=False)["input_ids"] == block
    runs = sum(block[k] != block[k - 1] for k in range(2, len(block) - 1))
    assert runs >= 3, "video and audio must interleave"

    model = fam.build(whole_plan(fam.depths), torch.device("cpu"), seed=0)
    mb = collate([s, plain], pad_id=151643)
    pos = fam.rope_positions(model, mb)  # per sample: the flags differ
    alone = collate([s], pad_id=151643)
    hf_pos, _ = model.model.get_rope_index(
        alone["input_ids"], None, alone["video_grid_thw"], alone["attention_mask"], True,
        alone["feature_attention_mask"].sum(-1), alone["video_second_per_grid"],
    )
    n = alone["input_ids"].shape[1]
    torch.testing.assert_close(pos[:, :1, :n], hf_pos, rtol=0, atol=0)
    row = alone["input_ids"][0]
    assert hf_pos[0, 0][row == fam.token_id("video")].min() == hf_pos[0, 0][row == fam.token_id("audio")].min()
    fam.begin_step(int(mb["attention_mask"].sum()))
    with torch.no_grad():
        assert torch.isfinite(fam.stage_forward(model, whole_plan(fam.depths), mb, {}, max(fam.count_label_tokens(mb), 1)))

    # long audio: 35 s > the 30 s window
    write_wav(tmp_path / "long.wav", 35.0)
    shutil.copy(demo_dir() / "mllm_demo_data" / "4.mp4", tmp_path / "4.mp4")
    video = "4.mp4"
    recs = [
        {"messages": [{"role": "user", "content": "<audio>What is it?"}, {"role": "assistant", "content": "A tone."}], "audios": ["long.wav"]},
        {"messages": [{"role": "user", "content": "<video><audio>What is it?"}, {"role": "assistant", "content": "A tone."}],
         "videos": [video], "audios": ["long.wav"], "use_audio_in_video": True},
    ]
    write_dataset(tmp_path, recs)
    long = build_dataset(data_cfg(dataset_dir=str(tmp_path), dataset="ds", cutoff_len=4096, long_audio="chunk"), fam, proc)
    a = long[(0, 0)]
    assert "error" not in a["meta"], a["meta"].get("error")
    assert len(a["audio_features"]) == 2 and sum(f.shape[-1] for f in a["audio_features"]) >= 3500  # every frame kept
    assert a["input_ids"].tolist().count(fam.token_id("audio")) == sum(aut_output_length(f.shape[-1]) for f in a["audio_features"])
    err = str(long[(0, 1)]["meta"].get("error", ""))  # a video pairs with one audio: refused, not cut
    assert "35.0 s, longer than the feature extractor's 30 s window" in err, err
