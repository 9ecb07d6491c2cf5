"""Qwen2-VL (`transformers.Qwen2VLForConditionalGeneration`)."""

from omnitrain.models.qwen2_vl.family import Qwen2VL

__all__ = ["Qwen2VL"]
