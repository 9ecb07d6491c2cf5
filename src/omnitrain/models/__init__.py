"""Model families: the interface (`family.py`) and one package per family.

`FAMILIES` is the registry a tool consults when it only has an HF folder
(its config's model_type) rather than a `model=` config; `hf_family` is
`model=hf`'s target (conf/model/hf.yaml).
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


def hf_family(path, name: str = "hf", **kwargs):
    """`model=hf`: the family that reads the folder at `path` (its config.json's
    model_type), with the config from the folder. A folder no family reads is
    refused (convert.hf.HFFormatError naming its architecture and the families)."""
    from pathlib import Path

    from omnitrain.convert.hf import HFFormatError, read_config

    _, _, cls = read_config(path)
    proc = kwargs.get("processor")
    marks = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")
    if proc is not None and Path(str(proc)) == Path(path) and not any((Path(path) / m).is_file() for m in marks):
        raise HFFormatError(
            f"{path} holds no processor ({', '.join(marks)} absent, e.g. a folder written by save_pretrained "
            "alone): pass model.processor=<a processor folder or builtin:<name>>"
        )
    return cls(name=name, path=path, **kwargs)


def demo_datasets(path) -> str:
    """The demo datasets a folder's model can take (`data=demo_hf`, model=hf's
    default): demo_omni's for a model with an audio encoder, demo_vl's otherwise."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from omnitrain.convert.hf import read_config

    if path is None:
        from omnitrain.config import ConfigError

        raise ConfigError("data=demo_hf picks the demo datasets for model=hf's folder: use it with model=hf model.path=<folder>")
    _, _, cls = read_config(path)
    kinds = {k for m in cls.modules for k in m.media}
    choice = "demo_omni" if "audio" in kinds else "demo_vl"
    return OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "data" / f"{choice}.yaml").dataset
