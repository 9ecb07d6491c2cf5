"""A micro-batch mixing samples with and without `use_audio_in_video` gives
each sample the rope positions and features it gets alone (real media)."""

import torch
from hydra.utils import instantiate

from conftest import compose_cfg
from data_fixtures.helpers import data_cfg, model_cfg, processor, write_dataset, write_video
from omnitrain.data import build_dataset, collate
from omnitrain.parallel.layout import whole_plan


def test_mixed_use_audio_in_video_in_one_micro_batch(tmp_path):
    write_video(tmp_path / "v.mp4", seconds=3.0, fps=10, size=(112, 84), audio_sr=22050)
    (tmp_path / "img").mkdir()
    from PIL import Image

    Image.new("RGB", (112, 84), (200, 30, 30)).save(tmp_path / "img" / "a.jpg")
    recs = [
        {"messages": [{"role": "user", "content": "<video>What happens?"}, {"role": "assistant", "content": "A bar grows."}],
         "videos": ["v.mp4"], "use_audio_in_video": True},
        {"messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "Red."}],
         "images": ["img/a.jpg"]},
        {"messages": [{"role": "user", "content": "<video>And now?"}, {"role": "assistant", "content": "Still a bar."}],
         "videos": ["v.mp4"], "use_audio_in_video": False},
    ]
    write_dataset(tmp_path, recs)
    ds = build_dataset(data_cfg(dataset_dir=str(tmp_path), dataset="ds"), model_cfg(), processor())
    samples = [ds[(0, i)] for i in range(3)]
    assert [s["use_audio_in_video"] for s in samples] == [True, False, False]

    adapter = instantiate(compose_cfg().model, _convert_="all")
    seg = whole_plan(adapter.depths)
    model = adapter.build(seg, torch.device("cpu"), seed=3)
    pad = processor().tokenizer.pad_token_id
    with torch.no_grad():
        alone = [adapter.stage_forward(model, seg, collate([s], pad), {}, 1) for s in samples]
        together = adapter.stage_forward(model, seg, collate(samples, pad), {}, 1)
        pos_alone = [adapter.rope_positions(model, collate([s], pad)) for s in samples]
        pos_together = adapter.rope_positions(model, collate(samples, pad))
    for b, p in enumerate(pos_alone):
        assert torch.equal(pos_together[:, b, : p.shape[2]], p[:, 0])
    assert abs(float(together) - float(sum(alone))) / float(sum(alone)) < 1e-5
