"""One-device training throughput of a 3B-class thinker: tokens/s, MFU, peak memory.

    python scripts/bench_gpu.py                      # model=qwen25_omni_3b on the accelerator, bf16
    python scripts/bench_gpu.py --peak-tflops 989    # MFU against this peak (default: device.py's table)
    python scripts/bench_gpu.py --smoke              # the tiny model, small samples, fp32 on CPU (the test suite's check)
    python scripts/bench_gpu.py [overrides...]       # any config override, e.g. parallel.fsdp.mixed_precision=bf16

The model has the real widths and depths (random init: no weights to
download). The samples are synthetic but go through the real data pipeline:
each has a random image, a random-noise audio clip and random text of a
varying length, written to a temporary dataset folder and processed by the
family's processor, so the encoders, the merge and the 3-D rope positions
all run as in training. All micro-batches are built before timing starts
(the data pipeline is not measured). Attention is the family's SDPA, which
dispatches to the device's fused (flash / memory-efficient) kernels where
it has them; bf16 is autocast with fp32 master weights and AdamW state.

tokens/s counts every LLM position (text, media placeholders) of the step's
micro-batches; MFU = family.flops_per_token() x tokens/s / peak FLOP/s, the
number training logs. Last lines: tokens_per_s=, mfu=, peak_mem_gib=.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

CONF = str(Path(__file__).resolve().parents[1] / "src" / "omnitrain" / "conf")

WORDS = "the a model trains on images audio and video frames while the pipeline keeps every stage busy".split()


def write_dataset(folder: Path, n: int, *, image_px: int, audio_s: float, words: int, seed: int = 0) -> None:
    """n conversations, each with one random image and audio clip, answers of varying length."""
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(seed)
    media = folder / "media"
    media.mkdir(parents=True)
    records = []
    for i in range(n):
        img = media / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (image_px, image_px, 3), dtype=np.uint8)).save(img)
        wav = media / f"{i}.wav"
        sf.write(wav, (0.1 * rng.standard_normal(int(16000 * audio_s))).astype(np.float32), 16000)
        k = int(words * (0.5 + rng.random()))  # answers from half to 1.5x `words` long
        answer = " ".join(rng.choice(WORDS, k))
        records.append(
            {
                "messages": [
                    {"role": "user", "content": "<image><audio>Describe the picture and the sound."},
                    {"role": "assistant", "content": answer},
                ],
                "images": [str(img)],
                "audios": [str(wav)],
            }
        )
    (folder / "synth.json").write_text(json.dumps(records))
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    info = {
        "synth": {
            "file_name": "synth.json",
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images", "audios": "audios"},
            "tags": tags,
        }
    }
    (folder / "dataset_info.json").write_text(json.dumps(info))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model config (default: qwen25_omni_3b; --smoke: qwen25_omni)")
    ap.add_argument("--smoke", action="store_true", help="tiny model and samples on CPU: checks the script, measures nothing")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5; --smoke 1)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 2; --smoke 0)")
    ap.add_argument("--micro-batches", type=int, default=None, help="micro-batches (of one sample) per step (default 4; --smoke 2)")
    ap.add_argument("--image-px", type=int, default=None, help="image side in pixels (default 448; --smoke 56)")
    ap.add_argument("--audio-s", type=float, default=None, help="audio seconds (default 10; --smoke 1)")
    ap.add_argument("--words", type=int, default=None, help="mean answer length in words (default 1200; --smoke 20)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s for MFU (default: device.py)")
    ap.add_argument("overrides", nargs="*", help="config overrides")
    a = ap.parse_args(argv)
    smoke = a.smoke
    model = a.model or ("qwen25_omni" if smoke else "qwen25_omni_3b")
    steps = a.steps if a.steps is not None else (1 if smoke else 5)
    warmup = a.warmup if a.warmup is not None else (0 if smoke else 2)
    image_px = a.image_px or (56 if smoke else 448)
    audio_s = a.audio_s or (1.0 if smoke else 10.0)
    words = a.words or (20 if smoke else 1200)

    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from omnitrain import device
    from omnitrain.config import register_configs
    from omnitrain.models.family import build_family
    from omnitrain.train.loop import Trainer

    total = warmup + steps
    m = a.micro_batches or (2 if smoke else 4)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp, "data")
        write_dataset(data, total * m, image_px=image_px, audio_s=audio_s, words=words)
        register_configs()
        overrides = [
            f"model={model}",
            f"train.device={'cpu' if smoke else 'auto'}",
            f"train.dtype={'fp32' if smoke else 'bf16'}",  # CPU bf16 kernels (conv3d) are slow, and nothing is measured
            f"train.steps={total}",
            f"train.global_batch_size={m}",
            "train.micro_batch_size=1",
            "train.progress=false",
            f"data.dataset_dir={data}",
            "data.dataset=synth",
            f"data.image_max_pixels={image_px * image_px}",
            f"data.cutoff_len={max(4096, 2 * words + 2048)}",
            *a.overrides,
        ]
        with initialize_config_dir(config_dir=CONF, version_base=None):
            cfg = compose("config", overrides=overrides)
        with open_dict(cfg):
            cfg.train.output_dir = str(Path(tmp, "run"))
        t0 = time.perf_counter()
        trainer = Trainer(cfg, build_family(cfg.model))
        build_s = time.perf_counter() - t0
        loader = iter(trainer.build_data())
        batches = [[next(loader) for _ in range(trainer.num_microbatches)] for _ in range(total)]

    dev = trainer.dev
    n_params = sum(p.numel() for p in trainer.params)
    print(
        f"model={model} ({n_params / 1e9:.2f} B params) on {dev} ({device.device_name(dev)}), {cfg.train.dtype}, "
        f"attention: {device.attention_kernels(dev)}; built in {build_s:.0f} s"
    )
    times, tokens = [], []
    for i, mbs in enumerate(batches):
        if i == warmup:
            device.reset_peak_memory(dev)  # the steady state's peak, not the first step's extra allocations
        res = trainer.train_step(mbs)  # ends with a device synchronize
        seq = [int(mb["attention_mask"].sum()) for mb in mbs]
        print(f"step {i + 1}: {res.step_time_s * 1e3:.0f} ms, loss {res.loss:.4f}, {sum(seq)} tokens (per sample {seq})")
        if i >= warmup:
            times.append(res.step_time_s)
            tokens.append(res.tokens)
    tps = sum(tokens) / sum(times)
    peak = a.peak_tflops * 1e12 if a.peak_tflops else device.peak_flops(dev)
    mfu = trainer.adapter.flops_per_token() * tps / peak if peak else 0.0
    mem = device.peak_memory_bytes(dev) / 2**30
    print(
        f"{steps} timed steps after {warmup}: median step {statistics.median(times) * 1e3:.0f} ms, "
        f"{tps:.0f} tokens/s, {trainer.adapter.flops_per_token() / 1e9:.1f} GFLOP per token, "
        f"peak {peak / 1e12:.0f} TFLOP/s" + ("" if peak else " (unknown: pass --peak-tflops; MFU shown as 0)")
    )
    print(f"tokens_per_s={tps:.1f}")
    print(f"mfu={mfu:.4f}")
    print(f"peak_mem_gib={mem:.2f}")
    return {"tokens_per_s": tps, "mfu": mfu, "peak_mem_gib": mem}


if __name__ == "__main__":
    main()
