"""The LLaMA-Factory demo set for the vision-language families (Qwen2.5-VL,
Qwen2-VL), each through its own shipped processor and chat template: every
image/video sample processes, token ids and media tensors equal HF's own
processor on the same media and settings, placeholder counts equal what the
HF model's vision tower outputs, and audio (a sample's, or a video's
soundtrack) is one clear error, or a counted skip with data.on_error=skip."""

from __future__ import annotations

import json
import re

import pytest
import torch

from data_fixtures.helpers import data_cfg, demo_dir, model_cfg, processor

from omnitrain.data import DataError, build_dataset, build_loader, collate
from omnitrain.data.formats import PLACEHOLDER_RE
from omnitrain.data.media import load_image, load_video

IMAGE, VIDEO, V_START, V_END = 151655, 151656, 151652, 151653
PAD = 151643
VL_DEMO = ["mllm_demo", "mllm_video_demo"]
FAMILIES = ["qwen25_vl", "qwen2_vl"]


@pytest.fixture(scope="module", params=FAMILIES)
def name(request):
    # Module-scoped: pytest runs every test of one family, then the other; the
    # processors are loaded once per process (helpers.processor is cached).
    return request.param


@pytest.fixture(scope="module")
def demo(name):
    ds = build_dataset(data_cfg(dataset=",".join(VL_DEMO)), model_cfg(name), processor(name))
    samples = {}
    for d, spec in enumerate(ds.index.specs):
        for i in range(ds.index.sizes[d]):
            s = ds[(d, i)]
            assert "error" not in s["meta"], s["meta"].get("error")
            samples[(spec.name, i)] = s
    return ds, samples


def test_every_demo_sample_processes(name, demo):
    ds, samples = demo
    assert ds.index.sizes == (6, 3)
    fam, tok = model_cfg(name), processor(name).tokenizer
    assert [fam.token_id(r) for r in ("image", "video", "vision_bos", "vision_eos")] == [IMAGE, VIDEO, V_START, V_END]
    system = tok.encode("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", add_special_tokens=False)
    for (ds_name, i), s in samples.items():
        ids, labels = s["input_ids"], s["labels"]
        assert ids.dim() == 1 and len(ids) == len(labels)
        assert ids[: len(system)].tolist() == system, (ds_name, i)  # the template's default system turn
        assert (labels != -100).any()
        media = (ids == IMAGE) | (ids == VIDEO)
        assert (labels[media] == -100).all()  # media tokens never carry labels
        kind, grid = ("image", "image_grid_thw") if ds_name == "mllm_demo" else ("video", "video_grid_thw")
        tid = IMAGE if kind == "image" else VIDEO
        # one <|vision_start|> pad... <|vision_end|> block per item, sized by its grid
        starts = torch.nonzero(ids == V_START).squeeze(1).tolist()
        assert len(starts) == s[grid].shape[0]
        for st, g in zip(starts, s[grid]):
            n = int(g.prod()) // 4
            assert ids[st + 1 : st + 1 + n].eq(tid).all() and int(ids[st + 1 + n]) == V_END, (ds_name, i)
        assert not s["audio_features"] and s["use_audio_in_video"] is False
        assert ("pixel_values" in s) == (kind == "image") and ("pixel_values_videos" in s) == (kind == "video")


def _hf_reference(proc, rec, base):
    """HF's processor on the same decoded media, the chat template's text and our settings."""
    images, videos, clips, messages = [], [], [], []
    it = {k: iter(rec.get(k + "s", [])) for k in ("image", "video")}
    for m in rec["messages"]:
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
            else:
                clips.append(load_video(path, fps=2.0, max_frames=16, min_frames=2, multiple=2))
                videos.append(clips[-1].frames)
        messages.append({"role": m["role"], "content": content})
    text = proc.apply_chat_template(messages, tokenize=False)
    kwargs = dict(
        images_kwargs={"size": {"shortest_edge": 3136, "longest_edge": 12544}},
        videos_kwargs={"size": {"shortest_edge": 3136, "longest_edge": 6272}, "do_sample_frames": False, "cap_pixels_per_frame": False},
    )
    if clips:
        # Qwen2.5-VL's processor derives seconds per grid (temporal patch / fps)
        # from the clip's metadata: give it the kept frames' rate, from their timestamps.
        from transformers.video_utils import VideoMetadata

        kwargs["videos_kwargs"]["video_metadata"] = [
            VideoMetadata(total_num_frames=len(c.times), fps=(len(c.times) - 1) / (c.times[-1] - c.times[0])) for c in clips
        ]
    return proc(text=[text], images=images or None, videos=videos or None, return_tensors="pt", **kwargs)


def test_token_layout_and_counts_equal_hf_processor(name, demo):
    _, samples = demo
    base, proc = demo_dir(), processor(name)
    for ds_name in VL_DEMO:
        records = json.loads((base / f"{ds_name}.json").read_text())
        for i, rec in enumerate(records):
            s = samples[(ds_name, i)]
            ref = _hf_reference(proc, rec, base)
            ids = ref["input_ids"][0]
            assert ids.tolist() == s["input_ids"].tolist(), (ds_name, i)
            for tid, pix, grid in ((IMAGE, "pixel_values", "image_grid_thw"), (VIDEO, "pixel_values_videos", "video_grid_thw")):
                assert int((ids == tid).sum()) == int((s["input_ids"] == tid).sum())
                assert (pix in ref) == (pix in s), (ds_name, i, pix)
                if pix in s:
                    assert ref[grid].tolist() == s[grid].tolist(), (ds_name, i)
                    assert int((ids == tid).sum()) == int(ref[grid].prod(-1).sum()) // 4
                    torch.testing.assert_close(ref[pix], s[pix])
            if "second_per_grid_ts" in ref:  # Qwen2.5-VL's processor
                torch.testing.assert_close(ref["second_per_grid_ts"].float(), s["video_second_per_grid"])


