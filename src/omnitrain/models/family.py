"""The model-family interface: what the generic packages (parallel, pipeline,
data, train, convert, plan) may ask of a model. One subclass per family lives
in `models/<family>/`; nothing outside `models/` names a family.

A family declares data (its modules, TP plans, HF tensor names, chat tokens)
and implements a few methods (encoders, merge, rope positions, dummy media,
FLOPs); everything that follows from the declarations is here, once:
meta build, per-module seeded init, the stage's owned modules, the decoder
layers, the loss, media bookkeeping of a micro-batch, HF name mapping.

Vocabulary:
  module   a unit a layout splits and sizes on its own (`parallel.pp.layers.<m>`,
           `parallel.tp.<m>`, `model.trainable.<m>`): encoders, then the decoder
  segment  what a pipeline stage runs: a module's `pre` part (before its first
           layer), its layers, its `post` part. The decoder's pre is the merge
           (embed tokens, scatter encoder features, positions), its post the
           head (norm, lm_head, loss).

What crosses a pipeline cut is a dict of named tensors: `<kind>_h` (an
encoder's hidden states of media kind `kind` between its layers),
`<kind>_emb` (its output features), `h` and `pos` (the decoder's hidden
states and positions). Everything else is read from the micro-batch, which
every stage loads itself.
"""

from __future__ import annotations

