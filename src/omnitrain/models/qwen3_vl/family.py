"""Qwen3-VL (`transformers.Qwen3VLForConditionalGeneration`, and the MoE
variant `Qwen3VLMoeForConditionalGeneration`): a ViT with learned position
embeddings resampled to each grid, whose hidden states after a few blocks
(`deepstack_visual_indexes`) are merged by their own mergers and *added* into
the hidden states of the first LLM layers at the visual positions (DeepStack),
and a Qwen3 LLM (q/k norms; dense or mixture-of-experts MLPs).

Segments and what crosses a cut:
  vision: patch_embed + pos_embed (pre) | blocks[i] | merger + DeepStack mergers (post)
          between blocks `<kind>_h`, and `<kind>_tap<j>`: the hidden states
          after the j-th DeepStack block, carried to the post part's merger j;
          after the post part `<kind>_emb` and `<kind>_ds<j>`
  llm:    merge (embed, scatter, 3-D rope; joins the image and video DeepStack
          features in visual-position order as `ds<j>`) | layers[i] (layer j
          adds `ds<j>` after itself and drops it) | norm + lm_head + loss
So a pipeline cut between LLM layers 0..len(ds)-1 carries the features the
later layers still need. Video frames are each wrapped in vision start/end
(with a timestamp between them), so a video is as many items of the
micro-batch's token stream as it has temporal patches.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from omnitrain.models.family import MEDIA, ModuleSpec
from omnitrain.models.moe import AuxLossInjector, MoEStats, router_balance
from omnitrain.models.qwen2_vl.family import LLM, LLM_TP_PLAN, VL_CHAT, Qwen2VL


def vision_spec(mergers: str) -> ModuleSpec:
    """The Qwen3 ViT's module; `mergers` is the FQN of its DeepStack merger list."""
    return ModuleSpec(
        name="vision",
        layers="model.visual.blocks",
        depth="vision_config.depth",
        prefixes=("model.visual.",),
        pre=("model.visual.patch_embed", "model.visual.pos_embed"),
        post=("model.visual.merger", mergers),
        shared=("model.visual.rotary_pos_emb",),
        media=("image", "video"),
    )


VISION_TP_PLAN = (
    ("model.visual.blocks.*.attn.qkv", "colwise_fused3"),
    ("model.visual.blocks.*.attn.proj", "rowwise"),
    ("model.visual.blocks.*.mlp.linear_fc1", "colwise"),
    ("model.visual.blocks.*.mlp.linear_fc2", "rowwise"),
)
# Qwen3's attention (q/k norms are per head: replicated) and a dense MLP's plan;
# an MoE layer's router and experts stay whole on every TP rank.
QWEN3_LLM_TP_PLAN = LLM_TP_PLAN + (
    ("model.language_model.layers.*.self_attn.q_norm", "head_norm"),
    ("model.language_model.layers.*.self_attn.k_norm", "head_norm"),
)


# One expert's weight as HF folders store it: `<...>.mlp.experts.<e>.<gate|up|down>_proj.weight`.
_EXPERT_KEY = re.compile(r"(?P<head>.*\.mlp\.experts)\.\d+\.(?P<proj>gate|up|down)_proj\.weight$")


