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
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from omnitrain import device
from omnitrain.errors import UserError
from omnitrain.models.family import LossNorm
from omnitrain.parallel.layout import whole_plan
from omnitrain.train.metrics import MetricsLogger
from omnitrain.train.optim import build_optimizer, build_scheduler, clip_grad_norm

log = logging.getLogger(__name__)


class NonFiniteError(UserError):
    """A step's loss or grad norm is NaN or inf under train.on_nonfinite=stop."""

    kind = "non-finite"


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
        from omnitrain.train import recompute

        self.recomputed = recompute.apply(self.model, self.adapter, self.plans, cfg.train)
        if self.ctx is not None:  # [parallel hook] TP / FSDP on this rank's modules
            self.model = self.ctx.parallelize(self.adapter, self.model, self.plans)
        self.adapter.cost_per_token(self.model)  # cached for the cost metrics (and data.balance)
        self.module_params = [(self.adapter.module_of(n), p) for n, p in self.adapter.local_parameters(self.model)]
        self.params = [p for _, p in self.module_params]
        # [parallel hook] joins encoder features computed in parts, shards the LLM's sequence
        self.hooks = self.ctx.stage_hooks() if self.ctx is not None else None
        o = cfg.optim
        lr_mult, wd = o.get("lr_mult") or {}, o.get("module_weight_decay") or {}
        self.optimizer = build_optimizer(self.module_params, o.optimizer, lr_mult, wd, modules=self.adapter.module_names)
        # The schedule's lr (what metrics report): a group's lr / its module's multiplier.
        self._group_mults = [float(lr_mult.get(self._group_module(g), 1.0)) for g in self.optimizer.param_groups]
        self.loss_type = cfg.train.get("loss", "token_mean")
        self.on_nonfinite = cfg.train.get("on_nonfinite", "skip")
        self.skipped_steps = 0
        self.scheduler = build_scheduler(self.optimizer, cfg.optim.scheduler, cfg.train.steps)
        self._base_lrs = list(getattr(self.scheduler, "base_lrs", []))  # this config's lr per group
        self.dtype = {"fp32": None, "bf16": torch.bfloat16}[cfg.train.dtype]
        self.loader = None
        self.eval_loader = None
        self.step = 0

    def _group_module(self, group: dict) -> str | None:
        ids = {id(p) for p in group["params"]}
        return next((m for m, p in self.module_params if id(p) in ids), None)

    def schedule_lr(self) -> float:
        """The schedule's lr now (a group with multiplier 1 if any, else the first / its multiplier)."""
        groups = self.optimizer.param_groups
        if not groups:
            return 0.0
        i = next((i for i, m in enumerate(self._group_mults) if m == 1.0), 0)
        return groups[i]["lr"] / self._group_mults[i] if self._group_mults[i] != 1.0 else groups[i]["lr"]

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
            split="train",  # without the data.eval_fraction held out (if set)
            dp_group=self.ctx.dp_group if self.ctx else None,
        )
        return self.loader

    def build_eval_data(self):
        """`data.eval`: datasets (like data.dataset) read with the training data's
        settings, in the same global-batch geometry (each dp rank its slice);
        or `data.eval_fraction`: the samples held out of the training datasets."""
        from omegaconf import open_dict

        from omnitrain.data import build_loader, load_processor

        d = self.cfg.data.copy()
        with open_dict(d):
            if not d.get("eval_fraction"):
                d.dataset = d.eval
            d.weights = None
        t = self.cfg.train
        self.eval_loader = build_loader(
            d, self.adapter, load_processor(self.cfg.model), seed=t.seed, micro_batch_size=t.micro_batch_size,
            global_batch_size=t.global_batch_size, dp_rank=self.dp_rank, dp_size=self.dp_size, split="eval",
            dp_group=self.ctx.dp_group if self.ctx else None,
        )
        return self.eval_loader

    def eval_batches(self) -> int:
        """Global batches per evaluation: train.eval_batches, else enough to cover
        the eval set once (the last batch wraps around to its first samples)."""
        n = self.cfg.train.get("eval_batches")
        if n:
            return int(n)
        size = getattr(self.eval_loader, "epoch_len", None)
        G = self.cfg.train.global_batch_size
        return max(1, -(-size // G)) if size else 1

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss over `eval_batches()` global batches (the same ones every
        time): the train.loss of all of them at once, forward only, under any layout."""
        self.eval_loader.micro_step = 0
        n = self.eval_batches() * self.num_microbatches
        mbs = [self._to_device(mb) for mb in self.eval_loader.iterate(n)]
        if len(mbs) != n:
            raise RuntimeError(f"evaluation: the eval loader gave {len(mbs)} micro-batches of {n}")
        if self.ctx is not None:
            mbs = self.ctx.prepare_micro_batches(self.adapter, mbs, self.dev)
        n_label = sum(self.adapter.count_label_tokens(mb) for mb in mbs)
        n_samples = sum(self.adapter.count_samples(mb) for mb in mbs)
        if self.ctx is not None:
            n_label, n_samples = self.ctx.dp_sum_ints(n_label, n_samples)
        norm = n_label if self.loss_type == "token_mean" else LossNorm(self.loss_type, n_label, n_samples)
        self.model.eval()
        try:
            if self.ctx is None or self.ctx.num_stages == 1:
                loss = sum((self.forward(mb, {}, norm).float().cpu() for mb in mbs), torch.zeros(()))
            else:
                loss = self.ctx.run_forward_only(self, mbs, norm)
            if self.ctx is not None:
                loss = self.ctx.reduce_loss(loss)
        finally:
            self.model.train()
        return {"step": self.step, "eval_loss": float(loss), "eval_tokens": int(n_label)}

    # ---- one step -----------------------------------------------------------
    def _to_device(self, mb: dict) -> dict:
        return {k: v.to(self.dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in mb.items()}

    def forward(self, mb: dict, inputs: dict, num_label_tokens):
        with device.autocast(self.dev, self.dtype):
            return self.adapter.stage_forward(self.model, self.plans[0], mb, inputs, num_label_tokens, hooks=self.hooks)

    def train_step(self, micro_batches: list[dict]) -> StepResult:
        t0 = time.perf_counter()
        micro_batches = [self._to_device(mb) for mb in micro_batches]
        data_metrics = self._data_counts(micro_batches)  # before dummy media and sequence padding
        if self.ctx is not None:  # [parallel hook] same encoder passes on every dp replica
            micro_batches = self.ctx.prepare_micro_batches(self.adapter, micro_batches, self.dev)
        n_label = sum(self.adapter.count_label_tokens(mb) for mb in micro_batches)
        n_samples = sum(self.adapter.count_samples(mb) for mb in micro_batches)
        tokens = sum(int(mb["attention_mask"].sum()) for mb in micro_batches)
        if self.ctx is not None:
            n_label, tokens, n_samples, *data_metrics = self.ctx.dp_sum_ints(n_label, tokens, n_samples, *data_metrics)
        if n_label == 0:
            raise RuntimeError(f"step {self.step + 1}: the global batch has no label tokens; check data.train_on_prompt and the data")
        # token_mean passes the plain count, as before: its loss stays bitwise the same.
        norm = n_label if self.loss_type == "token_mean" else LossNorm(self.loss_type, n_label, n_samples)
        self.adapter.begin_step(tokens)  # [family hook] MoE aux loss is normalised by the global batch's tokens
        extra = self._data_metrics(tokens, data_metrics)
        bad_mb = None  # the first micro-batch with a non-finite loss (known on a single stage)
        if self.ctx is None or self.ctx.num_stages == 1:
            loss = torch.zeros((), dtype=torch.float32)
            for i, mb in enumerate(micro_batches):
                mb_loss = self.forward(mb, {}, norm)
                mb_loss.backward()
                mb_loss = mb_loss.detach().float().cpu()
                if bad_mb is None and not torch.isfinite(mb_loss):
                    bad_mb = i
                loss += mb_loss
        else:
            loss, pipe = self.ctx.run_pipeline(self, micro_batches, norm)
            extra.update(pipe)
        if self.ctx is not None:
            self.ctx.reduce_grads(self.module_params)
            loss = self.ctx.reduce_loss(loss)
        stats = self.adapter.step_stats()  # [family hook] e.g. MoE aux loss and expert load
        if stats is not None:
            vec, to_row = stats
            extra = {**extra, **to_row(self.ctx.reduce_loss(vec) if self.ctx is not None else vec)}
        if self.ctx is not None:  # [parallel hook] norm over pp stages, TP and FSDP shards
            grad_norm = self.ctx.clip_grad_norm(self.module_params, self.cfg.optim.grad_clip)
        else:
            grad_norm = clip_grad_norm(self.params, self.cfg.optim.grad_clip)
        lr = self.schedule_lr()
        # loss and grad norm are the same on every rank (reduced over all of
        # them), so every rank takes the same decision: no pipeline deadlock.
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(torch.as_tensor(grad_norm)))
        if not finite:
            self._nonfinite(float(loss), float(grad_norm), micro_batches, bad_mb)
            extra = {**extra, "skipped": True}
        else:
            self.optimizer.step()
        # The schedule follows the step count, skipped steps included (a
        # resumed run and step k always have the same lr).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before")  # a skipped first step
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        device.synchronize(self.dev)
        self.step += 1
        return StepResult(float(loss), float(grad_norm), lr, tokens, time.perf_counter() - t0, extra)

    def _data_counts(self, micro_batches: list[dict]) -> list[int]:
        """What the data metrics need, as ints to sum over dp: LLM positions
        computed, and what they would be unpacked; each micro-batch's predicted
        cost in this rank's slot of a (dp x micro-batches) vector."""
        from omnitrain.data.packing import computed_tokens

        counts = [computed_tokens(mb) for mb in micro_batches]
        m = len(micro_batches)
        costs = [0] * (self.dp_size * m)
        for j, mb in enumerate(micro_batches):
            costs[self.dp_rank * m + j] = int(round(self.adapter.batch_cost(mb)))
        return [sum(c for c, _ in counts), sum(u for _, u in counts), *costs]

    def _data_metrics(self, tokens: int, counts: list[int]) -> dict:
        """Padding fraction of the LLM positions computed (`pad_frac`) and what it
        would be unpacked (`pad_frac_unpacked`); max/mean predicted cost over dp
        ranks and over micro-batches (data/balance.py)."""
        from omnitrain.data.balance import max_over_mean

        computed, unpacked, *costs = counts
        m = len(costs) // self.dp_size
        ranks = [sum(costs[r * m : (r + 1) * m]) for r in range(self.dp_size)]
        return {
            "pad_frac": 1 - tokens / max(computed, 1),
            "pad_frac_unpacked": 1 - tokens / max(unpacked, 1),
            "cost_imbalance_ranks": max_over_mean(ranks),
            "cost_imbalance_micro": max_over_mean(costs),
        }

    def _nonfinite(self, loss: float, grad_norm: float, micro_batches: list[dict], bad_mb) -> None:
        step = self.step + 1
        where = self._sample_positions(step, micro_batches, bad_mb)
        if self.on_nonfinite == "stop":
            raise NonFiniteError(
                f"step {step}: loss {loss} / grad norm {grad_norm} is not finite{where}; the weights were not updated "
                f"(train.on_nonfinite=skip skips such steps; lower optim.optimizer.lr or check the data)"
            )
        self.skipped_steps += 1
        if self.is_logging_rank or bad_mb is not None:
            log.warning(
                "step %d: loss %s / grad norm %s is not finite%s: skipped, the weights are unchanged (%d skipped so far)",
                step, loss, grad_norm, where, self.skipped_steps,
            )

    def _sample_positions(self, step: int, micro_batches: list[dict], bad_mb) -> str:
        """Where the step's samples are: global sample positions [(step-1) G, step G)
        in the loader's order, this rank's slice, and the first bad micro-batch if known."""
        t = self.cfg.train
        G, per_rank = t.global_batch_size, t.global_batch_size // self.dp_size
        lo = (step - 1) * G + self.dp_rank * per_rank
        out = f" (samples {(step - 1) * G}..{step * G - 1} of the data order"
        if bad_mb is not None:
            from omnitrain.data.packing import num_samples

            n = num_samples(micro_batches[bad_mb])
            a = lo + sum(num_samples(mb) for mb in micro_batches[:bad_mb])
            out += f"; first non-finite micro-batch {bad_mb} of dp rank {self.dp_rank}: samples {a}..{a + n - 1}"
        return out + ")"

    # ---- the run ------------------------------------------------------------
    def fit(self, run_dir: str | Path) -> list[dict]:
        cfg = self.cfg.train
        if self.loader is None:
            self.build_data()
        eval_every = int(cfg.get("eval_every") or 0)
        if eval_every and self.eval_loader is None:  # (config.validate: data.eval is set)
            self.build_eval_data()
        elif not eval_every and self.is_logging_rank and (self.cfg.data.get("eval") or self.cfg.data.get("eval_fraction")):
            log.warning("data.eval / data.eval_fraction is set but train.eval_every=0: no validation runs (set train.eval_every=N)")
        self.maybe_resume(run_dir)
        it = iter(self.loader)
        logger = MetricsLogger(
            run_dir, cfg.steps, enabled=self.is_logging_rank, progress=cfg.progress, start_step=self.step,
            tensorboard=bool(cfg.get("tensorboard", False)),
        )
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
                if eval_every and (self.step % eval_every == 0 or self.step == cfg.steps):
                    ev = self.evaluate()
                    row.update(ev)
                    logger.log_eval(ev)
                if cfg.save_every > 0 and (self.step % cfg.save_every == 0 or self.step == cfg.steps):
                    self.save(run_dir)
        finally:
            logger.close()
        if self.skipped_steps and self.is_logging_rank:
            log.warning("non-finite: %d of %d steps skipped (train.on_nonfinite=skip)", self.skipped_steps, len(rows))
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

    def _reapply_group_lrs(self) -> None:
        """After a resume, each param group's base lr is this config's (optim.optimizer.lr
        x optim.lr_mult of its module): a checkpoint of another layout holds another
        rank's groups (other modules), and a changed lr or lr_mult applies at once."""
        sched = self.scheduler
        if not hasattr(sched, "lr_lambdas") or list(sched.base_lrs) == self._base_lrs:
            return
        old = list(sched.base_lrs)
        sched.base_lrs = list(self._base_lrs)
        for group, base, fn in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["initial_lr"] = base
            group["lr"] = base * fn(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        if self.is_logging_rank and sorted(old) != sorted(self._base_lrs):
            log.warning("resume: base lr per param group %s -> %s (this run's optim.optimizer.lr and optim.lr_mult)", old, self._base_lrs)

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
        self._reapply_group_lrs()
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
                    what, self.step, self.schedule_lr(),
                )
        if self.is_logging_rank:
            log.info("resumed from %s at step %d", path, self.step)


def save_resolved_config(cfg, run_dir: str | Path) -> None:
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
