"""Schema of the `data` config group (owned by the data package)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class DataConfig:
    name: str = "demo_omni"
    # Folder holding dataset_info.json; `builtin:demo` is the shipped copy of
    # LLaMA-Factory's mllm demo set.
    dataset_dir: str = "builtin:demo"
    # Dataset names from dataset_info.json, or paths to json files: a list, or
    # one comma-separated string (`data.dataset=[a,b]` or `data.dataset='a,b'`).
    dataset: Any = "mllm_demo,mllm_audio_demo,mllm_video_demo,mllm_video_audio_demo"
    # Mixing: one weight per dataset; each epoch holds a weight-proportional
    # share of samples (datasets repeat or subsample). null = plain concatenation.
    weights: Optional[List[float]] = None
    # Validation datasets (names or json paths, like `dataset`), read with the
    # same settings; used by train.eval_every. null = no validation.
    eval: Any = None
    # Or hold out this fraction (0 < f < 1) of each training dataset for
    # validation: the same samples for a given train.seed (per dataset, at
    # least one held out and one kept), never trained on. null = off.
    eval_fraction: Optional[float] = None
    # Keep the first N samples of each dataset (LLaMA-Factory's max_samples).
    max_samples: Optional[int] = None
    # Token budget per sample; only trailing text is ever cut, never media.
    cutoff_len: int = 2048
    on_error: str = "raise"  # raise | skip
    num_workers: int = 0
    prefetch_factor: int = 2
    # Default for datasets and samples that do not say (a dataset_info entry or
    # a sample may carry its own `use_audio_in_video`).
    use_audio_in_video: bool = False
    # Per-dataset settings by name, e.g. {mllm_video_audio_demo: {use_audio_in_video: true}};
    # they override dataset_info.json, and a sample's own field overrides both.
    dataset_options: Dict[str, Any] = field(default_factory=dict)
    video_fps: float = 2.0
    video_max_frames: int = 16
    video_min_frames: int = 2
    image_max_pixels: int = 12544
    image_min_pixels: int = 3136
    video_max_pixels: int = 6272
    video_min_pixels: int = 3136
    # Audio longer than this is cut to it (counted in stats, logged); null = no cap.
    max_audio_seconds: Optional[float] = None
    # Audio longer than the feature extractor's window (30 s) is split into
    # several audio segments (chunk) or rejected (error).
    long_audio: str = "chunk"  # chunk | error
    # Labels: assistant turns only (default); train_on_prompt labels user and
    # system text too (never media); mask_history labels only the last answer.
    train_on_prompt: bool = False
    mask_history: bool = False
    # System prompt when a sample has none; null = the model's default prompt,
    # "" = no system turn.
    system: Optional[str] = None
    # Folder for processed samples keyed by content + settings; null = no cache.
    cache_dir: Optional[str] = None
    # Sequence packing (data/packing.py): the samples of a micro-batch share
    # rows of at most max_tokens tokens (attention and rope stay per sample; the
    # loss is the same). A sample longer than max_tokens is an error, never cut.
    packing: bool = False
    max_tokens: Optional[int] = None  # null = cutoff_len
    # Cost-balanced micro-batches (data/balance.py): the samples of each global
    # batch are dealt to dp ranks and micro-batches so that their predicted
    # cost (the family's cost per token) is even; the global batch is unchanged.
    balance: bool = False
    # Processed samples -> one micro-batch, by `_target_` (called with the samples and the pad id).
    collator: Any = field(default_factory=lambda: {"_target_": "omnitrain.data.collate", "_partial_": True})


_LIST_KEYS = ("data.dataset=", "+data.dataset=", "++data.dataset=")


def quote_dataset_lists(argv: List[str]) -> List[str]:
    """LLaMA-Factory's `data.dataset=a,b` -> `data.dataset='a,b'` for Hydra.

    Hydra reads an unquoted comma list as a sweep and refuses it outside
    --multirun; with --multirun/-m the sweep meaning is kept.
    """
    if any(a in ("-m", "--multirun") for a in argv):
        return list(argv)
    out = []
    for a in argv:
        key = next((k for k in _LIST_KEYS if a.startswith(k)), None)
        value = a[len(key):] if key else ""
        if key and "," in value and value[:1] not in "[\"'":
            a = f"{key}'{value}'"
        out.append(a)
    return out
