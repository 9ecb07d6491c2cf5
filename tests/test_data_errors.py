"""Bad input: one clear line naming dataset, sample index and file; with
on_error=skip the run goes on and the count is reported."""

from __future__ import annotations

import shutil

import pytest

from data_fixtures.helpers import chat, data_cfg, demo_dir, model_cfg, processor, write_dataset, write_video

from omnitrain.data import DataError, build_loader


def _copy_media(tmp_path):
    src = demo_dir() / "mllm_demo_data"
    for f in ("1.jpg", "2.wav", "4.mp4"):
        shutil.copy(src / f, tmp_path / f)


GOOD = {"messages": chat("<image>What is it?", "A picture."), "images": ["1.jpg"]}


def _loader(tmp_path, samples, on_error="raise", info=None, **kw):
    write_dataset(tmp_path, samples, info=info)
    cfg = data_cfg(dataset_dir=str(tmp_path), dataset="ds", on_error=on_error, **kw)
    return build_loader(cfg, model_cfg(), processor(), seed=0, micro_batch_size=1, global_batch_size=1)


def _drain(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _assert_one_line(err: DataError, index: int, file: str):
    msg = str(err)
    assert "\n" not in msg
    assert "dataset 'ds'" in msg and f"sample {index}" in msg and file in msg, msg


def _corrupt(path, data=b"this is not a media file" * 10):
    path.write_bytes(data)


# Each case: (samples, setup, expected reason, bad file name)
def _case_missing_file(tmp_path):
    return [GOOD, {"messages": chat("<image>Hi"), "images": ["nope.jpg"]}], "missing_file", "nope.jpg"


def _case_corrupt_image(tmp_path):
    _corrupt(tmp_path / "bad.jpg")
    return [GOOD, {"messages": chat("<image>Hi"), "images": ["bad.jpg"]}], "corrupt_media", "bad.jpg"


def _case_corrupt_video(tmp_path):
    _corrupt(tmp_path / "bad.mp4")
    return [GOOD, {"messages": chat("<video>Hi"), "videos": ["bad.mp4"]}], "corrupt_media", "bad.mp4"


def _case_corrupt_audio(tmp_path):
    _corrupt(tmp_path / "bad.wav", b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 4)
    return [GOOD, {"messages": chat("<audio>Hi"), "audios": ["bad.wav"]}], "corrupt_media", "bad.wav"


def _case_placeholder_mismatch(tmp_path):
    return [GOOD, {"messages": chat("<image><image>Two?"), "images": ["1.jpg"]}], "placeholder_mismatch", "1.jpg"


def _case_empty_conversation(tmp_path):
    return [GOOD, {"messages": [], "images": []}], "empty_conversation", "ds.json"


def _case_no_answer(tmp_path):
    msgs = chat("Hi", "Hello") + [{"role": "user", "content": "And?"}]
    return [GOOD, {"messages": msgs}], "no_answer", "ds.json"


def _case_no_audio_track(tmp_path):
    return [GOOD, {"messages": chat("<video>Hi"), "videos": ["4.mp4"], "use_audio_in_video": True}], "no_audio_track", "4.mp4"


CASES = {
    "missing_file": _case_missing_file,
    "corrupt_image": _case_corrupt_image,
    "corrupt_video": _case_corrupt_video,
    "corrupt_audio": _case_corrupt_audio,
    "placeholder_mismatch": _case_placeholder_mismatch,
    "empty_conversation": _case_empty_conversation,
    "no_answer": _case_no_answer,
    "no_audio_track": _case_no_audio_track,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_sample_raises_one_line(tmp_path, case):
    _copy_media(tmp_path)
    samples, reason, file = CASES[case](tmp_path)
    with pytest.raises(DataError) as info:
        loader = _loader(tmp_path, samples)
        _drain(loader, 2)
    assert info.value.reason == reason
    _assert_one_line(info.value, 1, file)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_sample_skipped_and_counted(tmp_path, case):
    _copy_media(tmp_path)
    samples, reason, _ = CASES[case](tmp_path)
    loader = _loader(tmp_path, samples, on_error="skip")
    batches = _drain(loader, 4)  # two epochs
    stats = loader.stats()
    assert stats["skipped_total"] >= 1, stats
    assert reason in stats["skipped"]
    assert stats["samples"] + sum(stats["failed"].values()) == 4
    # a skipped sample leaves no loss behind
    assert sum(int((b["labels"] != -100).sum()) for b in batches) > 0


def test_unknown_column(tmp_path):
    _copy_media(tmp_path)
    info = {"file_name": "ds.json", "formatting": "sharegpt", "columns": {"messages": "messages", "pictures": "images"}}
    with pytest.raises(DataError) as e:
        _loader(tmp_path, [GOOD], info=info)
    assert e.value.reason == "unknown_column"
    assert "pictures" in str(e.value) and "dataset_info.json" in str(e.value) and "dataset 'ds'" in str(e.value)


def test_messages_column_missing(tmp_path):
    _copy_media(tmp_path)
    info = {"file_name": "ds.json", "columns": {"messages": "conversation", "images": "images"}}
    with pytest.raises(DataError) as e:
        _loader(tmp_path, [GOOD], info=info)
    _assert_one_line(e.value, 0, "ds.json")
    assert "'conversation'" in str(e.value)


def test_unknown_dataset_name(tmp_path):
    _copy_media(tmp_path)
    write_dataset(tmp_path, [GOOD])
    with pytest.raises(DataError) as e:
        build_loader(data_cfg(dataset_dir=str(tmp_path), dataset="dss"), model_cfg(), processor(), seed=0, micro_batch_size=1, global_batch_size=1)
    assert "unknown dataset 'dss'" in str(e.value) and "ds" in str(e.value)


def test_cutoff_never_cuts_media(tmp_path):
    _copy_media(tmp_path)
    long_answer = " ".join(["word"] * 400)
    samples = [{"messages": chat("<image>Describe.", long_answer), "images": ["1.jpg"]}]
    loader = _loader(tmp_path, samples, cutoff_len=120)
    b = _drain(loader, 1)[0]
    assert b["input_ids"].shape[1] == 120  # trailing answer text cut
    n_img = int((b["input_ids"] == 151655).sum())
    assert n_img == int(b["image_grid_thw"].prod(-1).sum()) // 4  # all image tokens kept

    # a budget that would cut into the image: error (raise) or counted skip
    with pytest.raises(DataError) as e:
        _drain(_loader(tmp_path, samples, cutoff_len=20), 1)
    assert e.value.reason == "too_long" and "cutoff_len=20" in str(e.value)
    _assert_one_line(e.value, 0, "1.jpg")
    loader = _loader(tmp_path, [GOOD] + samples, cutoff_len=20, on_error="skip")
    batches = _drain(loader, 2)
    assert loader.stats()["failed"] == {"too_long": 2}
    assert all(int((b["labels"] != -100).sum()) == 0 for b in batches)  # fillers carry no loss


def test_long_audio_chunked_not_cut(tmp_path):
    from data_fixtures.helpers import write_wav

    write_wav(tmp_path / "long.wav", 65.0)
    samples = [{"messages": chat("<audio>What is it?", "A tone."), "audios": ["long.wav"]}]
    loader = _loader(tmp_path, samples, cutoff_len=4096)
    b = _drain(loader, 1)[0]
    # 65 s with a 30 s window -> 3 segments, every frame kept
    assert b["input_features"].shape[0] == 3
    assert 6500 <= int(b["feature_attention_mask"].sum()) <= 6503  # equal parts, ceil per part
    ids = b["input_ids"][0]
    assert int((ids == 151647).sum()) == 3  # three <|audio_bos|> blocks
    assert loader.stats()["audio_chunked"] == 1

    with pytest.raises(DataError) as e:
        _drain(_loader(tmp_path, samples, long_audio="error"), 1)
    assert "65.0 s" in str(e.value) and "long.wav" in str(e.value)

    loader = _loader(tmp_path, samples, max_audio_seconds=10.0)
    b = _drain(loader, 1)[0]
    assert b["input_features"].shape[0] == 1 and int(b["feature_attention_mask"].sum()) == 1000
    assert loader.stats()["audio_capped"] == 1


def test_video_audio_track_too_long(tmp_path):
    write_video(tmp_path / "v.mp4", seconds=3.0, fps=5, audio_sr=16000)
    samples = [{"messages": chat("<video>Hi"), "videos": ["v.mp4"], "use_audio_in_video": True}]
    # a 3 s track fits the 30 s window; check the flag per sample overrides the dataset default
    loader = _loader(tmp_path, samples, use_audio_in_video=False)
    b = _drain(loader, 1)[0]
    assert bool(b["use_audio_in_video"][0]) and "input_features" in b
    samples[0]["use_audio_in_video"] = False
    loader = _loader(tmp_path, samples, use_audio_in_video=True)
    b = _drain(loader, 1)[0]
    assert not bool(b["use_audio_in_video"][0]) and "input_features" not in b


def test_error_in_worker_is_still_one_line(tmp_path):
    _copy_media(tmp_path)
    samples, _, file = _case_corrupt_image(tmp_path)
    with pytest.raises(DataError) as info:
        _drain(_loader(tmp_path, samples, num_workers=1), 2)
    _assert_one_line(info.value, 1, file)
