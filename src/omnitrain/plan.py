"""Parameter-count planner: how big each module, layer and pipeline stage is.

    python -m omnitrain.plan model=qwen25_omni_7b
    python -m omnitrain.plan model=qwen25_omni_3b parallel=pp4_hetero
    python -m omnitrain.plan model=qwen25_omni_7b 'parallel.pp.layers.llm=[0,7,12,9]' ...

Composes the same config as `python -m omnitrain` (same overrides), builds the
model on the meta device (shapes only: the 7B thinker costs no memory) and
prints parameters per module, per layer, and per pipeline stage of the chosen
layout. The counting functions are pure and take any thinker module.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Iterable, Mapping

from torch import nn

CONF_DIR = Path(__file__).resolve().parent / "conf"

# Module prefix -> group, matched in order (first match wins).
GROUPS = (
    ("vision", "model.visual."),
    ("audio", "model.audio_tower."),
    ("llm_embed", "model.language_model.embed_tokens."),
    ("llm_layers", "model.language_model.layers."),
    ("llm_norm", "model.language_model.norm."),
    ("lm_head", "lm_head."),
)
GROUP_NAMES = tuple(g for g, _ in GROUPS) + ("other", "total")

# Per-layer containers, and the non-layer parts of each encoder that the layout
# places before the first / after the last of its layers (see parallel/layout.py).
_LAYER_RE = {
    "vision": re.compile(r"^model\.visual\.blocks\.(\d+)\."),
    "audio": re.compile(r"^model\.audio_tower\.layers\.(\d+)\."),
    "llm": re.compile(r"^model\.language_model\.layers\.(\d+)\."),
}
_PRE = {
    "vision": ("model.visual.patch_embed.", "model.visual.rotary_pos_emb."),
    "audio": ("model.audio_tower.conv1.", "model.audio_tower.conv2.", "model.audio_tower.positional_embedding."),
}
_ENCODER_PREFIX = {"vision": "model.visual.", "audio": "model.audio_tower."}
_MERGE = ("model.language_model.embed_tokens.",)
_HEAD = ("model.language_model.norm.", "lm_head.")

BYTES_PER_PARAM_TRAIN = 16  # fp32 weight + grad + AdamW exp_avg + exp_avg_sq


def count_params(model: nn.Module) -> dict[str, int]:
    """Parameters per module group (see GROUPS), plus `other` and `total`.

    A tied lm_head shares its tensor with embed_tokens; it is counted once,
    under llm_embed, so lm_head reads 0 and total is the true unique count.
    """
    out = dict.fromkeys(GROUP_NAMES, 0)
    for name, p in model.named_parameters():  # deduplicates shared tensors
        group = next((g for g, prefix in GROUPS if name.startswith(prefix)), "other")
        out[group] += p.numel()
        out["total"] += p.numel()
    return out


def layer_params(model: nn.Module) -> dict[str, list[int]]:
    """Parameters of each layer of each module: {"vision": [...32], "audio": [...], "llm": [...]}."""
    sizes: dict[str, dict[int, int]] = {m: {} for m in _LAYER_RE}
    for name, p in model.named_parameters():
        for module, rx in _LAYER_RE.items():
            m = rx.match(name)
            if m:
                i = int(m.group(1))
                sizes[module][i] = sizes[module].get(i, 0) + p.numel()
                break
    return {m: [s[i] for i in sorted(s)] for m, s in sizes.items()}


def _segment(name: str) -> tuple[str, int | None]:
    """Which pipeline segment owns a parameter: (segment, layer index or None)."""
    for module, rx in _LAYER_RE.items():
        m = rx.match(name)
        if m:
            return module, int(m.group(1))
    for enc, prefix in _ENCODER_PREFIX.items():
        if name.startswith(prefix):
            # merger, ln_post, proj, audio_bos_eos_token ... run after the last layer
            return (f"{enc}_pre" if name.startswith(_PRE[enc]) else f"{enc}_post"), None
    if name.startswith(_MERGE):
        return "merge", None
    if name.startswith(_HEAD):
        return "head", None
    return "merge", None  # anything unforeseen: with the embeddings, on the merge stage


def stage_params(model: nn.Module, plans: Iterable) -> list[int]:
    """Parameters each pipeline stage holds, for `parallel.layout.StagePlan`s.

    Counted per stage, so a tied lm_head appears on both the merge stage and
    the head stage when they differ (each needs its own copy).
    """
    plans = list(plans)
    out = [0] * len(plans)
    for name, p in model.named_parameters(remove_duplicate=False):
        seg, idx = _segment(name)
        for s, plan in enumerate(plans):
            if idx is not None:
                owns = idx in plan.layers.get(seg, range(0))
            else:
                owns = bool(getattr(plan, seg))
            if owns:
                out[s] += p.numel()
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
    """(adapter, HF thinker on the meta device) from `cfg.model`."""
    from hydra.utils import instantiate

    adapter = instantiate(model_cfg, _convert_="all")
    return adapter, adapter.build_meta()


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
    rows = [[g, f"{counts[g]:,}", _fmt(counts[g]), f"{100 * counts[g] / total:.1f}%"] for g in GROUP_NAMES if g != "other" or counts[g]]
    return _table(["module", "params", "", "share"], rows)


def layer_table(layers: Mapping[str, list[int]]) -> str:
    rows = []
    for module, sizes in layers.items():
        if sizes:
            per = sorted(set(sizes))
            each = _fmt(per[0]) if len(per) == 1 else f"{_fmt(per[0])}..{_fmt(per[-1])}"
            rows.append([module, str(len(sizes)), each, _fmt(sum(sizes))])
    return _table(["module", "layers", "per layer", "all layers"], rows)


def stage_table(plans, sizes: list[int]) -> str:
    rows = []
    for plan, n in zip(plans, sizes):
        held = [f"{m} {r.start}-{r.stop - 1}" for m, r in plan.layers.items() if len(r)]
        extras = [k for k in ("merge", "head") if getattr(plan, k)]
        rows.append([str(plan.index), ", ".join(held + extras), _fmt(n), f"{n * BYTES_PER_PARAM_TRAIN / 2**30:.1f}"])
    return _table(["stage", "holds", "params", "train GiB*"], rows)


def _num_microbatches(cfg) -> int:
    t, dp = cfg.train, cfg.parallel.dp
    dp = dp if isinstance(dp, int) and dp > 0 else 1
    return max(1, t.global_batch_size // (t.micro_batch_size * dp))


def report(cfg) -> str:
    """The planner's text for a composed config."""
    from omnitrain.config import ConfigError
    from omnitrain.parallel.layout import validate_layout

    adapter, model = build_meta(cfg.model)
    counts = count_params(model)
    parts = [f"model={cfg.model.name}  ({cfg.model.config_class}, built on meta)", "", module_table(counts)]
    parts += ["", layer_table(layer_params(model))]
    pp = cfg.parallel.pp
    try:
        layers = None if pp.layers is None else {k: list(v) for k, v in pp.layers.items()}
        plans = validate_layout(
            pp.size,
            layers,
            adapter.depths,
            num_microbatches=_num_microbatches(cfg),
            schedule=pp.schedule,
            virtual_stages=pp.virtual_stages,
        )
    except ConfigError as e:
        parts += ["", f"parallel={cfg.parallel.name}: no stage table, the layout is invalid: {e}"]
    else:
        parts += ["", f"parallel={cfg.parallel.name}", stage_table(plans, stage_params(model, plans))]
        parts += [f"* {BYTES_PER_PARAM_TRAIN} B/param (fp32 weight, grad, AdamW moments), before TP/FSDP sharding"]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    print(report(compose(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
