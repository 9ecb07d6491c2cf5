"""Qwen2.5-VL: Qwen2-VL with a windowed-attention vision encoder (a few
full-attention blocks), a gated MLP in the vision blocks, and video rope
positions spaced by each video's real seconds per temporal patch.

The vision tower keeps HF's window order between its blocks: the patches are
permuted into windows after patch_embed and restored after the merger, so
what crosses a cut inside the vision layers is in window order.
"""

from __future__ import annotations

import torch
from torch import nn

from omnitrain.models.qwen2_vl.family import LLM_TP_PLAN, Qwen2VL


class Qwen25VL(Qwen2VL):
    hf_class = "transformers.Qwen2_5_VLForConditionalGeneration"
    hf_config_class = "transformers.Qwen2_5_VLConfig"
    tp_plan = {
        "vision": (
            ("model.visual.blocks.*.attn.qkv", "colwise_fused3"),
            ("model.visual.blocks.*.attn.proj", "rowwise"),
            ("model.visual.blocks.*.mlp.gate_proj", "colwise"),
            ("model.visual.blocks.*.mlp.up_proj", "colwise"),
            ("model.visual.blocks.*.mlp.down_proj", "rowwise"),
        ),
        "llm": LLM_TP_PLAN,
    }
    hf_model_types = {"qwen2_5_vl": ("", None)}

    def vision_segments(self, visual: nn.Module, plan, kind: str, pixels, grid, out: dict) -> None:
        from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids, get_vision_window_index

        position_ids = get_vision_position_ids(grid, visual.spatial_merge_size, kwargs={})
        cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid, visual.config, kwargs={})
        window_index, cu_window = get_vision_window_index(
            grid, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size, patch_size=visual.patch_size, kwargs={}
        )
        max_window = int((cu_window[1:] - cu_window[:-1]).max()) if cu_window.numel() > 1 else 0
        if "vision" in plan.pre:
            h = visual.patch_embed(pixels.type(visual.patch_embed.proj.weight.dtype))
            h = visual.permute_input_for_window_attn(h, window_index, seq_len=h.shape[0])
        else:
            h = out.pop(f"{kind}_h")
        layers = plan.layers.get("vision", range(0))
        if len(layers):
            rot = visual.rotary_pos_emb(h, position_ids)
            rot = tuple(visual.permute_input_for_window_attn(r, window_index, seq_len=h.shape[0]) for r in rot)
            for i in layers:
                full = i in visual.fullatt_block_indexes
                h = visual.blocks[i](
                    h,
                    cu_seqlens=cu_seqlens if full else cu_window,
                    max_seqlen=max_seqlen if full else max_window,
                    position_embeddings=rot,
                )
        if "vision" in plan.post:
            out[f"{kind}_emb"] = visual.merger(h)[torch.argsort(window_index)]
        else:
            out[f"{kind}_h"] = h

    def hf_inputs(self, mb: dict) -> dict:
        out = super().hf_inputs(mb)
        if "video_second_per_grid" in mb:
            out["second_per_grid_ts"] = mb["video_second_per_grid"]  # HF's name for the videos' timing
        return out

    def rope_positions(self, model, mb) -> torch.Tensor:
        g = self.real_grids(mb)
        pos, _ = model.model.get_rope_index(
            mb["input_ids"],
            self.mm_token_types(mb),
            g["image_grid_thw"],
            g["video_grid_thw"],
            second_per_grid_ts=g["video_second_per_grid"],
            attention_mask=mb["attention_mask"],
        )
        return pos

    # ---- cost model [planner hooks] -------------------------------------------
    def layer_type(self, module: str, index: int) -> str:
        if module == "vision":
            return "vision_full" if index in self.hf_config.vision_config.fullatt_block_indexes else "vision_window"
        return module

    def layer_width(self, module: str) -> int:
        if module == "vision":
            return int(self.hf_config.vision_config.hidden_size)
        return super().layer_width(module)

    def vision_span(self, index: int, per_item: float) -> float:
        """Window blocks attend within windows of (window_size / patch_size)^2 patches."""
        v = self.hf_config.vision_config
        if index in v.fullatt_block_indexes:
            return per_item
        return min(per_item, float((v.window_size // v.patch_size) ** 2))

    def tp_sizes(self) -> dict[str, dict[str, int]]:
        v = self.hf_config.vision_config
        return {"vision": {"num_heads": v.num_heads, "intermediate_size": v.intermediate_size}, "llm": self.llm_tp_sizes()}
