"""Model families: the interface (`family.py`) and one package per family.

`FAMILIES` is the registry a tool consults when it only has an HF folder
(its config's model_type) rather than a `model=` config.
"""

from __future__ import annotations

FAMILIES = {
    "qwen25_omni": "omnitrain.models.qwen25_omni.Qwen25OmniThinker",
    "qwen25_vl": "omnitrain.models.qwen25_vl.Qwen25VL",
    "qwen2_vl": "omnitrain.models.qwen2_vl.Qwen2VL",
    "qwen3_omni": "omnitrain.models.qwen3_omni.Qwen3OmniThinker",
    "qwen3_vl": "omnitrain.models.qwen3_vl.Qwen3VL",
}


def family_classes():
    from omnitrain.models.family import import_object

    return {name: import_object(path) for name, path in FAMILIES.items()}


def family_for_model_type(model_type: str):
    """(family name, family class) that reads HF folders of `model_type`, or None."""
    for name, cls in family_classes().items():
        if model_type in cls.hf_model_types:
            return name, cls
    return None
