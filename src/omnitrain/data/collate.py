"""Processed samples -> one micro-batch (the keys `models.family.MEDIA` lists,
named as the HF models' forward names them), right-padded.

Media tensors are concatenated sample by sample in order of appearance;
audio features are zero-padded in time to the batch's longest clip with a
`feature_attention_mask` (the model reads only the valid frames), so no media
is ever cut or changed.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch

from omnitrain.data.template import IGNORE


def collate(samples: Sequence[Dict[str, Any]], pad_id: int) -> Dict[str, torch.Tensor]:
    b = len(samples)
    seq = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((b, seq), pad_id, dtype=torch.long)
    labels = torch.full((b, seq), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((b, seq), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[i, :n] = s["input_ids"]
        labels[i, :n] = s["labels"]
        attention_mask[i, :n] = 1
    batch: Dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    for pix, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        have = [s for s in samples if pix in s]
        if have:
            batch[pix] = torch.cat([s[pix] for s in have])
            batch[grid] = torch.cat([s[grid] for s in have])
    have = [s for s in samples if "video_second_per_grid" in s]
    if have:
        batch["video_second_per_grid"] = torch.cat([s["video_second_per_grid"] for s in have])

    feats: List[torch.Tensor] = [f for s in samples for f in s["audio_features"]]
    if feats:
        t = max(f.shape[-1] for f in feats)
        input_features = torch.zeros((len(feats), feats[0].shape[0], t), dtype=feats[0].dtype)
        mask = torch.zeros((len(feats), t), dtype=torch.long)
        for i, f in enumerate(feats):
            input_features[i, :, : f.shape[-1]] = f
            mask[i, : f.shape[-1]] = 1
        batch["input_features"] = input_features
        batch["feature_attention_mask"] = mask
    batch["use_audio_in_video"] = torch.tensor([bool(s["use_audio_in_video"]) for s in samples], dtype=torch.bool)
    return batch


def count_label_tokens(micro_batch: Dict[str, torch.Tensor]) -> int:
    """Tokens that carry a loss after the causal shift (labels[:, 1:] != -100)."""
    return int((micro_batch["labels"][:, 1:] != IGNORE).sum())
