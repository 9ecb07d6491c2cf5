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


def model_tensors(family, folder: str | Path) -> dict[str, dict[str, tuple[str, str]]]:
    """In-memory name -> {file key without the folder's prefix: (file, key in the
    file)} of the keys in a folder that make up that tensor of the trained model
    (one key, or several where the files split it: per-expert MoE weights)."""
    _, prefix, _ = read_config(folder, family)
    out: dict[str, dict[str, tuple[str, str]]] = {}
    for key, file in weight_map(folder).items():
        if key.startswith(prefix):
            rel = key[len(prefix) :]
            out.setdefault(family.from_hf_name(rel), {})[rel] = (file, key)
    return out


def pick_layout(family, name: str, shape, got: dict) -> tuple[dict, list[str], list[str]]:
    """(the layout of `name` to read {rel key: shape}, its keys the folder lacks,
    the folder's keys for `name` outside it): the first complete layout, else
    the one with the most keys present."""
    layouts = family.hf_layouts(name, shape)
    best = max(layouts, key=lambda lay: (all(k in got for k in lay), sum(k in got for k in lay)))
    return best, [k for k in best if k not in got], [k for k in got if k not in best]


def tied_keys(model: nn.Module) -> dict[str, str]:
    """{parameter: the parameter it shares its tensor with} as HF ties them
    (a tied lm_head -> embed_tokens); {} for an untied model. A tied entry is
    not in the files: from_pretrained ties it again."""
    return dict(getattr(model, "all_tied_weights_keys", None) or {})


def _listing(names: list[str], n: int = 8) -> str:
    more = f" ... and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _fit_problems(family, folder: Path, available: dict, state: dict, expected: set, check: list, against: str):
    """(what keeps a folder's tensors from fitting `state`, the sources to read:
    name -> {rel key: (file, key)}): keys missing for `expected`, keys the model
    lacks, and the shapes of `check`'s keys (in that order) read from the files'
    headers, a split tensor's keys against its slices."""
    from safetensors import safe_open

    missing, unexpected, sources, want = [], [], {}, {}
    for name in sorted(set(available) | expected):
        got = available.get(name, {})
        if name not in state:
            unexpected += [key for _, key in got.values()]
            continue
        layout, miss, extra = pick_layout(family, name, state[name].shape, got)
        if name in expected:
            missing += miss
        unexpected += [got[k][1] for k in extra]
        sources[name] = {k: got[k] for k in layout if k in got}
        want[name] = layout
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_listing(sorted(unexpected))}")
    by_file: dict[str, list[tuple[str, str, tuple]]] = {}
    for name in check:
        for rel, (file, key) in sources.get(name, {}).items():
            by_file.setdefault(file, []).append((key, want[name][rel]))
    shapes = []
    for file, items in by_file.items():
        with safe_open(folder / file, "pt") as f:
            for key, shape in items:
                got_shape = tuple(f.get_slice(key).get_shape())
                if got_shape != tuple(shape):
                    shapes.append(f"{key} {got_shape} vs {against} {tuple(shape)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches: {_listing(shapes, 4)}")
    return problems, sources


def read_tensors(family, folder: Path, sources: dict, names):
    """Yield (name, tensor) for `names`, each read from its sources' keys only
    (safetensors reads them by offset, file by file) and joined by
    `family.from_hf_tensors` as soon as its last key is read."""
    from safetensors import safe_open

    by_file: dict[str, list[tuple[str, str, str]]] = {}
    for name in sorted(names):
        for rel, (file, key) in sources[name].items():
            by_file.setdefault(file, []).append((name, rel, key))
    left = {name: len(sources[name]) for name in names}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for file, items in by_file.items():
        with safe_open(folder / file, "pt") as f:
            for name, rel, key in items:
                parts.setdefault(name, {})[rel] = f.get_tensor(key)
                left[name] -= 1
                if not left[name]:
                    yield name, family.from_hf_tensors(name, parts.pop(name))


