"""Overhead of omnitrain's single-process training step over a plain PyTorch loop.

Both sides train the same tiny Qwen2.5-Omni thinker (same initial weights) on
the same pre-collated demo micro-batches with the same AdamW, LR schedule,
gradient clipping and accumulation. The plain side calls HF's monolithic
forward; omnitrain's side runs `Trainer.train_step` (segment forward, global
label-token normalisation, metrics bookkeeping). Steps are interleaved, one
of each in turn, so machine noise hits both alike.

    python scripts/bench_overhead.py [--steps 12] [overrides...]
prints per-side median step time and `overhead_ratio=<omnitrain / plain>`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CONF = str(Path(__file__).resolve().parents[1] / "src" / "omnitrain" / "conf")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from omnitrain.config import register_configs
    from omnitrain.models.family import build_family
    from omnitrain.train.loop import Trainer
    from omnitrain.train.optim import build_optimizer, build_scheduler

    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = compose("config", overrides=["train.device=cpu", "train.global_batch_size=2", *args.overrides])
    with open_dict(cfg):
        cfg.train.output_dir = "/tmp/omnitrain_bench_overhead"
    total = args.warmup + args.steps
    with open_dict(cfg):
        cfg.train.steps = total

    trainer = Trainer(cfg, build_family(cfg.model))
    loader = iter(trainer.build_data())
    steps = [[next(loader) for _ in range(trainer.num_microbatches)] for _ in range(total)]

    # The plain side: the same weights and buffers (same seeded build), HF's own forward.
    plain = trainer.adapter.build(trainer.plans, trainer.dev, cfg.train.seed)
    opt = build_optimizer(plain.parameters(), cfg.optim.optimizer)
    sched = build_scheduler(opt, cfg.optim.scheduler, total)
    clip = cfg.optim.grad_clip

    losses = {"omni": [], "plain": []}

    def plain_step(mbs):
        t0 = time.perf_counter()
        step_loss = 0.0
        n = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in mbs)
        for mb in mbs:
            kw = {k: v for k, v in mb.items() if k not in ("labels", "use_audio_in_video")}
            logits = plain(**kw, use_audio_in_video=bool(mb["use_audio_in_video"].any())).logits
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), mb["labels"][:, 1:].reshape(-1), reduction="sum"
            ) / n
            loss.backward()
            step_loss += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(plain.parameters(), clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        losses["plain"].append(step_loss)
        return dt

    def omni_step(mbs):
        t0 = time.perf_counter()
        res = trainer.train_step(mbs)
        dt = time.perf_counter() - t0
        losses["omni"].append(res.loss)
        return dt

    t_omni, t_plain = [], []
    for i, mbs in enumerate(steps):
        # Alternate which side goes first so neither always runs on a warm cache.
        pair = (omni_step(mbs), plain_step(mbs)) if i % 2 == 0 else tuple(reversed((plain_step(mbs), omni_step(mbs))))
        if i >= args.warmup:
            t_omni.append(pair[0])
            t_plain.append(pair[1])
    mo, mp = statistics.median(t_omni), statistics.median(t_plain)
    ratios = [a / b for a, b in zip(t_omni, t_plain)]
    print(f"steps={args.steps} micro_batches_per_step={trainer.num_microbatches}")
    print(f"omnitrain_step_s={mo:.4f} plain_step_s={mp:.4f}")
    print(f"per_step_ratio_median={statistics.median(ratios):.4f}")
    # Same work on both sides: the two models see the same data and weights,
    # so their losses agree step by step.
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses["omni"], losses["plain"]))
    print(f"max_loss_rel_diff={worst:.2e}")
    if worst > 1e-5:
        print("losses omnitrain:", losses["omni"])
        print("losses plain:    ", losses["plain"])
    print(f"overhead_ratio={mo / mp:.4f}")


if __name__ == "__main__":
    main()
