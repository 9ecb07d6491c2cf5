"""The training loop, run by every rank.

One optimizer step = global_batch_size samples. Each rank draws the
micro-batches of its data-parallel slice; a pipeline runs them through its
schedule, a single stage runs forward+backward per micro-batch (gradient
accumulation). Every micro-batch loss is normalised by the label tokens of
the whole global batch, so the step's loss and gradients do not depend on
the layout or on micro_batch_size.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from omnitrain import device
from omnitrain.parallel.layout import whole_plan
from omnitrain.train.metrics import MetricsLogger
from omnitrain.train.optim import build_optimizer, build_scheduler, clip_grad_norm

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    tokens: int
    step_time_s: float
    extra: dict = field(default_factory=dict)


class Trainer:
    """Holds what one rank needs: its stage of the model, optimizer, data.

    `family` is the model family's adapter (models/family.py), built once per
    process and passed in."""

    def __init__(self, cfg, family, *, dist_ctx=None):
        self.cfg = cfg
        self.dev_info = device.detect(cfg.train.device)
        self.dev = self.dev_info.torch_device(device.local_rank())
        self.ctx = dist_ctx  # parallel.context.ParallelContext or None for one process
        self.adapter = family
        self.plans = self._plans()
        device.manual_seed_all(cfg.train.seed)
        self.model = self.adapter.build(self.plans, self.dev, cfg.train.seed)
        if self.ctx is not None:  # [parallel hook] TP / FSDP on this rank's modules
            self.model = self.ctx.parallelize(self.adapter, self.model, self.plans)
        self.module_params = [(self.adapter.module_of(n), p) for n, p in self.adapter.local_parameters(self.model)]
        self.params = [p for _, p in self.module_params]
        # [parallel hook] joins encoder features computed in parts, shards the LLM's sequence
        self.hooks = self.ctx.stage_hooks() if self.ctx is not None else None
        self.optimizer = build_optimizer(self.params, cfg.optim.optimizer)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim.scheduler, cfg.train.steps)
        self.dtype = {"fp32": None, "bf16": torch.bfloat16}[cfg.train.dtype]
        self.loader = None
        self.step = 0

    # ---- layout -------------------------------------------------------------
    @property
    def dp_rank(self) -> int:
        return self.ctx.dp_rank if self.ctx else 0

    @property
    def dp_size(self) -> int:
        return self.ctx.dp_size if self.ctx else 1

    @property
    def is_logging_rank(self) -> bool:
        return self.ctx.is_logging_rank if self.ctx else True

    def _plans(self) -> list:
        if self.ctx is None or self.ctx.num_stages == 1:
            return [whole_plan(self.adapter.depths)]
        return list(self.ctx.stage_plans)

    @property
    def num_microbatches(self) -> int:
        t = self.cfg.train
        return t.global_batch_size // (t.micro_batch_size * self.dp_size)

    # ---- data ---------------------------------------------------------------
    def build_data(self):
        from omnitrain.data import build_loader, load_processor

        processor = load_processor(self.cfg.model)
        t = self.cfg.train
        self.loader = build_loader(
            self.cfg.data,
            self.adapter,
            processor,
            seed=t.seed,
            micro_batch_size=t.micro_batch_size,
            global_batch_size=t.global_batch_size,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
        )
        return self.loader

    # ---- one step -----------------------------------------------------------
    def _to_device(self, mb: dict) -> dict:
        return {k: v.to(self.dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in mb.items()}

    def forward(self, mb: dict, inputs: dict, num_label_tokens):
        with device.autocast(self.dev, self.dtype):
            return self.adapter.stage_forward(self.model, self.plans[0], mb, inputs, num_label_tokens, hooks=self.hooks)

    def train_step(self, micro_batches: list[dict]) -> StepResult:
        t0 = time.perf_counter()
        micro_batches = [self._to_device(mb) for mb in micro_batches]
        if self.ctx is not None:  # [parallel hook] same encoder passes on every dp replica
            micro_batches = self.ctx.prepare_micro_batches(self.adapter, micro_batches, self.dev)
        n_label = sum(self.adapter.count_label_tokens(mb) for mb in micro_batches)
        tokens = sum(int(mb["attention_mask"].sum()) for mb in micro_batches)
        if self.ctx is not None:
            n_label, tokens = self.ctx.dp_sum_ints(n_label, tokens)
        if n_label == 0:
            raise RuntimeError(f"step {self.step + 1}: the global batch has no label tokens; check data.train_on_prompt and the data")
        extra = {}
        if self.ctx is None or self.ctx.num_stages == 1:
            loss = torch.zeros((), dtype=torch.float32)
            for mb in micro_batches:
                mb_loss = self.forward(mb, {}, n_label)
                mb_loss.backward()
                loss += mb_loss.detach().float().cpu()
        else:
            loss, extra = self.ctx.run_pipeline(self, micro_batches, n_label)
        if self.ctx is not None:
            self.ctx.reduce_grads(self.module_params)
            loss = self.ctx.reduce_loss(loss)
        if self.ctx is not None:  # [parallel hook] norm over pp stages, TP and FSDP shards
            grad_norm = self.ctx.clip_grad_norm(self.module_params, self.cfg.optim.grad_clip)
        else:
            grad_norm = clip_grad_norm(self.params, self.cfg.optim.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        device.synchronize(self.dev)
        self.step += 1
        return StepResult(float(loss), float(grad_norm), lr, tokens, time.perf_counter() - t0, extra)

    # ---- the run ------------------------------------------------------------
    def fit(self, run_dir: str | Path) -> list[dict]:
        cfg = self.cfg.train
        if self.loader is None:
            self.build_data()
        self.maybe_resume(run_dir)
        it = iter(self.loader)
        logger = MetricsLogger(run_dir, cfg.steps, enabled=self.is_logging_rank, progress=cfg.progress, start_step=self.step)
        peak = device.peak_flops(self.dev) * (self.ctx.world_size if self.ctx else 1)
        rows = []
        self.checkpoints_written = 0
        t_start = time.perf_counter()
        try:
            from omnitrain.launch import report_step

            while self.step < cfg.steps:
                report_step(self.step)  # for the heartbeat: where a rank that stops answering was
                mbs = [next(it) for _ in range(self.num_microbatches)]
                res = self.train_step(mbs)
                row = {
                    "step": self.step,
                    "loss": res.loss,
                    "grad_norm": res.grad_norm,
                    "lr": res.lr,
                    "tokens": res.tokens,
                    "step_time_s": res.step_time_s,
                    "tokens_per_s": res.tokens / res.step_time_s,
                    "mfu": (self.adapter.flops_per_token() * res.tokens / res.step_time_s / peak) if peak else 0.0,
                    "peak_mem_gib": device.peak_memory_bytes(self.dev) / 2**30,
                    **res.extra,
                }
                rows.append(row)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    logger.log(row)
                logger.advance()
                if cfg.save_every > 0 and (self.step % cfg.save_every == 0 or self.step == cfg.steps):
                    self.save(run_dir)
        finally:
            logger.close()
        stats = getattr(self.loader, "stats", None)
        if stats is not None and self.is_logging_rank:
            s = stats()
            if s.get("skipped"):
                log.warning("data: skipped %s samples (%s)", s["skipped"], s)
        if self.is_logging_rank:
            from omnitrain.console import summary

            log.info("%s", summary(rows, run_dir, time.perf_counter() - t_start, self.checkpoints_written))
        return rows


    # ---- checkpoints --------------------------------------------------------
    def save(self, run_dir) -> Path:
        from omnitrain.train import checkpoint

        t = self.cfg.train
        path = checkpoint.save(
            run_dir,
            self.step,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            loader=self.loader,
            dev=self.dev,
            keep_last=t.keep_last,
            save_optimizer=t.save_optimizer,
            run=self.run_shape(),
        )
        self.checkpoints_written = getattr(self, "checkpoints_written", 0) + 1
        if self.is_logging_rank:
            log.info("checkpoint: step %d -> %s", self.step, path)
        return path

    def run_shape(self) -> dict:
        """What a resume must keep (the batch) or says it changes (steps, schedule)."""
        t = self.cfg.train
        return {
            "steps": t.steps,
            "global_batch_size": t.global_batch_size,
            "scheduler": OmegaConf.to_container(self.cfg.optim.scheduler, resolve=True),
        }

    def maybe_resume(self, run_dir) -> None:
        from omnitrain.train import checkpoint

        path = checkpoint.find_resume(run_dir, self.cfg.train.resume)
        if path is None:
            return
        saved = checkpoint.read_meta(path).get("run") or {}
        now = self.run_shape()
        if saved.get("global_batch_size", now["global_batch_size"]) != now["global_batch_size"]:
            raise checkpoint.CheckpointError(
                f"train.resume={path}: the checkpoint trained on train.global_batch_size={saved['global_batch_size']}, "
                f"this run has {now['global_batch_size']}, which changes what every later step trains on: set "
                f"train.global_batch_size={saved['global_batch_size']} (or start a new run from the weights with model.init_from)"
            )
        self.step = checkpoint.load(
            path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, loader=self.loader, dev=self.dev
        )
        changed = [k for k in ("steps", "scheduler") if k in saved and saved[k] != now[k]]
        if changed:
            # The restored optimizer holds the old schedule's lr: apply the new one now, not a step later.
            for group, base, fn in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
                group["lr"] = base * fn(self.scheduler.last_epoch)
            if self.is_logging_rank:
                what = "; ".join(
                    f"train.steps {saved['steps']} -> {now['steps']}" if k == "steps" else f"optim.scheduler {saved[k]} -> {now[k]}"
                    for k in changed
                )
                log.warning(
                    "resume: %s: the LR schedule is recomputed from step %d (lr now %.3g)",
                    what, self.step, self.optimizer.param_groups[0]["lr"] if self.optimizer.param_groups else 0.0,
                )
        if self.is_logging_rank:
            log.info("resumed from %s at step %d", path, self.step)


def save_resolved_config(cfg, run_dir: str | Path) -> None:
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
