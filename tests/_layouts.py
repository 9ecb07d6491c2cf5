"""Run one layout through the real launch and training loop on synthetic data
and collect what parity tests compare: per-step losses, grad norms and every
rank's final parameters (sharded DTensors gathered to full tensors)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

import _synth
from conftest import compose_cfg
from omnitrain import launch
from omnitrain.models.family import build_family
from omnitrain.parallel.context import check_layout, world_size_for
from omnitrain.train.worker import worker

# Adam's step for an element is m / (sqrt(v) + eps). Where |grad| << eps the
# step is ~ lr * grad / eps, so an absolute gradient difference d (rounding
# from another, equally valid summation order: ~1e-11 for the bias gradients
# that nearly cancel, like key biases, whose gradient is zero without rope)
# becomes a parameter difference lr * d / eps. With torch's default 1e-8 that
# turns noise into lr-sized steps; 1e-6 still left LLM biases 2e-5 off per
# tensor under TP (row-parallel layers add partial sums), 1e-5 leaves < 5e-6.
# It stays far below the tiny model's typical gradient (rms ~6e-4), so Adam
# is still sign-like where gradients are real. The comparison is about the
# layout, not about amplified noise.
EPS = 1e-5


def _loader(dp_rank, dp_size, *, global_batch, micro, kinds=None):
    return _synth.SynthLoader(global_batch_size=global_batch, micro_batch_size=micro, dp_rank=dp_rank, dp_size=dp_size, kinds=kinds)


def _save_params(path, trainer):
    """Every rank saves its parameters: plain tensors whole; a sharded (DTensor)
    one as its local shard plus the global (flat) index of each local element
    and the ranks of its mesh, from which `_load_params` rebuilds the full
    tensor. No collective: gathering each of ~1300 DTensors with full_tensor()
    cost ~5 ms apiece on gloo (7 s of a 4-process run on 2 cores)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    local = {}
    for n, p in trainer.adapter.local_parameters(trainer.model):
        t = p.detach()
        if isinstance(t, DTensor):
            # The same placements applied to the global indices, locally
            # (src_data_rank=None: split only, no communication).
            idx = torch.arange(t.numel()).reshape(t.shape)
            where = distribute_tensor(idx, t.device_mesh, t.placements, src_data_rank=None).to_local()
            value = t.to_local()
            assert where.shape == value.shape, (n, where.shape, value.shape, t.placements)
            local[n] = {"shape": tuple(t.shape), "ranks": t.device_mesh.mesh.flatten().tolist(), "index": where.clone(), "value": value.clone()}
        else:
            local[n] = t.clone()
    torch.save(local, f"{path}/params_{trainer.ctx.rank if trainer.ctx else 0}.pt")


def _load_params(out: Path) -> dict:
    """{name: full tensor} from the ranks' files; where several ranks hold a
    parameter, the last file's (as a dict update), a sharded one assembled
    from the shards of that file's mesh (its own shard written last): what
    that rank's full_tensor() would have returned. Every element must be
    covered."""
    files = {int(f.stem.split("_")[1]): torch.load(f) for f in sorted(out.glob("params_*.pt"))}
    last = {}
    for rank, local in files.items():  # in the files' sorted order, as before
        for n, v in local.items():
            last[n] = (rank, v)
    params = {}
    for n, (rank, v) in last.items():
        if not isinstance(v, dict):
            params[n] = v
            continue
        full = torch.empty(v["shape"], dtype=v["value"].dtype).reshape(-1)
        covered = torch.zeros(full.numel(), dtype=torch.bool)
        for r in [r for r in v["ranks"] if r != rank] + [rank]:
            shard = files[r][n]
            assert shard["shape"] == v["shape"] and shard["ranks"] == v["ranks"], (n, r, rank)
            full[shard["index"].reshape(-1)] = shard["value"].reshape(-1)
            covered[shard["index"].reshape(-1)] = True
        assert bool(covered.all()), (n, "not every element is held by a shard")
        params[n] = full.reshape(v["shape"])
    return params


def _config(out: Path, overrides, *, steps: int, global_batch: int, micro: int):
    out.mkdir(parents=True)
    cfg = compose_cfg(
        [f"train.steps={steps}", f"train.global_batch_size={global_batch}", f"train.micro_batch_size={micro}",
         "parallel.timeout_s=60", f"optim.optimizer.eps={EPS}", *overrides],
        output_dir=out,
    )
    check_layout(cfg)
    return cfg


