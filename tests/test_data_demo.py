"""The LLaMA-Factory demo set end to end: every sample processes, placeholder
counts equal what the HF thinker's encoders output, token layout equals HF's
own processor, and a video's soundtrack interleaves like HF Qwen2.5-Omni."""

from __future__ import annotations

import pytest
import torch

from data_fixtures.helpers import DEMO_NAMES, TOKEN_IDS, data_cfg, model_cfg, processor, tiny_thinker, write_dataset, write_video

from omnitrain.data import build_dataset, collate
from omnitrain.data.media import load_audio, load_image, load_video

IMAGE, VIDEO, AUDIO = TOKEN_IDS["image_token_id"], TOKEN_IDS["video_token_id"], TOKEN_IDS["audio_token_id"]


@pytest.fixture(scope="module")
def demo():
    ds = build_dataset(data_cfg(dataset=",".join(DEMO_NAMES)), model_cfg(), processor())
    samples = {}
    for d, spec in enumerate(ds.index.specs):
        for i in range(ds.index.sizes[d]):
            s = ds[(d, i)]
            assert "error" not in s["meta"], s["meta"].get("error")
            samples[(spec.name, i)] = s
    return ds, samples


def test_every_demo_sample_processes(demo):
    ds, samples = demo
    assert ds.index.sizes == (6, 3, 3, 3)
    assert len(samples) == 15
    for (name, i), s in samples.items():
        ids = s["input_ids"]
        assert ids.dim() == 1 and len(ids) == len(s["labels"])
        assert (s["labels"] != -100).any()
        # media tokens never carry labels
        media = (ids == IMAGE) | (ids == VIDEO) | (ids == AUDIO)
        assert (s["labels"][media] == -100).all()


def _encoder_counts(model, s):
    counts = {}
    with torch.no_grad():
        if "pixel_values" in s:
            out = model.get_image_features(s["pixel_values"], s["image_grid_thw"], return_dict=True)
            counts["image"] = sum(x.shape[0] for x in out.pooler_output)
        if "pixel_values_videos" in s:
            out = model.get_video_features(s["pixel_values_videos"], s["video_grid_thw"], return_dict=True)
            counts["video"] = sum(x.shape[0] for x in out.pooler_output)
        if s["audio_features"]:
            b = collate([s], 0)
            out = model.get_audio_features(b["input_features"], b["feature_attention_mask"], return_dict=True)
            counts["audio"] = out.last_hidden_state.shape[0]
    return counts


def test_placeholders_match_encoder_outputs(demo):
    """Checked against the HF thinker's encoders and a full forward per sample."""
    _, samples = demo
    model = tiny_thinker()
    for key, s in samples.items():
        ids = s["input_ids"]
        want = {"image": int((ids == IMAGE).sum()), "video": int((ids == VIDEO).sum()), "audio": int((ids == AUDIO).sum())}
        got = _encoder_counts(model, s)
        for kind, n in got.items():
            assert n == want[kind], (key, kind, n, want[kind])
        for kind in ("image", "video", "audio"):
            if kind not in got:
                assert want[kind] == 0, (key, kind)
        b = collate([s], 151643)
        uiv = bool(b.pop("use_audio_in_video")[0])
        with torch.no_grad():
            out = model(**b, use_audio_in_video=uiv)
        assert torch.isfinite(out.loss), key


def _hf_reference(proc, sample_json, base, spg=None, audio_from_video=False):
    """HF's own processor on the same decoded media and the chat template text."""
    from omnitrain.data.formats import PLACEHOLDER_RE

    images, videos, audios, messages = [], [], [], []
    it = {k: iter(sample_json.get(k + "s", [])) for k in ("image", "video", "audio")}
    for m in sample_json["messages"]:
        content = []
        for k, part in enumerate(PLACEHOLDER_RE.split(m["content"])):
            if k % 2 == 0:
                if part:
                    content.append({"type": "text", "text": part})
                continue
            kind = part[1:-1]
            path = str(base / next(it[kind]))
            content.append({"type": kind})
            if kind == "image":
                images.append(load_image(path))
            elif kind == "video":
                clip = load_video(path, fps=2.0, max_frames=16, audio_sr=16000 if audio_from_video else None)
                videos.append(clip.frames)
                if audio_from_video:
                    audios.append(clip.audio)
            else:
                audios.append(load_audio(path, 16000))
        messages.append({"role": m["role"], "content": content})
    text = proc.apply_chat_template(messages, tokenize=False)
    kwargs = dict(
        images_kwargs={"size": {"shortest_edge": 3136, "longest_edge": 12544}},
        videos_kwargs={"size": {"shortest_edge": 3136, "longest_edge": 6272}, "do_sample_frames": False, "cap_pixels_per_frame": False},
        audio_kwargs={"sampling_rate": 16000},
    )
    if spg is not None:
        kwargs["videos_kwargs"]["fps"] = 2.0 / spg  # HF derives second_per_grid from fps
    if audio_from_video:
        kwargs["load_audio_from_video"] = True
        kwargs["audio_from_video_indices"] = list(range(len(videos)))
    return proc(text=[text], images=images or None, videos=videos or None, audio=audios or None, return_tensors="pt", **kwargs)


