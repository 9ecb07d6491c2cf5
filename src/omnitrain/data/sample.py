"""One `Example` -> one processed sample: decode each media file once, run the
HF front ends (image/video processor, Whisper features), lay out tokens.

The processed sample holds 1-D `input_ids`/`labels` and per-sample media
tensors in order of appearance; `collate` batches them. Token counts are
computed from the processed features (grid sizes, mel lengths), so the
placeholders always match what the encoders output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from omnitrain.data.errors import DataError
from omnitrain.data.formats import Example
from omnitrain.data.media import load_audio, load_image, load_video
from omnitrain.data.processor import TokenIds
from omnitrain.data.template import MediaRef, plan_media, render
from omnitrain.data.threads import one_thread


@dataclass(frozen=True)
class Settings:
    """Everything besides the example that decides the processed sample."""

    image_min_pixels: int = 3136
    image_max_pixels: int = 12544
    video_min_pixels: int = 3136
    video_max_pixels: int = 6272
    video_fps: float = 2.0
    video_max_frames: int = 16
    video_min_frames: int = 2
    max_audio_seconds: Optional[float] = None
    long_audio: str = "chunk"
    cutoff_len: int = 2048
    train_on_prompt: bool = False
    mask_history: bool = False
    system: Optional[str] = None
    use_audio_in_video: bool = False
    position_id_per_seconds: float = 25.0
    seconds_per_chunk: float = 2.0

    @classmethod
    def from_config(cls, data_cfg: Any, hf_config: Any = None) -> "Settings":
        """`hf_config`: the model's HF config (video/audio interleave timing, where it has one)."""
        return cls(
            image_min_pixels=data_cfg.image_min_pixels,
            image_max_pixels=data_cfg.image_max_pixels,
            video_min_pixels=data_cfg.video_min_pixels,
            video_max_pixels=data_cfg.video_max_pixels,
            video_fps=float(data_cfg.video_fps),
            video_max_frames=data_cfg.video_max_frames,
            video_min_frames=data_cfg.video_min_frames,
            max_audio_seconds=data_cfg.max_audio_seconds,
            long_audio=data_cfg.long_audio,
            cutoff_len=data_cfg.cutoff_len,
            train_on_prompt=data_cfg.train_on_prompt,
            mask_history=data_cfg.mask_history,
            system=data_cfg.system,
            use_audio_in_video=data_cfg.use_audio_in_video,
            position_id_per_seconds=float(getattr(hf_config, "position_id_per_seconds", 25)),
            seconds_per_chunk=float(getattr(hf_config, "seconds_per_chunk", 2.0)),
        )


def audio_output_length(n_frames: int) -> int:
    """Mel frames -> audio encoder outputs (two stride-2 stages, as HF computes)."""
    n = (n_frames - 1) // 2 + 1
    return (n - 2) // 2 + 1


@dataclass
class _Media:
    """Decoded media of one sample, keyed by path (decode once per sample)."""

    images: Dict[str, Any] = field(default_factory=dict)
    videos: Dict[str, Any] = field(default_factory=dict)
    audios: Dict[str, np.ndarray] = field(default_factory=dict)
    decoded: List[str] = field(default_factory=list)


@dataclass
class _Parts:
    """What one sample accumulates while its placeholders are walked."""

    images: List[torch.Tensor] = field(default_factory=list)
    image_grids: List[torch.Tensor] = field(default_factory=list)
    videos: List[torch.Tensor] = field(default_factory=list)
    video_grids: List[torch.Tensor] = field(default_factory=list)
    second_per_grid: List[float] = field(default_factory=list)
    audio_feats: List[torch.Tensor] = field(default_factory=list)
    placeholder_ids: List[List[int]] = field(default_factory=list)
    features: Dict[Any, Any] = field(default_factory=dict)  # processed media by (kind, path)
    stats: Dict[str, int] = field(default_factory=lambda: {"audio_chunked": 0, "audio_capped": 0})


