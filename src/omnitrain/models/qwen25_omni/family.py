"""Qwen2.5-Omni's thinker: Qwen2.5-VL's vision encoder (its q/k/v separate),
a Whisper-style audio encoder, and a Qwen2 LLM whose 3-D rope also places
audio, and interleaves a video with its soundtrack (use_audio_in_video).

Segments, in data-flow order:
  vision: patch_embed (pre) | blocks[i] | merger (post)
  audio:  conv1/conv2/positional_embedding (pre) | layers[i] | ln_post/proj (post)
  llm:    merge (embed, scatter features, 3-D rope) | layers[i] | norm + lm_head + loss
What crosses a cut inside the audio layers is `audio_h`, the packed hidden
states (before ln_post/proj); after the audio post part `audio_emb`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnitrain.models.family import ChatSpec, ModelFamily, ModuleSpec, Work
from omnitrain.models.qwen2_vl.family import LLM, LLM_TP_PLAN, VISION
from omnitrain.models.qwen25_omni.template import interleave_video_audio
from omnitrain.models.qwen25_vl.family import Qwen25VL

AUDIO = ModuleSpec(
    name="audio",
    layers="model.audio_tower.layers",
    depth="audio_config.encoder_layers",
    prefixes=("model.audio_tower.",),
    pre=("model.audio_tower.conv1", "model.audio_tower.conv2", "model.audio_tower.positional_embedding"),
    post=("model.audio_tower.ln_post", "model.audio_tower.proj", "model.audio_tower.audio_bos_eos_token"),
    media=("audio",),
)


class Qwen25OmniThinker(Qwen25VL):
    hf_class = "transformers.Qwen2_5OmniThinkerForConditionalGeneration"
    hf_config_class = "transformers.Qwen2_5OmniThinkerConfig"
    modules = (VISION, AUDIO, LLM)
    chat = ChatSpec(
        tokens={
            "image": "<|IMAGE|>",
            "video": "<|VIDEO|>",
            "audio": "<|AUDIO|>",
            "vision_bos": "<|vision_bos|>",
            "vision_eos": "<|vision_eos|>",
            "audio_bos": "<|audio_bos|>",
            "audio_eos": "<|audio_eos|>",
            "im_start": "<|im_start|>",
            "im_end": "<|im_end|>",
        },
        config_keys={
            "image": ("image_token_id", "image_token_index"),
            "video": ("video_token_id", "video_token_index"),
            "audio": ("audio_token_id", "audio_token_index"),
            "vision_bos": ("vision_start_token_id",),
            "vision_eos": ("vision_end_token_id",),
            "audio_bos": ("audio_start_token_id",),
            "audio_eos": ("audio_end_token_id",),
        },
        audio_in_video=interleave_video_audio,
    )
    tp_plan = {
        "vision": (
            ("model.visual.blocks.*.attn.q", "colwise"),
            ("model.visual.blocks.*.attn.k", "colwise"),
            ("model.visual.blocks.*.attn.v", "colwise"),
            ("model.visual.blocks.*.attn.proj", "rowwise"),
            ("model.visual.blocks.*.mlp.gate_proj", "colwise"),
            ("model.visual.blocks.*.mlp.up_proj", "colwise"),
            ("model.visual.blocks.*.mlp.down_proj", "rowwise"),
        ),
        "audio": (
            ("model.audio_tower.layers.*.self_attn.q_proj", "colwise"),
            ("model.audio_tower.layers.*.self_attn.k_proj", "colwise"),  # no bias: only the weight is sharded
            ("model.audio_tower.layers.*.self_attn.v_proj", "colwise"),
            ("model.audio_tower.layers.*.self_attn.out_proj", "rowwise"),
            ("model.audio_tower.layers.*.fc1", "colwise"),
            ("model.audio_tower.layers.*.fc2", "rowwise"),
        ),
        "llm": LLM_TP_PLAN,
    }
    tp_head_attrs = {
        "vision": (("model.visual.blocks.*.attn", "num_heads"),),
        "audio": (("model.audio_tower.layers.*.self_attn", "num_heads"),),
    }
    hf_names = (("model.visual.", "visual."), ("model.audio_tower.", "audio_tower."), ("model.language_model.", "model."))
    # A thinker folder, or a whole Qwen2.5-Omni folder (thinker + talker + token2wav).
    # model.trainable=sft: both encoders frozen except their projectors (vision
    # merger, audio proj), the LLM trained.
    sft_trainable = {"vision": {"train": False, "except": ["merger"]}, "audio": {"train": False, "except": ["proj"]}, "llm": True}
    hf_model_types = {"qwen2_5_omni_thinker": ("", None), "qwen2_5_omni": ("thinker.", "thinker_config")}

    def undeclared_config_keys(self):
        # rope indexing reads vision_start_token_id from the config, which the
        # thinker config class does not declare (FACTS): keep it set.
        return ("vision_start_token_id", "vision_end_token_id")

    # ---- audio --------------------------------------------------------------
    def encode(self, module, model, plan, view, out):
        if module != "audio":
            return super().encode(module, model, plan, view, out)
        if "input_features" in view:
            self.audio_segments(model.model.audio_tower, plan, view, out)

    def audio_segments(self, tower, plan, mb, out):
        from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as hf

        fmask = mb["feature_attention_mask"]
        feature_lens = fmask.sum(-1)
        if "audio" in plan.pre:
            feats = mb["input_features"].permute(0, 2, 1)[fmask.bool()].permute(1, 0)
            padded, chunk_lengths = hf.chunk_and_pad_features(feats, feature_lens, tower.n_window)
            padded = padded.to(tower.conv1.weight.dtype)
            pmask = (torch.arange(padded.shape[2], device=padded.device) < chunk_lengths.unsqueeze(1)).unsqueeze(1)
            e = F.gelu(tower.conv1(padded)) * pmask.long()
            e = F.gelu(tower.conv2(e)).transpose(1, 2)
            e = e + tower.positional_embedding.positional_embedding[: e.shape[1], :].unsqueeze(0).to(e.dtype)
            h = torch.index_select(e.reshape(-1, e.shape[-1]), 0, hf.get_valid_indices(chunk_lengths))
        else:
            chunk_lengths = _chunk_lengths(feature_lens, tower.n_window)
            h = out.pop("audio_h")
        layers = plan.layers.get("audio", range(0))
        if len(layers):
            cu = hf.get_audio_cu_seqlens(chunk_lengths)
            max_seqlen = int((cu[1:] - cu[:-1]).max())
            for i in layers:
                h = tower.layers[i](h, cu_seqlens=cu, max_seqlen=max_seqlen)[0]
        if "audio" in plan.post:
            pool = hf.get_pool_indices(feature_lens)
            h = (h[pool] + h[pool + 1]) / 2
            out["audio_emb"] = tower.proj(tower.ln_post(h))
        else:
            out["audio_h"] = h

    def dummy_media(self, kind: str) -> dict:
        if kind != "audio":
            return super().dummy_media(kind)
        n = 4
        return {"input_features": torch.zeros(1, self.hf_config.audio_config.num_mel_bins, n), "feature_attention_mask": torch.ones(1, n, dtype=torch.long)}

    def hf_inputs(self, mb: dict) -> dict:
        # The thinker's HF forward takes one use_audio_in_video for the batch
        # (and no mm_token_type_ids): a batch mixing both cannot be run there.
        out = ModelFamily.hf_inputs(self, mb)
        flags = mb.get("use_audio_in_video")
        if flags is not None and flags.numel():
            if bool(flags.any()) != bool(flags.all()):
                raise ValueError("samples with and without use_audio_in_video in one batch: the HF model takes one flag per batch")
            out["use_audio_in_video"] = bool(flags.all())
        return out

    # ---- positions ----------------------------------------------------------
    def rope_positions(self, model, mb) -> torch.Tensor:
        """3-D rope positions (3,B,S), per sample so `use_audio_in_video` can differ per sample."""
        thinker = model.model
        ids, am = mb["input_ids"], mb["attention_mask"]
        flags = mb.get("use_audio_in_video")
        g = self.real_grids(mb)
        img_grid, vid_grid, spg = g["image_grid_thw"], g["video_grid_thw"], g["video_second_per_grid"]
        fmask = mb.get("feature_attention_mask")
        audio_lens = fmask.sum(-1) if fmask is not None and "audio" not in mb.get("_dummy", ()) else None
        if flags is None or not bool(flags.any()) or bool(flags.all()):
            flag = bool(flags.all()) if flags is not None and flags.numel() else False
            pos, _ = thinker.get_rope_index(ids, img_grid, vid_grid, am, flag, audio_lens, spg)
            return pos
        # Mixed flags in one micro-batch: one sample at a time, each with its own slice of grids.
        rows = []
        i = {"image": 0, "video": 0, "audio": 0}
        for b, n in enumerate(self.media_items(mb)):
            def part(x, kind):
                return x[i[kind] : i[kind] + n[kind]] if n[kind] else None

            pos, _ = thinker.get_rope_index(
                ids[b : b + 1], part(img_grid, "image"), part(vid_grid, "video"), am[b : b + 1], bool(flags[b]),
                part(audio_lens, "audio"), part(spg, "video"),
            )
            rows.append(pos)
            i = {k: i[k] + n[k] for k in i}
        return torch.cat(rows, dim=1)

    # ---- cost model [planner hooks] -------------------------------------------
    def layer_width(self, module: str) -> int:
        if module == "audio":
            return int(self.hf_config.audio_config.d_model)
        return super().layer_width(module)

    @staticmethod
    def audio_frames(load) -> tuple[float, float]:
        """(items, encoder frames per item) of one sample: an audio token is 2
        frames after the stride-2 conv (4 mel frames), pooled by 2."""
        tok, n = float(load.get("audio", 0)), float(load.get("audio_items", 1)) or 1.0
        return n, 2 * tok / n

    def layer_work(self, module, index, load) -> Work:
        if module != "audio":
            return super().layer_work(module, index, load)
        n, frames = self.audio_frames(load)
        # attention within chunks of n_window frames (2 n_window mel frames)
        return Work(n * frames, n * frames * min(frames, float(self.hf_config.audio_config.n_window)))

    def part_work(self, module, part, load) -> Work:
        if module != "audio":
            return super().part_work(module, part, load)
        n, frames = self.audio_frames(load)
        return Work(n * frames if part == "pre" else float(load.get("audio", 0)))

    def cost_per_token(self, model=None) -> dict[str, float]:
        # the audio layers run on conv2's output: half the mel frames
        c = super().cost_per_token(model)
        return {**c, "audio": c["audio"] / 2}

    def tp_sizes(self) -> dict[str, dict[str, int]]:
        a = self.hf_config.audio_config
        audio = {"encoder_attention_heads": a.encoder_attention_heads, "encoder_ffn_dim": a.encoder_ffn_dim}
        return {**super().tp_sizes(), "audio": audio}


def _chunk_lengths(feature_lens: torch.Tensor, n_window: int) -> torch.Tensor:
    """Chunk lengths as HF's chunk_and_pad_features computes them, without the features."""
    chunk_num = torch.ceil(feature_lens / (n_window * 2)).long()
    lengths = torch.full((int(chunk_num.sum()),), n_window * 2, dtype=torch.long, device=feature_lens.device)
    tail = F.pad(chunk_num, (1, 0), value=-1).cumsum(0)[1:]
    lengths[tail] = feature_lens % (n_window * 2)
    return torch.where(lengths == 0, n_window * 2, lengths)