def test_token_layout_equals_hf_processor(demo):
    import json

    from data_fixtures.helpers import demo_dir

    _, samples = demo
    base = demo_dir()
    proc = processor()
    for name in DEMO_NAMES:
        records = json.loads((base / f"{name}.json").read_text())
        for i, rec in enumerate(records):
            s = samples[(name, i)]
            spg = float(s["video_second_per_grid"][0]) if "video_second_per_grid" in s else None
            ref = _hf_reference(proc, rec, base, spg)
            assert ref["input_ids"][0].tolist() == s["input_ids"].tolist(), (name, i)
            if "pixel_values" in s:
                torch.testing.assert_close(ref["pixel_values"], s["pixel_values"])
                assert ref["image_grid_thw"].tolist() == s["image_grid_thw"].tolist()
            if "pixel_values_videos" in s:
                torch.testing.assert_close(ref["pixel_values_videos"], s["pixel_values_videos"])
            if s["audio_features"]:
                mask = ref["feature_attention_mask"]
                for j, f in enumerate(s["audio_features"]):
                    n = int(mask[j].sum())
                    assert n == f.shape[-1]
                    torch.testing.assert_close(ref["input_features"][j, :, :n], f, atol=1e-5, rtol=1e-5)


def test_video_own_audio_interleaves_like_hf(tmp_path):
    """A video with its own soundtrack + use_audio_in_video: interleaved blocks,
    equal to HF's processor, and HF's rope index accepts it."""
    write_video(tmp_path / "v.mp4", seconds=5.0, fps=10, size=(112, 84), audio_sr=22050)
    rec = {"messages": [{"role": "user", "content": "<video>What happens?"}, {"role": "assistant", "content": "A bar grows."}], "videos": ["v.mp4"], "use_audio_in_video": True}
    write_dataset(tmp_path, [rec])
    ds = build_dataset(data_cfg(dataset_dir=str(tmp_path), dataset="ds"), model_cfg(), processor())
    s = ds[(0, 0)]
    assert "error" not in s["meta"], s["meta"]
    assert s["use_audio_in_video"] is True
    assert s["meta"]["decoded"] == [str(tmp_path / "v.mp4")]  # frames and soundtrack in one pass
    ids = s["input_ids"].tolist()
    # <|vision_bos|><|audio_bos|> V.. A.. V.. A.. <|audio_eos|><|vision_eos|>
    start = ids.index(TOKEN_IDS["vision_start_token_id"])
    assert ids[start + 1] == TOKEN_IDS["audio_start_token_id"]
    block = ids[start + 2 : ids.index(TOKEN_IDS["audio_end_token_id"])]
    runs = [k for k in range(1, len(block)) if block[k] != block[k - 1]]
    assert block[0] == VIDEO and len(runs) >= 3, "video and audio chunks must alternate"

    spg = float(s["video_second_per_grid"][0])
    ref = _hf_reference(processor(), rec, tmp_path, spg, audio_from_video=True)
    assert ref["input_ids"][0].tolist() == ids

    model = tiny_thinker()
    b = collate([s], 151643)
    b.pop("use_audio_in_video")
    with torch.no_grad():
        assert torch.isfinite(model(**b, use_audio_in_video=True).loss)
    counts = _encoder_counts(model, s)
    assert counts["audio"] == ids.count(AUDIO) and counts["video"] == ids.count(VIDEO)
    # HF rope: one position block for the pair, time-aligned video and audio
    pos, _ = model.model.get_rope_index(
        b["input_ids"], None, b["video_grid_thw"], b["attention_mask"], True,
        b["feature_attention_mask"].sum(-1), b["video_second_per_grid"],
    )
    t = pos[0, 0]
    vid_t = t[b["input_ids"][0] == VIDEO]
    aud_t = t[b["input_ids"][0] == AUDIO]
    assert vid_t.min() == aud_t.min()  # both streams start at the same time position


