"""Qwen3-Omni's thinker: Qwen3-VL's vision tower with DeepStack, the AuT
audio encoder (three stride-2 2-D convolutions over 100-frame chunks, then
windowed attention), and a Qwen3 mixture-of-experts LLM with Qwen2.5-Omni's
3-D rope (audio placed by time, use_audio_in_video interleaving).

Segments, in data-flow order:
  vision: patch_embed + pos_embed (pre) | blocks[i] | merger + DeepStack mergers (post)
  audio:  conv2d1-3 + conv_out + positional embedding (pre) | layers[i] | ln_post, proj1, proj2 (post)
  llm:    merge (embed, scatter features, DeepStack features, 3-D rope) | layers[i] | norm + lm_head + loss
What crosses a cut inside the audio layers is `audio_h` (packed hidden
states); the vision tower's crossings are described in models/qwen3_vl.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnitrain.models.family import ChatSpec, ModuleSpec
from omnitrain.models.qwen2_vl.family import LLM
from omnitrain.models.qwen25_omni.family import Qwen25OmniThinker, _chunk_lengths
from omnitrain.models.qwen3_omni.template import interleave_video_audio
from omnitrain.models.qwen3_vl.family import QWEN3_LLM_TP_PLAN, VISION_TP_PLAN, DeepStack, vision_spec

AUDIO = ModuleSpec(
    name="audio",
    layers="model.audio_tower.layers",
    depth="audio_config.encoder_layers",
    prefixes=("model.audio_tower.",),
    pre=(
        "model.audio_tower.conv2d1", "model.audio_tower.conv2d2", "model.audio_tower.conv2d3",
        "model.audio_tower.conv_out", "model.audio_tower.positional_embedding",
    ),
    post=("model.audio_tower.ln_post", "model.audio_tower.proj1", "model.audio_tower.proj2"),
    media=("audio",),
)


def aut_output_length(n_frames: int, n_window: int = 50) -> int:
    """Mel frames -> AuT outputs: 13 per whole 2*n_window-frame chunk, three stride-2 convs on the rest (HF's rule)."""
    chunk = 2 * n_window
    rest = (n_frames % chunk - 1) // 2 + 1
    return ((rest - 1) // 2 + 1 - 1) // 2 + 1 + (n_frames // chunk) * 13


class Qwen3OmniThinker(DeepStack, Qwen25OmniThinker):
    hf_class = "transformers.Qwen3OmniMoeThinkerForConditionalGeneration"
    hf_config_class = "transformers.Qwen3OmniMoeThinkerConfig"
    modules = (vision_spec("model.visual.merger_list"), AUDIO, LLM)
    chat = ChatSpec(
        tokens={
            "image": "<|image_pad|>",
            "video": "<|video_pad|>",
            "audio": "<|audio_pad|>",
            "vision_bos": "<|vision_start|>",
            "vision_eos": "<|vision_end|>",
            "audio_bos": "<|audio_start|>",
            "audio_eos": "<|audio_end|>",
            "im_start": "<|im_start|>",
            "im_end": "<|im_end|>",
        },
        config_keys={
            "image": ("image_token_id",),
            "video": ("video_token_id",),
            "audio": ("audio_token_id",),
            "vision_bos": ("vision_start_token_id",),
            "vision_eos": ("vision_end_token_id",),
            "audio_bos": ("audio_start_token_id",),
            "audio_eos": ("audio_end_token_id",),
        },
        audio_in_video=interleave_video_audio,
        audio_tokens=lambda n: aut_output_length(n),
    )
    tp_plan = {
        "vision": VISION_TP_PLAN,
        "audio": (
            ("model.audio_tower.layers.*.self_attn.q_proj", "colwise"),
            ("model.audio_tower.layers.*.self_attn.k_proj", "colwise"),
            ("model.audio_tower.layers.*.self_attn.v_proj", "colwise"),
            ("model.audio_tower.layers.*.self_attn.out_proj", "rowwise"),
            ("model.audio_tower.layers.*.fc1", "colwise"),
            ("model.audio_tower.layers.*.fc2", "rowwise"),
        ),
        "llm": QWEN3_LLM_TP_PLAN,
    }
    sp_plan = {}
    tp_head_attrs = {
        "vision": (("model.visual.blocks.*.attn", "num_heads"),),
        "audio": (("model.audio_tower.layers.*.self_attn", "num_heads"),),
    }
    hf_names = (("model.visual.", "visual."), ("model.audio_tower.", "audio_tower."), ("model.language_model.", "model."))
    hf_model_types = {"qwen3_omni_moe_thinker": ("", None), "qwen3_omni_moe": ("thinker.", "thinker_config")}

    def undeclared_config_keys(self):
        # Read by HF's rope index / our merge but not declared by the thinker
        # config; head_dim is the published text config's (hidden 2048 / 32
        # heads would give 64, the checkpoint uses 128).
        return ("vision_start_token_id", "vision_end_token_id", "audio_end_token_id", "text_config.head_dim")

    # ---- audio (AuT) ----------------------------------------------------------
    def audio_segments(self, tower, plan, mb, out):
        from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf

        fmask = mb["feature_attention_mask"]
        feature_lens = fmask.sum(-1)
        if "audio" in plan.pre:
            feats = mb["input_features"].permute(0, 2, 1)[fmask.bool()].permute(1, 0)
            padded, chunk_lengths = hf.chunk_and_pad_features(feats, feature_lens, tower.n_window)
            x = padded.unsqueeze(1).to(tower.conv2d1.weight.dtype)
            e = torch.cat([F.gelu(tower.conv2d3(F.gelu(tower.conv2d2(F.gelu(tower.conv2d1(c)))))) for c in x.split(tower.conv_chunksize, dim=0)])
            b, c, f, t = e.size()
            e = tower.conv_out(e.permute(0, 3, 1, 2).contiguous().view(b, t, c * f))
            e = e + tower.positional_embedding.positional_embedding[: e.shape[1], :].unsqueeze(0).to(e.dtype)
            h = torch.index_select(e.reshape(-1, e.shape[-1]), 0, hf.get_valid_indices(chunk_lengths, tower.n_window))
        else:
            chunk_lengths = _chunk_lengths(feature_lens, tower.n_window)
            h = out.pop("audio_h")
        layers = plan.layers.get("audio", range(0))
        if len(layers):
            cu = hf.get_audio_cu_seqlens(chunk_lengths, feature_lens, tower.n_window_infer, tower.n_window)
            max_seqlen = hf.get_max_seqlen(cu, tower.config)
            for i in layers:
                h = tower.layers[i](h, cu, max_seqlen=max_seqlen)[0]
        if "audio" in plan.post:
            out["audio_emb"] = tower.proj2(tower.act(tower.proj1(tower.ln_post(h))))
        else:
            out["audio_h"] = h

    @staticmethod
    def audio_frames(load) -> tuple[float, float]:
        """(items, encoder positions per item): AuT's layers run on its
        downsampled outputs, one per LLM audio token (no pooling after them)."""
        tok, n = float(load.get("audio", 0)), float(load.get("audio_items", 1)) or 1.0
        return n, tok / n

    def tp_sizes(self) -> dict[str, dict[str, int]]:
        a = self.hf_config.audio_config
        audio = {"encoder_attention_heads": a.encoder_attention_heads, "encoder_ffn_dim": a.encoder_ffn_dim}
        return {**DeepStack.tp_sizes(self), "audio": audio}