class DeepStack:
    """The Qwen3 vision tower and LLM decoder with DeepStack, for any family
    whose vision module is `vision` and whose HF model keeps the Qwen3
    layout; also the MoE router statistics and aux loss where the LLM has
    sparse MLPs (`model.moe.aux_loss_coef`)."""

    moe_options = ("aux_loss_coef",)
    experts = "model.language_model.layers.*.mlp.experts"  # parallel.ep shards them (parallel/ep.py)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.aux_loss_coef = float(self.moe.get("aux_loss_coef", 0.0))

    aux_loss_coef = 0.0  # a family built from an HF folder (from_hf_config) trains without it

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the sparse (MoE) decoder layers, by HF's rule."""
        t = self.hf_config.text_config
        n = self.num_experts
        if not n:
            return []
        return [i for i in range(t.num_hidden_layers) if i not in (t.mlp_only_layers or []) and (i + 1) % t.decoder_sparse_step == 0]

    @property
    def moe_stats(self):
        if "_moe_stats" not in self.__dict__:
            self._moe_stats = MoEStats(len(self.moe_layers), self.num_experts) if self.moe_layers else None
        return self._moe_stats

    def build(self, plans, device, seed):
        """The generic build, with the experts implementation device.py picks
        for `device` (HF dispatches on the config at every call)."""
        if self.moe_layers:
            from omnitrain import device as dev

            self.hf_config.text_config._experts_implementation = dev.experts_implementation(device)
        return super().build(plans, device, seed)

    @property
    def num_experts(self) -> int:
        t = self.hf_config.text_config
        return int(getattr(t, "num_experts", None) or getattr(t, "num_local_experts", 0) or 0)

    @property
    def num_deepstack(self) -> int:
        return len(self.hf_config.vision_config.deepstack_visual_indexes)

    # ---- vision ---------------------------------------------------------------
    def vision_segments(self, visual: nn.Module, plan, kind: str, pixels, grid, out: dict) -> None:
        from transformers.vision_utils import (
            get_vision_attention_seqlens,
            get_vision_interpolation_indices_and_weights,
            get_vision_position_ids,
        )

        taps = list(visual.deepstack_visual_indexes)
        position_ids = get_vision_position_ids(grid, visual.spatial_merge_size, kwargs={})
        cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid, visual.config, kwargs={})
        if "vision" in plan.pre:
            idx, w = get_vision_interpolation_indices_and_weights(
                grid, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
                align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.spatial_merge_size, kwargs={},
            )
            h = visual.patch_embed(pixels.type(visual.patch_embed.proj.weight.dtype))
            h = h + (visual.pos_embed(idx) * w[:, :, None]).sum(1).to(h.dtype)
        else:
            h = out.pop(f"{kind}_h")
        layers = plan.layers.get("vision", range(0))
        if len(layers):
            rot = visual.rotary_pos_emb(h, position_ids)
            for i in layers:
                h = visual.blocks[i](h, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, position_embeddings=rot)
                if i in taps:
                    out[f"{kind}_tap{taps.index(i)}"] = h
        if "vision" in plan.post:
            out[f"{kind}_emb"] = visual.merger(h)
            for j in range(len(taps)):
                out[f"{kind}_ds{j}"] = visual.deepstack_merger_list[j](out.pop(f"{kind}_tap{j}"))
        else:
            out[f"{kind}_h"] = h

    # ---- decoder ----------------------------------------------------------------
    def visual_mask(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids == self.token_id("image")) | (ids == self.token_id("video"))

    def merge(self, model, mb, out, hooks) -> None:
        """The generic merge, then each DeepStack level's image and video
        features joined in visual-position order (as HF does) into `ds<j>`."""
        ids = mb["input_ids"]
        view = mb.get("_slices", {}).get("vision", mb)
        dummy = view.get("_dummy", ())  # [parallel hook] see ModelFamily.dummy_media
        feats, keep = {}, None
        for kind in ("image", "video"):
            parts = [out.pop(f"{kind}_ds{j}", None) for j in range(self.num_deepstack)]
            if parts[0] is None:
                continue
            if kind in dummy:
                s = sum(p.sum() for p in parts)
                keep = s if keep is None else keep + s
                continue
            if "vision" in mb.get("_slices", {}):
                parts = [hooks["vision"](p) for p in parts]  # this rank encoded a part of the samples
            feats[kind] = parts
        super().merge(model, mb, out, hooks)
        if keep is not None:
            out["h"] = out["h"] + 0.0 * keep  # the dummy pass stays in the graph with zero grads
        if not feats:
            return
        img, vid = ids == self.token_id("image"), ids == self.token_id("video")
        vis = img | vid
        for j in range(self.num_deepstack):
            if len(feats) == 1:
                joint = next(iter(feats.values()))[j]
            else:
                a, b = feats["image"][j], feats["video"][j]
                joint = a.new_zeros(int(vis.sum()), a.shape[-1])
                joint[img[vis]] = a
                joint[vid[vis]] = b
            out[f"ds{j}"] = joint

    def decode(self, model, layers: range, mb: dict, out: dict) -> None:
        """The decoder's layers as HF's text model runs them: layer j < len(ds)
        adds DeepStack level j at the visual positions after itself; an MoE
        layer's router logits give its aux-loss term and expert counts."""
        lm = self.language_model(model)
        h, pos = out["h"], out["pos"]
        mask, seq_pos = self.decoder_mask(lm, h, mb)
        rot = lm.rotary_emb(h, pos)
        vis = None
        for i in layers:
            layer = lm.layers[i]
            captured = []
            handle = None
            if self.moe_stats is not None and i in self.moe_layers:
                handle = layer.mlp.gate.register_forward_hook(lambda _m, _a, o: captured.append(o[0]))
            try:
                h = layer(h, attention_mask=mask, position_embeddings=rot, position_ids=seq_pos, use_cache=False)
            finally:
                if handle is not None:
                    handle.remove()
            if captured:
                h = self._router_terms(i, captured[0], mb["attention_mask"], h)
            ds = out.pop(f"ds{i}", None)
            if ds is not None:
                vis = self.visual_mask(mb["input_ids"]) if vis is None else vis
                h = lm._deepstack_process(h, vis, ds)
        out["h"] = h

    def _router_terms(self, layer: int, logits: torch.Tensor, attention_mask: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Record layer `layer`'s expert counts and aux term (models/moe.py
        defines the normalisation) and join the term to backward through `h`."""
        t = self.hf_config.text_config
        st = self.moe_stats
        b, counts = router_balance(logits, attention_mask, t.num_experts_per_tok)
        tokens = int(attention_mask.sum())
        weight = tokens / (st.global_tokens * len(self.moe_layers))
        li = self.moe_layers.index(layer)
        st.counts[li] += counts.double().cpu()
        st.seen[li] += 1
        st.aux += float(b.detach()) * weight
        if self.aux_loss_coef and torch.is_grad_enabled():
            h = AuxLossInjector.apply(h, b * (self.aux_loss_coef * weight))
        return h

    # ---- HF files: experts one tensor each, as save_pretrained writes them ------
    def to_hf_tensors(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """`...mlp.experts.gate_up_proj` (E, 2I, H) -> `...mlp.experts.<e>.gate_proj.weight` /
        `up_proj.weight` (I, H); `down_proj` (E, H, I) -> `...<e>.down_proj.weight`."""
        head, _, leaf = name.rpartition(".")
        if not head.endswith(".mlp.experts") or leaf not in ("gate_up_proj", "down_proj"):
            return super().to_hf_tensors(name, tensor)
        base = self.to_hf_name(head)
        out = {}
        for e in range(tensor.shape[0]):
            if leaf == "down_proj":
                out[f"{base}.{e}.down_proj.weight"] = tensor[e]
            else:
                gate, up = tensor[e].chunk(2, dim=0)
                out[f"{base}.{e}.gate_proj.weight"], out[f"{base}.{e}.up_proj.weight"] = gate, up
        return out

    def hf_layouts(self, name: str, shape) -> list[dict[str, tuple]]:
        """Fused experts: per-expert keys (the hub folders, transformers 5's
        save_pretrained, which reverts its conversion) or the fused key."""
        whole = super().hf_layouts(name, shape)
        split = {k: tuple(v.shape) for k, v in self.to_hf_tensors(name, torch.empty(shape, device="meta")).items()}
        return whole if split.keys() == whole[0].keys() else [split, *whole]

    def from_hf_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        if len(tensors) == 1:
            return super().from_hf_tensors(name, tensors)
        base, _, leaf = name.rpartition(".")
        base = self.to_hf_name(base)
        n = len(tensors) // (1 if leaf == "down_proj" else 2)
        if leaf == "down_proj":
            return torch.stack([tensors[f"{base}.{e}.down_proj.weight"] for e in range(n)])
        return torch.stack([torch.cat([tensors[f"{base}.{e}.gate_proj.weight"], tensors[f"{base}.{e}.up_proj.weight"]]) for e in range(n)])

    def from_hf_name(self, key: str) -> str:
        m = _EXPERT_KEY.match(key)
        if m is None:
            return super().from_hf_name(key)
        return super().from_hf_name(m["head"]) + (".down_proj" if m["proj"] == "down" else ".gate_up_proj")

    # ---- step hooks (the trainer calls them) -----------------------------------
    def begin_step(self, global_tokens: int) -> None:
        if self.moe_stats is not None:
            self.moe_stats.reset(global_tokens)

    def step_stats(self):
        """(vector to sum over ranks, function of the summed vector -> log row entries), or None."""
        if self.moe_stats is None:
            return None
        return self.moe_stats.vector(), self.moe_stats.metrics

    # ---- sizes ------------------------------------------------------------------
    def tp_sizes(self) -> dict[str, dict[str, int]]:
        v = self.hf_config.vision_config
        return {"vision": {"num_heads": v.num_heads, "intermediate_size": v.intermediate_size}, "llm": self.llm_tp_sizes()}

    def llm_tp_sizes(self) -> dict[str, int]:
        t = self.hf_config.text_config
        out = {"num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads, "vocab_size": t.vocab_size}
        if len(self.moe_layers) < t.num_hidden_layers:  # some dense MLPs
            out["intermediate_size"] = t.intermediate_size
        return out

    # ---- cost model [planner hooks] (plan/cost.py) ---------------------------
    def layer_type(self, module: str, index: int) -> str:
        """The ViT attends over whole items in every block (no windows); MoE
        decoder layers are their own type (their cost is the active experts')."""
        if module == self.decoder and index in self.moe_layers:
            return "llm_moe"
        return module if module == "vision" else super().layer_type(module, index)

    def vision_span(self, index: int, per_item: float) -> float:
        return per_item

    def layer_width(self, module: str) -> int:
        if module == "vision":
            return int(self.hf_config.vision_config.hidden_size)
        return super().layer_width(module)

    def expert_params(self, module: str, index: int) -> int:
        if module != self.decoder or index not in self.moe_layers:
            return 0
        t = self.hf_config.text_config
        return 3 * t.hidden_size * t.moe_intermediate_size * self.num_experts

    def layer_cost(self, module, index, work, params, dtype_bytes):
        """An MoE layer's FLOPs and bytes count the experts a token is routed
        to (top-k of E), the router and attention in full."""
        if module == self.decoder and index in self.moe_layers:
            t = self.hf_config.text_config
            experts = 3 * t.hidden_size * t.moe_intermediate_size * self.num_experts
            params = params - experts + experts * t.num_experts_per_tok // self.num_experts
        return super().layer_cost(module, index, work, params, dtype_bytes)

    def active_params(self, model: nn.Module) -> int:
        """Parameters one token uses: all but the experts it is not routed to."""
        t = self.hf_config.text_config
        total = sum(p.numel() for p in model.parameters())
        if not self.moe_layers:
            return total
        per_expert = sum(p[0].numel() for n, p in model.named_parameters() if ".mlp.experts." in n) // len(self.moe_layers)
        return total - len(self.moe_layers) * per_expert * (self.num_experts - t.num_experts_per_tok)

    def flops_per_token(self) -> float:
        """Training FLOPs per LLM token: 6 x the LLM's active parameters (attention scores ignored)."""
        c = self.hf_config.text_config
        h, L, v = c.hidden_size, c.num_hidden_layers, c.vocab_size
        hd = getattr(c, "head_dim", None) or h // c.num_attention_heads
        attn = h * hd * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
        n_moe = len(self.moe_layers)
        mlp = (L - n_moe) * 3 * h * c.intermediate_size
        if n_moe:
            mlp += n_moe * (3 * h * c.moe_intermediate_size * c.num_experts_per_tok + h * self.num_experts)
        return 6.0 * (L * attn + mlp + h * v)


def frames_with_timestamps(grid, merge_size: int, second_per_grid: float, ids, encode) -> list[int]:
    """Qwen3-VL's video layout: per temporal patch "<t seconds>" then vision
    start, its tokens, vision end. t is the mean time of the patch's two
    frames, as HF's processor computes it (frames 0, spf, 2 spf, ...)."""
    t, h, w = (int(x) for x in grid)
    per_t = (h // merge_size) * (w // merge_size)
    spf = second_per_grid / 2
    out = []
    for k in range(t):
        out += encode(f"<{k * second_per_grid + spf / 2:.1f} seconds>") + [ids.vision_bos] + [ids.video] * per_t + [ids.vision_eos]
    return out


QWEN3_VL_CHAT = dataclasses.replace(VL_CHAT, video_tokens=frames_with_timestamps)


class Qwen3VL(DeepStack, Qwen2VL):
    hf_class = "transformers.Qwen3VLForConditionalGeneration"
    hf_config_class = "transformers.Qwen3VLConfig"
    modules = (vision_spec("model.visual.deepstack_merger_list"), LLM)
    chat = QWEN3_VL_CHAT
    tp_plan = {"vision": VISION_TP_PLAN, "llm": QWEN3_LLM_TP_PLAN}
    sp_plan = {}  # DeepStack adds features at visual positions of the whole sequence
    tp_head_attrs = {"vision": (("model.visual.blocks.*.attn", "num_heads"),)}
    hf_names = (("model.visual.", "model.visual."), ("model.language_model.", "model.language_model."))
    hf_model_types = {"qwen3_vl": ("", None)}

    def rope_positions(self, model, mb) -> torch.Tensor:
        g = self.real_grids(mb)
        pos, _ = model.model.get_rope_index(
            mb["input_ids"], self.mm_token_types(mb), g["image_grid_thw"], g["video_grid_thw"], attention_mask=mb["attention_mask"]
        )
        return pos

    def media_items(self, mb: dict) -> list[dict[str, int]]:
        """Per sample, its images and videos. A video's temporal patches are
        each wrapped in vision start/end, so a sample's videos are found by
        consuming video grids until their temporal patches cover its frames."""
        ids, am = mb["input_ids"], mb["attention_mask"]
        vstart = self.token_id("vision_bos")
        t = [int(x) for x in mb["video_grid_thw"][:, 0]] if "video_grid_thw" in mb and "video" not in mb.get("_dummy", ()) else []
        k, out = 0, []
        for b in range(ids.shape[0]):
            row = ids[b][am[b].bool()]
            starts = row[torch.nonzero(row == vstart).squeeze(1) + 1]
            frames, n = int((starts == self.token_id("video")).sum()), 0
            while frames > 0:
                frames -= t[k]
                k, n = k + 1, n + 1
            out.append({"image": int((starts == self.token_id("image")).sum()), "video": n})
        return out


class Qwen3VLMoe(Qwen3VL):
    hf_class = "transformers.Qwen3VLMoeForConditionalGeneration"
    hf_config_class = "transformers.Qwen3VLMoeConfig"
    hf_model_types = {"qwen3_vl_moe": ("", None)}


__all__ = ["DeepStack", "Qwen3VL", "Qwen3VLMoe", "vision_spec", "VISION_TP_PLAN", "MEDIA"]
