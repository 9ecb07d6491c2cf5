"""Shared helpers for the data tests (and for anyone who needs a tiny thinker).

- `processor()`: the shipped processor, loaded once per process.
- `data_cfg(**kw)`: a typed DataConfig (no Hydra compose needed).
- `tiny_thinker()`: a random HF Qwen2.5-Omni thinker with tiny widths and one
  layer per module, real token ids, to check encoder output counts.
- `write_video` / `write_wav`: media files made on the fly (a video with its
  own audio track, long audio) so no binary fixtures are stored.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[2]
PEER_DEMO = (REPO / ".." / "shared" / "peer-data" / "llamafactory").resolve()
DEMO_NAMES = ["mllm_demo", "mllm_audio_demo", "mllm_video_demo", "mllm_video_audio_demo"]

TOKEN_IDS = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "audio_token_id": 151646,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "audio_start_token_id": 151647,
    "audio_end_token_id": 151648,
}


def demo_dir() -> Path:
    """The peer copy of LLaMA-Factory's demo set (the acceptance data), else ours."""
    if PEER_DEMO.exists():
        return PEER_DEMO
    from omnitrain.paths import resolve

    return resolve("builtin:demo")


@lru_cache(maxsize=None)
def model_cfg(name: str = "qwen25_omni"):
    """The model family of `conf/model/<name>.yaml` (what the data pipeline takes)."""
    from omegaconf import OmegaConf

    from omnitrain.models.family import build_family

    cfg = OmegaConf.load(REPO / "src" / "omnitrain" / "conf" / "model" / f"{name}.yaml")
    cfg.pop("defaults", None)  # Hydra's composition list (a family's default data), not a family argument
    return build_family(cfg)


@lru_cache(maxsize=None)
def processor(name: str = "qwen25_omni"):
    from omnitrain.data import load_processor

    return load_processor(model_cfg(name))


def data_cfg(**kw):
    from omegaconf import OmegaConf

    from omnitrain.data.config import DataConfig

    cfg = OmegaConf.structured(DataConfig)
    kw.setdefault("dataset_dir", str(demo_dir()))
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def write_dataset(folder: Path, samples, name: str = "ds", info: dict | None = None, formatting: str = "sharegpt") -> Path:
    """A LLaMA-Factory folder: <name>.json + dataset_info.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(samples, ensure_ascii=False))
    entry = info or {
        "file_name": f"{name}.json",
        "formatting": formatting,
        "columns": {"messages": "messages", "images": "images", "videos": "videos", "audios": "audios"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    }
    (folder / "dataset_info.json").write_text(json.dumps({name: entry}))
    return folder


def chat(user: str, answer: str = "ok") -> list:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def write_wav(path: Path, seconds: float, sr: int = 16000, freq: float = 440.0) -> Path:
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr)
    return path


def write_video(path: Path, seconds: float = 3.0, fps: int = 10, size=(64, 48), audio_sr: int | None = 22050) -> Path:
    """A small mp4 (mpeg4 video, aac audio when audio_sr is set) with moving content."""
    import av

    w, h = size
    with av.open(str(path), "w") as c:
        vs = c.add_stream("mpeg4", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        aus = c.add_stream("aac", rate=audio_sr) if audio_sr else None
        for i in range(int(seconds * fps)):
            img = np.zeros((h, w, 3), dtype=np.uint8)
            img[:, : (i * 7) % w] = (i * 20 % 255, 100, 200)
            for pkt in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in vs.encode():
            c.mux(pkt)
        if aus is not None:
            n = int(seconds * audio_sr)
            t = np.arange(n) / audio_sr
            wave = (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
            step = 1024
            for k in range(0, n, step):
                chunk = np.stack([wave[k : k + step]] * 2)  # stereo planar
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
                frame.sample_rate = audio_sr
                frame.pts = k
                for pkt in aus.encode(frame):
                    c.mux(pkt)
            for pkt in aus.encode():
                c.mux(pkt)
    return path


@lru_cache(maxsize=1)
def tiny_thinker(vocab_size: int = 152064):
    """A random Qwen2.5-Omni thinker: one layer per module, widths 16-64."""
    import torch
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    cfg = Qwen2_5OmniThinkerConfig(
        audio_token_index=TOKEN_IDS["audio_token_id"],
        image_token_index=TOKEN_IDS["image_token_id"],
        video_token_index=TOKEN_IDS["video_token_id"],
        vision_start_token_id=TOKEN_IDS["vision_start_token_id"],
        vision_end_token_id=TOKEN_IDS["vision_end_token_id"],
        audio_start_token_id=TOKEN_IDS["audio_start_token_id"],
        audio_end_token_id=TOKEN_IDS["audio_end_token_id"],
        position_id_per_seconds=25,
        seconds_per_chunk=2,
        vision_config=dict(
            depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[0],
        ),
        audio_config=dict(
            num_mel_bins=128, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16,
            output_dim=32, n_window=100, max_source_positions=1500,
        ),
        text_config=dict(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        ),
    )
    torch.manual_seed(0)
    return Qwen2_5OmniThinkerForConditionalGeneration(cfg).eval()
