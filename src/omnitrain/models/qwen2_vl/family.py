"""Qwen2-VL: a vision encoder (full attention over each image / video) whose
merged patches are scattered into the LLM's placeholder tokens, and a
Qwen2 LLM with 3-D multimodal rope.

Segments: vision patch_embed (pre) | blocks[i] | merger (post);
llm merge (embed + scatter + 3-D positions) | layers[i] | norm + lm_head + loss.
"""

from __future__ import annotations

import torch
from torch import nn

from omnitrain.models.family import MEDIA, ChatSpec, ModelFamily, ModuleSpec, Work

VISION = ModuleSpec(
    name="vision",
    layers="model.visual.blocks",
    depth="vision_config.depth",
    prefixes=("model.visual.",),
    pre=("model.visual.patch_embed",),
    post=("model.visual.merger",),
    shared=("model.visual.rotary_pos_emb",),
    media=("image", "video"),
)
LLM = ModuleSpec(
    name="llm",
    layers="model.language_model.layers",
    depth="text_config.num_hidden_layers",
    prefixes=("model.language_model.", "lm_head."),
    pre=("model.language_model.embed_tokens",),
    post=("model.language_model.norm", "lm_head"),
    shared=("model.language_model.rotary_emb",),
)

# The Qwen2 LLM's Megatron-style plan; every Qwen family here shares it.
LLM_TP_PLAN = (
    ("model.language_model.embed_tokens", "vocab_embed"),
    ("model.language_model.layers.*.self_attn.q_proj", "colwise"),
    ("model.language_model.layers.*.self_attn.k_proj", "colwise"),
    ("model.language_model.layers.*.self_attn.v_proj", "colwise"),
    ("model.language_model.layers.*.self_attn.o_proj", "rowwise"),
    ("model.language_model.layers.*.mlp.gate_proj", "colwise"),
    ("model.language_model.layers.*.mlp.up_proj", "colwise"),
    ("model.language_model.layers.*.mlp.down_proj", "rowwise"),
    ("lm_head", "vocab_head"),
)
# Sequence parallelism: the norms run on sequence shards; attention and MLP
# gather the sequence on entry (HF's attention reads the length from its input).
LLM_SP_PLAN = (
    ("model.language_model.layers.*.input_layernorm", "seq_norm"),
    ("model.language_model.layers.*.self_attn", "seq_gather_kw"),
    ("model.language_model.layers.*.post_attention_layernorm", "seq_norm"),
    ("model.language_model.layers.*.mlp", "seq_gather"),
    ("model.language_model.norm", "seq_norm"),
)

VL_CHAT = ChatSpec(
    tokens={
        "image": "<|image_pad|>",
        "video": "<|video_pad|>",
        "vision_bos": "<|vision_start|>",
        "vision_eos": "<|vision_end|>",
        "im_start": "<|im_start|>",
        "im_end": "<|im_end|>",
    },
    config_keys={
        "image": ("image_token_id",),
        "video": ("video_token_id",),
        "vision_bos": ("vision_start_token_id",),
        "vision_eos": ("vision_end_token_id",),
    },
)


