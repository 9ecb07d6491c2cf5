"""`plan.calibrate=true`: time each layer type on this machine's device and
fit the cost model to it.

The configured model is built on the device (so this is for models that fit
one device: the tiny ones on CPU, a 7B-class on an accelerator) and a few
real micro-batches of the data config run through it as a chain of
one-segment "stages" (a module's pre part, one layer, its post part), each
forward on detached inputs and each backward from its successor's input
grads, exactly as the pipeline executor runs a stage. A second chain takes
the layers two at a time. Every timed call is one observation

    t = call[module] + sum over its segments (c[type] + a[type] x FLOPs)

(per module the set-up a stage pays once: positions, masks, window
indices; per layer type a fixed cost and a cost per FLOP), solved by
non-negative least squares, forward and backward separately; each segment's
time is the faster of two runs. Threads are
set as a worker of the configured layout gets them (launch._worker_threads).
"""

from __future__ import annotations

import numpy as np
import torch

from omnitrain.plan.cost import CostModel, Fit, Load, Roofline, sample_load

WARMUP = 1
BATCHES = 3
REPEATS = 2


def _chains(family) -> list[list]:
    """Segment plans: singles, then layers in pairs."""
    from omnitrain.parallel.layout import StagePlan

    mods = family.module_names
    depths = family.depths

    def plan(module, lo=0, hi=0, pre=False, post=False):
        layers = {m: range(0) for m in mods}
        layers[module] = range(lo, hi)
        return StagePlan(0, 0, 1, layers, frozenset([module] if pre else []), frozenset([module] if post else []), family.decoder)

    out = []
    for step in (1, 2):
        chain = []
        for m in mods:
            if not depths[m]:
                continue
            chain.append(plan(m, pre=True))
            for lo in range(0, depths[m], step):
                chain.append(plan(m, lo, min(lo + step, depths[m])))
            chain.append(plan(m, post=True))
        out.append(chain)
    return out


def _keys(plan, family) -> list[tuple]:
    out = []
    for m in family.module_names:
        if m in plan.pre:
            out.append((m, "pre", -1))
        out += [(m, "layer", i) for i in plan.layers[m]]
        if m in plan.post:
            out.append((m, "post", -1))
    return out


def _run_chain(family, model, chain, mb, n_label, dev, dtype):
    from omnitrain import device

    sync = lambda: device.synchronize(dev)  # noqa: E731
    clock = device.compute_clock(dev)  # the executor's clock (run_pipeline), so prediction and measurement compare
    out, saved, fwd, bwd = {}, [], [], []
    for sp in chain:
        inputs = {k: v.detach().requires_grad_(v.requires_grad) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in out.items()}
        sync()
        t0 = clock()
        with device.autocast(dev, dtype):
            res = family.stage_forward(model, sp, mb, inputs, n_label)
        sync()
        fwd.append(clock() - t0)
        saved.append((inputs, res))
        out = res if isinstance(res, dict) else {}
    grads = None
    for inputs, res in reversed(saved):
        sync()
        t0 = clock()
        if torch.is_tensor(res):
            res.backward()
        else:
            pairs = [(res[k], g) for k, g in (grads or {}).items() if k in res and res[k].requires_grad]
            if pairs:
                torch.autograd.backward([p for p, _ in pairs], [g for _, g in pairs])
        sync()
        bwd.append(clock() - t0)
        grads = {k: (v.grad if v.grad is not None else torch.zeros_like(v)) for k, v in inputs.items() if torch.is_tensor(v) and v.requires_grad}
    # Zeroed, not freed: a stage's later micro-batches add into allocated grads
    # (freeing them made every timed backward pay the first micro-batch's allocation).
    model.zero_grad(set_to_none=False)
    return fwd, bwd[::-1]


def _pick(family, it, dev, max_draws: int = 16) -> list[dict]:
    """A warm-up micro-batch, then micro-batches from the data order until every
    media kind of the family was seen (at least BATCHES): a layer type the
    chosen micro-batches never run would be fitted as free."""
    from omnitrain.models.family import MEDIA

    out = [next(it)]
    seen = dict.fromkeys(family.media_kinds(), 0)
    for _ in range(max_draws):
        mb = next(it)
        new = [k for k in seen if MEDIA[k].trigger in mb and not seen[k]]
        if new or len(out) <= BATCHES and all(seen.values()):
            out.append(mb)
            for k in seen:
                seen[k] += MEDIA[k].trigger in mb
        if all(seen.values()) and len(out) > BATCHES:
            break
    return [{k: v.to(dev) if torch.is_tensor(v) else v for k, v in mb.items()} for mb in out]


