"""Media decoding details: EXIF orientation, video timing from the real
sampling rate (incl. containers without a frame count), labels policy."""

from __future__ import annotations

import pytest

from data_fixtures.helpers import chat, data_cfg, model_cfg, processor, write_dataset, write_video

from omnitrain.data import build_dataset
from omnitrain.data.media import load_image, load_video


def test_exif_orientation_applied(tmp_path):
    from PIL import Image

    im = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    im.save(tmp_path / "r.jpg", exif=exif)
    out = load_image(str(tmp_path / "r.jpg"))
    assert out.size == (20, 40) and out.mode == "RGB"


@pytest.mark.parametrize("ext", ["mp4", "mkv"])
def test_video_timing_from_actual_sampling(tmp_path, ext):
    path = write_video(tmp_path / f"v.{ext}", seconds=4.0, fps=10, audio_sr=None)
    clip = load_video(str(path), fps=2.0, max_frames=64)
    assert clip.frames.shape[0] == 8
    assert clip.seconds_per_frame == pytest.approx(0.5, abs=0.02)
    # a frame cap lowers the real rate: 4 frames over 4 s -> 1 s apart, not 0.5
    capped = load_video(str(path), fps=2.0, max_frames=4)
    assert capped.frames.shape[0] == 4
    assert capped.seconds_per_frame == pytest.approx(1.0, abs=0.02)


def test_second_per_grid_reaches_the_batch(tmp_path):
    write_video(tmp_path / "v.mp4", seconds=4.0, fps=10, audio_sr=None)
    write_dataset(tmp_path, [{"messages": chat("<video>What?"), "videos": ["v.mp4"]}])
    ds = build_dataset(data_cfg(dataset_dir=str(tmp_path), dataset="ds", video_max_frames=4), model_cfg(), processor())
    s = ds[(0, 0)]
    # temporal patch 2 x 1 s between sampled frames (HF would assume 2 / fps = 1.0 for any video)
    assert float(s["video_second_per_grid"][0]) == pytest.approx(2.0, abs=0.05)


@pytest.mark.parametrize(
    "opts, present, absent",
    [
        ({}, ["First answer.", "Second answer."], ["question", "helpful"]),
        ({"mask_history": True}, ["Second answer."], ["First answer.", "question"]),
        ({"train_on_prompt": True}, ["First question?", "First answer.", "Second answer."], []),
        ({"system": "Be terse."}, ["Second answer."], ["Be terse."]),
    ],
)
def test_label_policy(tmp_path, opts, present, absent):
    msgs = chat("First question?", "First answer.") + chat("Second question?", "Second answer.")
    write_dataset(tmp_path, [{"messages": msgs}])
    ds = build_dataset(data_cfg(dataset_dir=str(tmp_path), dataset="ds", **opts), model_cfg(), processor())
    s = ds[(0, 0)]
    tok = processor().tokenizer
    labelled = tok.decode(s["input_ids"][s["labels"] != -100])
    for p in present:
        assert p in labelled, (opts, labelled)
    for a in absent:
        assert a not in labelled, (opts, labelled)
    full = tok.decode(s["input_ids"])
    assert full.startswith("<|im_start|>system\n" + opts.get("system", "You are a helpful assistant."))


def _decode_in_child(path, out):
    clip = load_video(path, fps=2.0, max_frames=8)
    out.put(clip.frames.shape[0])


def test_video_decodes_in_a_process_forked_after_decoding(tmp_path):
    # A sweep runs its single-process job in the launching process, then forks
    # the next job's workers: PyAV's per-thread swscale context (slice threads)
    # was inherited without its threads and the child's first frame hung forever.
    import multiprocessing as mp

    path = str(write_video(tmp_path / "v.mp4", seconds=2.0, fps=10, audio_sr=None))  # encoding converts too
    assert load_video(path, fps=2.0, max_frames=8).frames.shape[0] == 4
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_decode_in_child, args=(path, out))
    child.start()
    child.join(60)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung and child.exitcode == 0, "a forked process hangs decoding video"
    assert out.get(timeout=5) == 4
