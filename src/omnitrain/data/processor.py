"""The HF processor and the special token ids the data pipeline writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from omnitrain.data.errors import DataError

# Qwen chat-template pieces (special tokens of the Qwen2 vocabulary).
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# The Qwen2.5-Omni chat template's own default system turn.
DEFAULT_SYSTEM = "You are a helpful assistant."


def load_processor(model_cfg: Any):
    """`model_cfg.processor` (a folder or `builtin:<name>`) -> a Qwen2_5OmniProcessor."""
    from transformers import AutoProcessor

    from omnitrain import paths

    ref = model_cfg.processor if not isinstance(model_cfg, str) else model_cfg
    folder = paths.resolve(str(ref), key="model.processor")
    if not folder.exists():
        raise FileNotFoundError(f"model.processor={ref!r}: folder {folder} does not exist")
    return AutoProcessor.from_pretrained(str(folder))


@dataclass(frozen=True)
class TokenIds:
    image: int
    video: int
    audio: int
    vision_bos: int
    vision_eos: int
    audio_bos: int
    audio_eos: int
    im_start: int
    im_end: int
    pad: int


# model.config key(s) -> TokenIds field; both HF spellings are accepted.
_CONFIG_KEYS = {
    "image": ("image_token_id", "image_token_index"),
    "video": ("video_token_id", "video_token_index"),
    "audio": ("audio_token_id", "audio_token_index"),
    "vision_bos": ("vision_start_token_id",),
    "vision_eos": ("vision_end_token_id",),
    "audio_bos": ("audio_start_token_id",),
    "audio_eos": ("audio_end_token_id",),
}
_TOKENS = {
    "image": "<|IMAGE|>",
    "video": "<|VIDEO|>",
    "audio": "<|AUDIO|>",
    "vision_bos": "<|vision_bos|>",
    "vision_eos": "<|vision_eos|>",
    "audio_bos": "<|audio_bos|>",
    "audio_eos": "<|audio_eos|>",
    "im_start": IM_START,
    "im_end": IM_END,
}


def token_ids(tokenizer, model_config: Optional[Mapping[str, Any]] = None) -> TokenIds:
    """Ids from the tokenizer, checked against the model config when it names them.

    A mismatch would scatter encoder features into the wrong positions, so it
    is an error rather than a guess.
    """
    ids = {}
    unk = getattr(tokenizer, "unk_token_id", None)
    for name, tok in _TOKENS.items():
        i = tokenizer.convert_tokens_to_ids(tok)
        if i is None or (unk is not None and i == unk):
            raise DataError(f"the tokenizer has no {tok} token; use a Qwen2.5-Omni processor", reason="bad_processor")
        ids[name] = int(i)
    cfg = dict(model_config or {})
    for name, keys in _CONFIG_KEYS.items():
        for key in keys:
            if cfg.get(key) is not None and int(cfg[key]) != ids[name]:
                raise DataError(
                    f"model.config.{key}={cfg[key]} but the processor's tokenizer has {_TOKENS[name]}={ids[name]}; "
                    "the processor and the model disagree",
                    reason="bad_processor",
                )
    pad = tokenizer.pad_token_id
    ids["pad"] = int(pad) if pad is not None else ids["im_end"]
    return TokenIds(**ids)
