"""Structured config schemas (Hydra ConfigStore) and whole-config validation.

Each config group has a dataclass schema. A group's yaml lists the schema as
the first entry of its own defaults list (`- /schema/<group>@_here_`), so a
wrong type or an unknown key fails at composition with the key named.
Cross-group rules (layout vs model depth, batch divisibility) live in
`validate()` and `parallel.context.check_layout` and run before any worker
process starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from omnitrain.errors import UserError

from omnitrain.data.config import DataConfig


@dataclass
class LoraModuleConfig:
    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # > 0 draws from each rank's RNG: layouts agree only at 0
    # Linear names inside the module's layers; null = all its projections (attention + MLP).
    target_modules: Optional[List[str]] = None


@dataclass
class ModelConfig:
    # The model family's adapter (omnitrain.models.<family>), built once per process.
    _target_: str = MISSING
    name: str = MISSING
    # HF config class (null: the family's) and its keyword arguments (nested
    # dicts for sub-configs); with `path`, keys merged over the folder's config.
    config_class: Optional[str] = None
    config: Dict[str, Any] = field(default_factory=dict)
    # An HF folder as it ships (model=hf): architecture and config from its
    # config.json; model=hf also takes its processor and weights from it.
    path: Optional[str] = None
    # Processor (tokenizer + media front ends): a folder, or `builtin:<name>`
    # for one shipped in omnitrain/assets.
    processor: str = MISSING
    # Example -> processed sample, given (processor, token ids, settings): the
    # family's transform, built by `_target_` (partial).
    transform: Any = field(default_factory=lambda: {"_target_": "omnitrain.data.sample.SampleBuilder", "_partial_": True})
    # HF folder to initialise weights from; null = random init (seeded).
    init_from: Optional[str] = None
    # Which modules train (keys: the family's modules; unlisted ones train):
    # per module a bool, or {train: bool, except: [patterns]} where the
    # parameters matching an fnmatch pattern (names relative to the module,
    # e.g. "merger.*" for vision) get the opposite. Frozen parameters get no
    # gradients and no optimizer state. `sft`: the family's usual SFT choice
    # (encoders frozen, their projectors and the LLM trained).
    trainable: Any = field(default_factory=dict)
    # LoRA (PEFT) per module: model.lora.llm.enabled=true model.lora.llm.target_modules=[q_proj,v_proj].
    # Entries for modules the family lacks must stay disabled.
    lora: Dict[str, LoraModuleConfig] = field(
        default_factory=lambda: {m: LoraModuleConfig() for m in ("vision", "audio", "llm")}
    )
    # Mixture-of-experts options of a family with MoE layers: aux_loss_coef
    # (router load-balancing loss, normalised as models/moe.py says).
    moe: Dict[str, Any] = field(default_factory=dict)


@dataclass
class PPConfig:
    size: int = 1
    schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b | zero_bubble | zbv (virtual_stages=2)
    # One list per module, one entry per stage; null = everything on one stage.
    # Typed Any: OmegaConf cannot merge `parallel.pp.layers={...}` into a null
    # typed dict node; validate_layout checks the lists instead.
    layers: Any = None
    virtual_stages: int = 1


@dataclass
class FSDPConfig:  # [parallel] options of parallel.dp_mode=fsdp
    mixed_precision: str = "none"  # none | bf16 (gather/compute in bf16, reduce grads in fp32)
    cpu_offload: bool = False  # sharded params, grads and optimizer state live in host memory
    reshard_after_forward: bool = True  # free gathered params after each unit's forward


@dataclass
class EPConfig:  # [parallel] expert parallelism, per module with experts
    # Experts of each MoE layer split over this many of the LLM's data-parallel
    # ranks (tokens routed by all-to-all; parallel/ep.py); 1 = every rank holds all.
    llm: int = 1


@dataclass
class ParallelConfig:
    name: str = "single"
    pp: PPConfig = field(default_factory=PPConfig)
    # TP size: one for every module (`tp: 2`) or per module (`tp: {vision: 1, llm: 2}`,
    # unlisted modules 1); the keys are the model family's modules.
    tp: Any = 1
    dp: Any = "auto"  # auto | int
    dp_mode: str = "replicate"  # replicate | fsdp
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    ep: EPConfig = field(default_factory=EPConfig)
    # Shard the LLM's norms and residual stream over its TP ranks along the
    # sequence (Megatron's sequence parallelism); needs parallel.tp.llm > 1.
    sequence_parallel: bool = False
    # Seconds a collective may wait before the process group aborts.
    timeout_s: int = 300
    # Seconds without a heartbeat after which a self-launched worker counts as
    # hung (stopped, frozen) and the run stops naming it; 0 turns it off.
    heartbeat_s: float = 60


@dataclass
class OptimConfig:
    name: str = "adamw"
    # Any torch.optim class by `_target_`, with its keyword arguments; the
    # trainable parameters this rank owns are passed first.
    optimizer: Dict[str, Any] = field(
        default_factory=lambda: {
            "_target_": "torch.optim.AdamW",
            "lr": 1e-3,
            "betas": [0.9, 0.95],
            "eps": 1e-8,
            "weight_decay": 0.0,
            "foreach": False,  # identical math whatever the parameter grouping
        }
    )
    # LR schedule by `_target_`, given the optimizer (and `total_steps` where it takes one).
    scheduler: Dict[str, Any] = field(
        default_factory=lambda: {"_target_": "omnitrain.train.optim.warmup_cosine", "warmup_steps": 5, "min_lr_ratio": 0.1}
    )
    grad_clip: float = 1.0  # 0 or less disables clipping
    # Per module (keys: the family's modules): a multiplier of the optimizer's
    # lr (ms-swift's vit_lr / aligner_lr), and a weight decay that replaces
    # optim.optimizer.weight_decay. Each module's parameters form one param group.
    # On the command line: optim.lr_mult={vision:0.1,llm:1} (or +optim.lr_mult.vision=0.1).
    lr_mult: Any = None
    module_weight_decay: Any = None


@dataclass
class TrainConfig:
    steps: int = 40
    global_batch_size: int = 4
    micro_batch_size: int = 1
    seed: int = 1234
    dtype: str = "fp32"  # fp32 | bf16 (autocast)
    device: str = "auto"  # auto | cpu | cuda | npu
    log_every: int = 1
    progress: bool = True
    # Run directory; null = Hydra's run dir (outputs/<date>/<time>).
    output_dir: Optional[str] = None
    save_every: int = 0
    keep_last: int = 2
    save_optimizer: bool = True
    resume: Optional[str] = None
    # token_mean: sum of token losses / label tokens of the global batch;
    # sample_mean: mean over the global batch's samples of each sample's token
    # mean; sum: the plain sum of token losses.
    loss: str = "token_mean"
    # A step whose loss or grad norm is NaN/inf never updates the weights:
    # skip (logged, counted) or stop (one-line error naming the step).
    on_nonfinite: str = "skip"
    # Event files in <run dir>/tensorboard from the logging rank (pip install omnitrain[tb]).
    tensorboard: bool = False
    # Validation every N steps (0 = off) on data.eval: the loss (train.loss) over
    # eval_batches global batches (null = the eval set once), forward only.
    eval_every: int = 0
    eval_batches: Optional[int] = None
    # Activation recompute per module (train/recompute.py): none | full | selective,
    # and how many layers: null = all the module's layers on this stage, N = the
    # first N of them on each pipeline stage. Modules the family lacks stay none.
    recompute: Dict[str, str] = field(default_factory=lambda: {m: "none" for m in ("vision", "audio", "llm")})
    recompute_layers: Dict[str, Optional[int]] = field(default_factory=lambda: {m: None for m in ("vision", "audio", "llm")})


@dataclass
class PlanTokens:
    """LLM tokens of one sample by kind; any set = these numbers instead of a data scan."""

    image: Optional[float] = None
    video: Optional[float] = None
    audio: Optional[float] = None
    text: Optional[float] = None
    # items of a kind per sample (an image of 1,000 tokens attends over 1,000; two of 500 over 500 each)
    image_items: float = 1
    video_items: float = 1
    audio_items: float = 1


@dataclass
class PlanConfig:
    """The planner (`python -m omnitrain.plan`, `parallel.pp.layers=auto`, `parallel=auto`)."""

    # LLM tokens per sample by kind; all null = scan the data config's samples.
    tokens: PlanTokens = field(default_factory=PlanTokens)
    stat: str = "mean"  # mean | p90: which statistic of the scanned samples the plan uses
    scan_samples: int = 256  # samples the scan reads (the first of the data order)
    # Time each layer type on this machine's device and fit the cost model;
    # false = a roofline of the numbers below.
    calibrate: bool = False
    peak_tflops: float = 313.0  # dense bf16 TFLOP/s of one device (Ascend 910B; A100 312, H100 989)
    efficiency: float = 0.45  # share of the peak a layer reaches
    mem_gbps: float = 1600.0  # device memory bandwidth, GB/s
    link_gbps: float = 100.0  # TP all-reduce bus bandwidth, GB/s
    # Memory per device the auto layouts must fit (GiB); null = no cap.
    memory_gib: Optional[float] = None
    # World size parallel=auto plans for; null = $WORLD_SIZE (torchrun), else required.
    world_size: Optional[int] = None


@dataclass
class Config:
    model: ModelConfig = MISSING
    parallel: ParallelConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    train: TrainConfig = MISSING
    plan: PlanConfig = field(default_factory=PlanConfig)


def register_configs() -> None:
    from omegaconf import OmegaConf

    from omnitrain.models import demo_datasets

    # data=demo_hf (model=hf's default data): the demo sets the folder's model can take.
    OmegaConf.register_new_resolver("omnitrain_demo_datasets", demo_datasets, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="schema/model", name="model", node=ModelConfig)
    cs.store(group="schema/parallel", name="parallel", node=ParallelConfig)
    cs.store(group="schema/data", name="data", node=DataConfig)
    cs.store(group="schema/optim", name="optim", node=OptimConfig)
    cs.store(group="schema/train", name="train", node=TrainConfig)


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the key and the fix."""

    kind = "config error"


