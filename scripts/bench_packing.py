"""What sequence packing saves on the demo mix: LLM positions computed per
label token and samples/s of the whole training step, unpacked vs packed.

Two single-process trainers with the same seed (same initial weights) train
on the same micro-batches of the demo mix (`data=demo_mix`, the tiny
Qwen2.5-Omni thinker by default), one with `data.packing=true`. Data is
loaded up front (not timed); steps are interleaved, one of each in turn, so
machine noise hits both alike; the step time is `Trainer.train_step`'s
(forward, backward, optimizer). The two sides' losses must agree (packing
changes no number beyond rounding).

    python scripts/bench_packing.py [--steps 6] [--micro 4] [overrides...]
last line: `packing_speedup=<packed samples/s over unpacked>`.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

CONF = str(Path(__file__).resolve().parents[1] / "src" / "omnitrain" / "conf")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--micro", type=int, default=4, help="samples per micro-batch (packing packs within one)")
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from omnitrain.config import register_configs
    from omnitrain.data.packing import computed_tokens
    from omnitrain.models.family import build_family
    from omnitrain.train.loop import Trainer

    register_configs()
    total = args.warmup + args.steps
    base = [
        "data=demo_mix", "train.device=cpu", f"train.steps={total}", f"train.global_batch_size={args.global_batch}",
        f"train.micro_batch_size={args.micro}", f"data.max_tokens={args.max_tokens}",
    ]
    sides = {}
    for name, packed in (("unpacked", False), ("packed", True)):
        with initialize_config_dir(config_dir=CONF, version_base=None):
            cfg = compose("config", overrides=[*base, f"data.packing={str(packed).lower()}", *args.overrides])
        with open_dict(cfg):
            cfg.train.output_dir = f"/tmp/omnitrain_bench_packing/{name}"
        trainer = Trainer(cfg, build_family(cfg.model))
        it = iter(trainer.build_data())
        steps = [[next(it) for _ in range(trainer.num_microbatches)] for _ in range(total)]
        sides[name] = (trainer, steps)

    times = {n: [] for n in sides}
    losses = {n: [] for n in sides}
    for k in range(total):
        for name, (trainer, steps) in sides.items():
            res = trainer.train_step(steps[k])
            losses[name].append(res.loss)
            if k >= args.warmup:
                times[name].append(res.step_time_s)

    samples_per_step = args.global_batch
    rate = {}
    for name, (trainer, steps) in sides.items():
        mbs = [mb for s in steps for mb in s]
        computed = sum(computed_tokens(mb)[0] for mb in mbs)
        real = sum(int(mb["attention_mask"].sum()) for mb in mbs)
        labels = sum(trainer.adapter.count_label_tokens(mb) for mb in mbs)
        rows = sum(int(mb["input_ids"].shape[0]) for mb in mbs)
        rate[name] = samples_per_step / statistics.median(times[name])
        print(
            f"{name:9s} rows/step {rows / total:5.2f}  LLM positions/label token {computed / labels:6.2f}  "
            f"padding {1 - real / computed:6.1%}  median step {statistics.median(times[name]):6.3f} s  "
            f"{rate[name]:6.2f} samples/s"
        )
        print(f"llm_tokens_per_label_{name}={computed / labels:.3f}")
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses["packed"], losses["unpacked"]))
    print(f"loss rel diff packed vs unpacked (max over {total} steps): {worst:.1e}")
    if worst > 1e-4:
        raise SystemExit(f"packed and unpacked losses differ by {worst:.1e}: packing changed the numbers")
    print(f"packing_speedup={rate['packed'] / rate['unpacked']:.3f}")


if __name__ == "__main__":
    main()
