"""Structured config schemas (Hydra ConfigStore) and whole-config validation.

Each config group has a dataclass schema. A group's yaml lists the schema as
the first entry of its own defaults list (`- /schema/<group>@_here_`), so a
wrong type or an unknown key fails at composition with the key named.
Cross-group rules (layout vs model depth, batch divisibility) live in
`validate()` and run before any worker process starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from omnitrain.data.config import DataConfig


@dataclass
class ModelConfig:
    _target_: str = "omnitrain.models.qwen25_omni.Qwen25OmniThinker"
    name: str = MISSING
    # HF config class and its keyword arguments (nested dicts for sub-configs).
    config_class: str = "transformers.Qwen2_5OmniThinkerConfig"
    config: Dict[str, Any] = field(default_factory=dict)
    # Processor (tokenizer + image/video/audio front ends): a folder, or
    # `builtin:<name>` for one shipped in omnitrain/assets.
    processor: str = "builtin:qwen25_omni_tiny"
    # HF folder to initialise weights from; null = random init (seeded).
    init_from: Optional[str] = None
    # Which modules train. A frozen module gets no optimizer state.
    trainable: Dict[str, bool] = field(default_factory=lambda: {"vision": True, "audio": True, "llm": True})


@dataclass
class PPConfig:
    size: int = 1
    schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b
    # One list per module, one entry per stage; null = everything on one stage.
    layers: Optional[Dict[str, List[int]]] = None
    virtual_stages: int = 1


@dataclass
class FSDPConfig:  # [parallel] options of parallel.dp_mode=fsdp
    mixed_precision: str = "none"  # none | bf16 (gather/compute in bf16, reduce grads in fp32)
    cpu_offload: bool = False  # sharded params, grads and optimizer state live in host memory
    reshard_after_forward: bool = True  # free gathered params after each unit's forward


@dataclass
class ParallelConfig:
    name: str = "single"
    pp: PPConfig = field(default_factory=PPConfig)
    tp: Dict[str, int] = field(default_factory=lambda: {"vision": 1, "audio": 1, "llm": 1})
    dp: Any = "auto"  # auto | int
    dp_mode: str = "replicate"  # replicate | fsdp
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    # Shard the LLM's norms and residual stream over its TP ranks along the
    # sequence (Megatron's sequence parallelism); needs parallel.tp.llm > 1.
    sequence_parallel: bool = False
    # Seconds a collective may wait before the process group aborts.
    timeout_s: int = 300


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 5
    scheduler: str = "cosine"  # cosine | constant
    grad_clip: float = 1.0  # 0 or less disables clipping


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


@dataclass
class Config:
    model: ModelConfig = MISSING
    parallel: ParallelConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    train: TrainConfig = MISSING


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="schema/model", name="model", node=ModelConfig)
    cs.store(group="schema/parallel", name="parallel", node=ParallelConfig)
    cs.store(group="schema/data", name="data", node=DataConfig)
    cs.store(group="schema/optim", name="optim", node=OptimConfig)
    cs.store(group="schema/train", name="train", node=TrainConfig)


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


def validate(cfg) -> None:
    """Cross-group checks that need no process group. Raises ConfigError."""
    t = cfg.train
    if t.steps < 1:
        raise ConfigError(f"train.steps={t.steps}: must be >= 1")
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        raise ConfigError("train.global_batch_size and train.micro_batch_size must be >= 1")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={t.micro_batch_size}: change one of them"
        )
    if t.dtype not in ("fp32", "bf16"):
        raise ConfigError(f"train.dtype={t.dtype!r}: use fp32 or bf16")
    o = cfg.optim
    if o.scheduler not in ("cosine", "constant"):
        raise ConfigError(f"optim.scheduler={o.scheduler!r}: use cosine or constant")
    if o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps}: must be >= 0")
