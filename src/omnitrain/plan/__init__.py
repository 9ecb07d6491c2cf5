"""Parameter-count planner: how big each module, layer and pipeline stage is.

    python -m omnitrain.plan model=<model>
    python -m omnitrain.plan model=<model> parallel=<layout>
    python -m omnitrain.plan model=<model> 'parallel.pp.layers.llm=[0,7,12,9]' ...

Composes the same config as `python -m omnitrain` (same overrides), builds the
model on the meta device (shapes only: the 7B thinker costs no memory) and
prints parameters per module, per layer, and per pipeline stage of the chosen
layout (whole, and per rank after TP sharding). The counting functions are
pure and take any family's model, naming its parts by the family's modules.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Iterable, Mapping

from torch import nn

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
BYTES_PER_PARAM_TRAIN = 16  # fp32 weight + grad + AdamW exp_avg + exp_avg_sq


def groups(family) -> list[tuple[str, tuple[str, ...]]]:
    """(group, parameter-name prefixes), matched in order: each encoder whole;
    the decoder's embedding, layers and each part of its head."""
    out = [(m.name, m.prefixes) for m in family.modules[:-1]]
    d = family.modules[-1]
    out.append((f"{d.name}_embed", tuple(p + "." for p in d.pre)))
    out.append((f"{d.name}_layers", (d.layers + ".",)))
    for fqn in d.post:
        out.append((f"{d.name}_{fqn.rpartition('.')[2]}" if "." in fqn else fqn, (fqn + ".",)))
    return out


def count_params(family, model: nn.Module) -> dict[str, int]:
    """Parameters per group (see `groups`), plus `other` and `total`.

    A tied lm_head shares its tensor with embed_tokens; it is counted once,
    under the embedding, so lm_head reads 0 and total is the true unique count.
    """
    gs = groups(family)
    out = dict.fromkeys([g for g, _ in gs] + ["other", "total"], 0)
    for name, p in model.named_parameters():  # deduplicates shared tensors
        group = next((g for g, prefixes in gs if name.startswith(prefixes)), "other")
        out[group] += p.numel()
        out["total"] += p.numel()
    return out


def _layer_re(family) -> dict[str, re.Pattern]:
    return {m.name: re.compile(rf"^{re.escape(m.layers)}\.(\d+)\.") for m in family.modules}


def layer_params(family, model: nn.Module) -> dict[str, list[int]]:
    """Parameters of each layer of each module, e.g. {"vision": [...32], "llm": [...28]}."""
    rx = _layer_re(family)
    sizes: dict[str, dict[int, int]] = {m: {} for m in rx}
    for name, p in model.named_parameters():
        for module, r in rx.items():
            m = r.match(name)
            if m:
                i = int(m.group(1))
                sizes[module][i] = sizes[module].get(i, 0) + p.numel()
                break
    return {m: [s[i] for i in sorted(s)] for m, s in sizes.items()}


def _owner(family, name: str, rx: Mapping[str, re.Pattern]) -> tuple[str, str, int | None]:
    """Which segment owns a parameter: (module, "layers" | "pre" | "post" | "shared", layer index)."""
    for spec in family.modules:
        m = rx[spec.name].match(name)
        if m:
            return spec.name, "layers", int(m.group(1))
        for part in ("pre", "post", "shared"):
            if name.startswith(tuple(f + "." for f in getattr(spec, part))):
                return spec.name, part, None
    module = family.module_of(name)
    # anything unforeseen in an encoder runs after its layers; in the decoder, with the embeddings
    return module, ("pre" if module == family.decoder else "post"), None


def _owns(plan, module: str, part: str, idx) -> bool:
    if part == "layers":
        return idx in plan.layers.get(module, range(0))
    if part == "shared":
        return plan.has(module)
    return module in getattr(plan, part)


def stage_params(family, model: nn.Module, plans: Iterable) -> list[int]:
    """Parameters each pipeline stage holds, for `parallel.layout.StagePlan`s.

    Counted per stage, so a tied lm_head appears on both the merge stage and
    the head stage when they differ (each needs its own copy).
    """
    plans = list(plans)
    out = [0] * len(plans)
    rx = _layer_re(family)
    for name, p in model.named_parameters(remove_duplicate=False):
        owner = _owner(family, name, rx)
        for s, plan in enumerate(plans):
            if _owns(plan, *owner):
                out[s] += p.numel()
    return out


def rank_params(family, model: nn.Module, plans: Iterable, tp: Mapping[str, int], fsdp: Mapping[str, int] | None = None, ep: int = 1) -> list[float]:
    """Parameters one rank of each stage holds after TP (and FSDP) sharding: a
    tensor its module's TP plan shards counts 1/tp, the rest (norms, biases of
    row-parallel layers, patch embeddings) whole; under FSDP everything is
    divided by the module's dp size `fsdp[module]`; the family's experts
    (`family.experts`, parallel.ep) count 1/ep."""
    import fnmatch

    from omnitrain.parallel.tp import _matches

    plans = list(plans)
    out = [0] * len(plans)
    rx = _layer_re(family)
    for name, p in model.named_parameters(remove_duplicate=False):
        owner = _owner(family, name, rx)
        module = owner[0]
        fqn, _, leaf = name.rpartition(".")
        sharded = any(_matches(pat, fqn) for pat, _ in family.tp_plan.get(module, ()))
        # row-parallel biases are added after the reduction: replicated
        rowwise = any(_matches(pat, fqn) and style == "rowwise" for pat, style in family.tp_plan.get(module, ()))
        n = p.numel() / tp.get(module, 1) if sharded and not (rowwise and leaf == "bias") else p.numel()
        n /= (fsdp or {}).get(module, 1)
        # experts: 1/ep, or under FSDP 1/(edp x ep) = 1/dp, which the line above did
        if ep > 1 and family.experts and fnmatch.fnmatchcase(fqn, family.experts) and (fsdp or {}).get(module, 1) == 1:
            n /= ep
        for s, plan in enumerate(plans):
            if _owns(plan, *owner):
                out[s] += n
    return out


