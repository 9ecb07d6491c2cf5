"""The HF processor and the special token ids the data pipeline writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omnitrain.data.errors import DataError


def load_processor(model_cfg: Any):
    """`model_cfg.processor` (a folder or `builtin:<name>`) -> the family's HF processor."""
    from transformers import AutoProcessor

    from omnitrain import paths

    ref = model_cfg.processor if not isinstance(model_cfg, str) else model_cfg
    folder = paths.resolve(str(ref), key="model.processor")
    if not folder.exists():
        from omnitrain.config import ConfigError

        raise ConfigError(f"model.processor={ref!r}: folder {folder} does not exist; give an HF processor folder or builtin:<name>")
    return AutoProcessor.from_pretrained(str(folder))


@dataclass(frozen=True)
class TokenIds:
    image: int
    video: int
    vision_bos: int
    vision_eos: int
    im_start: int
    im_end: int
    pad: int
    # None for a family without an audio encoder
    audio: Optional[int] = None
    audio_bos: Optional[int] = None
    audio_eos: Optional[int] = None


def token_ids(tokenizer, family) -> TokenIds:
    """The family's chat tokens (`family.chat.tokens`) from the tokenizer,
    checked against the ids the model config names.

    A mismatch would scatter encoder features into the wrong positions, so it
    is an error rather than a guess.
    """
    ids = {}
    unk = getattr(tokenizer, "unk_token_id", None)
    for name, tok in family.chat.tokens.items():
        i = tokenizer.convert_tokens_to_ids(tok)
        if i is None or (unk is not None and i == unk):
            raise DataError(
                f"the tokenizer has no {tok} token; use a processor of model {family.name} (model.processor)",
                reason="bad_processor",
            )
        ids[name] = int(i)
        want = family.token_id(name)
        if want is not None and want != ids[name]:
            keys = "/".join(family.chat.config_keys[name])
            raise DataError(
                f"model.config.{keys}={want} but the processor's tokenizer has {tok}={ids[name]}; "
                "the processor and the model disagree",
                reason="bad_processor",
            )
    pad = tokenizer.pad_token_id
    ids["pad"] = int(pad) if pad is not None else ids["im_end"]
    return TokenIds(**ids)
