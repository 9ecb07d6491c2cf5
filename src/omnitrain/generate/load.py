"""A trained model for inference: from a checkpoint of any layout or an HF folder.

A checkpoint (a step dir, `checkpoints/` or a run dir) loads through
torch.distributed.checkpoint into the whole model (`train.checkpoint.load`:
tensors are keyed by name, so whatever layout saved it); its model comes from
the run's config.yaml or the config.json `convert hf_to_mm` stored. An HF
folder (a thinker, a whole omni folder, a VL folder) loads through the
family's state-dict adapter straight onto the meta-built model
(`convert.hf.materialize`, through `model.init_from`), as training does. Either way the model is the family's HF class
(`hf_class`), so `generate` is transformers' own.

Prompts are built by the family's transform (the training `SampleBuilder`)
with the data settings the run trained with (or the defaults), changed by
`key=value` data options.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from omnitrain.errors import UserError

log = logging.getLogger("omnitrain.generate")

# Files that make a folder a processor (any of them).
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


class ModelNotFound(UserError, FileNotFoundError):
    """The model path is neither a checkpoint nor an HF folder."""

    kind = "model error"


@dataclass
class Loaded:
    family: Any  # models.family.ModelFamily
    model: torch.nn.Module  # the family's HF class, eval mode, no grads
    processor: Any
    builder: Any  # the family's transform (prompt(example) -> processed sample)
    ids: Any  # data.processor.TokenIds
    device: torch.device
    source: str


def _is_checkpoint(path: Path) -> bool:
    return (path / ".metadata").is_file() or (path / "checkpoints").is_dir() or (path / "latest").is_file()


def _folder_family(folder: Path):
    from omnitrain.convert import hf
    from omnitrain.models import family_for_model_type

    config, _, cls = hf.read_config(folder)  # the trained (sub-)model's config; refuses other architectures
    name = family_for_model_type(hf.folder_config(folder).get("model_type"))[0]
    family = cls.from_hf_config(config, name=name)
    family.init_from = str(folder)
    return family


def _checkpoint_family(path: Path, config: str | None):
    """(family with init_from cleared, step dir, run's data config or None)."""
    from omnitrain.convert.__main__ import _model_family, _run_config, _step_dir

    step_dir = _step_dir(str(path))
    family, model_cfg = _model_family(step_dir, config)
    family.init_from = None  # the weights come from the checkpoint
    run_cfg = _run_config(step_dir, config)
    return family, step_dir, model_cfg, (run_cfg.data if run_cfg is not None and "data" in run_cfg else None)


def data_settings(family, run_data=None, options: Sequence[str] = ()):
    """`data.Settings` from the run's data config (else the defaults) with
    `key=value` options (DataConfig keys) applied; a bad key is a ConfigError."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from omnitrain.config import ConfigError
    from omnitrain.data.config import DataConfig
    from omnitrain.data.sample import Settings

    try:
        cfg = OmegaConf.structured(DataConfig)
        if run_data is not None:
            known = {k: v for k, v in OmegaConf.to_container(run_data, resolve=True).items() if k in cfg}
            cfg = OmegaConf.merge(cfg, known)
        bad = [o for o in options if "=" not in o]
        if bad:
            raise ConfigError(f"data option {bad[0]!r}: use key=value with a data.* key, e.g. image_max_pixels=1003520")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(options)))
    except OmegaConfBaseException as e:
        raise ConfigError(f"data option: {str(e).splitlines()[0]}; the keys are those of the data group (README)") from None
    return Settings.from_config(cfg, family.hf_config)


def _processor(ref: str | None, fallback: str | None, source: Path):
    from omnitrain.data import load_processor

    ref = ref or fallback
    if ref is None:
        if any((source / f).is_file() for f in _PROCESSOR_FILES):
            ref = str(source)
        else:
            raise ModelNotFound(f"{source}: no processor/tokenizer found with the model; pass --processor <folder or builtin:name>")
    return load_processor(str(ref))


def load(
    path: str,
    *,
    processor: str | None = None,
    config: str | None = None,
    dtype: str = "fp32",
    device: str = "auto",
    data_options: Sequence[str] = (),
) -> Loaded:
    """The model at `path` (checkpoint or HF folder) with its processor and prompt builder."""
    from omnitrain import device as devices
    from omnitrain.data.processor import token_ids
    from omnitrain.data.sample import SampleBuilder
    from omnitrain.parallel.layout import whole_plan
    from omnitrain.train import checkpoint

    src = Path(path).expanduser()
    if not src.exists():
        raise ModelNotFound(f"{path}: no such checkpoint or HF folder")
    if dtype not in ("fp32", "bf16"):
        from omnitrain.config import ConfigError

        raise ConfigError(f"--dtype {dtype}: use fp32 or bf16")
    run_data, proc_ref, step_dir = None, None, None
    if _is_checkpoint(src):
        family, step_dir, model_cfg, run_data = _checkpoint_family(src, config)
        proc_ref = getattr(model_cfg, "processor", None) if model_cfg is not None else None
    elif (src / "config.json").is_file():
        family = _folder_family(src)
    else:
        raise ModelNotFound(f"{path}: neither a checkpoint (.metadata, checkpoints/) nor an HF folder (config.json)")

    proc = _processor(processor, proc_ref, step_dir or src)
    ids = token_ids(proc.tokenizer, family)  # the processor must fit the model's token ids
    settings = data_settings(family, run_data, data_options)
    transform = family.transform or SampleBuilder
    builder = transform(proc, ids, settings, chat=family.chat, model_name=family.name, media_kinds=family.media_kinds())
    if not hasattr(builder, "prompt"):
        raise ModelNotFound(f"model.transform {type(builder).__name__} has no prompt(example) method: generation needs one")

    dev = devices.detect(device).torch_device(devices.local_rank())
    # Random init first, then every tensor overwritten: non-persistent buffers
    # (rotary tables) come from the init, as in training.
    model = family.build(whole_plan(family.depths), torch.device("cpu"), seed=0)
    if step_dir is not None:
        checkpoint.load(step_dir, model=model)
    model.requires_grad_(False)
    model = model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]).to(dev).eval()
    log.info("loaded %s (%s, %s) on %s", src, family.name, family.hf_architecture, dev)
    return Loaded(family, model, proc, builder, ids, dev, str(step_dir or src))
