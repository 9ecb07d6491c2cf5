"""Qwen2.5-Omni's layout of a video with its soundtrack (use_audio_in_video):
the family's `ChatSpec.audio_in_video`, called by the data pipeline."""

from __future__ import annotations

from typing import List, Sequence

import numpy as np


def interleave_video_audio(
    video_grid_thw: Sequence[int],
    merge_size: int,
    second_per_grid: float,
    n_audio_tokens: int,
    ids,
    position_id_per_seconds: float = 25,
    seconds_per_chunk: float = 2.0,
) -> List[int]:
    """Qwen2.5-Omni's time-interleaved video+audio block (without vision bos/eos).

    Video tokens of temporal grid t sit at time t x second_per_grid; both
    streams are cut into `seconds_per_chunk` chunks and alternated, video
    first, inside <|audio_bos|> ... <|audio_eos|>, exactly as HF's processor
    lays them out and its rope index expects.
    """
    t, h, w = (int(x) for x in video_grid_thw)
    per_t = (h // merge_size) * (w // merge_size)
    video_pos = np.repeat(np.arange(t) * second_per_grid * position_id_per_seconds, per_t)
    audio_pos = np.arange(n_audio_tokens)
    per_chunk = int(position_id_per_seconds * seconds_per_chunk)
    vchunks = _chunk_sizes(video_pos, per_chunk)
    achunks = _chunk_sizes(audio_pos, per_chunk)
    out = [ids.audio_bos]
    for j in range(max(len(vchunks), len(achunks))):
        if j < len(vchunks):
            out += [ids.video] * vchunks[j]
        if j < len(achunks):
            out += [ids.audio] * achunks[j]
    out.append(ids.audio_eos)
    return out


def _chunk_sizes(pos: np.ndarray, per_chunk: int) -> List[int]:
    """Sizes of successive runs with pos in [k*per_chunk, (k+1)*per_chunk).

    Same boundaries as HF's get_chunked_index: a chunk closes at the first
    value >= the next multiple, and an empty trailing chunk is still emitted.
    """
    sizes, start, bound = [], 0, per_chunk
    for i, v in enumerate(pos):
        if v >= bound:
            sizes.append(i - start)
            start = i
            bound += per_chunk
    sizes.append(len(pos) - start)
    return sizes