import fnmatch
import importlib
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def import_object(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class ModuleSpec:
    """One module of a family, by the FQNs of its HF parts."""

    name: str
    layers: str  # FQN of the nn.ModuleList of its layers
    depth: str  # attribute path in the HF config that gives the layer count
    prefixes: tuple[str, ...]  # parameter-name prefixes that belong to it
    pre: tuple[str, ...] = ()  # FQNs run before its first layer
    post: tuple[str, ...] = ()  # FQNs run after its last layer
    shared: tuple[str, ...] = ()  # FQNs every stage with any of its segments needs (rotary tables)
    media: tuple[str, ...] = ()  # media kinds an encoder encodes; () for the decoder


@dataclass(frozen=True)
class Media:
    """Where one media kind sits in a micro-batch (the collator's layout)."""

    kind: str
    trigger: str  # the key whose presence runs the encoder
    rows: tuple[str, ...]  # keys with one row per patch / clip, in sample order
    per_item: tuple[str, ...] = ()  # keys with one row per item (grids, timings)
    grid: str | None = None  # rows per item = prod(grid) (else one row per item)
    frames: str | None = None  # a mask whose sum is the items' input length (audio frames)


# The collator's keys (data/collate.py), shared by every family that has the kind.
MEDIA = {
    "image": Media("image", "pixel_values", ("pixel_values",), ("image_grid_thw",), "image_grid_thw"),
    "video": Media("video", "pixel_values_videos", ("pixel_values_videos",), ("video_grid_thw", "video_second_per_grid"), "video_grid_thw"),
    "audio": Media("audio", "input_features", (), ("input_features", "feature_attention_mask"), frames="feature_attention_mask"),
}


@dataclass(frozen=True)
class Work:
    """What one sample asks of one layer (planner, plan/cost.py): tokens
    (patches, audio frames, LLM positions) through it, and the (query, key)
    pairs its attention scores."""

    tokens: float
    pairs: float = 0.0


@dataclass(frozen=True)
class Cost:
    """Forward cost of one segment for one sample: FLOPs, bytes moved
    (weights read, activations read and written) and activation bytes kept
    for the backward."""

    flops: float
    bytes: float
    act: float


@dataclass(frozen=True)
class ChatSpec:
    """What the data pipeline needs to lay out a sample for this family."""

    tokens: Mapping[str, str]  # role -> token string (image, video, vision_bos, ..., im_start, im_end)
    config_keys: Mapping[str, tuple[str, ...]]  # role -> HF config keys holding its id (checked against the tokenizer)
    default_system: str = "You are a helpful assistant."
    # A video's tokens interleaved with its soundtrack's (use_audio_in_video):
    # fn(video grid, merge size, seconds per grid, audio tokens, ids,
    # position ids per second, seconds per chunk) -> token ids; None = unsupported.
    audio_in_video: Optional[Callable] = None
    # Audio encoder outputs (= placeholder tokens) for n mel frames; None = the
    # Whisper-style encoder's (two stride-2 stages).
    audio_tokens: Optional[Callable[[int], int]] = None
    # A video's tokens with vision bos/eos: fn(video grid, merge size, seconds
    # per grid, ids, encode(text) -> ids) -> token ids; None = one block
    # bos + video tokens + eos.
    video_tokens: Optional[Callable] = None


class ModelFamily:
    """Base of every family adapter; built by Hydra from `cfg.model` (`_target_`)."""

    hf_class: str = ""  # the HF model class this family trains
    hf_config_class: str = ""  # its config class
    modules: tuple[ModuleSpec, ...] = ()  # encoders in data-flow order, the decoder last
    chat: ChatSpec = None
    # TP plans, per module: (FQN pattern, style); "*" is a layer index. Styles
    # (parallel/tp.py): colwise, rowwise, vocab_embed, vocab_head, and for
    # sequence parallelism seq_norm, seq_gather, seq_gather_kw.
    tp_plan: Mapping[str, tuple] = {}
    sp_plan: Mapping[str, tuple] = {}
    # [parallel] fnmatch pattern of the LLM's experts modules (HF's fused
    # gate_up_proj / down_proj) that parallel.ep shards; None: no experts.
    experts: str | None = None
    # Head-count attributes HF's attention reshapes by: divided by the TP size.
    tp_head_attrs: Mapping[str, tuple] = {}
    # State-dict adapter: (in-memory prefix, file prefix) as save_pretrained writes them.
    hf_names: tuple[tuple[str, str], ...] = ()
    # HF config model_type of a folder this family reads -> (prefix of its
    # tensors there, key of its sub-config or None for the top level).
    hf_model_types: Mapping[str, tuple] = {}
    # `model.trainable=sft`: the usual SFT choice for this family (README: Fine-tuning controls).
    sft_trainable: Mapping[str, object] = {}

    # Keys `model.moe` takes (a family with MoE layers lists them).
    moe_options: tuple[str, ...] = ()

    def __init__(self, name, config, processor=None, config_class=None, init_from=None, trainable=None, transform=None, lora=None, path=None, moe=None):
        from omnitrain.models.lora import parse_lora

        self.name = name
        self.moe = dict(moe or {})
        bad = sorted(set(self.moe) - set(self.moe_options))
        if bad:
            from omnitrain.config import ConfigError

            hint = f"it takes {', '.join(self.moe_options)}" if self.moe_options else f"model {name} has no MoE layers"
            raise ConfigError(f"model.moe.{bad[0]}: unknown key; {hint}")
        self.processor = processor  # a folder or builtin:<name> (data.load_processor)
        self.transform = transform
        self.init_from = init_from
        if trainable == "sft":
            trainable = dict(self.sft_trainable)
        elif isinstance(trainable, str):
            from omnitrain.config import ConfigError

            raise ConfigError(f"model.trainable={trainable!r}: use sft (this family's SFT preset) or a bool / {{train, except}} per module")
        self.path = path
        self.last_load = None  # {tensors, bytes} the last build read from init_from
        self.trainable, self.trainable_except = parse_trainable(trainable, self.module_names, name)
        self.lora = parse_lora(lora, self)
        for m in self.lora:
            # LoRA freezes the module's base: only the `except` patterns of
            # model.trainable.<m> name base parameters that still train.
            self.trainable[m] = False
        self.config_class = config_class or self.hf_config_class
        if path is None:
            self.hf_config = self.make_config(self.config_class, dict(config))
        else:
            # An HF folder as it ships (model=hf): its (sub-)config, `config` merged over it.
            from omnitrain.convert.hf import read_config

            folder_config, _, _ = read_config(path, self)
            overrides = dict(config or {})
            self.check_config_keys(self.config_class, overrides, known=folder_config)
            self.hf_config = self.config_from_hf(_deep_merge(folder_config, overrides))

    @classmethod
    def from_hf_config(cls, config: dict, name: str = "hf"):
        """The family for an HF folder's (sub-)config dict, without a model yaml."""
        self = cls.__new__(cls)
        ModelFamily.__init__(self, name, {}, processor=None)
        self.hf_config = self.config_from_hf(config)
        return self

    # ---- modules ----------------------------------------------------------
    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.modules)

    @property
    def decoder(self) -> str:
        return self.modules[-1].name

    @property
    def encoders(self) -> tuple[str, ...]:
        return self.module_names[:-1]

    def default_lora_targets(self, module: str) -> tuple[str, ...]:
        """`model.lora.<module>.target_modules` when unset: every Linear of the
        module's layers that its TP plan shards (q/k/v/o and MLP projections)."""
        pats = [p for p, style in self.tp_plan.get(module, ()) if ".*." in p and style.startswith(("colwise", "rowwise"))]
        return tuple(dict.fromkeys(p.rpartition(".")[2] for p in pats))

    def spec(self, module: str) -> ModuleSpec:
        return next(m for m in self.modules if m.name == module)

    @property
    def depths(self) -> dict[str, int]:
        out = {}
        for m in self.modules:
            v = self.hf_config
            for part in m.depth.split("."):
                v = getattr(v, part)
            out[m.name] = int(v)
        return out

    def media_kinds(self) -> tuple[str, ...]:
        return tuple(k for m in self.modules for k in m.media)

    def module_of(self, param_name: str) -> str:
        """The module a parameter (or `<FQN>.`) belongs to; the decoder takes the rest (lm_head)."""
        for m in self.modules[:-1]:
            if param_name.startswith(m.prefixes):
                return m.name
        return self.decoder

    # ---- config -----------------------------------------------------------
    def check_config_keys(self, config_class: str, kwargs: dict, known: dict | None = None) -> None:
        """`model.config` keys must be the config class's (or `known`'s, a folder's config)."""
        cls = import_object(config_class)
        extra = self.undeclared_config_keys()
        default = cls()
        known = known or {}
        unknown = sorted(set(kwargs) - set(default.to_dict()) - set(extra) - set(known))
        # HF accepts any key of a sub-config silently: check those too.
        for sub in getattr(default, "sub_configs", {}):
            if isinstance(kwargs.get(sub), dict):
                # `<sub>.<key>` in undeclared_config_keys: passed to the sub-config, which keeps it
                sub_known = (set(getattr(default, sub).to_dict()) | set(known.get(sub) or {})
                             | {k.split(".", 1)[1] for k in extra if k.startswith(sub + ".")})
                unknown += [f"{sub}.{k}" for k in sorted(set(kwargs[sub]) - sub_known)]
        if unknown:
            from omnitrain.config import ConfigError

            raise ConfigError(f"model.config: unknown keys {unknown} for {config_class}; check the spelling")

    def make_config(self, config_class: str, kwargs: dict):
        self.check_config_keys(config_class, kwargs)
        cls = import_object(config_class)
        extra = self.undeclared_config_keys()
        cfg = cls(**{k: v for k, v in kwargs.items() if k not in extra})
        for key in extra:  # read by HF code, not declared by the config class
            if key in kwargs and "." not in key:
                setattr(cfg, key, kwargs[key])
        return _sdpa(cfg)

    def undeclared_config_keys(self) -> tuple[str, ...]:
        return ()

    def config_from_hf(self, config: dict):
        """The HF config object from a folder's (sub-)config dict."""
        cls = import_object(self.config_class)
        keep = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "transformers_version")}
        extra = self.undeclared_config_keys()
        cfg = cls(**{k: v for k, v in keep.items() if k not in extra})
        for key in extra:
            if key in keep:
                setattr(cfg, key, keep[key])
        return _sdpa(cfg)

    # ---- HF tensor names (state-dict adapter) -----------------------------
    def to_hf_name(self, name: str) -> str:
        for ours, theirs in self.hf_names:
            if name.startswith(ours):
                return theirs + name[len(ours) :]
        return name

    def to_hf_tensors(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """The HF folder's tensors for one in-memory tensor (export); a family
        whose HF files split a tensor (per-expert MoE weights) overrides it."""
        return {self.to_hf_name(name): tensor}

    def hf_layouts(self, name: str, shape) -> list[dict[str, tuple]]:
        """The ways an HF folder may store one in-memory tensor, each {key: shape}
        (import; the first complete one is read, the first is reported when none
        is): default its one key. A family whose files split a tensor adds that."""
        return [{self.to_hf_name(name): tuple(shape)}]

    def from_hf_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """One in-memory tensor from the file tensors of one of its `hf_layouts`."""
        (tensor,) = tensors.values()
        return tensor

    def from_hf_name(self, key: str) -> str:
        """The in-memory tensor a file key (without the folder's prefix) is (part of)."""
        for ours, theirs in self.hf_names:
            if key.startswith(theirs):
                return ours + key[len(theirs) :]
        return key

    @property
    def hf_architecture(self) -> str:
        return self.hf_class.rpartition(".")[2]

    # ---- build ------------------------------------------------------------
    def build_meta(self, hf_config=None) -> nn.Module:
        """The whole HF model on the meta device: shapes only, no memory."""
        cls = import_object(self.hf_class)
        with torch.device("meta"):
            return cls._from_config(hf_config or self.hf_config, dtype=torch.float32)

    def owned_prefixes(self, plan) -> list[str]:
        """Module FQNs a stage materializes (parameters and buffers), for a
        `parallel.layout.StagePlan`."""
        out = []
        for m in self.modules:
            if not plan.has(m.name):
                continue
            out += m.shared
            if m.name in plan.pre:
                out += m.pre
            out += [f"{m.layers}.{i}" for i in plan.layers.get(m.name, range(0))]
            if m.name in plan.post:
                out += m.post
        return out

    def build(self, plans, device: torch.device, seed: int) -> nn.Module:
        """Build on meta, then materialize and initialise only this rank's modules.

        Each module is initialised from its own seed (run seed + hash of its
        name), so a parameter gets the same values whatever the layout.
        Modules this rank does not own stay on the meta device. A rank that
        runs several (virtual) stages passes their plans as a list. With
        `init_from` (an HF folder) the owned tensors are read from its files
        instead (`convert.hf.materialize`); TP / FSDP then distribute them.
        """
        plans = plans if isinstance(plans, (list, tuple)) else [plans]
        prefixes = list(dict.fromkeys(p for plan in plans for p in self.owned_prefixes(plan)))
        model = self.build_meta()
        modules = dict(model.named_modules())
        if self.init_from:
            from omnitrain.convert.hf import materialize

            # Straight from the folder's files, only this rank's tensors, no init first.
            self.last_load = materialize(self, model, prefixes, self.init_from, device, seed)
        else:
            for prefix in prefixes:
                mod = modules[prefix]
                # Initialise on CPU (one RNG, same values on every device type), then move.
                mod.to_empty(device="cpu", recurse=True)
                for name, sub in mod.named_modules(prefix=prefix):
                    with _seeded(seed, name):
                        model._init_weights(sub)
                mod.to(device)
        # HF ties lm_head to embed_tokens on meta; materializing them as separate
        # prefixes gives each its own tensor: share it again where both are here
        # (layouts that would split them are refused by check_tied_embeddings).
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        params = dict(model.named_parameters(remove_duplicate=False))
        if tied and not any(params[k].is_meta for pair in tied.items() for k in pair if k in params):
            model.tie_weights()
        self.apply_trainable(model)
        if self.lora:
            from omnitrain.models.lora import inject

            inject(self, model, self.lora, seed)
        model.train()
        return model

    def relative_name(self, param_name: str) -> str:
        """A parameter's name relative to its module's FQN prefix (`merger.mlp.0.weight`
        for `model.visual.merger.mlp.0.weight`); a name outside every prefix stays whole."""
        for prefix in self.spec(self.module_of(param_name)).prefixes:
            if param_name.startswith(prefix):
                return param_name[len(prefix) :]
        return param_name

    def _matches(self, param_name: str, pattern: str) -> bool:
        """A pattern matches the name relative to its module's prefix, or the full name."""
        return _matches(self.relative_name(param_name), pattern) or _matches(param_name, pattern)

    def is_trainable(self, param_name: str) -> bool:
        """`model.trainable.<module>`: the module's default, flipped for the
        parameters an `except` pattern matches."""
        module = self.module_of(param_name)
        param_name = param_name.replace(".base_layer.", ".")  # a LoRA target's base weight
        flip = any(self._matches(param_name, pat) for pat in self.trainable_except[module])
        return self.trainable[module] != flip

    def apply_trainable(self, model: nn.Module) -> None:
        """Freeze (requires_grad=False) what `model.trainable` freezes. An
        `except` pattern that matches no parameter of its module is a typo: refused."""
        self.check_trainable([n for n, _ in model.named_parameters()])
        for n, p in model.named_parameters():
            if not self.is_trainable(n):
                p.requires_grad_(False)

    def check_trainable(self, names) -> None:
        """Every `except` pattern matches some parameter of its module (else ConfigError)."""
        for module, patterns in self.trainable_except.items():
            own = [n for n in names if self.module_of(n) == module]
            rel = [self.relative_name(n) for n in own]
            for pat in patterns:
                if not any(self._matches(n, pat) for n in own):
                    from omnitrain.config import ConfigError

                    raise ConfigError(
                        f"model.trainable.{module}.except: {pat!r} matches no parameter of {module} "
                        f"(names are relative to the module, e.g. {rel[0] if rel else '?'!r})"
                    )

    def module_parameters(self, model: nn.Module, module: str):
        return [p for n, p in model.named_parameters() if self.module_of(n) == module]

    @staticmethod
    def local_parameters(model: nn.Module):
        """(name, param) of the materialized parameters (not on meta)."""
        return [(n, p) for n, p in model.named_parameters() if not p.is_meta]

    # ---- forward ----------------------------------------------------------
    def stage_forward(self, model: nn.Module, plan, mb: dict, inputs: dict, num_label_tokens, hooks=None):
        """Run one stage's segments on one micro-batch.

        `inputs` is what the previous stage sent (empty on the first stage).
        Returns the dict for the next stage, or the loss on the head stage.
        [parallel hook] `mb["_slices"][module]`, where present, holds the
        media this rank encodes for `module` (a part of the micro-batch's
        samples, see `slice_media`); `hooks[module]` joins the parts'
        features, `hooks["seq_shard"]` keeps this rank's part of the
        decoder's sequence.
        """
        hooks = hooks or {}
        out = dict(inputs)
        slices = mb.get("_slices", {})
        for enc in self.encoders:
            if plan.has(enc):
                self.encode(enc, model, plan, slices.get(enc, mb), out)
        dec = self.decoder
        if dec in plan.pre:
            self.merge(model, mb, out, hooks)
            if "seq_shard" in hooks:
                out["h"] = hooks["seq_shard"](out["h"])
        if len(plan.layers.get(dec, range(0))):
            self.decode(model, plan.layers[dec], mb, out)
        if dec in plan.post:
            segments = None
            if isinstance(num_label_tokens, LossNorm) and num_label_tokens.kind == "sample_mean" and "pack_index" in mb:
                from omnitrain.data.packing import segment_ids

                segments = segment_ids(mb)  # sample_mean weighs per sample, not per packed row
            return self.loss(model, out["h"], mb["labels"], num_label_tokens, segments=segments)
        return out

    def encode(self, module: str, model: nn.Module, plan, view: dict, out: dict) -> None:
        """Run `module`'s segments of `plan` on the micro-batch view `view`."""
        raise NotImplementedError

    def rope_positions(self, model: nn.Module, mb: dict) -> torch.Tensor:
        raise NotImplementedError

    def dummy_media(self, kind: str) -> dict:
        """The smallest input of one media kind, for a rank whose micro-batch has
        none while a data-parallel peer's has some: FSDP's collectives need
        every replica to run the same encoder passes. Marked in `_dummy` so
        its features join the loss with weight 0 and no positions read it."""
        raise NotImplementedError

    def begin_step(self, global_tokens: int) -> None:
        """[trainer hook] A step starts; `global_tokens`: real tokens of its global batch."""

    def step_stats(self):
        """[trainer hook] None, or (float64 vector of per-rank sums, function of
        the vector summed over ranks -> entries of the step's log row)."""
        return None

    def active_params(self, model: nn.Module) -> int:
        """Parameters one token uses (the planner's `active` count; MoE families override)."""
        return sum(p.numel() for p in model.parameters())

    def flops_per_token(self) -> float:
        """Training FLOPs per decoder token (for MFU)."""
        raise NotImplementedError

    def tp_sizes(self) -> dict[str, dict[str, int]]:
        """Per module, the sizes its TP size must divide (named for the error message)."""
        raise NotImplementedError

    # ---- cost model [planner hooks] (plan/cost.py) --------------------------
    # `load` is one sample's LLM tokens per media kind ("image", "video",
    # "audio"; "<kind>_items" items of that kind) and "text" (the rest).
    def layer_type(self, module: str, index: int) -> str:
        """Layers of one type cost the same per unit of work (the planner fits
        and reports per type): one type per module unless the family says more."""
        return module

    def layer_width(self, module: str) -> int:
        """Hidden size of `module`'s layers (attention FLOPs, activation bytes)."""
        raise NotImplementedError

    def layer_work(self, module: str, index: int, load: Mapping[str, float]) -> Work:
        """Tokens and attention pairs of layer `index` of `module` for one sample."""
        raise NotImplementedError

    def part_work(self, module: str, part: str, load: Mapping[str, float]) -> Work:
        """Tokens through `module`'s pre or post part for one sample."""
        raise NotImplementedError

    def expert_params(self, module: str, index: int) -> int:
        """[planner hook] Parameters of layer `index`'s routed experts (what
        parallel.ep splits); 0 for a dense layer."""
        return 0

    def layer_cost(self, module: str, index: int, work: Work, params: int, dtype_bytes: int) -> Cost:
        """Forward cost of one layer. Dense default: 2 FLOPs per weight per
        token, 4 x width per attention pair (QK^T and AV); weights read once,
        ~17 width-sized activations per token kept (Megatron's 34 bytes per
        token and width at 16 bit, without the score matrix, which SDPA does
        not keep). A MoE family counts only the active experts' weights."""
        w = self.layer_width(module)
        flops = 2.0 * params * work.tokens + 4.0 * w * work.pairs
        act = 17.0 * w * work.tokens * dtype_bytes
        return Cost(flops, params * dtype_bytes + 2 * act, act)

    def part_cost(self, module: str, part: str, work: Work, params: int, dtype_bytes: int) -> Cost:
        """Forward cost of a pre or post part: dense (2 FLOPs per weight per
        token) except the decoder's pre (the merge), an embedding gather, and
        the decoder's post, whose fp32 logits and their grad are kept."""
        w = self.layer_width(module)
        if module == self.decoder and part == "pre":
            io = work.tokens * w * dtype_bytes
            return Cost(0.0, 3 * io, io)
        flops = 2.0 * params * work.tokens
        if module == self.decoder and part == "post":
            logits = work.tokens * (params / max(w, 1)) * 4  # fp32 logits, (params / width) = vocab
            return Cost(flops + 6 * logits / 4, params * dtype_bytes + 3 * logits, 2 * logits)
        act = 4.0 * w * work.tokens * dtype_bytes
        return Cost(flops, params * dtype_bytes + 2 * act, act)

    # ---- predicted cost (data.balance, metrics) ----------------------------
    def cost_per_token(self, model: nn.Module | None = None) -> dict[str, float]:
        """Predicted training FLOPs per input token of each module: an encoder
        per row it reads (patch, audio frame), 6 x its layers' parameters; the
        decoder `flops_per_token`. Cached; counted on `model` if given (any
        stage's: parameters it does not own are on meta, still with their
        shapes), else on a meta build. A small default that a fuller cost model
        (attention, per layer type) can replace."""
        cached = self.__dict__.get("_cost_per_token")
        if cached is None:
            mods = dict((model or self.build_meta()).named_modules())
            cached = {m.name: 6.0 * sum(p.numel() for p in mods[m.layers].parameters()) for m in self.modules[:-1]}
            cached[self.decoder] = float(self.flops_per_token())
            self._cost_per_token = cached
        return cached

    def module_tokens(self, mb: dict) -> dict[str, int]:
        """Input tokens of each module in a micro-batch: an encoder's rows of
        real media (patches, audio frames; dummy media not counted), the decoder's tokens."""
        dummy = mb.get("_dummy", ())
        out = {}
        for m in self.modules[:-1]:
            n = 0
            for kind in m.media:
                md = MEDIA[kind]
                if md.trigger not in mb or kind in dummy:
                    continue
                if md.grid:
                    n += int(mb[md.grid].prod(-1).sum())
                elif md.frames:
                    n += int(mb[md.frames].sum())
                else:
                    n += int(mb[md.per_item[0]].shape[0])
            out[m.name] = n
        out[self.decoder] = int(mb["attention_mask"].sum())
        return out

    def batch_cost(self, mb: dict) -> float:
        """Predicted training FLOPs of a micro-batch (or of one sample collated alone)."""
        cpt = self.cost_per_token()
        return sum(cpt[m] * n for m, n in self.module_tokens(mb).items())

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def token_id(self, role: str) -> int | None:
        for key in self.chat.config_keys.get(role, ()):
            v = getattr(self.hf_config, key, None)
            if v is not None:
                return int(v)
        return None

    def merge(self, model: nn.Module, mb: dict, out: dict, hooks: dict) -> None:
        """Embed the tokens, scatter each media kind's features into its
        placeholder positions, compute the positions."""
        ids = mb["input_ids"]
        emb = self.language_model(model).embed_tokens(ids)
        slices = mb.get("_slices", {})
        for m in self.modules[:-1]:
            for kind in m.media:
                feats = out.pop(f"{kind}_emb", None)
                if feats is not None and kind in slices.get(m.name, mb).get("_dummy", ()):  # [parallel hook] see dummy_media
                    emb = emb + 0.0 * feats.sum()  # keeps the dummy pass in the graph: its grads are zeros
                    feats = feats[:0]
                if feats is not None and m.name in slices:
                    feats = hooks[m.name](feats)  # this rank encoded a part of the samples: join the parts
                mask = ids == self.token_id(kind)
                n_tok = int(mask.sum())
                if feats is None or feats.shape[0] == 0:
                    if n_tok:
                        raise ValueError(f"micro-batch has {n_tok} {kind} tokens but no {kind} features")
                    continue
                if n_tok != feats.shape[0]:
                    # HF does not check every kind (FACTS: silent misalignment); we do.
                    raise ValueError(f"{kind} tokens ({n_tok}) != {kind} features ({feats.shape[0]}) in this micro-batch")
                emb = emb.masked_scatter(mask.unsqueeze(-1), feats.to(emb.dtype))
        out["h"] = emb
        out["pos"] = self.positions(model, mb)

    def positions(self, model: nn.Module, mb: dict) -> torch.Tensor:
        """`rope_positions`, for a packed micro-batch (data/packing.py) computed
        per sample on its unpacked view (so they restart at every sample) and
        laid out as the packed tokens."""
        from omnitrain.data import packing

        if not packing.is_packed(mb):
            return self.rope_positions(model, mb)
        return packing.fold_positions(self.rope_positions(model, packing.unpack(mb)), mb)

    def decoder_mask(self, lm: nn.Module, h: torch.Tensor, mb: dict):
        """(causal mask, position ids or None) for the decoder's layers; a
        family that overrides `decode` calls it too, so packing holds for it."""
        from transformers.masking_utils import create_causal_mask

        # The mask spans the whole sequence; under sequence parallelism h holds
        # a part of it, so the mask takes its length from the attention mask.
        whole = h.new_empty((h.shape[0], mb["attention_mask"].shape[1], 0))
        am, seq_pos = mb["attention_mask"], None
        if "pack_index" in mb:
            # Packed samples (data/packing.py): positions restarting per sample and
            # no 2-D mask are how HF builds a block-diagonal causal mask (and flash
            # attention its varlen spans); padding is last in a row, seen by none.
            from omnitrain.data.packing import sequence_positions

            am, seq_pos = None, sequence_positions(mb)
        return create_causal_mask(config=lm.config, inputs_embeds=whole, attention_mask=am, cache=None, position_ids=seq_pos), seq_pos

    def decode(self, model: nn.Module, layers: range, mb: dict, out: dict) -> None:
        """The decoder's layers `layers`, called as HF's decoder calls them."""
        lm = self.language_model(model)
        h, pos = out["h"], out["pos"]
        mask, seq_pos = self.decoder_mask(lm, h, mb)
        rot = lm.rotary_emb(h, pos)
        for i in layers:
            h = lm.layers[i](h, attention_mask=mask, position_embeddings=rot, position_ids=seq_pos, use_cache=False)
        out["h"] = h

    def loss(self, model: nn.Module, h: torch.Tensor, labels: torch.Tensor, num_label_tokens, segments=None) -> torch.Tensor:
        """This micro-batch's part of the global batch's loss.

        `num_label_tokens` is the label tokens of the whole global batch (an
        int: `token_mean`, sum of token cross-entropies / that count) or a
        `LossNorm` (`train.loss`): `token_mean` as the int, `sum` the plain
        sum, `sample_mean` a weight per token of 1 / (its sample's label
        tokens x the global batch's samples with labels). Normalising by
        global counts (not this micro-batch's) makes the sum of micro-batch
        losses equal the single-process loss under any layout.
        """
        logits = model.lm_head(self.language_model(model).norm(h)).float()
        # HF's ForCausalLMLoss layout (all S logits, labels shifted and padded
        # with the ignore index): the same terms summed in HF's order, so the
        # loss is bitwise HF's.
        shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
        shift = shifted.reshape(-1)
        logits = logits.reshape(-1, logits.shape[-1])
        norm = num_label_tokens
        if not isinstance(norm, LossNorm) or norm.kind == "token_mean":
            n = norm.label_tokens if isinstance(norm, LossNorm) else norm
            return F.cross_entropy(logits, shift, ignore_index=IGNORE_INDEX, reduction="sum") / n
        if norm.kind == "sum":
            return F.cross_entropy(logits, shift, ignore_index=IGNORE_INDEX, reduction="sum")
        ce = F.cross_entropy(logits, shift, ignore_index=IGNORE_INDEX, reduction="none")
        return (ce * self.token_weights(shifted, norm.samples, segments).reshape(-1)).sum()

    @staticmethod
    def token_weights(shifted_labels: torch.Tensor, num_samples: int, segments=None) -> torch.Tensor:
        """`sample_mean`'s weight per (shifted) label position: 1 / (label tokens
        of its sample x samples with labels in the global batch); 0 where ignored.
        A row is a sample, or with packing `segments` (rows, L) says whose each token is."""
        mask = shifted_labels != IGNORE_INDEX
        if segments is None:
            per_sample = mask.sum(1, keepdim=True).clamp_min(1).to(torch.float32)
        else:
            counts = torch.zeros(int(segments.max()) + 1, dtype=torch.float32, device=mask.device)
            counts.scatter_add_(0, segments.reshape(-1), mask.reshape(-1).to(torch.float32))
            per_sample = counts.clamp_min(1)[segments]
        return mask.to(torch.float32) / (per_sample * num_samples)

    @staticmethod
    def count_samples(mb: dict) -> int:
        """Samples of a micro-batch with at least one label token (what `sample_mean` averages over)."""
        if "pack_index" in mb:  # packed (data/packing.py): per sample, not per row
            labels = mb["labels"]
            return sum(bool((labels[r, s + 1 : s + n] != IGNORE_INDEX).any()) for r, s, n in mb["pack_index"].tolist())
        return int(((mb["labels"][:, 1:] != IGNORE_INDEX).sum(1) > 0).sum())

    @staticmethod
    def count_label_tokens(mb: dict) -> int:
        """Tokens the loss counts in a micro-batch (labels shifted by one, as in `loss`)."""
        return int((mb["labels"][:, 1:] != IGNORE_INDEX).sum())

    # ---- the HF model's own forward / generate -----------------------------
    def hf_inputs(self, mb: dict) -> dict:
        """A collated micro-batch as keyword arguments of `hf_class`'s forward
        and `generate` (the collator's keys named as HF names them, labels
        left out), so the plain HF model runs on what training runs on."""
        return {k: v for k, v in mb.items() if k not in ("labels", "use_audio_in_video") and not k.startswith("_")}

    # ---- micro-batch bookkeeping [parallel hooks] --------------------------
    def media_keys(self, module: str) -> tuple[str, ...]:
        """Micro-batch keys an encoder reads."""
        return tuple(k for kind in self.spec(module).media for k in (*MEDIA[kind].rows, *MEDIA[kind].per_item))

    def media_items(self, mb: dict) -> list[dict[str, int]]:
        """Per sample of a micro-batch, how many items of each media kind it has.
        Media rows follow sample order, so these counts locate a sample's rows.
        An image or video starts right after vision_bos; a video with its
        soundtrack interleaved (use_audio_in_video) starts with audio_bos."""
        ids, am = mb["input_ids"], mb["attention_mask"]
        flags = mb.get("use_audio_in_video")
        kinds = self.media_kinds()
        vstart, astart = self.token_id("vision_bos"), self.token_id("audio_bos")
        out = []
        for b in range(ids.shape[0]):
            row = ids[b][am[b].bool()]
            starts = row[torch.nonzero(row == vstart).squeeze(1) + 1]
            n = {k: int((starts == self.token_id(k)).sum()) for k in kinds if k != "audio"}
            if "audio" in kinds:
                n["audio"] = int((row == astart).sum())
                if flags is not None and bool(flags[b]):
                    n["video"] += int((starts == astart).sum())
            out.append(n)
        return out

    def slice_media(self, mb: dict, module: str, lo: int, hi: int) -> dict:
        """[parallel hook] `module`'s media of samples [lo, hi) of a micro-batch."""
        items = self.media_items(mb)
        out = {}
        for kind in self.spec(module).media:
            m = MEDIA[kind]
            a = sum(s[kind] for s in items[:lo])
            n = sum(s[kind] for s in items[lo:hi])
            if not n:
                continue
            for key in m.per_item:
                if key in mb:
                    out[key] = mb[key][a : a + n]
            if m.rows:
                rows = mb[m.grid].prod(-1)
                r0, r1 = int(rows[:a].sum()), int(rows[: a + n].sum())
                for key in m.rows:
                    out[key] = mb[key][r0:r1]
        return out

    def pad_sequence(self, mb: dict, multiple: int) -> dict:
        """Right-pad a micro-batch's sequence to a multiple of `multiple`, as the
        collator pads to the longest sample: the new positions are masked out
        of attention and loss (labels ignored). Sequence parallelism needs
        equal shards. The id is any non-media token (0)."""
        extra = -mb["input_ids"].shape[1] % multiple
        if not extra:
            return mb
        pads = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}
        return {**mb, **{k: F.pad(mb[k], (0, extra), value=v) for k, v in pads.items()}}