class Qwen2VL(ModelFamily):
    hf_class = "transformers.Qwen2VLForConditionalGeneration"
    hf_config_class = "transformers.Qwen2VLConfig"
    modules = (VISION, LLM)
    chat = VL_CHAT
    tp_plan = {
        "vision": (
            # one fused q|k|v projection: sharded per third so each rank keeps whole heads
            ("model.visual.blocks.*.attn.qkv", "colwise_fused3"),
            ("model.visual.blocks.*.attn.proj", "rowwise"),
            ("model.visual.blocks.*.mlp.fc1", "colwise"),
            ("model.visual.blocks.*.mlp.fc2", "rowwise"),
        ),
        "llm": LLM_TP_PLAN,
    }
    sp_plan = {"llm": LLM_SP_PLAN}
    tp_head_attrs = {"vision": (("model.visual.blocks.*.attn", "num_heads"),)}
    hf_names = (("model.visual.", "visual."), ("model.language_model.", "model."))
    hf_model_types = {"qwen2_vl": ("", None)}
    # model.trainable=sft: the vision tower frozen, its merger (the projector) and the LLM trained.
    sft_trainable = {"vision": {"train": False, "except": ["merger"]}, "llm": True}

    # ---- vision -----------------------------------------------------------
    def encode(self, module, model, plan, view, out):
        visual = model.model.visual
        for kind in self.spec(module).media:
            m = MEDIA[kind]
            if m.trigger in view:
                self.vision_segments(visual, plan, kind, view[m.trigger], view[m.grid], out)

    def vision_segments(self, visual: nn.Module, plan, kind: str, pixels, grid, out: dict) -> None:
        from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids

        position_ids = get_vision_position_ids(grid, visual.spatial_merge_size, kwargs={})
        cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid, visual.config, kwargs={})
        h = visual.patch_embed(pixels.type(visual.patch_embed.proj.weight.dtype)) if "vision" in plan.pre else out.pop(f"{kind}_h")
        layers = plan.layers.get("vision", range(0))
        if len(layers):
            rot = visual.rotary_pos_emb(h, position_ids)
            for i in layers:
                h = visual.blocks[i](h, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, position_embeddings=rot)
        if "vision" in plan.post:
            out[f"{kind}_emb"] = visual.merger(h)
        else:
            out[f"{kind}_h"] = h

    def dummy_media(self, kind: str) -> dict:
        v = self.hf_config.vision_config
        m = v.spatial_merge_size
        grid = torch.tensor([[1, m, m]])  # one merged token
        pix = torch.zeros(m * m, v.in_channels * v.temporal_patch_size * v.patch_size**2)
        if kind == "image":
            return {"pixel_values": pix, "image_grid_thw": grid}
        return {"pixel_values_videos": pix, "video_grid_thw": grid, "video_second_per_grid": torch.ones(1)}

    # ---- positions ----------------------------------------------------------
    def mm_token_types(self, mb: dict) -> torch.Tensor:
        """HF's mm_token_type_ids: 0 text, 1 image, 2 video token."""
        ids = mb["input_ids"]
        types = torch.zeros_like(ids, dtype=torch.int)
        types[ids == self.token_id("image")] = 1
        types[ids == self.token_id("video")] = 2
        return types

    def hf_inputs(self, mb: dict) -> dict:
        # transformers 5 places vision tokens in the 3-D rope by mm_token_type_ids.
        out = {k: v for k, v in super().hf_inputs(mb).items() if k != "video_second_per_grid"}
        out["mm_token_type_ids"] = self.mm_token_types(mb)
        return out

    def real_grids(self, mb: dict) -> dict:
        """Grids (and timings) of real media: a dummy item has no tokens to place."""
        dummy = mb.get("_dummy", ())  # [parallel hook] see dummy_media
        out = {}
        for kind, keys in (("image", ("image_grid_thw",)), ("video", ("video_grid_thw", "video_second_per_grid"))):
            for key in keys:
                out[key] = None if kind in dummy else mb.get(key)
        return out

    def rope_positions(self, model, mb) -> torch.Tensor:
        g = self.real_grids(mb)
        pos, _ = model.model.get_rope_index(
            mb["input_ids"], self.mm_token_types(mb), g["image_grid_thw"], g["video_grid_thw"], attention_mask=mb["attention_mask"]
        )
        return pos

    # ---- sizes --------------------------------------------------------------
    def tp_sizes(self) -> dict[str, dict[str, int]]:
        v = self.hf_config.vision_config
        return {"vision": {"num_heads": v.num_heads, "mlp_hidden": int(v.embed_dim * v.mlp_ratio)}, "llm": self.llm_tp_sizes()}

    def llm_tp_sizes(self) -> dict[str, int]:
        t = self.hf_config.text_config
        return {
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "intermediate_size": t.intermediate_size,
            "vocab_size": t.vocab_size,
        }

    def flops_per_token(self) -> float:
        """Training FLOPs per LLM token (6 x LLM params, ignoring attention)."""
        c = self.hf_config.text_config
        h, i, L, v = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
        kv = c.num_key_value_heads * (h // c.num_attention_heads)
        per_layer = h * h * 2 + h * kv * 2 + 3 * h * i
        return 6.0 * (L * per_layer + h * v)

    # ---- cost model [planner hooks] -------------------------------------------
    def layer_width(self, module: str) -> int:
        if module == "vision":
            return int(self.hf_config.vision_config.embed_dim)
        return int(self.hf_config.text_config.hidden_size)

    def vision_items(self, load) -> list[tuple[float, float]]:
        """(items, patches per item) of each visual kind of one sample: an LLM
        token is spatial_merge_size^2 patches."""
        m2 = self.hf_config.vision_config.spatial_merge_size ** 2
        out = []
        for kind in ("image", "video"):
            tok, n = float(load.get(kind, 0)), float(load.get(f"{kind}_items", 1)) or 1.0
            if tok:
                out.append((n, tok * m2 / n))
        return out

    @staticmethod
    def sequence(load) -> float:
        return float(sum(load.get(k, 0) for k in ("text", "image", "video", "audio")))

    def vision_span(self, index: int, per_item: float) -> float:
        """Patches one vision patch attends to in block `index`: its whole item."""
        return per_item

    def layer_work(self, module, index, load) -> Work:
        if module == "vision":
            items = self.vision_items(load)
            return Work(sum(n * p for n, p in items), sum(n * p * self.vision_span(index, p) for n, p in items))
        seq = self.sequence(load)
        return Work(seq, seq * seq / 2)  # causal

    def part_work(self, module, part, load) -> Work:
        if module == "vision":
            patches = sum(n * p for n, p in self.vision_items(load))
            # patch_embed runs per patch, the merger's MLP per merged token
            return Work(patches if part == "pre" else patches / self.hf_config.vision_config.spatial_merge_size ** 2)
        return Work(self.sequence(load))
