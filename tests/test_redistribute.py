"""Splitting a micro-batch's media into encoder parts, and joining the
parts' features (the pieces per-module TP sizes need)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import _synth
from _dist import run_workers
from conftest import compose_cfg
from omnitrain.parallel.redistribute import gather_rows, part_range


@pytest.fixture(scope="module")
def adapter():
    from hydra.utils import instantiate

    return instantiate(compose_cfg([]).model, _convert_="all")


def _counts(items):
    return [(n["image"], n["video"], n["audio"]) for n in items]


def test_part_range():
    assert [part_range(6, 3, p) for p in range(3)] == [(0, 2), (2, 4), (4, 6)]
    with pytest.raises(ValueError, match="micro-batch of 3 samples does not split into 2 encoder parts"):
        part_range(3, 2, 0)


@pytest.mark.parametrize("parts", [1, 2, 3, 6])
def test_slices_concatenate_to_the_micro_batch(adapter, parts):
    # 6 samples: images, audio, video, image+audio, text only, all three
    mb = _synth.micro_batches(1, batch=6)[0]
    assert _counts(adapter.media_items(mb)) == [(1, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 1), (0, 0, 0), (1, 1, 1)]
    pieces = {m: [adapter.slice_media(mb, m, *part_range(6, parts, p)) for p in range(parts)] for m in ("vision", "audio")}
    for m in adapter.encoders:
        for k in (k for k in adapter.media_keys(m) if k in mb):
            got = [s[k] for s in pieces[m] if k in s]
            assert torch.equal(torch.cat(got), mb[k]), (m, k)
    # a part with no sample of a kind has none of its keys
    if parts == 6:
        assert pieces["vision"][4] == {} and pieces["audio"][2] == {}
        assert set(pieces["vision"][5]) == {k for k in adapter.media_keys("vision") if k in mb}


def test_media_items_count_video_soundtracks_per_sample(adapter):
    # use_audio_in_video: the interleaved block starts with audio_start after vision_start
    ids = [_synth.IM_START, _synth.V_START, _synth.A_START, _synth.VIDEO, _synth.AUDIO, _synth.A_END, _synth.V_END]
    mb = {
        "input_ids": torch.tensor([ids, ids]),
        "attention_mask": torch.ones(2, len(ids), dtype=torch.long),
        "use_audio_in_video": torch.tensor([True, False]),
    }
    assert _counts(adapter.media_items(mb)) == [(0, 1, 1), (0, 0, 1)]


def _gather(rank, world):
    # rank r contributes r + 1 rows (rank 0 of a 3-group: 1, 2, 3 rows; one part may be empty)
    rows = 0 if rank == 1 else rank + 1
    x = torch.full((rows, 3), float(rank), requires_grad=True)
    y = gather_rows(x, dist.group.WORLD, rank)
    (y * torch.arange(y.shape[0], dtype=torch.float32)[:, None]).sum().backward()
    return y.detach(), x.grad


def test_gather_rows_joins_parts_and_backward_keeps_own_rows():
    out = run_workers(_gather, 3)
    want = torch.cat([torch.zeros(1, 3), torch.full((3, 3), 2.0)])
    for y, _ in out:
        assert torch.equal(y, want)
    # d/dx of sum(row_index * y): each rank's own rows' indices in the whole
    assert torch.equal(out[0][1], torch.zeros(1, 3))
    assert out[1][1].shape == (0, 3)
    assert torch.equal(out[2][1], torch.tensor([1.0, 2.0, 3.0])[:, None].expand(3, 3))
