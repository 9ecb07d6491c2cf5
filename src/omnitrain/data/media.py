"""Media decoding: images (PIL), audio files (soundfile+soxr, av fallback),
video frames and a video's own audio track (av, one pass over the file).

Pure functions from a path and settings to arrays; every failure is a
`DataError` with the file named (the caller adds dataset and sample).
librosa's own backends (soundfile, soxr) are used directly: `librosa.load`
JIT-compiles for ~20 s on first use.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from omnitrain.data.errors import DataError


def _corrupt(path: str, kind: str, e: BaseException) -> DataError:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return DataError(f"cannot decode {kind}: {msg}", file=path, reason="corrupt_media")


def load_image(path: str):
    """RGB PIL image, EXIF orientation applied."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
            return im.convert("RGB")
    except Exception as e:  # PIL raises many types for bad files
        raise _corrupt(path, "image", e) from None


def to_mono(wave: np.ndarray) -> np.ndarray:
    """(channels, n) or (n,) -> (n,) float32, channel mean like librosa."""
    wave = np.asarray(wave, dtype=np.float32)
    return wave.mean(axis=0) if wave.ndim == 2 else wave


def resample(wave: np.ndarray, sr: int, target_sr: int) -> np.ndarray:
    if sr == target_sr:
        return np.ascontiguousarray(wave, dtype=np.float32)
    import soxr

    # soxr "HQ" is librosa's default resampler (res_type="soxr_hq").
    return soxr.resample(wave, sr, target_sr, quality="HQ").astype(np.float32, copy=False)


def load_audio(path: str, target_sr: int) -> np.ndarray:
    """Mono float32 waveform at `target_sr` (soundfile; av for what it cannot read)."""
    import soundfile as sf

    try:
        wave, sr = sf.read(path, dtype="float32", always_2d=True)
        return resample(to_mono(wave.T), sr, target_sr)
    except sf.LibsndfileError:
        pass  # e.g. m4a, or a container soundfile does not know: try av
    except Exception as e:
        raise _corrupt(path, "audio", e) from None
    try:
        import av

        with av.open(path) as container:
            if not container.streams.audio:
                raise DataError("no audio stream in file", file=path, reason="corrupt_media")
            wave, sr = _decode_audio_stream(container, container.streams.audio[0])
    except DataError:
        raise
    except Exception as e:
        raise _corrupt(path, "audio", e) from None
    return resample(wave, sr, target_sr)


_REFORMATTER = threading.local()  # .pid, .r: this thread's av VideoReformatter; see _rgb
_INHERITED: list = []  # reformatters made before a fork, in the thread that forked


def _rgb(frame) -> np.ndarray:
    """An av VideoFrame -> (h, w, 3) uint8.

    Not `frame.to_ndarray(format="rgb24")`: PyAV keeps one swscale context per
    thread, since PyAV 17 by default with a slice thread per CPU. A process that forks
    after a conversion (a sweep's single-process job, then a multi-process
    one) leaves the child that context without its threads, and the child's
    next conversion waits for them forever. Here each process (and thread)
    converts with its own single-threaded reformatter; one inherited over
    fork is never touched (nor freed) in the child.
    """
    from av.video.reformatter import VideoReformatter

    # Per thread (freed with it), re-made after a fork: the pid tells an inherited
    # one, which is kept (freeing it could wait for its missing threads).
    if getattr(_REFORMATTER, "pid", None) != os.getpid():
        if hasattr(_REFORMATTER, "r"):
            _INHERITED.append(_REFORMATTER.r)
        _REFORMATTER.pid, _REFORMATTER.r = os.getpid(), VideoReformatter()
    r = _REFORMATTER.r
    try:
        out = r.reformat(frame, format="rgb24", threads=1)
    except TypeError:  # PyAV < 17 has no `threads`: its reformatting is single-threaded
        out = r.reformat(frame, format="rgb24")
    return out.to_ndarray()


def _frame_samples(frame) -> np.ndarray:
    """An av AudioFrame -> (channels, n) float32."""
    arr = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if frame.format.is_planar:
        arr = arr.reshape(channels, -1)
    else:
        arr = arr.reshape(-1, channels).T
    if arr.dtype.kind == "i":
        arr = arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
    return arr.astype(np.float32, copy=False)


def _decode_audio_stream(container, stream):
    chunks = [_frame_samples(f) for f in container.decode(stream)]
    if not chunks:
        raise DataError("audio stream has no samples", file=container.name, reason="corrupt_media")
    return to_mono(np.concatenate(chunks, axis=1)), stream.rate


