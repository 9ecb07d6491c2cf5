"""Qwen3-VL (`transformers.Qwen3VLForConditionalGeneration`) and its MoE variant."""

from omnitrain.models.qwen3_vl.family import Qwen3VL, Qwen3VLMoe

__all__ = ["Qwen3VL", "Qwen3VLMoe"]