def load_hf_weights(family, model: nn.Module, folder: str | Path) -> int:
    """Copy an HF folder's tensors into the materialized (non-meta) entries of
    `model`'s state dict, reading only those; returns how many were loaded.

    The folder must hold exactly the model's tensors: names this model does
    not have (a deeper model, another architecture) or names it lacks are an
    error listing them, raised before any tensor is copied.
    """
    folder = Path(folder)
    available = model_tensors(family, folder)
    state = model.state_dict()
    expected = set(state) - set(tied_keys(model))
    owned = {k: v for k, v in state.items() if not v.is_meta and k in available}
    problems, sources = _fit_problems(family, folder, available, state, expected, list(owned), "model")
    if problems:
        raise HFFormatError(f"model.init_from={folder} does not fit model {family.name}: " + "; ".join(problems))
    with torch.no_grad():
        for k, t in read_tensors(family, folder, sources, owned):
            owned[k].copy_(t)
    return len(owned)


# ----------------------------------------------------------------------------- fast load

# safetensors' dtype names (headers) -> torch dtypes.
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def check_folder(family, model: nn.Module, folder: str | Path) -> dict[str, dict[str, tuple[str, str]]]:
    """Every tensor of `model` (a whole model, on meta is enough) is in the
    folder with its shape, and the folder holds nothing else of the trained
    model; reads only the files' headers. Raises one HFFormatError listing what is missing, unexpected or of another shape.
    Returns the sources to read: name -> {rel key: (file, key)}."""
    folder = Path(folder)
    available = model_tensors(family, folder)
    state = model.state_dict()
    expected = set(state) - set(tied_keys(model))
    problems, sources = _fit_problems(family, folder, available, state, expected, sorted(expected & set(available)), "config")
    if problems:
        raise HFFormatError(f"{folder} does not fit model {family.name} (its tensors vs the config): " + "; ".join(problems))
    return sources


def materialize(family, model: nn.Module, prefixes, folder: str | Path, device, seed: int, dtype: torch.dtype | None = None) -> dict:
    """Materialize the modules at `prefixes` of a meta-device `model` straight
    from an HF folder: each parameter and persistent buffer is read from its
    safetensors file (only these keys; safetensors reads them by offset) and
    becomes the module's tensor on `device`, in `dtype` (default: the meta
    tensor's dtype). No random init runs first; a module whose own tensors the
    files do not hold (non-persistent buffers: rotary tables) is initialised
    as `build` would. The whole folder is checked (`check_folder`) before any
    tensor is read. Returns {"tensors": n, "bytes": bytes read from the files}."""
    from safetensors import safe_open

    from omnitrain.models.family import _seeded

    folder = Path(folder)
    available = check_folder(family, model, folder)
    modules = dict(model.named_modules())
    owned = {}
    for prefix in prefixes:
        for name, t in modules[prefix].state_dict(prefix=prefix + ".", keep_vars=True).items():
            if name in available:
                owned[name] = t
    loaded, nbytes = {}, 0
    for k, t in read_tensors(family, folder, available, owned):
        nbytes += t.numel() * t.element_size()
        want = dtype if dtype is not None and t.is_floating_point() else owned[k].dtype
        loaded[k] = t.to(device=device, dtype=want)
    # assign=True makes the read tensors the module's own (no copy into a fresh allocation).
    model.load_state_dict(loaded, strict=False, assign=True)
    # A tied head is not in the files: share the embedding's tensor (HF's own tying).
    params = dict(model.named_parameters(remove_duplicate=False))
    if any(params[a].is_meta and not params[s].is_meta for a, s in tied_keys(model).items() if a in params and s in params):
        model.tie_weights()
    # What the files do not hold (non-persistent buffers) is computed as build's init does.
    for prefix in prefixes:
        for name, sub in modules[prefix].named_modules(prefix=prefix):
            own = list(sub.named_parameters(recurse=False)) + list(sub.named_buffers(recurse=False))
            if not any(t.is_meta for _, t in own):
                continue
            keep = {n: t for n, t in own if not t.is_meta}
            sub.to_empty(device="cpu", recurse=False)
            with _seeded(seed, name):
                model._init_weights(sub)
            sub.to(device)
            for n, t in keep.items():  # read from the files: put back
                setattr(sub, n, t)
    return {"tensors": len(loaded), "bytes": nbytes}
