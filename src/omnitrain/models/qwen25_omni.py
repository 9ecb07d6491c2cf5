"""Qwen2.5-Omni thinker adapter: builds the HF module, names its segments and
runs any contiguous range of them.

Segments, in data-flow order (each stage of a pipeline owns a contiguous run):
  vision: patch_embed (pre) | blocks[i] | merger (post)
  audio:  conv1/conv2/positional_embedding (pre) | layers[i] | ln_post/proj (post)
  merge:  embed_tokens + scatter encoder features + 3-D rope positions
  llm:    layers[i]
  head:   norm + lm_head + loss

The layers are HF's own modules, called the way HF's forward calls them; only
the glue between them lives here, so a stage computes exactly what the
monolithic HF forward computes (tests/test_model.py checks loss and grads).

What crosses a cut is a dict of named tensors:
  image_h / video_h   vision hidden states in HF's window order (before merger)
  image_emb / video_emb  merged vision features (after merger), original order
  audio_h             packed audio hidden states (before ln_post/proj)
  audio_emb           projected audio features
  h, pos              LLM hidden states (B,S,H) and 3-D rope positions (3,B,S)
Everything else (grids, masks, labels) is read from the raw micro-batch, which
every stage loads itself.
"""

from __future__ import annotations

import importlib
import zlib
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MODULES = ("vision", "audio", "llm")
IGNORE_INDEX = -100