def _need(key: str, value, ok: bool, what: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {what}")


def validate(cfg) -> None:
    """Every number a user sets, and cross-group checks that need no process
    group. Raises ConfigError naming the key and what would work."""
    t = cfg.train
    for key in ("steps", "global_batch_size", "micro_batch_size", "log_every"):
        _need(f"train.{key}", t[key], t[key] >= 1, "must be >= 1")
    for key in ("save_every", "keep_last"):
        _need(f"train.{key}", t[key], t[key] >= 0, "must be >= 0 (0 turns it off)")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={t.micro_batch_size}: change one of them"
        )
    _need("train.dtype", t.dtype, t.dtype in ("fp32", "bf16"), "use fp32 or bf16")
    _need("parallel.timeout_s", cfg.parallel.timeout_s, cfg.parallel.timeout_s > 0, "must be > 0 seconds")
    _need("parallel.heartbeat_s", cfg.parallel.heartbeat_s, cfg.parallel.heartbeat_s >= 0, "must be >= 0 seconds (0 turns it off)")
    d = cfg.data
    _need("data.num_workers", d.num_workers, d.num_workers >= 0, "must be >= 0")
    _need("data.cutoff_len", d.cutoff_len, d.cutoff_len >= 1, "must be >= 1")
    _need("data.on_error", d.on_error, d.on_error in ("raise", "skip"), "use raise or skip")
    if d.get("max_tokens") is not None:
        _need("data.max_tokens", d.max_tokens, d.max_tokens >= 1, "must be >= 1 (null = data.cutoff_len)")
    o = cfg.optim
    opt = o.optimizer
    if "lr" in opt:
        _need("optim.optimizer.lr", opt.lr, float(opt.lr) > 0, "must be > 0")
    if "eps" in opt:
        _need("optim.optimizer.eps", opt.eps, float(opt.eps) > 0, "must be > 0")
    if "weight_decay" in opt:
        _need("optim.optimizer.weight_decay", opt.weight_decay, float(opt.weight_decay) >= 0, "must be >= 0")
    if "betas" in opt:
        betas = list(opt.betas)
        _need("optim.optimizer.betas", betas, len(betas) == 2 and all(0 <= float(b) < 1 for b in betas), "give two values in [0, 1)")
    _need("train.loss", t.loss, t.loss in ("token_mean", "sample_mean", "sum"), "use token_mean, sample_mean or sum")
    _need("train.on_nonfinite", t.on_nonfinite, t.on_nonfinite in ("skip", "stop"), "use skip or stop")
    _need("train.eval_every", t.eval_every, t.eval_every >= 0, "must be >= 0 (0 turns validation off)")
    frac = cfg.data.get("eval_fraction")
    if frac is not None:
        _need("data.eval_fraction", frac, 0 < float(frac) < 1, "must be in (0, 1) (null = off)")
        if cfg.data.get("eval"):
            raise ConfigError(
                f"data.eval_fraction={frac} and data.eval={cfg.data.eval}: validate on held-out samples or on "
                "datasets, not both; unset one of them"
            )
    if t.eval_every and not cfg.data.get("eval") and not frac:
        raise ConfigError(
            f"train.eval_every={t.eval_every}: no validation data; set data.eval (datasets, like data.dataset) "
            "or data.eval_fraction (held out of data.dataset)"
        )
    if t.eval_batches is not None:
        _need("train.eval_batches", t.eval_batches, t.eval_batches >= 1, "must be >= 1 (null = the eval set once)")
    for key in ("lr_mult", "module_weight_decay"):
        for m, v in (o.get(key) or {}).items():
            ok = float(v) > 0 if key == "lr_mult" else float(v) >= 0
            _need(f"optim.{key}.{m}", v, ok, "must be > 0 (freeze with model.trainable)" if key == "lr_mult" else "must be >= 0")
    sched = o.scheduler
    if "warmup_steps" in sched:
        _need("optim.scheduler.warmup_steps", sched.warmup_steps, int(sched.warmup_steps) >= 0, "must be >= 0")
    if "min_lr_ratio" in sched:
        _need("optim.scheduler.min_lr_ratio", sched.min_lr_ratio, 0 <= float(sched.min_lr_ratio) <= 1, "must be in [0, 1]")


def check_finetune(cfg, family) -> None:
    """Fine-tuning keys that name the family's modules (`optim.lr_mult`,
    `optim.module_weight_decay`; `model.trainable` is checked by the family,
    its `except` patterns here against the model's parameter names), before
    any process starts."""
    modules = family.module_names
    for key in ("lr_mult", "module_weight_decay"):
        unknown = sorted(set(cfg.optim.get(key) or {}) - set(modules))
        if unknown:
            raise ConfigError(f"optim.{key}.{unknown[0]}: unknown module; model {cfg.model.name} has {', '.join(modules)}")
    if any(family.trainable_except.values()):
        family.check_trainable([n for n, _ in family.build_meta().named_parameters()])
    if family.lora:  # target names that match no Linear fail here, on meta, not in a worker
        from omnitrain.models.lora import inject

        inject(family, family.build_meta(), family.lora, cfg.train.seed)
