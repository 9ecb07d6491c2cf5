"""What each rank runs: set up torch.distributed when the layout has more
than one process, build the trainer for this rank's stage, train."""

from __future__ import annotations

import logging
import warnings

from omnitrain import device, launch
from omnitrain.train.loop import Trainer, save_resolved_config


def worker(cfg, make_loader=None, on_end=None, make_eval_loader=None) -> list[dict]:
    """`make_loader(dp_rank, dp_size)`, if given, replaces the configured data
    (tests feed synthetic micro-batches through the real loop this way), and
    `make_eval_loader` the validation data (data.eval);
    `on_end(trainer)` runs on every rank after training (tests collect state)."""
    from omnitrain.models.family import build_family

    ctx = None
    family = build_family(cfg.model)  # once per process, passed on
    if launch.in_distributed_env():
        from omnitrain.parallel.context import ParallelContext

        launch.init_distributed(device.detect(cfg.train.device), timeout_s=cfg.parallel.timeout_s)
        ctx = ParallelContext.build(cfg, family)
        if not ctx.is_logging_rank:
            # Every rank runs the same set-up: let one of them say it (log
            # lines and Python warnings alike; errors still come from any rank).
            logging.getLogger().setLevel(logging.WARNING)
            warnings.filterwarnings("ignore")
    try:
        trainer = Trainer(cfg, family, dist_ctx=ctx)
        if make_loader is not None:
            trainer.loader = make_loader(trainer.dp_rank, trainer.dp_size)
        if make_eval_loader is not None:
            trainer.eval_loader = make_eval_loader(trainer.dp_rank, trainer.dp_size)
        if ctx is None or ctx.is_logging_rank:
            save_resolved_config(cfg, cfg.train.output_dir)
        rows = trainer.fit(cfg.train.output_dir)
        if on_end is not None:
            on_end(trainer)
        return rows
    finally:
        if ctx is not None:
            launch.destroy()
