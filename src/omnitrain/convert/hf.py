"""Hugging Face folders <-> omnitrain module names.

A Qwen2.5-Omni thinker folder, as `save_pretrained` writes it, names tensors
the original way (`visual.*`, `audio_tower.*`, `model.*` for the LLM,
`lm_head.*`); a full Qwen2_5OmniForConditionalGeneration folder prefixes the
thinker's with `thinker.` and also holds talker/token2wav tensors (ignored).
In memory (transformers 5) the thinker nests them as `model.visual.*`,
`model.audio_tower.*`, `model.language_model.*`; omnitrain checkpoints use
these in-memory names.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

THINKER = "qwen2_5_omni_thinker"
FULL = "qwen2_5_omni"
THINKER_ARCH = "Qwen2_5OmniThinkerForConditionalGeneration"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# in-memory prefix -> file prefix (first match wins)
_TO_FILE = (("model.visual.", "visual."), ("model.audio_tower.", "audio_tower."), ("model.language_model.", "model."))


class HFFormatError(ValueError):
    """An HF folder that does not fit this model; nothing was modified."""


def to_hf_name(name: str) -> str:
    for ours, theirs in _TO_FILE:
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    return name


def from_hf_name(key: str) -> str:
    for ours, theirs in _TO_FILE:
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    return key


def read_config(folder: str | Path) -> tuple[dict, str]:
    """The thinker's config dict and the tensor-name prefix of a folder ('' or 'thinker.')."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise HFFormatError(f"{folder}: no config.json; not a Hugging Face model folder")
    config = json.loads(path.read_text())
    kind = config.get("model_type")
    if kind == THINKER:
        return config, ""
    if kind == FULL and "thinker_config" in config:
        return config["thinker_config"], "thinker."
    arch = ", ".join(config.get("architectures") or []) or "?"
    raise HFFormatError(
        f"{folder} holds a {kind!r} model ({arch}); expected Qwen2.5-Omni "
        f"(model_type {THINKER!r} or {FULL!r})"
    )


def weight_map(folder: str | Path) -> dict[str, str]:
    """Tensor name in the files -> file name, from the index or the single file."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        wm = json.loads((folder / INDEX).read_text())["weight_map"]
        absent = sorted({f for f in wm.values() if not (folder / f).is_file()})
        if absent:
            raise HFFormatError(f"{folder}: {INDEX} names shards that are missing: {', '.join(absent)}")
        return wm
    if (folder / SINGLE).is_file():
        from safetensors import safe_open

        with safe_open(folder / SINGLE, "pt") as f:
            return {k: SINGLE for k in f.keys()}
    raise HFFormatError(f"{folder}: no {SINGLE} nor {INDEX}")


def thinker_tensors(folder: str | Path) -> dict[str, tuple[str, str]]:
    """In-memory name -> (file, key in the file) of every thinker tensor in a folder."""
    _, prefix = read_config(folder)
    out = {}
    for key, file in weight_map(folder).items():
        if key.startswith(prefix):
            out[from_hf_name(key[len(prefix) :])] = (file, key)
    return out


def _listing(names: list[str], n: int = 8) -> str:
    more = f" ... and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def load_hf_weights(model: nn.Module, folder: str | Path) -> int:
    """Copy an HF folder's tensors into the materialized (non-meta) entries of
    `model`'s state dict, reading only those; returns how many were loaded.

    The folder must hold exactly the thinker's tensors: names this model does
    not have (a deeper model, another architecture) or names it lacks are an
    error listing them, raised before any tensor is copied.
    """
    from safetensors import safe_open

    folder = Path(folder)
    available = thinker_tensors(folder)
    state = model.state_dict()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    expected = set(state) - ({"lm_head.weight"} if tied else set())
    missing = sorted(expected - set(available))
    unexpected = sorted(set(available) - set(state))
    owned = {k: v for k, v in state.items() if not v.is_meta and k in available}
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_listing([to_hf_name(k) for k in missing])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_listing([available[k][1] for k in unexpected])}")
    by_file: dict[str, list[str]] = {}
    for k in owned:
        by_file.setdefault(available[k][0], []).append(k)
    shapes = []
    for file, names in by_file.items():
        with safe_open(folder / file, "pt") as f:
            for k in names:
                shape = tuple(f.get_slice(available[k][1]).get_shape())
                if shape != tuple(owned[k].shape):
                    shapes.append(f"{available[k][1]} {shape} vs model {tuple(owned[k].shape)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches: {_listing(shapes, 4)}")
    if problems:
        raise HFFormatError(f"model.init_from={folder} does not fit model: " + "; ".join(problems))
    with torch.no_grad():
        for file, names in by_file.items():
            with safe_open(folder / file, "pt") as f:
                for k in names:
                    owned[k].copy_(f.get_tensor(available[k][1]))
    return len(owned)
