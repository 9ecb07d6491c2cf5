"""`python -m omnitrain [overrides]`: compose the config, check it, start the
workers the layout needs, train.

    python -m omnitrain                                  # tiny Qwen2.5-Omni thinker, demo data
    python -m omnitrain parallel=pp4_hetero train.steps=5
    python -m omnitrain --cfg job                        # print the composed config
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from omnitrain.config import ConfigError, register_configs

log = logging.getLogger("omnitrain")


def run(cfg: DictConfig) -> float:
    """Train with a composed config; returns the last step's loss (for sweeps)."""
    from omnitrain import launch
    from omnitrain.parallel.context import check_layout, world_size_for
    from omnitrain.train.worker import worker

    if cfg.train.output_dir is None:
        with open_dict(cfg):
            cfg.train.output_dir = HydraConfig.get().runtime.output_dir
    check_layout(cfg)
    nprocs = world_size_for(cfg)
    rows = launch.launch(worker, nprocs, cfg, timeout_s=cfg.parallel.timeout_s, layout=f"parallel={cfg.parallel.name}")
    return rows[-1]["loss"] if rows else float("nan")


@hydra.main(version_base=None, config_path="conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    from omnitrain.data import DataError
    from omnitrain.launch import WorkerFailed

    try:
        return run(cfg)
    except WorkerFailed as e:
        # Errors a user can fix stay one line even when a worker raised them.
        if e.exc_type in ("ConfigError", "DataError", "CheckpointError"):
            log.error("rank %d: %s", e.rank, e.message)
            sys.exit(2)
        raise
    except ConfigError as e:
        # A config mistake is one line, not a traceback.
        log.error("config error: %s", e)
        sys.exit(2)
    except DataError as e:
        # Names the dataset, sample index and file (data.on_error=skip to go on).
        log.error("data error: %s", e)
        sys.exit(2)


def main() -> None:
    from omnitrain.data import quote_dataset_lists

    register_configs()
    # LLaMA-Factory spelling `data.dataset=a,b` (Hydra would read a sweep).
    sys.argv[1:] = quote_dataset_lists(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
