"""Qwen3-Omni's layout of a video with its soundtrack (use_audio_in_video):
the family's `ChatSpec.audio_in_video`, called by the data pipeline.

Unlike Qwen2.5-Omni (2-second chunks alternated), Qwen3-Omni merges the two
streams token by token in time order: a video token of temporal grid t sits
at t x second_per_grid x position_id_per_seconds, the j-th audio token at j
(one position per audio token), and the earlier goes first, video on a tie.
This is the order HF's processor writes and its rope index walks.
"""

from __future__ import annotations

from typing import List, Sequence


def interleave_video_audio(
    video_grid_thw: Sequence[int],
    merge_size: int,
    second_per_grid: float,
    n_audio_tokens: int,
    ids,
    position_id_per_seconds: float = 13,
    seconds_per_chunk: float = 2.0,
) -> List[int]:
    """The block inside <|vision_start|> ... <|vision_end|>: <|audio_start|>,
    the time-merged video and audio tokens, <|audio_end|>. `seconds_per_chunk`
    is unused (Qwen2.5-Omni's signature)."""
    del seconds_per_chunk
    t, h, w = (int(x) for x in video_grid_thw)
    per_t = (h // merge_size) * (w // merge_size)
    out = [ids.audio_bos]
    a = 0
    for ti in range(t):
        at = ti * second_per_grid * position_id_per_seconds
        # audio tokens strictly before this grid's time go first
        while a < n_audio_tokens and a < at:
            out.append(ids.audio)
            a += 1
        out += [ids.video] * per_t
    out += [ids.audio] * (n_audio_tokens - a)
    out.append(ids.audio_eos)
    return out
