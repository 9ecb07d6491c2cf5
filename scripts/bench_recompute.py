"""Peak memory of one forward+backward with activation recompute off, full and
selective on every module (train.recompute.<m>), on the tiny model.

    python scripts/bench_recompute.py                  # model=qwen25_omni, one image+audio+text micro-batch
    python scripts/bench_recompute.py model=qwen25_vl   # any overrides

Prints per mode the loss, the largest relative gradient difference from
`none`, and the peak bytes allocated during the step: on an accelerator the
device's peak allocated bytes; on CPU the peak of torch's CPU allocations as
the profiler's memory events record them (RSS would be dominated by the
Python process). Ratios are printed, not asserted.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402


def cpu_peak_bytes(fn) -> tuple[object, int]:
    """(fn(), peak bytes of live CPU tensors above the start while fn ran)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    # Each allocation and free is counted once, by the innermost op it happened
    # in (its self usage) or as a bare "[memory]" event, at that op's start.
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    cur = peak = 0
    for e in events:
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return out, peak


def saved_bytes(fn, model) -> tuple[object, int]:
    """(fn(), bytes of the distinct non-parameter tensors autograd saved for
    backward outside recomputed regions): the activations a step holds until
    its backward. Exact for none and full; selective keeps its saved op
    outputs in its own cache, which this does not see (the profiler's peak does)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def measure(overrides=(), modes=("none", "full", "selective"), batch=None, peak_modes=None, meter=None):
    """{mode: (loss, {name: grad}, peak bytes)} for one micro-batch, recompute on
    every module; peak None for modes not in `peak_modes` (default: all; the
    CPU profiler costs seconds per step); `meter(step) -> (loss, bytes)` replaces
    the peak measurement (e.g. `saved_bytes`); `meter(step, model) -> (loss, bytes)`."""
    import _synth
    from conftest import compose_cfg
    from omnitrain import device
    from omnitrain.models.family import build_family
    from omnitrain.parallel.layout import whole_plan
    from omnitrain.train import recompute

    mb = batch or _synth.collate([_synth.sample(1, image=(1, 8, 8), audio=480, text=200)])
    out = {}
    for mode in modes:
        cfg = compose_cfg([*overrides, *(f"train.recompute.{m}={mode}" for m in ("vision", "audio", "llm"))])
        fam = build_family(cfg.model)
        modules = set(fam.module_names)
        cfg.train.recompute = {m: v for m, v in cfg.train.recompute.items() if m in modules}
        dev = device.detect(cfg.train.device).torch_device()
        model = fam.build(whole_plan(fam.depths), dev, cfg.train.seed)
        recompute.apply(model, fam, [whole_plan(fam.depths)], cfg.train)
        batch_dev = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in mb.items()}
        n = fam.count_label_tokens(batch_dev)

        def step():
            loss = fam.stage_forward(model, whole_plan(fam.depths), batch_dev, {}, n)
            loss.backward()
            return float(loss.detach())

        if peak_modes is not None and mode not in peak_modes:
            loss, peak = step(), None
        elif meter is not None:
            loss, peak = meter(step, model)
        elif device.is_cpu(dev):
            loss, peak = cpu_peak_bytes(step)
        else:
            device.synchronize(dev)
            device.reset_peak_memory(dev)
            base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
            loss = step()
            device.synchronize(dev)
            peak = device.peak_memory_bytes(dev) - base
        grads = {k: p.grad.detach().cpu().clone() for k, p in model.named_parameters() if p.grad is not None}
        out[mode] = (loss, grads, peak)
    return out


def main(argv):
    res = measure(argv)
    ref_loss, ref_grads, ref_peak = res["none"]
    for mode, (loss, grads, peak) in res.items():
        worst = max(float((grads[k] - g).norm() / g.norm().clamp_min(1e-30)) for k, g in ref_grads.items())
        print(f"{mode:10s} loss {loss:.6f}  max rel grad diff {worst:.2e}  peak {peak / 2**20:8.2f} MiB  ({peak / ref_peak:.2f} x none)")


if __name__ == "__main__":
    main(sys.argv[1:])