def _job(out: Path, overrides, *, steps, global_batch, micro, kinds, eval_kinds, make_loader):
    cfg = _config(out, overrides, steps=steps, global_batch=global_batch, micro=micro)
    loader = make_loader or functools.partial(_loader, global_batch=global_batch, micro=micro, kinds=kinds)
    evals = None if eval_kinds is None else functools.partial(_loader, global_batch=global_batch, micro=micro, kinds=eval_kinds)
    return cfg, loader, functools.partial(_save_params, str(out)), evals


_imported_models: set = set()


def _import_model(cfg) -> None:
    """Build the model on the meta device once per model config in this (the
    parent) process, before its first launch: the forked workers then find
    its modules (transformers' modeling code and what it imports, ~2-3 s of
    CPU) imported instead of each importing them."""
    key = str(cfg.model.get("name")) + str(cfg.model.get("_target_"))
    if key not in _imported_models:
        _imported_models.add(key)
        build_family(cfg.model).build_meta()
        # and what a multi-process run imports of ours (~0.3 s)
        import omnitrain.parallel.fsdp  # noqa: F401
        import omnitrain.parallel.redistribute  # noqa: F401
        import omnitrain.pipeline.executor  # noqa: F401
        import omnitrain.train.checkpoint  # noqa: F401


def _collect(out: Path, logged, rows=None):
    if rows is not None:
        rows.extend(logged)
    return [r["loss"] for r in logged], [r["grad_norm"] for r in logged], _load_params(out)


def run_layout(out: Path, overrides, *, steps: int, global_batch: int, micro: int = 1, kinds=None, eval_kinds=None, make_loader=None, rows=None):
    """Returns (losses, grad norms, {param name: final tensor}). `kinds`: the
    synthetic sample kinds (default `_synth.KINDS`, for the Omni thinker);
    `eval_kinds`: synthetic validation data (with train.eval_every);
    `make_loader(dp_rank, dp_size)` replaces the synthetic loader; `rows`, a
    list, receives the logged metric rows."""
    cfg, *rest = _job(out, overrides, steps=steps, global_batch=global_batch, micro=micro, kinds=kinds, eval_kinds=eval_kinds, make_loader=make_loader)
    if world_size_for(cfg) > 1:
        _import_model(cfg)
    logged = launch.launch(worker, world_size_for(cfg), cfg, *rest, timeout_s=120)
    return _collect(out, logged, rows)


def _several(jobs):
    """Body of every rank of a shared launch: the jobs' runs one after the
    other, on the one default process group (each run builds its own meshes
    and sub-groups on it, as in a launch of its own). Returns each run's rows."""
    import gc
    import logging
    import warnings

    destroy, level = launch.destroy, logging.getLogger().level
    launch.destroy = lambda: None  # keep the default group for the next run
    results = []
    try:
        for cfg, *rest in jobs:
            with warnings.catch_warnings():  # worker() silences non-logging ranks: per run
                results.append(worker(cfg, *rest))
            logging.getLogger().setLevel(level)
            gc.collect()
    finally:
        launch.destroy = destroy
    return results


def run_layouts(out: Path, layouts: dict, *, steps: int, global_batch: int, micro: int = 1, kinds=None, eval_kinds=None, rows=None) -> dict:
    """`run_layout` for several layouts ({name: overrides}, each run in out/name),
    with one launch per process count: the runs of a launch follow each other
    in the same forked workers (start-up, rendezvous and the parent's fork are
    paid once). Each run is the same as alone: own config, model, optimizer,
    meshes, data from step 0, own output folder. `rows`, a dict, receives each
    run's logged metric rows by name. A layout given as (overrides, options)
    takes its own `micro` / `kinds` from options. Returns {name: (losses,
    grad norms, params)}."""
    jobs = {}
    for name, ov in layouts.items():
        ov, opt = ov if isinstance(ov, tuple) else (ov, {})
        opt = {"micro": micro, "kinds": kinds, **opt}
        jobs[name] = _job(out / name, ov, steps=steps, global_batch=global_batch, eval_kinds=eval_kinds, make_loader=None, **opt)
    by_world = {}
    for name, job in jobs.items():
        by_world.setdefault(world_size_for(job[0]), []).append(name)
    results = {}
    for world, names in by_world.items():
        if world == 1:
            logged = [launch.launch(worker, 1, *jobs[n], timeout_s=120) for n in names]
        else:
            for n in names:
                _import_model(jobs[n][0])
            logged = launch.launch(_several, world, [jobs[n] for n in names], timeout_s=120)
        for n, lg in zip(names, logged):
            results[n] = _collect(out / n, lg, None if rows is None else rows.setdefault(n, []))
    return {n: results[n] for n in layouts}


