"""build_loader: order from seed + global batch only, resume, workers, cache,
mixing, LLaVA json, max_samples."""

from __future__ import annotations

import itertools
import json
import shutil

import torch

from data_fixtures.helpers import data_cfg, demo_dir, model_cfg, processor

from omnitrain.data import build_loader, count_label_tokens
from omnitrain.data.loader import _MicroBatches
from omnitrain.data.sampler import epoch_counts, epoch_order, micro_batch_positions

# image + audio demo sets: cheap to decode, two datasets to mix
NAMES = "mllm_demo,mllm_audio_demo"


def _loader(micro=1, global_bs=4, rank=0, dp=1, seed=7, **kw):
    kw.setdefault("dataset", NAMES)
    return build_loader(data_cfg(**kw), model_cfg(), processor(), seed=seed, micro_batch_size=micro,
                        global_batch_size=global_bs, dp_rank=rank, dp_size=dp)


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _rows(batches):
    """Each sample's unpadded input_ids, in order."""
    out = []
    for b in batches:
        for ids, mask in zip(b["input_ids"], b["attention_mask"]):
            out.append(ids[mask.bool()].tolist())
    return out


def test_order_depends_only_on_seed_and_global_batch():
    for micro, dp in [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1)]:
        keys = []
        for rank in range(dp):
            per_rank = 8 // dp // micro
            for m in range(per_rank * 3):  # three global steps
                step = m // per_rank
                keys.append((step, micro_batch_positions(m, global_batch_size=8, micro_batch_size=micro, dp_rank=rank, dp_size=dp)))
        by_step = {}
        for step, pos in keys:
            by_step.setdefault(step, []).extend(pos)
        assert {s: sorted(p) for s, p in by_step.items()} == {s: list(range(8 * s, 8 * s + 8)) for s in range(3)}


def test_same_samples_under_any_layout():
    ref = _rows(_take(_loader(micro=1, global_bs=4), 8))  # two global steps
    got = []
    ranks = [_take(_loader(micro=2, global_bs=4, rank=r, dp=2), 2) for r in range(2)]
    for step in range(2):
        for r in range(2):
            got += _rows([ranks[r][step]])
    assert got == ref


def test_seed_determines_order_and_epochs_cover_everything():
    a = _rows(_take(_loader(seed=1), 9))
    assert a == _rows(_take(_loader(seed=1), 9))
    assert a != _rows(_take(_loader(seed=2), 9))
    order = epoch_order((6, 3), None, 1, 0)
    assert sorted(order) == [(0, i) for i in range(6)] + [(1, i) for i in range(3)]
    assert epoch_order((6, 3), None, 1, 1) != order  # reshuffled per epoch


def test_resume_from_state_dict():
    full = _take(_loader(), 7)
    first = _loader()
    _take(first, 4)
    state = first.state_dict()
    resumed = _loader()
    resumed.load_state_dict(state)
    rest = _take(resumed, 3)
    assert _rows(rest) == _rows(full[4:])
    # another micro/dp layout resumes on a global-step boundary
    other = _loader(micro=2, global_bs=4)
    other.load_state_dict(state)  # 4 micro-batches of 1 = one global step of 4
    assert _rows(_take(other, 1)) == _rows(full[4:6])


def test_workers_give_identical_batches():
    ref = _take(_loader(micro=2), 3)
    got = _take(_loader(micro=2, num_workers=2), 3)
    for a, b in zip(ref, got):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    # a bounded pass (evaluation): the sampler ends with it, so workers prepare nothing past it
    bounded = _loader(micro=2, num_workers=2)
    assert _rows(itertools.islice(bounded.iterate(3), 5)) == _rows(ref) and bounded.micro_step == 3
    assert [len(keys) for keys in itertools.islice(_MicroBatches(bounded, 1, 3), 5)] == [2, 2]  # islice: fails, not hangs


def test_cache_skips_decoding(tmp_path):
    first = _loader(cache_dir=str(tmp_path / "cache"))
    a = _take(first, 9)
    s1 = first.stats()
    assert s1["cache_misses"] == 9 and sum(s1["decodes"].values()) > 0
    second = _loader(cache_dir=str(tmp_path / "cache"))
    b = _take(second, 9)
    s2 = second.stats()
    assert s2["cache_hits"] == 9 and s2["decodes"] == {}
    for x, y in zip(a, b):
        for k in x:
            assert torch.equal(x[k], y[k]), k
    # other processing settings -> other keys (no stale hits)
    third = _loader(cache_dir=str(tmp_path / "cache"), image_max_pixels=6272)
    _take(third, 2)
    assert third.stats()["cache_hits"] == 0


def test_mixing_weights():
    assert epoch_counts([6, 3], None) == [6, 3]
    assert epoch_counts([6, 3], [1.0, 2.0]) == [3, 6]
    assert epoch_counts([6, 0], [1.0, 1.0]) == [6, 0]
    order = epoch_order((6, 3), (1.0, 2.0), 3, 0)
    assert sum(1 for d, _ in order if d == 1) == 6  # the small set repeats
    loader = _loader(weights=[1.0, 2.0], micro=3, global_bs=9)
    batches = _take(loader, 3)
    n_audio = sum(int(b["feature_attention_mask"].shape[0]) if "feature_attention_mask" in b else 0 for b in batches)
    assert n_audio == 6


def test_llava_json_path_and_max_samples(tmp_path):
    shutil.copy(demo_dir() / "mllm_demo_data" / "1.jpg", tmp_path / "1.jpg")
    records = [
        {"id": f"s{i}", "image": "1.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": f"Players {i}."},
            {"from": "human", "value": "Where?"}, {"from": "gpt", "value": "A field."}]}
        for i in range(5)
    ] + [{"id": "text", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    loader = _loader(dataset=str(path), micro=6, global_bs=6)
    b = _take(loader, 1)[0]
    assert b["input_ids"].shape[0] == 6 and b["image_grid_thw"].shape[0] == 5
    tok = processor().tokenizer
    texts = [tok.decode(ids[m.bool()]) for ids, m in zip(b["input_ids"], b["attention_mask"])]
    assert any("Be brief." in t for t in texts)
    assert count_label_tokens(b) == int((b["labels"][:, 1:] != -100).sum()) > 0
    capped = _loader(dataset=str(path), max_samples=2, micro=2, global_bs=2)
    assert capped.epoch_len == 2


def test_micro_batch_contract():
    b = _take(_loader(micro=4, global_bs=4, dataset="mllm_demo,mllm_audio_demo,mllm_video_demo"), 1)[0]
    assert b["input_ids"].dtype == torch.long and b["attention_mask"].dtype == torch.long
    assert b["labels"].shape == b["input_ids"].shape
    assert b["use_audio_in_video"].dtype == torch.bool and b["use_audio_in_video"].shape == (4,)
    # right padding: ones then zeros
    for m in b["attention_mask"]:
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()
    assert (b["labels"][b["attention_mask"] == 0] == -100).all()
    allowed = {"input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "pixel_values_videos",
               "video_grid_thw", "video_second_per_grid", "input_features", "feature_attention_mask", "use_audio_in_video"}
    assert set(b) <= allowed