@pytest.fixture(scope="module")
def tiny_hf(name):
    """The family's HF model at one vision block and one LLM layer, random weights."""
    from conftest import compose_cfg
    from omnitrain.models.family import build_family, import_object

    small = ["model.config.vision_config.depth=1", "model.config.text_config.num_hidden_layers=1"]
    if name == "qwen25_vl":
        small.append("model.config.vision_config.fullatt_block_indexes=[0]")
    fam = build_family(compose_cfg([f"model={name}", *small]).model)
    torch.manual_seed(0)
    return fam, import_object(fam.hf_class)._from_config(fam.hf_config).eval()


def test_placeholders_match_hf_vision_outputs(name, demo, tiny_hf):
    """Checked against the HF model's vision tower and a full HF forward per sample."""
    _, samples = demo
    fam, model = tiny_hf
    for key, s in samples.items():
        b = collate([s], PAD)
        with torch.no_grad():
            if "pixel_values" in b:
                out = model.get_image_features(b["pixel_values"], b["image_grid_thw"], return_dict=True)
                assert sum(x.shape[0] for x in out.pooler_output) == int((b["input_ids"] == IMAGE).sum()), key
            if "pixel_values_videos" in b:
                out = model.get_video_features(b["pixel_values_videos"], b["video_grid_thw"], return_dict=True)
                assert sum(x.shape[0] for x in out.pooler_output) == int((b["input_ids"] == VIDEO).sum()), key
            kw = {k: b[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw") if k in b}
            if name == "qwen25_vl" and "video_second_per_grid" in b:
                kw["second_per_grid_ts"] = b["video_second_per_grid"]
            out = model(**kw, mm_token_type_ids=fam.mm_token_types(b), use_cache=False)
        assert torch.isfinite(out.loss), key


def test_micro_batches_are_right_padded_whatever_the_tokenizer_side(name):
    """Qwen2-VL's processor pads on the left (upstream); the collator pads on
    the right itself with the tokenizer's pad id, for every family."""
    tok = processor(name).tokenizer
    assert tok.padding_side == {"qwen2_vl": "left", "qwen25_vl": "right"}[name]
    loader = build_loader(data_cfg(dataset=",".join(VL_DEMO)), model_cfg(name), processor(name), seed=0, micro_batch_size=3, global_batch_size=3)
    it = iter(loader)
    for _ in range(3):
        b = next(it)
        am = b["attention_mask"]
        lengths = am.sum(-1)
        assert len(set(lengths.tolist())) > 1, "want samples of different lengths in a micro-batch"
        for row, n in zip(range(am.shape[0]), lengths.tolist()):
            assert am[row, :n].all() and not am[row, n:].any()
            assert (b["input_ids"][row, n:] == tok.pad_token_id).all() and (b["labels"][row, n:] == -100).all()
        assert int(b["input_ids"][am.bool()].eq(tok.pad_token_id).sum()) == 0


def _one_line(err: DataError, dataset: str, model: str):
    msg = str(err)
    assert "\n" not in msg
    assert f"dataset {dataset!r}" in msg and re.search(r"sample \d+", msg) and f"model {model}" in msg, msg
    assert err.reason == "unsupported_media"


@pytest.mark.parametrize(
    "case",
    [
        dict(dataset="mllm_audio_demo"),  # a sample's own audio
        dict(dataset="mllm_video_demo", use_audio_in_video=True),  # a video's soundtrack, by the data default
        dict(dataset="mllm_video_demo", dataset_options={"mllm_video_demo": {"use_audio_in_video": True}}),  # ... per dataset
    ],
    ids=["audio", "use_audio_in_video", "use_audio_in_video_per_dataset"],
)
def test_audio_for_a_vl_model_is_one_clear_error_or_a_counted_skip(name, case):
    fam, proc = model_cfg(name), processor(name)
    bad = case["dataset"]
    with pytest.raises(DataError) as e:
        loader = build_loader(data_cfg(**case), fam, proc, seed=0, micro_batch_size=1, global_batch_size=1)
        next(iter(loader))
    _one_line(e.value, bad, name)
    # data.on_error=skip: mixed with the image set, every bad sample is skipped and counted
    loader = build_loader(data_cfg(**{**case, "dataset": f"mllm_demo,{bad}", "on_error": "skip"}), fam, proc, seed=0, micro_batch_size=1, global_batch_size=1)
    it = iter(loader)
    batches = [next(it) for _ in range(loader.epoch_len)]  # one epoch: 6 images + 3 bad
    stats = loader.stats()
    assert stats["samples"] == 6 and stats["failed"] == {"unsupported_media": 3} and stats["skipped_total"] == 3, stats
    assert all(f"dataset '{bad}'" in err and f"model {name}" in err for err in stats["errors"])
    skipped = [b for b in batches if "pixel_values" not in b]
    assert len(skipped) == 3 and all(int((b["labels"] != -100).sum()) == 0 for b in skipped)  # fillers carry no loss


def test_sample_cache_without_a_feature_extractor(name, tmp_path):
    """A VL processor has no audio feature extractor: the cache key still works."""
    cfg = data_cfg(dataset="mllm_demo", cache_dir=str(tmp_path / "cache"), max_samples=1)
    fam, proc = model_cfg(name), processor(name)
    first = build_dataset(cfg, fam, proc)[(0, 0)]
    again = build_dataset(cfg, fam, proc)[(0, 0)]
    assert first["meta"]["cache_hit"] is False and again["meta"]["cache_hit"] is True
    assert torch.equal(first["input_ids"], again["input_ids"]) and torch.equal(first["pixel_values"], again["pixel_values"])
