"""Qwen2.5-Omni's thinker (`transformers.Qwen2_5OmniThinkerForConditionalGeneration`)."""

from omnitrain.models.qwen25_omni.family import Qwen25OmniThinker

__all__ = ["Qwen25OmniThinker"]
