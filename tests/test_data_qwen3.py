"""The demo set through the Qwen3 families' shipped processors: Qwen3-Omni's
audio placeholders follow the AuT encoder's length rule and Qwen3-VL's videos
are laid out per temporal patch with timestamps, so the real encoders' outputs
fill exactly the placeholders (the merge refuses any mismatch) when the model
runs on collated demo micro-batches mixing images, videos, audio and text."""

from __future__ import annotations

import pytest
import torch

from data_fixtures.helpers import data_cfg, model_cfg, processor

from omnitrain.data import build_dataset, collate
from omnitrain.parallel.layout import whole_plan

CASES = {
    "qwen3_omni": ["mllm_demo", "mllm_audio_demo", "mllm_video_demo"],
    "qwen3_vl": ["mllm_demo", "mllm_video_demo"],
}


@pytest.mark.parametrize("name", list(CASES))
def test_demo_micro_batches_run_through_the_model(name):
    fam = model_cfg(name)
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
