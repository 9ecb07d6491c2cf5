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
    from torch.distributed.tensor import DTensor

    local = {}
    # Every rank of a stage walks the same parameters in the same order, so the
    # gathers (collectives over the stage's dp/tp mesh) line up.
    for n, p in trainer.adapter.local_parameters(trainer.model):
        t = p.detach()
        local[n] = (t.full_tensor() if isinstance(t, DTensor) else t).clone()
    torch.save(local, f"{path}/params_{trainer.ctx.rank if trainer.ctx else 0}.pt")


def run_layout(out: Path, overrides, *, steps: int, global_batch: int, micro: int = 1, kinds=None, eval_kinds=None, make_loader=None, rows=None):
    """Returns (losses, grad norms, {param name: final tensor}). `kinds`: the
    synthetic sample kinds (default `_synth.KINDS`, for the Omni thinker);
    `eval_kinds`: synthetic validation data (with train.eval_every);
    `make_loader(dp_rank, dp_size)` replaces the synthetic loader; `rows`, a
    list, receives the logged metric rows."""
    out.mkdir()
    cfg = compose_cfg(
        [f"train.steps={steps}", f"train.global_batch_size={global_batch}", f"train.micro_batch_size={micro}",
         "parallel.timeout_s=60", f"optim.optimizer.eps={EPS}", *overrides],
        output_dir=out,
    )
    check_layout(cfg)
    loader = make_loader or functools.partial(_loader, global_batch=global_batch, micro=micro, kinds=kinds)
    evals = None if eval_kinds is None else functools.partial(_loader, global_batch=global_batch, micro=micro, kinds=eval_kinds)
    logged = launch.launch(worker, world_size_for(cfg), cfg, loader, functools.partial(_save_params, str(out)), evals, timeout_s=120)
    if rows is not None:
        rows.extend(logged)
    params = {}
    for f in sorted(out.glob("params_*.pt")):
        params.update(torch.load(f))
    return [r["loss"] for r in logged], [r["grad_norm"] for r in logged], params


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


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
    # A tensor the reference leaves at ~0 norm has an analytically zero gradient
    # (Qwen3 AuT's key biases: a shared shift of all keys leaves softmax
    # unchanged), so it holds only rounding (~1e-11) that another summation
    # order makes differently: compared against a 1e-5 norm floor instead.
    worst = max((float((params[k] - ref_params[k]).norm() / ref_params[k].norm().clamp_min(1e-5)), k) for k in ref_params)
    diffs["worst_tensor"] = worst
    assert worst[0] < tensor_tol, (name, worst)
    return diffs


@functools.lru_cache(maxsize=None)
def _default_family():
    from omnitrain.models.family import build_family

    return build_family(compose_cfg().model)
