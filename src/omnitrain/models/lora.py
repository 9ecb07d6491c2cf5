"""LoRA through PEFT, per module (`model.lora.<module>`).

Adapters are injected into a module's layers only (`ModuleSpec.layers`),
after the stage is built and before TP/FSDP, on whatever the rank holds:
PEFT gives a layer on the meta device meta adapters, so a pipeline stage
materializes only its own. Each adapter's A is initialised from (seed, its
module FQN) with PEFT's own init (kaiming-uniform A, zero B), so every layout
starts from the same adapters. In a module with LoRA the base weights are
frozen unless `model.trainable.<module>` names them explicitly.

The PEFT config is one `LoraConfig` for all modules: a regex over full
module names selects each module's targets inside its layers, and
rank_pattern / alpha_pattern carry each module's r and alpha. The same
config is what an exported adapter folder holds (`convert mm_to_hf`), so
`peft.PeftModel.from_pretrained` on the HF base finds the same layers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

# Adapter weights carry this in their names (PEFT's layout: <target>.lora_A.<adapter>.weight).
ADAPTER = "default"
_FIELDS = {"enabled", "r", "alpha", "dropout", "target_modules"}


@dataclass(frozen=True)
class LoraSpec:
    r: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]


def parse_lora(lora, family) -> dict[str, LoraSpec]:
    """`model.lora`: per module {enabled, r, alpha, dropout, target_modules};
    the enabled ones as LoraSpecs. An enabled entry for a module the family
    lacks, or a bad value, is a ConfigError."""
    from omnitrain.config import ConfigError

    out = {}
    for m, v in dict(lora or {}).items():
        v = dict(v or {})
        bad = sorted(set(v) - _FIELDS)
        if bad:
            raise ConfigError(f"model.lora.{m}.{bad[0]}: unknown key; use {', '.join(sorted(_FIELDS))}")
        if not v.get("enabled", False):
            continue
        if m not in family.module_names:
            raise ConfigError(f"model.lora.{m}: unknown module; model {family.name} has {', '.join(family.module_names)}")
        r, alpha, dropout = int(v.get("r", 8)), float(v.get("alpha", 16)), float(v.get("dropout", 0.0))
        if r < 1:
            raise ConfigError(f"model.lora.{m}.r={r}: must be >= 1")
        if alpha <= 0:
            raise ConfigError(f"model.lora.{m}.alpha={alpha}: must be > 0")
        if not 0 <= dropout < 1:
            raise ConfigError(f"model.lora.{m}.dropout={dropout}: must be in [0, 1)")
        targets = v.get("target_modules") or family.default_lora_targets(m)
        targets = (targets,) if isinstance(targets, str) else tuple(str(t) for t in targets)
        if not targets:
            raise ConfigError(f"model.lora.{m}.target_modules: name the Linear layers to adapt, e.g. [q_proj, v_proj]")
        out[m] = LoraSpec(r, alpha, dropout, targets)
    return out


def module_regex(family, module: str, spec: LoraSpec) -> str:
    """Full module names of `module`'s targets: a Linear named t inside one of its layers."""
    layers = re.escape(family.spec(module).layers)
    names = "|".join(re.escape(t) for t in spec.targets)
    return rf"{layers}\.\d+\.(?:.*\.)?(?:{names})"


def peft_config(family, specs: dict[str, LoraSpec], base: str | None = None):
    """The one LoraConfig that adapts every module's targets with its own r and alpha.
    Dropout is one value in PEFT's config (the largest; per module it is set on the
    layers, see `inject`); it only matters in training."""
    from peft import LoraConfig

    pats = {m: module_regex(family, m, s) for m, s in specs.items()}
    first = next(iter(specs.values()))
    return LoraConfig(
        r=first.r,
        lora_alpha=first.alpha,
        lora_dropout=max(s.dropout for s in specs.values()),
        target_modules="|".join(f"(?:{p})" for p in pats.values()),
        rank_pattern={p: specs[m].r for m, p in pats.items()},
        alpha_pattern={p: specs[m].alpha for m, p in pats.items()},
        base_model_name_or_path=base,
    )


def is_lora_name(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def base_name(name: str) -> str:
    """A parameter's name as the model has it without adapters."""
    return name.replace(".base_layer.", ".")


def inject(family, model: nn.Module, specs: dict[str, LoraSpec], seed: int) -> None:
    """Add the adapters in place, initialise the materialized ones from (seed,
    name), set per-module dropout, and set requires_grad: adapters train, other
    parameters as `family.is_trainable` says (PEFT froze everything else)."""
    import torch
    from peft import inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    from omnitrain.config import ConfigError
    from omnitrain.models.family import _seeded

    inject_adapter_in_model(peft_config(family, specs), model, adapter_name=ADAPTER)
    found = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        m = family.module_of(name + ".")
        found.add(m)
        p = specs[m].dropout
        mod.lora_dropout[ADAPTER] = nn.Dropout(p) if p > 0 else nn.Identity()
        if not mod.lora_A[ADAPTER].weight.is_meta:
            with _seeded(seed, f"lora:{name}"), torch.no_grad():
                mod.reset_lora_parameters(ADAPTER, True)
    missing = sorted(set(specs) - found)
    if missing:
        m = missing[0]
        raise ConfigError(
            f"model.lora.{m}.target_modules={list(specs[m].targets)}: no Linear of that name in {family.spec(m).layers}.*"
        )
    for n, p in model.named_parameters():
        p.requires_grad_(is_lora_name(n) or family.is_trainable(base_name(n)))
    # Checkpoints hold what trains (adapters and trained parameters): the
    # frozen base comes back from the seed or model.init_from (train/checkpoint.py).
    model._checkpoint_trained_only = True


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer (W + B A x scale) and put the base
    layer back under the target's name: the HF model without adapters."""
    from peft.tuners.lora import LoraLayer

    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoraLayer):
            mod.merge(safe_merge=True)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, mod.get_base_layer())
    return model


def adapter_state_dict(model: nn.Module) -> dict:
    """The adapters as PEFT's save_pretrained writes them: keys
    `base_model.model.<target>.lora_A.weight` (no adapter name)."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    return {f"base_model.model.{k}": v for k, v in sd.items()}