@dataclass(frozen=True)
class LossNorm:
    """How micro-batch losses are normalised (`train.loss`), over the whole global batch."""

    kind: str  # token_mean | sample_mean | sum
    label_tokens: int  # label tokens of the global batch
    samples: int  # samples with label tokens in the global batch


LOSS_TYPES = ("token_mean", "sample_mean", "sum")


def _matches(rel_name: str, pattern: str) -> bool:
    """fnmatch on a name relative to its module; `merger` also matches everything under it."""
    return fnmatch.fnmatchcase(rel_name, pattern) or fnmatch.fnmatchcase(rel_name, pattern + ".*")


def parse_trainable(trainable, modules, model_name: str):
    """`model.trainable`: per module a bool, or `{train: bool, except: [patterns]}`
    (fnmatch patterns on parameter names relative to the module's prefix, whose
    parameters get the opposite of `train`). Unlisted modules train.
    Returns ({module: bool}, {module: [patterns]})."""
    from omnitrain.config import ConfigError

    trainable = dict(trainable or {})
    unknown = sorted(set(trainable) - set(modules))
    if unknown:
        raise ConfigError(f"model.trainable.{unknown[0]}: unknown module; model {model_name} has {', '.join(modules)}")
    default, patterns = {}, {}
    for m in modules:
        v = trainable.get(m, True)
        if isinstance(v, Mapping):
            bad = sorted(set(v) - {"train", "except"})
            if bad:
                raise ConfigError(f"model.trainable.{m}.{bad[0]}: unknown key; use train (bool) and except (list of patterns)")
            ex = v.get("except") or []
            if isinstance(ex, str):
                ex = [ex]
            default[m], patterns[m] = bool(v.get("train", True)), [str(p) for p in ex]
        elif isinstance(v, bool) or v in (0, 1):
            default[m], patterns[m] = bool(v), []
        else:
            raise ConfigError(f"model.trainable.{m}={v!r}: use true, false or {{train: bool, except: [patterns]}}")
    return default, patterns


