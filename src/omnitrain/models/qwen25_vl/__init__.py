"""Qwen2.5-VL (`transformers.Qwen2_5_VLForConditionalGeneration`)."""

from omnitrain.models.qwen25_vl.family import Qwen25VL

__all__ = ["Qwen25VL"]
