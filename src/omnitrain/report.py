"""`python -m omnitrain.report <multirun dir> [--png FILE] [--no-predict]`: one
row per job of a sweep (`python -m omnitrain -m ...`), fastest first.

Columns: the job's layout (parallel preset, split, TP), tokens/s, step time,
bubble (means over the logged steps after the first, which warms up), peak
memory per pipeline stage (GiB; on CPU the process's peak RSS), final loss,
and the planner's predicted step time for the job's resolved config
(`python -m omnitrain.plan`, roofline unless plan.calibrate was set; "-" with
--no-predict). Writes a PNG (throughput and memory per layout) next to the
sweep, or to --png, when matplotlib is installed (`pip install omnitrain[plot]`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from omnitrain.errors import UserError


class ReportError(UserError):
    kind = "report error"


@dataclass
class Job:
    name: str  # its folder under the sweep
    layout: str
    tokens_per_s: float
    step_s: float
    bubble: float | None
    stage_mem_gib: list[float]
    final_loss: float
    predicted_s: float | None = None


def layout_label(cfg) -> str:
    p = cfg.parallel
    parts = [str(p.name)]
    if p.pp.size > 1 and p.pp.layers is not None:
        parts.append(" ".join(f"{m}={list(c)}".replace(" ", "") for m, c in p.pp.layers.items()))
    tp = p.tp
    if hasattr(tp, "items"):
        if any(int(v) > 1 for v in tp.values()):
            parts.append("tp " + ",".join(f"{m}{v}" for m, v in tp.items()))
    elif int(tp) > 1:
        parts.append(f"tp {tp}")
    return " ".join(parts)


def read_job(folder: Path) -> Job | None:
    from omegaconf import OmegaConf

    metrics, config = folder / "metrics.jsonl", folder / "config.yaml"
    if not metrics.is_file() or not config.is_file():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    cfg = OmegaConf.load(config)
    body = rows[1:] or rows

    def mean(key):
        vals = [r[key] for r in body if key in r]
        return sum(vals) / len(vals) if vals else None

    mem_rows = [r["stage_peak_mem_gib"] for r in rows if "stage_peak_mem_gib" in r]
    mem = [max(col) for col in zip(*mem_rows)] if mem_rows else [max(r.get("peak_mem_gib", 0.0) for r in rows)]
    return Job(folder.name, layout_label(cfg), mean("tokens_per_s") or 0.0, mean("step_time_s") or 0.0, mean("bubble"), mem,
               float(rows[-1]["loss"]))


def predict_step(folder: Path) -> float | None:
    from omnitrain.models.family import build_family
    from omnitrain.parallel.context import check_layout
    from omnitrain.parallel.mesh import Sizes
    from omnitrain.plan.compare import run_config
    from omnitrain.plan.layout import stage_report

    cfg = run_config(folder, ())
    family = build_family(cfg.model)
    plans = check_layout(cfg, family)
    return stage_report(cfg, family, plans, Sizes.from_cfg(cfg, family.module_names))[1].step_s


def collect(sweep: Path, predict: bool = True) -> list[Job]:
    if not sweep.is_dir():
        raise ReportError(f"{sweep}: not a folder; give a multirun directory (multirun/<date>/<time> or hydra.sweep.dir)")
    folders = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name))
    jobs = []
    for f in folders:
        job = read_job(f)
        if job is None:
            continue
        if predict:
            try:
                job.predicted_s = predict_step(f)
            except UserError:
                job.predicted_s = None
        jobs.append(job)
    if not jobs:
        raise ReportError(f"{sweep}: no job folder with config.yaml and metrics.jsonl (did the sweep run a step?)")
    return sorted(jobs, key=lambda j: (-j.tokens_per_s, j.name))


def table(jobs: list[Job]) -> str:
    from omnitrain.plan import _table

    rows = []
    for j in jobs:
        rows.append([
            j.name, j.layout, f"{j.tokens_per_s:,.0f}", f"{j.step_s:.3f}", "-" if j.bubble is None else f"{j.bubble:.0%}",
            " ".join(f"{m:.2f}" for m in j.stage_mem_gib), f"{j.final_loss:.4f}", "-" if j.predicted_s is None else f"{j.predicted_s:.3f}",
        ])
    return _table(["job", "layout", "tokens/s", "step s", "bubble", "peak GiB per stage", "final loss", "predicted step s"], rows)


def plot(jobs: list[Job], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = [f"{j.name}: {j.layout}" for j in jobs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 0.6 * len(jobs) + 2))
    y = range(len(jobs))
    a.barh(list(y), [j.tokens_per_s for j in jobs], color="tab:blue")
    a.set_yticks(list(y), labels, fontsize=7)
    a.invert_yaxis()
    a.set_xlabel("tokens/s")
    a.set_title("throughput")
    stages = max(len(j.stage_mem_gib) for j in jobs)
    h = 0.8 / stages
    for s in range(stages):
        b.barh([i + s * h - 0.4 + h / 2 for i in y], [j.stage_mem_gib[s] if s < len(j.stage_mem_gib) else 0 for j in jobs], height=h,
               label=f"stage {s}")
    b.set_yticks(list(y), [j.name for j in jobs], fontsize=7)
    b.invert_yaxis()
    b.set_xlabel("peak GiB")
    b.set_title("peak memory per stage")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0 if argv else 2
    from omnitrain.errors import run_cli

    predict = "--no-predict" not in argv
    argv = [a for a in argv if a != "--no-predict"]
    png = None
    if "--png" in argv:
        i = argv.index("--png")
        png = Path(argv[i + 1])
        argv = argv[:i] + argv[i + 2 :]
    sweep = Path(argv[0])

    def body():
        jobs = collect(sweep, predict)
        print(table(jobs))
        out = plot(jobs, png or sweep / "report.png")
        print(f"plot: {out}" if out else "plot: skipped (pip install 'omnitrain[plot]' for matplotlib)")

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
