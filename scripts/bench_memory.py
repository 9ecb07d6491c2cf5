"""Per-rank training-state memory of parallel layouts.

    python scripts/bench_memory.py                      # 7B thinker, meta device, no weights
    python scripts/bench_memory.py --model qwen25_omni_3b
    python scripts/bench_memory.py --measure            # also run the tiny model 1 step per layout

Arithmetic part: the thinker is built on the meta device; each rank's bytes
are its stage's parameters (parallel/layout.py's split), each divided by its
module's TP size when the adapter's TP plan shards it and by dp under FSDP,
times 16 B (fp32 weight + grad + AdamW exp_avg + exp_avg_sq). Activations
are not counted. The worst rank of each layout is printed (it sets the
memory a device needs).

--measure runs the tiny model (model=qwen25_omni) one step per layout on
this machine and prints, per rank, the training state it really holds
(bytes of its local parameter, gradient and optimizer-state tensors after the
step, shards only) and its peak memory (on CPU: peak RSS, dominated by the
Python process itself; on an accelerator: peak allocated bytes).
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from omnitrain.plan import BYTES_PER_PARAM_TRAIN, compose  # noqa: E402

# name -> (parallel config, overrides, tp per module); the last one is the
# layout this script argues for: pp4_hetero's split with the LLM on TP 2.
LAYOUTS = {
    "single": ["parallel=single"],
    "fsdp8": ["parallel=fsdp4", "parallel.dp=8", "train.global_batch_size=8"],
    "pp4_hetero": ["parallel=pp4_hetero"],
    # vision/audio dp 2 next to llm dp 1 x tp 2: micro-batches of 2 (MindSpeed-MM's rule, derived), global 8
    "pp4_tp2_hetero": ["parallel=pp4_tp2_hetero", "train.global_batch_size=8"],
}


def rank_bytes(cfg, family, model) -> list[tuple[int, int]]:
    """(pipeline rank, bytes) for one rank of every pipeline stage (ranks within a stage are equal up to rounding)."""
    from omnitrain.parallel.context import check_layout
    from omnitrain.parallel.mesh import Sizes
    from omnitrain.plan import rank_params

    sizes = Sizes.from_cfg(cfg, family.module_names)
    plans = check_layout(cfg, family)
    fsdp = {m: sizes.dp_of(m) for m in sizes.tp} if cfg.parallel.dp_mode == "fsdp" else None
    per_stage = rank_params(family, model, plans, sizes.tp, fsdp)
    out = []
    for rank in range(sizes.pp):  # a rank of an interleaved pipeline runs several stages
        n = sum(r for plan, r in zip(plans, per_stage) if plan.rank == rank)
        out.append((rank, int(n * BYTES_PER_PARAM_TRAIN)))
    return out


def _held_bytes(trainer) -> int:
    """Bytes of this rank's local parameter, gradient and optimizer-state tensors (shards only)."""

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    total = 0
    for p in trainer.params:
        # The step ends with zero_grad(set_to_none): a trainable parameter's
        # gradient (same shape as its local shard) is counted as it was held.
        total += local(p).numel() * local(p).element_size() * (2 if p.requires_grad else 1)
    for state in trainer.optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.dim() > 0:
                total += local(v).numel() * local(v).element_size()
    return total


def _report(out_dir: str, trainer) -> None:
    import json

    from omnitrain import device

    rank = trainer.ctx.rank if trainer.ctx else 0
    stage = trainer.ctx.pp_rank if trainer.ctx else 0
    row = {"rank": rank, "stage": stage, "held": _held_bytes(trainer), "peak": device.peak_memory_bytes(trainer.dev)}
    Path(out_dir, f"mem_{rank}.json").write_text(json.dumps(row))


def measure(name: str, overrides: list[str]) -> list[dict]:
    """Per rank: training state held and peak over one step of the tiny model."""
    import functools
    import json
    import tempfile

    from omnitrain import launch
    from omnitrain.parallel.context import check_layout, world_size_for
    from omnitrain.train.worker import worker

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose(["model=qwen25_omni", "train.steps=1", "train.progress=false", "parallel.timeout_s=300", *overrides])
        from omegaconf import open_dict

        with open_dict(cfg):
            cfg.train.output_dir = tmp
        check_layout(cfg)
        # Keep the optimizer state the step created: the report runs after the last step.
        launch.launch(worker, world_size_for(cfg), cfg, None, functools.partial(_report, tmp), timeout_s=600, layout=name)
        return sorted((json.loads(f.read_text()) for f in Path(tmp).glob("mem_*.json")), key=lambda r: r["rank"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen25_omni_7b")
    ap.add_argument("--measure", action="store_true", help="also run the tiny model one step per layout")
    args = ap.parse_args(argv)
    from omnitrain.models.family import build_family

    print(f"model={args.model}: parameter + gradient + AdamW bytes per rank (fp32, 16 B/param; no activations)")
    print(f"{'layout':<16} {'ranks':>5} {'worst rank GiB':>15}  per stage GiB")
    for name, overrides in LAYOUTS.items():
        cfg = compose([f"model={args.model}", *overrides])
        adapter = build_family(cfg.model)
        model = adapter.build_meta()
        from omnitrain.parallel.mesh import Sizes

        per = rank_bytes(cfg, adapter, model)
        worst = max(b for _, b in per)
        stages = " ".join(f"{b / 2**30:.1f}" for _, b in per)
        print(f"{name:<16} {Sizes.from_cfg(cfg, adapter.module_names).world:>5} {worst / 2**30:>15.2f}  [{stages}]")
    if args.measure:
        print("\nmeasured, tiny model (model=qwen25_omni), one step: per rank, training state held "
              "(local params + grads + optimizer state) and peak memory")
        print(f"{'layout':<16} {'ranks':>5} {'worst held MiB':>15} {'worst peak GiB':>15}  held MiB per rank")
        for name, overrides in LAYOUTS.items():
            rows = measure(name, overrides)
            held = " ".join(f"{r['held'] / 2**20:.1f}" for r in rows)
            print(
                f"{name:<16} {len(rows):>5} {max(r['held'] for r in rows) / 2**20:>15.1f} "
                f"{max(r['peak'] for r in rows) / 2**30:>15.2f}  [{held}]",
                flush=True,
            )

if __name__ == "__main__":
    main()
