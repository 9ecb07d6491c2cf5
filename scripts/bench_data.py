"""Data pipeline throughput on the LLaMA-Factory demo set.

Compares, in samples/s (median of --repeats runs, each over --epochs epochs):
  naive    HF Qwen2.5-Omni processor on freshly decoded media per sample,
           each video decoded twice (as LLaMA-Factory does)
  omnitrain  build_loader, no cache
  warm     build_loader reading a cache filled by a previous run
and prints how many times each media file was decoded per use.

    python scripts/bench_data.py [--epochs 2] [--repeats 3] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from omnitrain.data import build_loader, load_processor  # noqa: E402
from omnitrain.data.config import DataConfig  # noqa: E402
from omnitrain.data.formats import PLACEHOLDER_RE  # noqa: E402
from omnitrain.data.media import load_audio, load_image, load_video  # noqa: E402
from omnitrain.paths import resolve  # noqa: E402

NAMES = ["mllm_demo", "mllm_audio_demo", "mllm_video_demo", "mllm_video_audio_demo"]


def data_cfg(**kw):
    cfg = OmegaConf.structured(DataConfig)
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def demo_records(folder: Path):
    out = []
    for name in NAMES:
        out += json.loads((folder / f"{name}.json").read_text())
    return out


def naive_epoch(proc, records, folder: Path, cfg, decodes: Counter) -> int:
    """What a plain loop does: decode, then hand everything to the HF processor."""
    for rec in records:
        images, videos, audios, messages = [], [], [], []
        it = {k: iter(rec.get(k + "s", [])) for k in ("image", "video", "audio")}
        for m in rec["messages"]:
            content = []
            for k, part in enumerate(PLACEHOLDER_RE.split(m["content"])):
                if k % 2 == 0:
                    if part:
                        content.append({"type": "text", "text": part})
                    continue
                kind = part[1:-1]
                path = str(folder / next(it[kind]))
                content.append({"type": kind})
                if kind == "image":
                    images.append(load_image(path))
                    decodes[path] += 1
                elif kind == "video":
                    # once for metadata / frame count, once for the frames
                    load_video(path, fps=cfg.video_fps, max_frames=cfg.video_max_frames)
                    videos.append(load_video(path, fps=cfg.video_fps, max_frames=cfg.video_max_frames).frames)
                    decodes[path] += 2
                else:
                    audios.append(load_audio(path, 16000))
                    decodes[path] += 1
            messages.append({"role": m["role"], "content": content})
        text = proc.apply_chat_template(messages, tokenize=False)
        proc(
            text=[text],
            images=images or None,
            videos=videos or None,
            audio=audios or None,
            images_kwargs={"size": {"shortest_edge": cfg.image_min_pixels, "longest_edge": cfg.image_max_pixels}},
            videos_kwargs={
                "size": {"shortest_edge": cfg.video_min_pixels, "longest_edge": cfg.video_max_pixels},
                "do_sample_frames": False,
                "cap_pixels_per_frame": False,
            },
            audio_kwargs={"sampling_rate": 16000},
            return_tensors="pt",
        )
    return len(records)


def loader_epochs(cfg, model_cfg, proc, epochs: int):
    loader = build_loader(cfg, model_cfg, proc, seed=0, micro_batch_size=1, global_batch_size=1)
    n = loader.epoch_len * epochs
    it = iter(loader)
    t = time.perf_counter()
    for _ in range(n):
        next(it)
    return n / (time.perf_counter() - t), loader.stats()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    folder = resolve("builtin:demo")
    from omnitrain.models.family import build_family
    from omnitrain.plan import compose

    model_cfg = build_family(compose(["model=qwen25_omni"]).model)  # the family: processor, chat tokens, transform
    proc = load_processor(model_cfg)
    cfg = data_cfg(dataset_dir=str(folder), dataset=",".join(NAMES), num_workers=args.workers)
    records = demo_records(folder)

    naive_epoch(proc, records[:1], folder, cfg, Counter())  # warm imports
    naive_rates, naive_decodes = [], Counter()
    for _ in range(args.repeats):
        decodes = Counter()
        t = time.perf_counter()
        n = sum(naive_epoch(proc, records, folder, cfg, decodes) for _ in range(args.epochs))
        naive_rates.append(n / (time.perf_counter() - t))
        naive_decodes = decodes

    omni_rates, stats = [], None
    for _ in range(args.repeats):
        rate, stats = loader_epochs(cfg, model_cfg, proc, args.epochs)
        omni_rates.append(rate)

    with tempfile.TemporaryDirectory() as tmp:
        cached = data_cfg(dataset_dir=str(folder), dataset=",".join(NAMES), num_workers=args.workers, cache_dir=tmp)
        loader_epochs(cached, model_cfg, proc, 1)  # fill the cache
        warm_rates, warm_stats = [], None
        for _ in range(args.repeats):
            rate, warm_stats = loader_epochs(cached, model_cfg, proc, args.epochs)
            warm_rates.append(rate)

    # The naive loop again with one intra-op thread (what omnitrain uses per sample),
    # to show how much of the gain is threading alone.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    naive1_rates = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        n = sum(naive_epoch(proc, records, folder, cfg, Counter()) for _ in range(args.epochs))
        naive1_rates.append(n / (time.perf_counter() - t))
    torch.set_num_threads(threads)

    naive, omni, warm, naive1 = (statistics.median(r) for r in (naive_rates, omni_rates, warm_rates, naive1_rates))
    uses = Counter()
    for rec in records:
        for k in ("images", "videos", "audios"):
            for p in set(rec.get(k, [])):
                uses[str(folder / p)] += args.epochs
    print(
        f"demo set: {len(records)} samples, {args.epochs} epochs x {args.repeats} repeats, "
        f"workers={args.workers}, torch threads={threads}"
    )
    print(f"naive loop (HF processor, video decoded twice): {naive:8.2f} samples/s")
    print(f"naive loop, 1 intra-op thread:                  {naive1:8.2f} samples/s")
    print(f"omnitrain loader:                               {omni:8.2f} samples/s  ratio {omni / naive:5.2f} (target >= 1.5)")
    print(f"omnitrain loader, warm cache:                   {warm:8.2f} samples/s  ratio {warm / naive:5.2f} (target >= 5)")
    print(f"warm cache: {warm_stats['cache_hits']} hits, {sum(warm_stats['decodes'].values())} decodes")
    print("decodes per use of each media file (one run):  naive  omnitrain")
    for path in sorted(uses):
        name = Path(path).name
        print(f"  {name:<8} used {uses[path]:>2}x   {naive_decodes[path] / uses[path]:5.2f}  {stats['decodes'].get(path, 0) / uses[path]:9.2f}")


if __name__ == "__main__":
    main()
