"""Qwen3-Omni's thinker (`transformers.Qwen3OmniMoeThinkerForConditionalGeneration`)."""

from omnitrain.models.qwen3_omni.family import Qwen3OmniThinker

__all__ = ["Qwen3OmniThinker"]
