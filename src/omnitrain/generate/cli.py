"""Command-line options shared by `omnitrain.generate` and `omnitrain.eval`."""

from __future__ import annotations

import argparse

from omnitrain.generate import GenOptions


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a checkpoint (step dir, checkpoints/ or run dir: any layout) or an HF folder")
    p.add_argument("--processor", help="processor folder or builtin:<name> (default: the run's model.processor, or the HF folder's)")
    p.add_argument("--config", help="the run's config.yaml (default: next to the checkpoint)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    from omnitrain import device

    p.add_argument("--device", choices=("auto", *device._BACKENDS), default="auto", help="auto: the accelerator there is, else the CPU")
    p.add_argument("-o", "--data-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a data setting for building prompts (data group keys: image_max_pixels, video_fps, cutoff_len, system, ...); repeatable")
    g = p.add_argument_group("generation (transformers' generate)")
    g.add_argument("--max-new-tokens", type=int, default=GenOptions.max_new_tokens)
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=GenOptions.temperature)
    g.add_argument("--top-p", type=float, default=GenOptions.top_p)
    g.add_argument("--top-k", type=int, default=GenOptions.top_k)
    g.add_argument("--num-beams", type=int, default=GenOptions.num_beams)
    g.add_argument("--seed", type=int, default=GenOptions.seed, help="sampling seed (each batch draws from (seed, batch number))")
    g.add_argument("--batch-size", type=int, default=1, help="prompts per generate call (left-padded)")
    g.add_argument("--nproc", type=int, default=1, help="data-parallel ranks started here (under torchrun: its world)")


def gen_options(args) -> GenOptions:
    return GenOptions(
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, num_beams=args.num_beams, seed=args.seed,
    )


def load_kwargs(args) -> dict:
    return dict(processor=args.processor, config=args.config, dtype=args.dtype, device=args.device, data_options=list(args.data_option))


def is_writer() -> bool:
    """Whether this process writes results (rank 0, or the only one)."""
    import os

    return int(os.environ.get("RANK", "0")) == 0