def _mb_load(family, mb) -> dict:
    grids = {k: int(mb[f"{k}_grid_thw"].shape[0]) for k in ("image", "video") if f"{k}_grid_thw" in mb}
    audio = int(mb["feature_attention_mask"].shape[0]) if "feature_attention_mask" in mb else 0
    return sample_load(family, mb["input_ids"], grids, audio)


def calibrate(cfg, family) -> Fit:
    from scipy.optimize import nnls

    from omnitrain import device, launch
    from omnitrain.data import build_loader, load_processor
    from omnitrain.parallel.context import world_size_for
    from omnitrain.parallel.layout import whole_plan
    from omnitrain.plan.layout import segments_for

    info = device.detect(cfg.train.device)
    dev = info.torch_device(device.local_rank())
    threads_before = torch.get_num_threads()
    try:
        world = world_size_for(cfg, family) if cfg.parallel.name != "auto" else 1
    except Exception:
        world = 1
    threads = launch._worker_threads(world) if world > 1 else 0
    dtype = {"fp32": None, "bf16": torch.bfloat16}[cfg.train.dtype]
    micro = int(cfg.train.micro_batch_size)
    model = family.build([whole_plan(family.depths)], dev, int(cfg.train.seed))
    loader = build_loader(cfg.data, family, load_processor(cfg.model), seed=int(cfg.train.seed), micro_batch_size=micro,
                          global_batch_size=micro, dp_rank=0, dp_size=1)
    segs = segments_for(cfg)
    types = sorted({s.type for s in segs})
    mods = list(family.module_names)
    chains = _chains(family)
    rows_f, rows_b, ys_f, ys_b = [], [], [], []
    it = iter(loader)
    try:
        if threads:
            torch.set_num_threads(threads)
        for i, mb in enumerate(_pick(family, it, dev)):
            n_label = max(family.count_label_tokens(mb), 1)
            cm = CostModel(family, segs, Load(_mb_load(family, mb), "micro-batch"), micro=1, dtype_bytes=4,
                           time_model=Roofline(1.0, 1.0, 1.0, 1.0))
            for chain in chains:
                if i < WARMUP:
                    _run_chain(family, model, chain, mb, n_label, dev, dtype)
                    continue
                # the mean of REPEATS runs per segment, as a run's per-step sums average them
                runs = [_run_chain(family, model, chain, mb, n_label, dev, dtype) for _ in range(REPEATS)]
                fwd = [sum(r[0][j] for r in runs) / REPEATS for j in range(len(chain))]
                bwd = [sum(r[1][j] for r in runs) / REPEATS for j in range(len(chain))]
                for sp, tf, tb in zip(chain, fwd, bwd):
                    row = np.zeros(len(mods) + 2 * len(types))
                    row[mods.index(next(m for m in mods if sp.has(m)))] = 1.0
                    for k in _keys(sp, family):
                        seg = next(s for s in segs if CostModel.key(s) == k)
                        j = len(mods) + 2 * types.index(seg.type)
                        row[j] += 1.0
                        row[j + 1] += cm.flops[k] / 3  # forward FLOPs
                    rows_f.append(row)
                    rows_b.append(row)
                    ys_f.append(tf)
                    ys_b.append(tb)
    finally:
        torch.set_num_threads(threads_before)
    fits = []
    for rows, ys in ((rows_f, ys_f), (rows_b, ys_b)):
        X, y = np.array(rows), np.array(ys)
        scale = np.maximum(np.abs(X).max(axis=0), 1e-30)
        coef, _ = nnls(X / scale, y)
        coef = coef / scale
        err = float(np.abs(X @ coef - y).sum() / max(y.sum(), 1e-30))
        fits.append((coef, err))
    (cf, ef), (cb, eb) = fits

    def per_type(coef, mult):
        return {t: (float(coef[len(mods) + 2 * i]), float(coef[len(mods) + 2 * i + 1]) / mult) for i, t in enumerate(types)}

    where = (
        f"{info.type}, {threads or threads_before} threads, {len(ys_f) // sum(len(c) for c in chains)} micro-batches of data={cfg.data.name} x {len(chains)} chains, "
        f"{len(types)} layer types; fit error fwd {ef:.1%}, bwd {eb:.1%}"
    )
    return Fit(
        fwd=per_type(cf, 1.0), bwd=per_type(cb, 2.0),  # the cost model passes 2 x forward FLOPs to backward
        call_fwd={m: float(cf[i]) for i, m in enumerate(mods)}, call_bwd={m: float(cb[i]) for i, m in enumerate(mods)},
        where=where,
    )
