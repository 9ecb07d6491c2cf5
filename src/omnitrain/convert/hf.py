"""Hugging Face folders <-> omnitrain module names.

omnitrain checkpoints use the names of the HF model in memory (transformers 5:
`model.visual.*`, `model.language_model.*`, `lm_head.*`, ...). A folder, as
`save_pretrained` writes it, may name them the original way (`visual.*`,
`model.*` for the LLM) and may nest the trained model in a larger one (a whole
omni folder prefixes the thinker with `thinker.`): each family's
state-dict adapter (`hf_names`, `hf_model_types`) says how.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from omnitrain.errors import UserError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class HFFormatError(UserError, ValueError):
    """An HF folder that does not fit this model; nothing was modified."""

    kind = "HF folder error"


def folder_config(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise HFFormatError(f"{folder}: no config.json; not a Hugging Face model folder")
    return json.loads(path.read_text())


def read_config(folder: str | Path, family=None) -> tuple[dict, str, object]:
    """(the trained model's config dict, its tensors' prefix in the files, family class).

    With `family` given, the folder must be one it reads; otherwise the family
    comes from the folder's model_type (models.FAMILIES).
    """
    from omnitrain.models import family_for_model_type

    config = folder_config(folder)
    kind = config.get("model_type")
    cls = type(family) if family is not None else None
    if cls is None:
        found = family_for_model_type(kind)
        cls = found[1] if found else None
    if cls is None or kind not in cls.hf_model_types:
        arch = ", ".join(config.get("architectures") or []) or "?"
        if cls is not None:
            want = f"model {family.name} reads model_type {' or '.join(cls.hf_model_types)}"
        else:
            from omnitrain.models import family_classes

            want = "no omnitrain family reads it; the families are " + ", ".join(
                f"{n} ({'/'.join(c.hf_model_types)})" for n, c in family_classes().items()
            )
        raise HFFormatError(f"{folder} holds a {kind!r} model ({arch}): {want}")
    prefix, sub = cls.hf_model_types[kind]
    if sub is not None:
        if sub not in config:
            raise HFFormatError(f"{folder}: a {kind!r} config without {sub!r}")
        config = config[sub]
    return config, prefix, cls


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


def model_tensors(family, folder: str | Path) -> dict[str, tuple[str, str]]:
    """In-memory name -> (file, key in the file) of every tensor of the trained model in a folder."""
    _, prefix, _ = read_config(folder, family)
    out = {}
    for key, file in weight_map(folder).items():
        if key.startswith(prefix):
            out[family.from_hf_name(key[len(prefix) :])] = (file, key)
    return out


def tied_keys(model: nn.Module) -> dict[str, str]:
    """{parameter: the parameter it shares its tensor with} as HF ties them
    (a tied lm_head -> embed_tokens); {} for an untied model. A tied entry is
    not in the files: from_pretrained ties it again."""
    return dict(getattr(model, "all_tied_weights_keys", None) or {})


def _listing(names: list[str], n: int = 8) -> str:
    more = f" ... and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def load_hf_weights(family, model: nn.Module, folder: str | Path) -> int:
    """Copy an HF folder's tensors into the materialized (non-meta) entries of
    `model`'s state dict, reading only those; returns how many were loaded.

    The folder must hold exactly the model's tensors: names this model does
    not have (a deeper model, another architecture) or names it lacks are an
    error listing them, raised before any tensor is copied.
    """
    from safetensors import safe_open

    folder = Path(folder)
    available = model_tensors(family, folder)
    state = model.state_dict()
    expected = set(state) - set(tied_keys(model))
    missing = sorted(expected - set(available))
    unexpected = sorted(set(available) - set(state))
    owned = {k: v for k, v in state.items() if not v.is_meta and k in available}
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_listing([family.to_hf_name(k) for k in missing])}")
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
        raise HFFormatError(f"model.init_from={folder} does not fit model {family.name}: " + "; ".join(problems))
    with torch.no_grad():
        for file, names in by_file.items():
            with safe_open(folder / file, "pt") as f:
                for k in names:
                    owned[k].copy_(f.get_tensor(available[k][1]))
    return len(owned)