# ----------------------------------------------------------------------------- config + CLI


def compose(overrides: Iterable[str] = ()):
    """The composed run config, exactly as `python -m omnitrain` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from omnitrain.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()  # callable again in the same process (tests)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return hydra_compose(config_name="config", overrides=list(overrides))


def build_meta(model_cfg) -> tuple[object, nn.Module]:
    """(model family, its HF model on the meta device) from `cfg.model`."""
    from omnitrain.models.family import build_family

    family = build_family(model_cfg)
    return family, family.build_meta()


def _fmt(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.3f} B"
    if n >= 1e6:
        return f"{n / 1e6:.2f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} K"
    return str(n)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(r):  # first column left-aligned, numbers right-aligned
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def module_table(counts: Mapping[str, int]) -> str:
    total = counts["total"] or 1
    rows = [[g, f"{n:,}", _fmt(n), f"{100 * n / total:.1f}%"] for g, n in counts.items() if g != "other" or n]
    return _table(["module", "params", "", "share"], rows)


def layer_table(layers: Mapping[str, list[int]]) -> str:
    rows = []
    for module, sizes in layers.items():
        if sizes:
            per = sorted(set(sizes))
            each = _fmt(per[0]) if len(per) == 1 else f"{_fmt(per[0])}..{_fmt(per[-1])}"
            rows.append([module, str(len(sizes)), each, _fmt(sum(sizes))])
    return _table(["module", "layers", "per layer", "all layers"], rows)


def stage_table(plans, sizes: list[int], per_rank: list[float]) -> str:
    rows = []
    for plan, n, r in zip(plans, sizes, per_rank):
        held = [f"{m} {rg.start}-{rg.stop - 1}" for m, rg in plan.layers.items() if len(rg)]
        extras = [k for k in ("merge", "head") if getattr(plan, k)]
        gib = r * BYTES_PER_PARAM_TRAIN / 2**30
        rows.append([str(plan.index), ", ".join(held + extras), _fmt(n), _fmt(int(r)), f"{gib:.1f}"])
    return _table(["stage", "holds", "params", "per rank", "train GiB/rank*"], rows)


def report(cfg) -> str:
    """The planner's text for a composed config."""
    from omegaconf import open_dict

    from omnitrain.config import ConfigError
    from omnitrain.parallel.context import check_layout
    from omnitrain.parallel.mesh import Sizes

    family, model = build_meta(cfg.model)
    counts = count_params(family, model)
    parts = [f"model={cfg.model.name}  ({family.hf_architecture}, built on meta)", "", module_table(counts)]
    active = family.active_params(model)  # [family hook] MoE: the experts a token is not routed to do not count
    if active != counts["total"]:
        parts.append(f"active per token: {_fmt(active)} of {_fmt(counts['total'])} total ({active:,} of {counts['total']:,})")
    parts += ["", layer_table(layer_params(family, model))]
    note = auto_line = None
    try:
        from omnitrain.plan.layout import is_auto, resolve_auto

        if is_auto(cfg):
            auto_line = resolve_auto(cfg, family)
        try:
            plans = check_layout(cfg, family)
        except ConfigError as e:
            if "micro-batches per step" not in str(e):
                raise
            # Only the batch is too small for the schedule: the stages do not depend on it.
            note = f"note: {e}"
            with open_dict(cfg):
                cfg.parallel.pp.schedule = "gpipe"
            plans = check_layout(cfg, family)
        sizes = Sizes.from_cfg(cfg, family.module_names)
    except ConfigError as e:
        parts += ["", f"parallel={cfg.parallel.name}: no stage table, the layout is invalid: {e}"]
    else:
        fsdp = {m: sizes.dp_of(m) for m in sizes.tp} if cfg.parallel.dp_mode == "fsdp" else None
        tp = ", ".join(f"{m} {t}" for m, t in sizes.tp.items())
        ep = int(cfg.parallel.ep.llm)
        ep_text = f", ep llm {ep} (expert-dp {sizes.dp_of(family.decoder) // ep})" if ep > 1 else ""
        parts += ["", f"parallel={cfg.parallel.name}: pp {sizes.pp}, dp {sizes.dp} ({cfg.parallel.dp_mode}), tp {tp}{ep_text}; {sizes.world} ranks"]
        parts += [stage_table(plans, stage_params(family, model, plans), rank_params(family, model, plans, sizes.tp, fsdp, ep))]
        parts += [
            f"* {BYTES_PER_PARAM_TRAIN} B/param (fp32 weight, grad, AdamW moments) after TP"
            + (" and FSDP" if fsdp else "") + (" and EP" if ep > 1 else "") + " sharding, on one rank of the stage; activations not included"
        ] + ([note] if note else [])
        if auto_line:
            parts += ["", auto_line]
        from omnitrain.plan.layout import stage_report

        parts += ["", stage_report(cfg, family, plans, sizes)[0]]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    from omnitrain.plan.__main__ import main as cli

    return cli(argv)