def test_demo_video_audio_pairs_with_listed_audio():
    """LLaMA-Factory's convention: `<video><audio>` + use_audio_in_video pairs the
    video with the listed audio file (the demo videos have no soundtrack)."""
    ds = build_dataset(data_cfg(dataset="mllm_video_audio_demo", use_audio_in_video=True), model_cfg(), processor())
    s = ds[(0, 0)]
    assert "error" not in s["meta"], s["meta"]
    ids = s["input_ids"].tolist()
    start = ids.index(TOKEN_IDS["vision_start_token_id"])
    assert ids[start + 1] == TOKEN_IDS["audio_start_token_id"]
    assert ids.count(TOKEN_IDS["audio_start_token_id"]) == 1  # the <audio> was absorbed
    model = tiny_thinker()
    b = collate([s], 151643)
    b.pop("use_audio_in_video")
    with torch.no_grad():
        assert torch.isfinite(model(**b, use_audio_in_video=True).loss)
    assert _encoder_counts(model, s)["audio"] == ids.count(AUDIO)


def test_decode_once_per_sample(demo):
    _, samples = demo
    s = samples[("mllm_demo", 0)]  # lists 1.jpg twice
    assert len(s["meta"]["decoded"]) == 1
    assert s["image_grid_thw"].shape[0] == 2
    for s in samples.values():
        assert len(s["meta"]["decoded"]) == len(set(s["meta"]["decoded"]))


def test_labels_only_on_answers(demo):
    _, samples = demo
    tok = processor().tokenizer
    s = samples[("mllm_demo", 0)]
    labelled = s["input_ids"][s["labels"] != -100]
    text = tok.decode(labelled)
    assert "They're Kane and Gretzka" in text and "celebrating" in text
    assert "Who are they" not in text and "system" not in text
    assert text.count("<|im_end|>") == 2  # each answer ends with its <|im_end|>


def test_use_audio_in_video_per_dataset():
    cfg = data_cfg(
        dataset="mllm_video_demo,mllm_video_audio_demo",
        dataset_options={"mllm_video_audio_demo": {"use_audio_in_video": True}},
    )
    ds = build_dataset(cfg, model_cfg(), processor())
    assert ds[(0, 0)]["use_audio_in_video"] is False
    assert ds[(1, 0)]["use_audio_in_video"] is True


@pytest.mark.parametrize("parts", [2, 3, 4])
def test_encoder_parts_of_a_real_micro_batch(demo, parts):
    """Per-module TP: an encoder part's media (the adapter's slice_media) is what
    collating only that part's samples gives, with images, video, audio and
    video+audio pairs (use_audio_in_video) mixed in one micro-batch."""
    from hydra.utils import instantiate

    from conftest import compose_cfg
    from omnitrain.parallel.redistribute import part_range

    adapter = instantiate(compose_cfg([]).model, _convert_="all")
    _, samples = demo
    paired = build_dataset(
        data_cfg(dataset="mllm_video_audio_demo", dataset_options={"mllm_video_audio_demo": {"use_audio_in_video": True}}),
        model_cfg(),
        processor(),
    )
    ss = list(samples.values())[:9] + [paired[(0, i)] for i in range(3)]
    ss = ss[::2] + ss[1::2]  # spread the pairs over the parts
    assert sum(s["use_audio_in_video"] for s in ss) == 3
    mb = collate(ss, 151643)
    for p in range(parts):
        lo, hi = part_range(len(ss), parts, p)
        sub = collate(ss[lo:hi], 151643)
        for module in adapter.encoders:
            keys = adapter.media_keys(module)
            got = adapter.slice_media(mb, module, lo, hi)
            assert set(got) == {k for k in keys if k in sub}, (module, p)
            for k in got:
                if k == "input_features":  # the batch pads frames to its own longest audio
                    n = sub[k].shape[-1]
                    assert not got[k][..., n:].any()
                    got[k] = got[k][..., :n]
                if k == "feature_attention_mask":
                    got[k] = got[k][..., : sub[k].shape[-1]]
                assert torch.equal(got[k], sub[k]), (module, p, k)
