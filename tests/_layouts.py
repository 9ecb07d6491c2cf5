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

# Adam divides by sqrt(v) + eps: with the default 1e-8 an element whose
# gradient is ~1e-9 (deep encoder biases at random init, or key biases whose
# gradient is zero in exact arithmetic) turns rounding noise from a different
# but equally valid summation order into an lr-sized step. A larger eps keeps
# the comparison about the layout, not about amplified noise.
EPS = 1e-6


def _loader(dp_rank, dp_size, *, global_batch, micro):
    return _synth.SynthLoader(global_batch_size=global_batch, micro_batch_size=micro, dp_rank=dp_rank, dp_size=dp_size)


def _save_params(path, trainer):
    from torch.distributed.tensor import DTensor

    local = {}
    # Every rank of a stage walks the same parameters in the same order, so the
    # gathers (collectives over the stage's dp/tp mesh) line up.
    for n, p in trainer.adapter.local_parameters(trainer.model):
        t = p.detach()
        local[n] = (t.full_tensor() if isinstance(t, DTensor) else t).clone()
    torch.save(local, f"{path}/params_{trainer.ctx.rank if trainer.ctx else 0}.pt")


def run_layout(out: Path, overrides, *, steps: int, global_batch: int, micro: int = 1):
    """Returns (losses, grad norms, {param name: final tensor})."""
    out.mkdir()
    cfg = compose_cfg(
        [f"train.steps={steps}", f"train.global_batch_size={global_batch}", f"train.micro_batch_size={micro}",
         "parallel.timeout_s=60", f"optim.eps={EPS}", *overrides],
        output_dir=out,
    )
    check_layout(cfg)
    loader = functools.partial(_loader, global_batch=global_batch, micro=micro)
    rows = launch.launch(worker, world_size_for(cfg), cfg, loader, functools.partial(_save_params, str(out)), timeout_s=120)
    params = {}
    for f in sorted(out.glob("params_*.pt")):
        params.update(torch.load(f))
    return [r["loss"] for r in rows], [r["grad_norm"] for r in rows], params


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))
