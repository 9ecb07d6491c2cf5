"""`python -m omnitrain [overrides]`: compose the config, check it, start the
workers the layout needs, train.

    python -m omnitrain                                  # the default model (conf/config.yaml), demo data
    python -m omnitrain parallel=pp4_hetero train.steps=5
    python -m omnitrain --cfg job                        # print the composed config
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from omnitrain.config import register_configs

log = logging.getLogger("omnitrain")


def run(cfg: DictConfig) -> float:
    """Train with a composed config; returns the last step's loss (for sweeps)."""
    from omnitrain import launch
    from omnitrain.models.family import build_family
    from omnitrain.parallel.context import check_layout, world_size_for
    from omnitrain.train.worker import worker

    if cfg.train.output_dir is None:
        with open_dict(cfg):
            cfg.train.output_dir = HydraConfig.get().runtime.output_dir
    from omnitrain.console import header

    from omnitrain.config import check_finetune

    family = build_family(cfg.model)
    check_finetune(cfg, family)
    if family.init_from:  # a folder whose tensors do not fit fails here, before any worker starts
        from omnitrain.convert.hf import check_folder

        check_folder(family, family.build_meta(), family.init_from)
    plans = check_layout(cfg, family)
    nprocs = world_size_for(cfg, family)
    log.info("%s", header(cfg, family, plans, nprocs))
    rows = launch.launch(
        worker, nprocs, cfg, timeout_s=cfg.parallel.timeout_s, layout=f"parallel={cfg.parallel.name}", heartbeat_s=cfg.parallel.heartbeat_s
    )
    return rows[-1]["loss"] if rows else float("nan")


@hydra.main(version_base=None, config_path="conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    from omnitrain.errors import run_cli

    out = {"loss": float("nan")}

    def body():
        out["loss"] = run(cfg)

    # A mistake the user can fix (here or in any worker) is one line and exit 2.
    code = run_cli(body)
    if code:
        sys.exit(code)
    return out["loss"]


EVERYDAY = """\
everyday overrides:
  train.steps=N train.global_batch_size=N train.micro_batch_size=N train.dtype=bf16
  train.save_every=N train.resume=auto train.output_dir=DIR   optim.optimizer.lr=X
  data.dataset_dir=DIR data.dataset=a,b data.max_samples=N data.on_error=skip
  parallel.pp.size=N 'parallel.pp.layers.llm=[...]' parallel.tp.llm=N parallel.dp=N
  -m ...        a sweep (multirun)        --cfg job     print the composed config
docs: README.md (commands, config groups), docs/DEVELOPING.md, docs/ADDING_A_MODEL.md"""


def help_text() -> str:
    """The user-facing config groups, each option with its yaml's first comment line."""
    from pathlib import Path

    conf = Path(__file__).resolve().parent / "conf"
    lines = ["usage: python -m omnitrain [group=option ...] [key=value ...]", "", "config groups:"]
    for group in sorted(p for p in conf.iterdir() if p.is_dir()):
        lines.append(f"  {group.name}:")
        for f in sorted(group.glob("*.yaml")):
            first = next((ln.lstrip("# ").strip() for ln in f.read_text().splitlines() if ln.startswith("#") and "@package" not in ln), "")
            lines.append(f"    {f.stem:<18} {first}")
    return "\n".join(lines + ["", EVERYDAY])


def main() -> None:
    from omnitrain.data import quote_dataset_lists

    if any(a in ("--help", "-h") for a in sys.argv[1:]):
        print(help_text())  # Hydra's own page lists the internal schema groups too
        return
    register_configs()
    # LLaMA-Factory spelling `data.dataset=a,b` (Hydra would read a sweep).
    sys.argv[1:] = quote_dataset_lists(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
