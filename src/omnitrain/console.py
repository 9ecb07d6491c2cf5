"""What a run says about itself: a header before it starts and a summary at
the end (pure functions from config, plans and metrics rows to text)."""

from __future__ import annotations

from pathlib import Path


def _fmt(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(int(n))


def header(cfg, family, plans, world_size: int) -> str:
    """Model and family, parameters per module, the layout's stages and
    module ranges, world size, dtype, batch and the run directory."""
    model = family.build_meta()
    per_module = dict.fromkeys(family.module_names, 0)
    for name, p in model.named_parameters():
        per_module[family.module_of(name)] += p.numel()
    params = ", ".join(f"{m} {_fmt(n)}" for m, n in per_module.items())
    t, p = cfg.train, cfg.parallel
    tp = p.tp if not hasattr(p.tp, "keys") else ", ".join(f"{m} {v}" for m, v in p.tp.items())
    lines = [
        f"model {cfg.model.name} ({family.hf_architecture}): {_fmt(sum(per_module.values()))} parameters ({params})",
        f"layout {p.name}: {world_size} process(es), pp {p.pp.size} ({p.pp.schedule}), tp {tp}, dp {p.dp} ({p.dp_mode})",
    ]
    if len(plans) > 1:
        for plan in plans:
            held = [f"{m} {r.start}-{r.stop - 1}" for m, r in plan.layers.items() if len(r)]
            extras = [k for k in ("merge", "head") if getattr(plan, k)]
            on = f" (rank {plan.rank})" if len(plans) > p.pp.size else ""  # virtual stages: which rank runs it
            lines.append(f"  stage {plan.index}{on}: " + ", ".join(held + extras))
    lines.append(
        f"train: {t.steps} steps of {t.global_batch_size} samples (micro-batches of {t.micro_batch_size}), "
        f"{t.dtype}, data {cfg.data.name}"
    )
    lines.append(f"run directory: {t.output_dir}")
    return "\n".join(lines)


def summary(rows: list[dict], run_dir, elapsed_s: float, checkpoints: int) -> str:
    """Steps, tokens, time, mean tokens/s, final loss, where the outputs are."""
    if not rows:
        return f"no step ran; run directory {run_dir}"
    tokens = sum(r["tokens"] for r in rows)
    step_s = sum(r["step_time_s"] for r in rows)
    lines = [
        f"done: {len(rows)} steps (to step {rows[-1]['step']}), {tokens:,} tokens in {elapsed_s:.1f} s, "
        f"{tokens / max(step_s, 1e-9):,.0f} tokens/s, final loss {rows[-1]['loss']:.4f}",
        f"metrics: {Path(run_dir) / 'metrics.jsonl'}",
    ]
    if checkpoints:
        lines.append(f"checkpoints: {Path(run_dir) / 'checkpoints'} ({checkpoints} written)")
    return "\n".join(lines)