def import_object(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Segments:
    """Which segments one stage runs. Ranges are half-open layer indices."""

    vision: tuple[int, int] = (0, 0)
    audio: tuple[int, int] = (0, 0)
    llm: tuple[int, int] = (0, 0)
    vision_pre: bool = False
    vision_post: bool = False
    audio_pre: bool = False
    audio_post: bool = False
    merge: bool = False
    head: bool = False

    @classmethod
    def whole(cls, depths: dict[str, int]) -> "Segments":
        return cls(
            vision=(0, depths["vision"]),
            audio=(0, depths["audio"]),
            llm=(0, depths["llm"]),
            vision_pre=True,
            vision_post=True,
            audio_pre=True,
            audio_post=True,
            merge=True,
            head=True,
        )

    @classmethod
    def from_plan(cls, plan) -> "Segments":
        """From a parallel.layout.StagePlan."""
        def span(module):
            r = plan.layers.get(module, range(0))
            return (r.start, r.stop) if len(r) else (0, 0)

        return cls(
            vision=span("vision"),
            audio=span("audio"),
            llm=span("llm"),
            vision_pre=plan.vision_pre,
            vision_post=plan.vision_post,
            audio_pre=plan.audio_pre,
            audio_post=plan.audio_post,
            merge=plan.merge,
            head=plan.head,
        )

    def has(self, module: str) -> bool:
        lo, hi = getattr(self, module)
        pre_post = {
            "vision": self.vision_pre or self.vision_post,
            "audio": self.audio_pre or self.audio_post,
            "llm": self.merge or self.head,
        }[module]
        return hi > lo or pre_post


class Qwen25OmniThinker:
    """Adapter object built by Hydra from `cfg.model` (`_target_`)."""

    hf_class = "transformers.Qwen2_5OmniThinkerForConditionalGeneration"

    def __init__(self, name, config_class, config, processor, init_from=None, trainable=None, **_unused):
        if _unused:
            raise TypeError(f"model: unknown keys {sorted(_unused)}")
        self.name = name
        self.processor_ref = processor
        self.init_from = init_from
        self.trainable = dict(trainable or {m: True for m in MODULES})
        self.hf_config = self._make_config(config_class, dict(config))

    # ---- config -----------------------------------------------------------
    @staticmethod
    def _make_config(config_class: str, kwargs: dict):
        cls = import_object(config_class)
        known = set(cls().to_dict()) | {"vision_start_token_id", "vision_end_token_id"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"model.config: unknown keys {unknown} for {config_class}; check the spelling")
        cfg = cls(**kwargs)
        # rope indexing reads vision_start_token_id from the config, which the
        # thinker config class does not declare (FACTS): keep it set.
        for key in ("vision_start_token_id", "vision_end_token_id"):
            if key in kwargs:
                setattr(cfg, key, kwargs[key])
        cfg._attn_implementation = "sdpa"
        for sub in ("text_config", "vision_config", "audio_config"):
            getattr(cfg, sub)._attn_implementation = "sdpa"
        return cfg

    @property
    def depths(self) -> dict[str, int]:
        c = self.hf_config
        return {
            "vision": c.vision_config.depth,
            "audio": c.audio_config.encoder_layers,
            "llm": c.text_config.num_hidden_layers,
        }

    @property
    def token_ids(self) -> dict[str, int]:
        c = self.hf_config
        return {
            "image": c.image_token_id,
            "video": c.video_token_id,
            "audio": c.audio_token_id,
            "vision_start": c.vision_start_token_id,
            "audio_start": c.audio_start_token_id,
        }

    # ---- build ------------------------------------------------------------
    def build_meta(self) -> nn.Module:
        """The whole HF thinker on the meta device: shapes only, no memory."""
        cls = import_object(self.hf_class)
        with torch.device("meta"):
            model = cls._from_config(self.hf_config, dtype=torch.float32)
        return model

    @staticmethod
    def owned_prefixes(seg: Segments) -> list[str]:
        """Module FQNs a stage materializes (parameters and buffers)."""
        out = []
        if seg.has("vision"):
            out.append("model.visual.rotary_pos_emb")
        if seg.vision_pre:
            out.append("model.visual.patch_embed")
        out += [f"model.visual.blocks.{i}" for i in range(*seg.vision)]
        if seg.vision_post:
            out.append("model.visual.merger")
        if seg.audio_pre:
            out += ["model.audio_tower.conv1", "model.audio_tower.conv2", "model.audio_tower.positional_embedding"]
        out += [f"model.audio_tower.layers.{i}" for i in range(*seg.audio)]
        if seg.audio_post:
            out += ["model.audio_tower.ln_post", "model.audio_tower.proj", "model.audio_tower.audio_bos_eos_token"]
        if seg.has("llm"):
            out.append("model.language_model.rotary_emb")
        if seg.merge:
            out.append("model.language_model.embed_tokens")
        out += [f"model.language_model.layers.{i}" for i in range(*seg.llm)]
        if seg.head:
            out += ["model.language_model.norm", "lm_head"]
        return out

    def build(self, segs: Segments | list[Segments], device: torch.device, seed: int) -> nn.Module:
        """Build on meta, then materialize and initialise only this stage's modules.

        Each module is initialised from its own seed (run seed + hash of its
        name), so a parameter gets the same values whatever the layout.
        Modules this stage does not own stay on the meta device. A rank that
        runs several (virtual) stages passes their Segments as a list.
        """
        segs = [segs] if isinstance(segs, Segments) else segs
        prefixes = list(dict.fromkeys(p for seg in segs for p in self.owned_prefixes(seg)))
        model = self.build_meta()
        modules = dict(model.named_modules())
        for prefix in prefixes:
            mod = modules[prefix]
            # Initialise on CPU (one RNG, same values on every device type), then move.
            mod.to_empty(device="cpu", recurse=True)
            for name, sub in mod.named_modules(prefix=prefix):
                with _seeded(seed, name):
                    model._init_weights(sub)
            mod.to(device)
        if self.init_from:
            from omnitrain.convert.hf import load_hf_weights

            # After the init: non-persistent buffers (rotary) come from it, weights from the folder.
            load_hf_weights(model, self.init_from)
        for module in MODULES:
            if not self.trainable.get(module, True):
                for p in self.module_parameters(model, module):
                    p.requires_grad_(False)
        model.train()
        return model

    @staticmethod
    def module_of(param_name: str) -> str:
        if param_name.startswith("model.visual."):
            return "vision"
        if param_name.startswith("model.audio_tower."):
            return "audio"
        return "llm"

    def module_parameters(self, model: nn.Module, module: str):
        return [p for n, p in model.named_parameters() if self.module_of(n) == module]

    @staticmethod
    def local_parameters(model: nn.Module):
        """(name, param) of the materialized parameters (not on meta)."""
        return [(n, p) for n, p in model.named_parameters() if not p.is_meta]

    # ---- [parallel hook] tensor-parallel plan and dummy media (used by omnitrain.parallel) ----
    # module -> ((FQN pattern, style), ...); "*" is a layer index. Styles:
    # colwise / rowwise (Megatron pairs), vocab_embed (embedding sharded over
    # the vocabulary), vocab_head (lm_head sharded over the vocabulary).
    # Everything else (norms, patch embed, merger, convs) stays replicated.
    TP_PLAN = {
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
        "llm": (
            ("model.language_model.embed_tokens", "vocab_embed"),
            ("model.language_model.layers.*.self_attn.q_proj", "colwise"),
            ("model.language_model.layers.*.self_attn.k_proj", "colwise"),
            ("model.language_model.layers.*.self_attn.v_proj", "colwise"),
            ("model.language_model.layers.*.self_attn.o_proj", "rowwise"),
            ("model.language_model.layers.*.mlp.gate_proj", "colwise"),
            ("model.language_model.layers.*.mlp.up_proj", "colwise"),
            ("model.language_model.layers.*.mlp.down_proj", "rowwise"),
            ("lm_head", "vocab_head"),
        ),
    }
    # Sequence parallelism (parallel.sequence_parallel) for the LLM: its norms
    # run on sequence shards; attention and MLP gather the sequence on entry
    # (HF's attention reads the sequence length from its input).
    SP_PLAN = {
        "llm": (
            ("model.language_model.layers.*.input_layernorm", "seq_norm"),
            ("model.language_model.layers.*.self_attn", "seq_gather_kw"),
            ("model.language_model.layers.*.post_attention_layernorm", "seq_norm"),
            ("model.language_model.layers.*.mlp", "seq_gather"),
            ("model.language_model.norm", "seq_norm"),
        ),
    }
    # Head counts HF's encoder attention reshapes by (the LLM's uses -1):
    # after sharding each rank holds heads / tp of them.
    TP_HEAD_ATTRS = {
        "vision": (("model.visual.blocks.*.attn", "num_heads"),),
        "audio": (("model.audio_tower.layers.*.self_attn", "num_heads"),),
        "llm": (),
    }

    def tp_sizes(self) -> dict[str, dict[str, int]]:
        """Per module, the sizes its TP size must divide (named for the error message)."""
        c = self.hf_config
        v, a, t = c.vision_config, c.audio_config, c.text_config
        return {
            "vision": {"num_heads": v.num_heads, "intermediate_size": v.intermediate_size},
            "audio": {"encoder_attention_heads": a.encoder_attention_heads, "encoder_ffn_dim": a.encoder_ffn_dim},
            "llm": {
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads,
                "intermediate_size": t.intermediate_size,
                "vocab_size": t.vocab_size,
            },
        }

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

    def dummy_media(self, kind: str) -> dict:
        """The smallest input of one media kind, for a rank whose micro-batch has
        none while a data-parallel peer's has some: FSDP's collectives need
        every replica to run the same encoder passes. Marked in `_dummy` so
        its features join the loss with weight 0 and no rope grid is read."""
        v, a = self.hf_config.vision_config, self.hf_config.audio_config
        if kind == "audio":
            n = 4
            return {"input_features": torch.zeros(1, a.num_mel_bins, n), "feature_attention_mask": torch.ones(1, n, dtype=torch.long)}
        m = v.spatial_merge_size
        grid = torch.tensor([[1, m, m]])  # one merged token
        pix = torch.zeros(m * m, v.in_channels * v.temporal_patch_size * v.patch_size**2)
        if kind == "image":
            return {"pixel_values": pix, "image_grid_thw": grid}
        return {"pixel_values_videos": pix, "video_grid_thw": grid, "video_second_per_grid": torch.ones(1)}

    # ---- forward ----------------------------------------------------------
    def stage_forward(
        self, model: nn.Module, seg: Segments, mb: dict, inputs: dict, num_label_tokens, hooks=None
    ) -> dict | torch.Tensor:
        """Run this stage's segments on one micro-batch.

        `inputs` is what the previous stage sent (empty on the first stage).
        Returns the dict for the next stage, or the loss on the head stage.
        [parallel hook] `mb["_slices"][module]`, where present, holds the
        media this rank encodes for `module` (a part of the micro-batch's
        samples, see `slice_media`); `hooks[module]` joins the parts' features,
        `hooks["seq_shard"]` keeps this rank's part of the LLM's sequence.
        """
        hooks = hooks or {}
        out = dict(inputs)
        thinker = model.model
        slices = mb.get("_slices", {})
        vis, aud = slices.get("vision", mb), slices.get("audio", mb)
        for kind, pix_key, grid_key in (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw")):
            if pix_key in vis and seg.has("vision"):
                self._vision(thinker.visual, seg, kind, vis[pix_key], vis[grid_key], out)
        if "input_features" in aud and seg.has("audio"):
            self._audio(thinker.audio_tower, seg, aud, out)
        if seg.merge:
            self._merge(thinker, mb, out, hooks)
            if "seq_shard" in hooks:
                out["h"] = hooks["seq_shard"](out["h"])
        if seg.llm[1] > seg.llm[0]:
            self._llm(thinker.language_model, seg, mb, out)
        if seg.head:
            return self._loss(model, out["h"], mb["labels"], num_label_tokens)
        return out

    def _vision(self, visual, seg, kind, pixels, grid, out):
        from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids, get_vision_window_index

        ctx = {}
        position_ids = get_vision_position_ids(grid, visual.spatial_merge_size, kwargs=ctx)
        cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid, visual.config, kwargs=ctx)
        window_index, cu_window = get_vision_window_index(
            grid,
            spatial_merge_size=visual.spatial_merge_size,
            window_size=visual.window_size,
            patch_size=visual.patch_size,
            kwargs=ctx,
        )
        max_window = int((cu_window[1:] - cu_window[:-1]).max()) if cu_window.numel() > 1 else 0
        if seg.vision_pre:
            h = visual.patch_embed(pixels.type(visual.patch_embed.proj.weight.dtype))
            h = visual.permute_input_for_window_attn(h, window_index, seq_len=h.shape[0])
        else:
            h = out.pop(f"{kind}_h")
        lo, hi = seg.vision
        if hi > lo:
            rot = visual.rotary_pos_emb(h, position_ids)
            rot = tuple(visual.permute_input_for_window_attn(r, window_index, seq_len=h.shape[0]) for r in rot)
            for i in range(lo, hi):
                full = i in visual.fullatt_block_indexes
                h = visual.blocks[i](
                    h,
                    cu_seqlens=cu_seqlens if full else cu_window,
                    max_seqlen=max_seqlen if full else max_window,
                    position_embeddings=rot,
                )
        if seg.vision_post:
            out[f"{kind}_emb"] = visual.merger(h)[torch.argsort(window_index)]
        else:
            out[f"{kind}_h"] = h

    def _audio(self, tower, seg, mb, out):
        from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as hf

        fmask = mb["feature_attention_mask"]
        feature_lens = fmask.sum(-1)
        if seg.audio_pre:
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
        lo, hi = seg.audio
        if hi > lo:
            cu = hf.get_audio_cu_seqlens(chunk_lengths)
            max_seqlen = int((cu[1:] - cu[:-1]).max())
            for i in range(lo, hi):
                h = tower.layers[i](h, cu_seqlens=cu, max_seqlen=max_seqlen)[0]
        if seg.audio_post:
            pool = hf.get_pool_indices(feature_lens)
            h = (h[pool] + h[pool + 1]) / 2
            out["audio_emb"] = tower.proj(tower.ln_post(h))
        else:
            out["audio_h"] = h

    def _merge(self, thinker, mb, out, hooks):
        ids = mb["input_ids"]
        emb = thinker.language_model.embed_tokens(ids)
        ids_ = self.token_ids
        slices = mb.get("_slices", {})
        for kind in ("audio", "image", "video"):
            module = "audio" if kind == "audio" else "vision"
            feats = out.pop(f"{kind}_emb", None)
            if feats is not None and kind in slices.get(module, mb).get("_dummy", ()):  # [parallel hook] see dummy_media
                emb = emb + 0.0 * feats.sum()  # keeps the dummy pass in the graph: its grads are zeros
                feats = feats[:0]
            if feats is not None and module in slices:
                feats = hooks[module](feats)  # this rank encoded a part of the samples: join the parts
            mask = ids == ids_[kind]
            n_tok = int(mask.sum())
            if feats is None or feats.shape[0] == 0:
                if n_tok:
                    raise ValueError(f"micro-batch has {n_tok} {kind} tokens but no {kind} features")
                continue
            if n_tok != feats.shape[0]:
                # HF does not check audio (FACTS: silent misalignment); we do.
                raise ValueError(f"{kind} tokens ({n_tok}) != {kind} features ({feats.shape[0]}) in this micro-batch")
            emb = emb.masked_scatter(mask.unsqueeze(-1), feats.to(emb.dtype))
        out["h"] = emb
        out["pos"] = self.rope_positions(thinker, mb)

    def media_items(self, mb: dict) -> list[tuple[int, int, int]]:
        """(images, videos, audios) of each sample of a micro-batch. Media rows
        (grids, pixel rows, audio rows) follow sample order, so these counts
        locate a sample's rows. A video with its soundtrack interleaved
        (use_audio_in_video) starts with audio_start after vision_start."""
        ids, am = mb["input_ids"], mb["attention_mask"]
        flags = mb.get("use_audio_in_video")
        tok = self.token_ids
        out = []
        for b in range(ids.shape[0]):
            row = ids[b][am[b].bool()]
            starts = row[torch.nonzero(row == tok["vision_start"]).squeeze(1) + 1]
            n_img = int((starts == tok["image"]).sum())
            n_vid = int((starts == tok["video"]).sum())
            if flags is not None and bool(flags[b]):
                n_vid += int((starts == tok["audio_start"]).sum())
            out.append((n_img, n_vid, int((row == tok["audio_start"]).sum())))
        return out

    # Micro-batch keys each encoder reads.
    MEDIA_KEYS = {
        "vision": ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "video_second_per_grid"),
        "audio": ("input_features", "feature_attention_mask"),
    }

    def slice_media(self, mb: dict, module: str, lo: int, hi: int) -> dict:
        """[parallel hook] `module`'s media of samples [lo, hi) of a micro-batch."""
        items = self.media_items(mb)
        before = [sum(c) for c in zip((0, 0, 0), *items[:lo])]
        within = [sum(c) for c in zip((0, 0, 0), *items[lo:hi])]
        out = {}
        if module == "audio":
            a, n = before[2], within[2]
            if n:
                out = {k: mb[k][a : a + n] for k in self.MEDIA_KEYS["audio"]}
            return out
        for i, pix, grid, extra in ((0, "pixel_values", "image_grid_thw", None), (1, "pixel_values_videos", "video_grid_thw", "video_second_per_grid")):
            a, n = before[i], within[i]
            if not n:
                continue
            rows = mb[grid].prod(-1)
            r0 = int(rows[:a].sum())
            out[pix] = mb[pix][r0 : r0 + int(rows[a : a + n].sum())]
            out[grid] = mb[grid][a : a + n]
            if extra in mb:
                out[extra] = mb[extra][a : a + n]
        return out

    def rope_positions(self, thinker, mb) -> torch.Tensor:
        """3-D rope positions (3,B,S), per sample so `use_audio_in_video` can differ per sample."""
        ids, am = mb["input_ids"], mb["attention_mask"]
        flags = mb.get("use_audio_in_video")
        img_grid, vid_grid = mb.get("image_grid_thw"), mb.get("video_grid_thw")
        spg = mb.get("video_second_per_grid")
        fmask = mb.get("feature_attention_mask")
        audio_lens = fmask.sum(-1) if fmask is not None else None
        dummy = mb.get("_dummy", ())  # [parallel hook] see dummy_media
        img_grid = None if "image" in dummy else img_grid
        vid_grid, spg = (None, None) if "video" in dummy else (vid_grid, spg)
        audio_lens = None if "audio" in dummy else audio_lens
        if flags is None or not bool(flags.any()) or bool(flags.all()):
            flag = bool(flags.all()) if flags is not None and flags.numel() else False
            pos, _ = thinker.get_rope_index(ids, img_grid, vid_grid, am, flag, audio_lens, spg)
            return pos
        # Mixed flags in one micro-batch: one sample at a time, each with its own slice of grids.
        rows = []
        i_img = i_vid = i_aud = 0
        for b, (n_img, n_vid, n_aud) in enumerate(self.media_items(mb)):
            pos, _ = thinker.get_rope_index(
                ids[b : b + 1],
                img_grid[i_img : i_img + n_img] if n_img else None,
                vid_grid[i_vid : i_vid + n_vid] if n_vid else None,
                am[b : b + 1],
                bool(flags[b]),
                audio_lens[i_aud : i_aud + n_aud] if n_aud else None,
                spg[i_vid : i_vid + n_vid] if n_vid else None,
            )
            rows.append(pos)
            i_img, i_vid, i_aud = i_img + n_img, i_vid + n_vid, i_aud + n_aud
        return torch.cat(rows, dim=1)

    def _llm(self, lm, seg, mb, out):
        from transformers.masking_utils import create_causal_mask

        h, pos = out["h"], out["pos"]
        # The mask spans the whole sequence; under sequence parallelism h holds
        # a part of it, so the mask takes its length from the attention mask.
        whole = h.new_empty((h.shape[0], mb["attention_mask"].shape[1], 0))
        mask = create_causal_mask(
            config=lm.config, inputs_embeds=whole, attention_mask=mb["attention_mask"], past_key_values=None, position_ids=None
        )
        rot = lm.rotary_emb(h, pos)
        for i in range(*seg.llm):
            h = lm.layers[i](h, attention_mask=mask, position_embeddings=rot, position_ids=None, past_key_values=None, use_cache=False)
        out["h"] = h

    @staticmethod
    def count_label_tokens(mb: dict) -> int:
        """Tokens the loss counts in a micro-batch (labels shifted by one, as in `_loss`)."""
        return int((mb["labels"][:, 1:] != IGNORE_INDEX).sum())

    @staticmethod
    def _loss(model, h, labels, num_label_tokens) -> torch.Tensor:
        """Sum of token cross-entropies / label tokens of the whole global batch.

        Dividing by the global count (not this micro-batch's) makes the sum of
        micro-batch losses equal the single-process loss under any layout.
        """
        logits = model.lm_head(model.model.language_model.norm(h))
        shift = labels[:, 1:].reshape(-1)
        logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
        return F.cross_entropy(logits, shift, ignore_index=IGNORE_INDEX, reduction="sum") / num_label_tokens

    # ---- cost model -------------------------------------------------------
    def flops_per_token(self) -> float:
        """Training FLOPs per LLM token (6 x LLM params, ignoring attention)."""
        c = self.hf_config.text_config
        h, i, L, v = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
        kv = c.num_key_value_heads * (h // c.num_attention_heads)
        per_layer = h * h * 2 + h * kv * 2 + 3 * h * i
        return 6.0 * (L * per_layer + h * v)


def _chunk_lengths(feature_lens: torch.Tensor, n_window: int) -> torch.Tensor:
    """Chunk lengths as HF's chunk_and_pad_features computes them, without the features."""
    chunk_num = torch.ceil(feature_lens / (n_window * 2)).long()
    lengths = torch.full((int(chunk_num.sum()),), n_window * 2, dtype=torch.long, device=feature_lens.device)
    tail = F.pad(chunk_num, (1, 0), value=-1).cumsum(0)[1:]
    lengths[tail] = feature_lens % (n_window * 2)
    return torch.where(lengths == 0, n_window * 2, lengths)


@contextmanager
def _seeded(seed: int, name: str):
    """Fork the global RNG, seeded by (seed, module name)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
        yield
