#!/usr/bin/env python
"""Grouped expert matmuls vs the per-expert loop, forward + backward of one
MoE experts block, from one run: transformers' experts implementations
(`config._experts_implementation`: "eager" = HF's loop over hit experts,
"grouped_mm" = torch's grouped GEMM, or transformers' fallback where torch has
none for the device / dtype) on the tiny qwen3_omni layer and on one
Qwen3-Omni-30B-A3B-shaped layer (128 experts of 768, top-8, hidden 2048).

    python scripts/bench_moe.py [--tokens 512] [--repeat 3] [--tokens-30b 64] [--repeat-30b 1] [--weight-grads-30b]
    python scripts/bench_moe.py --device cuda --dtype bf16 --tokens-30b 4096 --repeat-30b 3 --weight-grads-30b

The 30B-shaped layer holds 604 M expert weights (2.4 GB fp32): its default is
64 tokens (512 routed rows, ~4 per expert), one timed run after the warm-up,
and its backward goes to the input only (frozen experts, what every layer
below the last trainable one runs). With weight grads HF's loop indexes
`gate_up_proj[e]` per hit expert, and each index's backward writes a whole
(E, 2I, H) zero gradient (1.6 GB) before adding its slice: on a 2-core CPU
that alone ran past 10 minutes; `--weight-grads-30b` times it anyway.
"""

from __future__ import annotations

import argparse
import time

import torch


def make(hidden, inter, experts, top_k, tokens, impl, seed=0, weight_grads=True, dev=None, dtype=torch.float32):
    from transformers import Qwen3OmniMoeTextConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextSparseMoeBlock

    cfg = Qwen3OmniMoeTextConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts, num_experts_per_tok=top_k)
    cfg._experts_implementation = impl
    torch.manual_seed(seed)
    block = Qwen3OmniMoeThinkerTextSparseMoeBlock(cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
        p.requires_grad_(weight_grads)
    x = torch.randn(1, tokens, hidden)
    return block.to(dev, dtype), x.to(dev, dtype)


def time_block(block, x, repeat, sync=lambda: None):
    best = float("inf")
    for _ in range(repeat + 1):  # first run warms up
        xx = x.clone().requires_grad_(True)
        sync()
        t = time.perf_counter()
        block(xx).sum().backward()
        sync()  # an accelerator runs the kernels asynchronously
        best = min(best, time.perf_counter() - t)
        block.zero_grad(set_to_none=True)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tokens-30b", type=int, default=64)
    ap.add_argument("--repeat-30b", type=int, default=1)
    ap.add_argument("--weight-grads-30b", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, npu or auto (omnitrain.device)")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    args = ap.parse_args()
    from omnitrain import device

    dev = device.detect(args.device).torch_device()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    print(f"device {dev}, {args.dtype}")
    w30 = "weight + input grads" if args.weight_grads_30b else "input grads only"
    shapes = {
        "tiny qwen3_omni (E8 k2 H64 I32), weight + input grads": ((64, 32, 8, 2), args.tokens, args.repeat, True),
        f"30B-A3B layer (E128 k8 H2048 I768), {w30}": ((2048, 768, 128, 8), args.tokens_30b, args.repeat_30b, args.weight_grads_30b),
    }
    for name, ((h, i, e, k), tokens, repeat, wg) in shapes.items():
        times = {}
        outs = {}
        for impl in ("eager", "grouped_mm"):
            block, x = make(h, i, e, k, tokens, impl, weight_grads=wg, dev=dev, dtype=dtype)
            with torch.no_grad():
                outs[impl] = block(x).float()
            times[impl] = time_block(block, x, repeat, sync=lambda: device.synchronize(dev))
            del block
        diff = float((outs["eager"] - outs["grouped_mm"]).abs().max())
        print(f"{name}, {tokens} tokens: loop {times['eager'] * 1e3:.1f} ms, grouped {times['grouped_mm'] * 1e3:.1f} ms, "
              f"loop/grouped {times['eager'] / times['grouped_mm']:.2f}x (max |diff| {diff:.1e})")


if __name__ == "__main__":
    main()