def selected(request, layouts, needs=None) -> dict:
    """The part of `layouts` ({name: overrides}) that this session's selected
    tests of the requesting module use, in `layouts`' order: a shared run
    computes only what is asked for (`pytest -k`). `needs(test name, params)`
    names the layouts a test uses; by default its parameter `name`."""
    needs = needs or (lambda test, params: [params.get("name")])
    module = request.node.nodeid.split("::")[0]
    used = set()
    for item in request.session.items:
        if item.nodeid.split("::")[0] == module:
            used.update(needs(item.originalname, getattr(item, "callspec", None) and item.callspec.params or {}))
    return {n: ov for n, ov in layouts.items() if n in used}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


# A tensor the reference leaves at ~0 norm has an analytically zero gradient
# (Qwen3 AuT's key biases: a shared shift of all keys leaves softmax
# unchanged), so it holds only rounding that another summation order makes
# differently: norm ~1e-10, differences ~1e-10 (transformers 5.25: 7.5e-11 and
# 1.0e-10 under fsdp2 x ep2). Its difference is measured against this norm
# floor: 1e-8 absolute at the 1e-5 bound, four orders below one Adam step of
# a real gradient (~lr = 1e-3 per element), which a wrong shard or a
# mis-summed gradient moves.
NORM_FLOOR = 1e-3


def worst_tensor(params: dict, ref_params: dict) -> tuple[float, str]:
    """(largest relative difference of a parameter tensor, its name), norms floored at NORM_FLOOR."""
    return max((float((params[k] - ref_params[k]).norm() / ref_params[k].norm().clamp_min(NORM_FLOOR)), k) for k in ref_params)


def check_parity(run, reference, steps: int, name: str, tol: float = 1e-5, tensor_tol: float = 1e-5, family=None) -> dict:
    """Losses, grad norms, all parameters together and each module's (the
    family's modules: vision, audio, LLM for the Omni thinker, the default)
    within `tol` relative of the reference run; each parameter tensor within
    `tensor_tol`. Returns the relative differences it checked (for reports).

    TP layouts pass tensor_tol=1e-4: row-parallel layers add partial sums in
    another order, and a few bias tensors whose gradients nearly cancel
    (k_proj.bias: a shift of every key barely changes softmax) carry that
    rounding at 5e-6..1e-5 relative, on this CPU; another CPU's kernels round
    differently. A wrong shard or a mis-summed gradient is off by ~1.
    """
    losses, norms, params = run
    ref_losses, ref_norms, ref_params = reference
    assert len(losses) == steps, losses
    assert ref_losses[-1] != ref_losses[0], "the reference did not train"
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) / abs(b) < tol, (name, losses, ref_losses)
    # the grad norm counts every shard exactly once
    for a, b in zip(norms, ref_norms):
        assert abs(a - b) / abs(b) < tol, (name, norms, ref_norms)
    assert params.keys() == ref_params.keys(), set(params) ^ set(ref_params)
    family = family or _default_family()
    groups = {"all": list(ref_params)}
    for m in family.module_names:
        groups[m] = [k for k in ref_params if family.module_of(k) == m]
    diffs = {
        "loss": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)),
        "grad_norm": max(abs(a - b) / abs(b) for a, b in zip(norms, ref_norms)),
    }
    for group, keys in groups.items():
        assert keys, (name, group, "no parameters")
        flat = torch.cat([params[k].reshape(-1) for k in keys])
        ref_flat = torch.cat([ref_params[k].reshape(-1) for k in keys])
        diffs[group] = rel(flat, ref_flat)
        assert diffs[group] < tol, (name, group, diffs[group])
    worst = worst_tensor(params, ref_params)
    diffs["worst_tensor"] = worst
    assert worst[0] < tensor_tol, (name, worst)
    return diffs


@functools.lru_cache(maxsize=None)
def _default_family():
    from omnitrain.models.family import build_family

    return build_family(compose_cfg().model)