@dataclass
class VideoClip:
    frames: np.ndarray  # (T, H, W, 3) uint8, T a multiple of the temporal patch
    times: List[float]  # presentation time of each kept frame, seconds
    seconds_per_frame: float  # measured spacing of the kept frames
    audio: Optional[np.ndarray] = None  # mono float32 at the requested rate
    duration: float = 0.0


def plan_frame_count(duration: float, fps: float, max_frames: int, min_frames: int, total: Optional[int], multiple: int) -> int:
    """How many frames to sample: duration x fps, clamped, a multiple of the temporal patch."""
    n = duration * fps
    n = max(n, min_frames)
    n = min(n, max_frames)
    if total:
        n = min(n, total)
    n = int(math.floor(n / multiple)) * multiple
    return max(n, multiple)


def load_video(
    path: str,
    *,
    fps: float,
    max_frames: int,
    min_frames: int = 2,
    multiple: int = 2,
    audio_sr: Optional[int] = None,
) -> VideoClip:
    """Sample frames uniformly in time at `fps` (at most `max_frames`) in one pass.

    With `audio_sr`, the video's own audio track is decoded in the same pass
    (None when the file has no audio stream). Containers without a frame
    count (mkv, webm) are timed by their frames' timestamps.
    """
    import av

    try:
        container = av.open(path)
    except Exception as e:
        raise _corrupt(path, "video", e) from None
    with container:
        if not container.streams.video:
            raise DataError("no video stream in file", file=path, reason="corrupt_media")
        vs = container.streams.video[0]
        vs.thread_type = "AUTO"
        streams = [vs]
        aus = None
        if audio_sr is not None and container.streams.audio:
            aus = container.streams.audio[0]
            streams.append(aus)
        tb = float(vs.time_base) if vs.time_base else None
        rate = float(vs.average_rate) if vs.average_rate else None
        duration = None
        if vs.duration and tb:
            duration = vs.duration * tb
        elif container.duration:
            duration = container.duration / 1e6
        total = vs.frames or (round(duration * rate) if duration and rate else None)

        kept, times, all_frames, audio_chunks = [], [], [], []
        targets = None
        if duration:
            n = plan_frame_count(duration, fps, max_frames, min_frames, total, multiple)
            targets = [k * duration / n for k in range(n)]
        tol = 0.5 / rate if rate else 0.0
        k = 0
        start = None
        try:
            for packet in container.demux(streams):
                for frame in packet.decode():
                    if packet.stream is aus:
                        audio_chunks.append(_frame_samples(frame))
                        continue
                    t = float(frame.pts * tb) if frame.pts is not None and tb else len(all_frames) / (rate or fps)
                    if start is None:
                        start = t
                    t -= start
                    if targets is None:
                        all_frames.append((t, frame))  # no duration: choose after the pass
                        continue
                    # Keep this frame for every target time it is the first to reach.
                    while k < len(targets) and t + tol >= targets[k]:
                        if not kept or times[-1] != t:
                            rgb = _rgb(frame)
                        kept.append(rgb)
                        times.append(t)
                        k += 1
        except DataError:
            raise
        except Exception as e:
            raise _corrupt(path, "video", e) from None

        if targets is None:
            if not all_frames:
                raise DataError("video has no frames", file=path, reason="corrupt_media")
            last = all_frames[-1][0]
            duration = last + (1.0 / rate if rate else last / max(len(all_frames) - 1, 1))
            n = plan_frame_count(duration, fps, max_frames, min_frames, len(all_frames), multiple)
            pick = [min(int(i * len(all_frames) / n), len(all_frames) - 1) for i in range(n)]
            times = [all_frames[i][0] for i in pick]
            kept = [_rgb(all_frames[i][1]) for i in pick]
        if not kept:
            raise DataError("video has no frames", file=path, reason="corrupt_media")
        # A duration longer than the real stream leaves targets unreached.
        usable = (len(kept) // multiple) * multiple
        if usable == 0:
            kept, times = kept + [kept[-1]] * (multiple - len(kept)), times + [times[-1]] * (multiple - len(times))
        else:
            kept, times = kept[:usable], times[:usable]
        if len(times) > 1 and times[-1] > times[0]:
            spf = (times[-1] - times[0]) / (len(times) - 1)
        else:
            spf = 1.0 / fps
        audio = None
        if aus is not None and audio_chunks:
            wave = to_mono(np.concatenate(audio_chunks, axis=1))
            audio = resample(wave, aus.rate, audio_sr)
        return VideoClip(frames=np.stack(kept), times=times, seconds_per_frame=spf, audio=audio, duration=float(duration))
