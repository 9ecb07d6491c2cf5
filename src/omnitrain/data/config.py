"""Schema of the `data` config group (owned by the data package)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional


@dataclass
class DataConfig:
    name: str = "demo_omni"
    # Folder holding dataset_info.json; `builtin:demo` is the shipped copy of
    # LLaMA-Factory's mllm demo set.
    dataset_dir: str = "builtin:demo"
    # Comma-separated dataset names from dataset_info.json (or json paths).
    dataset: str = "mllm_demo,mllm_audio_demo,mllm_video_demo,mllm_video_audio_demo"
    weights: Optional[List[float]] = None
    max_samples: Optional[int] = None
    cutoff_len: int = 2048
    on_error: str = "raise"  # raise | skip
    num_workers: int = 0
    use_audio_in_video: bool = False
    video_fps: float = 2.0
    video_max_frames: int = 16
    image_max_pixels: int = 12544
    image_min_pixels: int = 3136
    video_max_pixels: int = 6272
    video_min_pixels: int = 3136
    max_audio_seconds: float = 30.0
    train_on_prompt: bool = False
    system: Optional[str] = None
    cache_dir: Optional[str] = None