class SampleBuilder:
    """The default transform (`model.transform`): what a family differs in
    comes from its `ChatSpec` (tokens, default system, how a video's
    soundtrack interleaves with it) and its processor."""

    def __init__(self, processor, ids: TokenIds, settings: Settings, *, chat, model_name: str, media_kinds):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.video_processor = processor.video_processor
        self.fe = getattr(processor, "feature_extractor", None)  # None: the model has no audio encoder
        self.ids = ids
        self.s = settings
        self.chat = chat
        self.model_name = model_name
        self.media_kinds = tuple(media_kinds)
        self.sr = int(self.fe.sampling_rate) if self.fe is not None else 16000
        self.window = int(self.fe.n_samples) if self.fe is not None else 0  # samples one feature call covers
        self.merge = int(self.image_processor.merge_size)
        self.vmerge = int(self.video_processor.merge_size)
        self.temporal_patch = int(self.video_processor.temporal_patch_size)
        self._audio_len = chat.audio_tokens or audio_output_length  # the family's audio encoder's length rule

    # -- public -------------------------------------------------------------

    def __call__(self, ex: Example, dataset_uiv: Optional[bool] = None) -> Dict[str, Any]:
        try:
            with one_thread():
                return self._build(ex, dataset_uiv)
        except DataError as e:
            raise e.at(ex.dataset, ex.index) from None

    def prompt(self, ex: Example, dataset_uiv: Optional[bool] = None) -> Dict[str, Any]:
        """The processed prompt for generation: `ex` ends with a user turn, an
        open assistant turn follows; the same media and template path as
        training, nothing labelled. A prompt over cutoff_len is an error (a
        prompt is never cut)."""
        if not ex.turns or ex.turns[-1][0] != "user":
            raise DataError("a prompt must end with a user turn", reason="bad_turns").at(ex.dataset, ex.index)
        try:
            with one_thread():
                return self._build(ex, dataset_uiv, generation=True)
        except DataError as e:
            raise e.at(ex.dataset, ex.index) from None

    def resolve_uiv(self, ex: Example, dataset_uiv: Optional[bool]) -> bool:
        """Sample field > dataset_info entry > data.use_audio_in_video."""
        for v in (ex.use_audio_in_video, dataset_uiv):
            if v is not None:
                return bool(v)
        return bool(self.s.use_audio_in_video)

    # -- steps --------------------------------------------------------------

    def _check_media(self, ex: Example, uiv: bool) -> None:
        """Media this model cannot encode: one clear error, never dropped."""
        if ("audio" not in self.media_kinds or self.chat.audio_in_video is None) and uiv:
            raise DataError(
                f"use_audio_in_video=true but model {self.model_name} cannot take a video's soundtrack; set "
                "use_audio_in_video=false for this dataset or sample, or set data.on_error=skip",
                file=(ex.videos or [None])[0],
                reason="unsupported_media",
            )
        if "audio" not in self.media_kinds and ex.audios:
            raise DataError(
                f"has audio but model {self.model_name} has no audio encoder; use a model with one, drop the "
                "dataset, or set data.on_error=skip",
                file=ex.audios[0],
                reason="unsupported_media",
            )

    def _build(self, ex: Example, dataset_uiv: Optional[bool], generation: bool = False) -> Dict[str, Any]:
        uiv = self.resolve_uiv(ex, dataset_uiv) and bool(ex.videos)
        self._check_media(ex, uiv)
        refs = plan_media(ex.turns, uiv)
        media = self._decode(ex, refs)
        acc = _Parts()
        for ref in refs:  # order of appearance = order of the media tensors
            if ref.kind == "image":
                acc.placeholder_ids.append(self._add_image(ex.images[ref.index], media, acc))
            elif ref.kind == "video":
                acc.placeholder_ids.append(self._add_video(ex, ref, media, acc, uiv))
            elif ref.absorbed:  # this <audio> is the preceding video's soundtrack
                acc.placeholder_ids.append([])
            else:
                acc.placeholder_ids.append(self._add_audio(ex.audios[ref.index], media, acc))

        system = ex.system if ex.system is not None else self.s.system
        input_ids, labels, spans = render(
            ex.turns,
            self.chat.default_system if system is None else system,
            acc.placeholder_ids,
            self._encode,
            train_on_prompt=self.s.train_on_prompt and not generation,
            mask_history=self.s.mask_history,
            add_generation_prompt=generation,
        )
        if generation:
            if len(input_ids) > self.s.cutoff_len:
                raise DataError(
                    f"the prompt needs {len(input_ids)} tokens, over cutoff_len={self.s.cutoff_len}; raise cutoff_len "
                    "or lower the media resolution (a prompt is never cut)",
                    file=(ex.images + ex.videos + ex.audios or [None])[0],
                    reason="too_long",
                )
        else:
            input_ids, labels = self._fit(input_ids, labels, spans, ex)

        out: Dict[str, Any] = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "use_audio_in_video": uiv,
            "audio_features": acc.audio_feats,
            "meta": {"dataset": ex.dataset, "index": ex.index, "decoded": media.decoded, **acc.stats},
        }
        if acc.images:
            out["pixel_values"] = torch.cat(acc.images)
            out["image_grid_thw"] = torch.stack(acc.image_grids)
        if acc.videos:
            out["pixel_values_videos"] = torch.cat(acc.videos)
            out["video_grid_thw"] = torch.stack(acc.video_grids)
            out["video_second_per_grid"] = torch.tensor(acc.second_per_grid, dtype=torch.float32)
        return out

    def _add_image(self, path: str, media: _Media, acc: "_Parts") -> List[int]:
        if ("image", path) not in acc.features:  # the same file twice: process once
            acc.features["image", path] = self._image_features(media.images[path], path)
        pv, grid = acc.features["image", path]
        acc.images.append(pv)
        acc.image_grids.append(grid)
        n = int(grid.prod()) // self.merge**2
        return [self.ids.vision_bos] + [self.ids.image] * n + [self.ids.vision_eos]

    def _add_video(self, ex: Example, ref: MediaRef, media: _Media, acc: "_Parts", uiv: bool) -> List[int]:
        path = ex.videos[ref.index]
        clip = media.videos[path]
        if ("video", path) not in acc.features:
            acc.features["video", path] = self._video_features(clip.frames, path)
        pv, grid = acc.features["video", path]
        # Measured spacing of the sampled frames, not the nominal fps.
        second_per_grid = self.temporal_patch * clip.seconds_per_frame
        acc.videos.append(pv)
        acc.video_grids.append(grid)
        acc.second_per_grid.append(second_per_grid)
        if not uiv:
            if self.chat.video_tokens is not None:  # the family lays a video out its own way (per-frame timestamps)
                return self.chat.video_tokens(grid.tolist(), self.vmerge, second_per_grid, self.ids, self._encode)
            n = int(grid.prod()) // self.vmerge**2
            return [self.ids.vision_bos] + [self.ids.video] * n + [self.ids.vision_eos]

        if ref.paired_audio is not None:
            apath = ex.audios[ref.paired_audio]
            wave = media.audios[apath]
        else:
            apath, wave = path, clip.audio
            if wave is None:
                raise DataError(
                    "use_audio_in_video is true but the video has no audio track; set use_audio_in_video=false "
                    "for this sample or put <audio> right after <video> with an audio file",
                    file=path,
                    reason="no_audio_track",
                )
        wave = self._cap(wave, acc.stats)
        if len(wave) > self.window:  # one video pairs with exactly one audio: no chunking here
            raise DataError(
                f"audio of the video is {len(wave) / self.sr:.1f} s, longer than the feature extractor's "
                f"{self.window / self.sr:.0f} s window; set data.max_audio_seconds or use_audio_in_video=false",
                file=apath,
                reason="audio_too_long",
            )
        feat = self._audio_features([wave], apath)[0]
        acc.audio_feats.append(feat)
        block = self.chat.audio_in_video(
            grid.tolist(),
            self.vmerge,
            second_per_grid,
            self._audio_len(feat.shape[-1]),
            self.ids,
            self.s.position_id_per_seconds,
            self.s.seconds_per_chunk,
        )
        return [self.ids.vision_bos] + block + [self.ids.vision_eos]

    def _add_audio(self, path: str, media: _Media, acc: "_Parts") -> List[int]:
        wave = self._cap(media.audios[path], acc.stats)
        ids: List[int] = []
        for feat in self._audio_features(self._segments(wave, path, acc.stats), path):
            acc.audio_feats.append(feat)
            n = self._audio_len(feat.shape[-1])
            ids += [self.ids.audio_bos] + [self.ids.audio] * n + [self.ids.audio_eos]
        return ids

    def _decode(self, ex: Example, refs: List[MediaRef]) -> _Media:
        """Each distinct file once; a video's soundtrack in the same pass."""
        m = _Media()
        want_track = {ex.videos[r.index] for r in refs if r.kind == "video" and r.own_track}
        for ref in refs:
            if ref.kind == "image":
                path = ex.images[ref.index]
                if path not in m.images:
                    m.images[path] = load_image(path)
                    m.decoded.append(path)
            elif ref.kind == "video":
                path = ex.videos[ref.index]
                if path not in m.videos:
                    m.videos[path] = load_video(
                        path,
                        fps=self.s.video_fps,
                        max_frames=self.s.video_max_frames,
                        min_frames=self.s.video_min_frames,
                        multiple=self.temporal_patch,
                        audio_sr=self.sr if path in want_track else None,
                    )
                    m.decoded.append(path)
                if ref.paired_audio is not None:
                    self._load_audio(m, ex.audios[ref.paired_audio])
            elif not ref.absorbed:
                self._load_audio(m, ex.audios[ref.index])
        return m

    def _load_audio(self, m: _Media, path: str) -> None:
        if path not in m.audios:
            m.audios[path] = load_audio(path, self.sr)
            m.decoded.append(path)

    def _image_features(self, image, path: str):
        try:
            out = self.image_processor(
                images=[image],
                size={"shortest_edge": self.s.image_min_pixels, "longest_edge": self.s.image_max_pixels},
                return_tensors="pt",
            )
        except Exception as e:
            raise DataError(f"image processor failed: {e}", file=path, reason="corrupt_media") from None
        return out["pixel_values"], out["image_grid_thw"][0]

    def _video_features(self, frames: np.ndarray, path: str):
        try:
            out = self.video_processor(
                videos=[frames],
                size={"shortest_edge": self.s.video_min_pixels, "longest_edge": self.s.video_max_pixels},
                do_sample_frames=False,
                cap_pixels_per_frame=False,
                return_tensors="pt",
            )
        except Exception as e:
            raise DataError(f"video processor failed: {e}", file=path, reason="corrupt_media") from None
        return out["pixel_values_videos"], out["video_grid_thw"][0]

    def _cap(self, wave: np.ndarray, stats: Dict[str, int]) -> np.ndarray:
        cap = self.s.max_audio_seconds
        if cap is not None and len(wave) > cap * self.sr:
            stats["audio_capped"] += 1
            return wave[: int(cap * self.sr)]
        return wave

    def _segments(self, wave: np.ndarray, path: str, stats: Dict[str, int]) -> List[np.ndarray]:
        """Audio longer than the extractor's window -> several windows (never a silent cut)."""
        if len(wave) == 0:
            raise DataError("audio is empty", file=path, reason="corrupt_media")
        if len(wave) <= self.window:
            return [wave]
        if self.s.long_audio != "chunk":
            raise DataError(
                f"audio is {len(wave) / self.sr:.1f} s, longer than the feature extractor's {self.window / self.sr:.0f} s "
                "window; set data.long_audio=chunk or data.max_audio_seconds",
                file=path,
                reason="audio_too_long",
            )
        stats["audio_chunked"] += 1
        # Equal parts, so no part is a sliver the encoder would reduce to nothing.
        n = math.ceil(len(wave) / self.window)
        bounds = [round(i * len(wave) / n) for i in range(n + 1)]
        return [wave[bounds[i] : bounds[i + 1]] for i in range(n)]

    def _audio_features(self, waves: List[np.ndarray], path: str) -> List[torch.Tensor]:
        """Log-mel features trimmed to their valid frames, (128, n_frames) each.

        Each clip is padded only to its length + one FFT window instead of the
        full 30 s (or 300 s) window: the valid frames and the clip's max (the
        log-mel normaliser) are the same either way, at a fraction of the cost.
        """
        hop, n_fft = int(self.fe.hop_length), int(self.fe.n_fft)
        out = []
        for w in waves:
            pad_to = min(self.window, -(-(len(w) + n_fft) // hop) * hop)
            f = self.fe(
                w,
                sampling_rate=self.sr,
                padding="max_length",
                max_length=pad_to,
                truncation=True,
                return_attention_mask=True,
                return_tensors="pt",
            )
            n = int(f["attention_mask"][0].sum())
            if self._audio_len(n) < 1:
                raise DataError(f"audio is too short ({1000 * len(w) / self.sr:.0f} ms)", file=path, reason="corrupt_media")
            out.append(f["input_features"][0, :, :n].contiguous())
        return out

    def _encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _fit(self, input_ids: List[int], labels: List[int], spans, ex: Example):
        """cutoff_len: cut trailing text only; never a media token."""
        limit = self.s.cutoff_len
        if len(input_ids) > limit:
            media_end = max((end for _, end in spans), default=0)
            if media_end > limit:
                raise DataError(
                    f"needs {len(input_ids)} tokens and its media end at token {media_end}, over "
                    f"cutoff_len={limit}; raise data.cutoff_len or lower the media resolution",
                    file=(ex.images + ex.videos + ex.audios or [None])[0],
                    reason="too_long",
                )
            input_ids, labels = input_ids[:limit], labels[:limit]
        if all(l == -100 for l in labels[1:]):
            raise DataError(
                f"no label tokens left (cutoff_len={limit}, {len(input_ids)} tokens)",
                file=(ex.images + ex.videos + ex.audios or [None])[0],
                reason="no_labels",
            )
        return input_ids, labels