def _sdpa(cfg):
    """The attention every family's segmented forward is checked against (HF's sdpa)."""
    cfg._attn_implementation = "sdpa"
    for sub in cfg.sub_configs:
        getattr(cfg, sub)._attn_implementation = "sdpa"
    return cfg


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


@contextmanager
def _seeded(seed: int, name: str):
    """Fork the global RNG, seeded by (seed, module name). Where no
    accelerator is initialised yet, only the CPU generator is seeded (what
    initialisation on CPU uses): torch.manual_seed would queue a lazy seeding
    of each accelerator's RNG, recording a Python stack every time (~1 s of a
    real-depth tiny model's 1.3 s build on CPU)."""
    from omnitrain import device

    with torch.random.fork_rng(devices=[]):
        s = (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)
        if device.accelerator_initialized():
            torch.manual_seed(s)
        else:
            torch.default_generator.manual_seed(s)
        yield


def build_family(model_cfg) -> ModelFamily:
    """The family adapter for `cfg.model` (its `_target_`)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from omnitrain.errors import UserError

    if OmegaConf.is_config(model_cfg) and model_cfg.get("_target_") == "omnitrain.models.hf_family" and model_cfg.get("path") is None:
        from omnitrain.config import ConfigError

        raise ConfigError(f"model={model_cfg.get('name', 'hf')} needs model.path=<HF folder> (a model as it ships: config.json + safetensors)")
    try:
        return instantiate(model_cfg, _convert_="all")
    except InstantiationException as e:
        # Hydra wraps what the family raised: a user error stays one line.
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise
