"""The one place that names a device or a backend.

Everything else asks this module: which accelerator is here, which
torch.distributed backend goes with it, how to synchronise, how much memory a
rank used, and the peak FLOP/s used for MFU. NPU support comes from torch_npu
(optional `npu` extra); importing it registers `torch.npu`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import dataclass

import torch

_BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}

# Dense bf16 peak FLOP/s per device, for MFU. Keys are substrings of the
# device name; first match wins. CPU has no meaningful peak: MFU is reported
# as 0 there rather than a made-up number.
_PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("Ascend910B", 313e12),
    ("Ascend910", 256e12),
)


@functools.lru_cache(maxsize=None)
def _has_npu() -> bool:
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
    except Exception:
        return False
    return hasattr(torch, "npu") and torch.npu.is_available()


@dataclass(frozen=True)
class DeviceInfo:
    type: str  # npu | cuda | cpu
    backend: str  # gloo, or "cpu:gloo,npu:hccl" / "cpu:gloo,cuda:nccl" (backend_for)

    def torch_device(self, local_rank: int = 0) -> torch.device:
        if self.type == "cpu":
            return torch.device("cpu")
        return torch.device(self.type, local_rank)


def detect(requested: str = "auto") -> DeviceInfo:
    """Pick the device type: `auto` prefers npu, then cuda, then cpu."""
    if requested not in ("auto", *_BACKENDS):
        raise ValueError(f"train.device={requested!r}: use one of auto, {', '.join(_BACKENDS)}")
    if requested == "auto":
        if _has_npu():
            requested = "npu"
        elif torch.cuda.is_available():
            requested = "cuda"
        else:
            requested = "cpu"
    elif requested == "npu" and not _has_npu():
        raise RuntimeError("train.device=npu but torch_npu is not importable: pip install 'omnitrain[npu]'")
    elif requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible: use train.device=auto or cpu")
    return DeviceInfo(requested, _backend(requested))


def is_cpu(dev: torch.device | DeviceInfo) -> bool:
    return dev.type == "cpu"


def _backend(dev_type: str) -> str:
    if dev_type == "cpu":
        return _BACKENDS["cpu"]
    # An accelerator's collective library takes only device tensors; the
    # host-side ones (loss and token sums, data-parallel counters) need gloo
    # on the same groups, which torch's per-device backend string gives.
    return f"cpu:{_BACKENDS['cpu']},{dev_type}:{_BACKENDS[dev_type]}"


def backend_for(dev: torch.device | DeviceInfo) -> str:
    """The process-group backend for `dev` (every group made from it inherits it)."""
    return _backend(dev.type)


def cpu_backend() -> str:
    """Backend for CPU-side collectives (object broadcast, barriers)."""
    return _BACKENDS["cpu"]


def _module(dev: torch.device | DeviceInfo):
    return getattr(torch, dev.type, None) if dev.type != "cpu" else None


def set_device(dev: torch.device) -> None:
    mod = _module(dev)
    if mod is not None:
        mod.set_device(dev)


def synchronize(dev: torch.device | DeviceInfo) -> None:
    mod = _module(dev)
    if mod is not None:
        mod.synchronize()


def compute_clock(dev: torch.device | DeviceInfo):
    """The clock that times a stage's compute. On CPU with one intra-op thread
    it is the calling thread's CPU time (autograd runs CPU backward on the
    calling thread too): with more workers than cores, wall time would also
    count the waits for a core, which belong to the machine, not the stage.
    Otherwise host wall time (on accelerators the executor does not
    synchronize per action, so that communication keeps overlapping)."""
    if dev.type == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time
    return time.perf_counter


def accelerator_initialized() -> bool:
    """Whether this process already holds an accelerator context.

    A child forked after that cannot use the accelerator, so launchers must
    spawn instead.
    """
    for name in ("cuda", "npu"):
        mod = getattr(torch, name, None)
        if mod is not None and hasattr(mod, "is_initialized") and mod.is_initialized():
            return True
    return False


def manual_seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    for name in ("cuda", "npu"):
        mod = getattr(torch, name, None)
        if mod is not None and hasattr(mod, "manual_seed_all"):
            with contextlib.suppress(Exception):
                mod.manual_seed_all(seed)


def rng_state(dev: torch.device | DeviceInfo) -> dict:
    state = {"cpu": torch.get_rng_state()}
    mod = _module(dev)
    if mod is not None:
        state["device"] = mod.get_rng_state()
    return state


def set_rng_state(dev: torch.device | DeviceInfo, state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    mod = _module(dev)
    if mod is not None and "device" in state:
        mod.set_rng_state(state["device"])


def reset_peak_memory(dev: torch.device | DeviceInfo) -> None:
    mod = _module(dev)
    if mod is not None:
        mod.reset_peak_memory_stats()


def peak_memory_bytes(dev: torch.device | DeviceInfo) -> int:
    """Peak allocated bytes on the device; on CPU the process's peak RSS."""
    mod = _module(dev)
    if mod is not None:
        return int(mod.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def device_name(dev: torch.device | DeviceInfo) -> str:
    """The device's marketing name (what the peak-FLOPs table is keyed by); "cpu" on CPU."""
    mod = _module(dev)
    if mod is None:
        return "cpu"
    try:
        return str(mod.get_device_name())
    except Exception:
        return dev.type


def attention_kernels(dev: torch.device | DeviceInfo) -> str:
    """Which fused kernels SDPA may dispatch to here (for reports)."""
    if dev.type == "cuda":
        b = torch.backends.cuda
        on = [n for n, f in (("flash", b.flash_sdp_enabled), ("mem_efficient", b.mem_efficient_sdp_enabled),
                             ("cudnn", getattr(b, "cudnn_sdp_enabled", lambda: False))) if f()]
        return "sdpa (" + ", ".join(on + ["math"]) + ")"
    if dev.type == "npu":
        return "sdpa (npu fused attention)"
    return "sdpa (cpu)"


def peak_flops(dev: torch.device | DeviceInfo) -> float:
    """Peak dense bf16 FLOP/s of one device; 0.0 when unknown (MFU reported as 0)."""
    mod = _module(dev)
    if mod is None:
        return 0.0
    try:
        name = mod.get_device_name()
    except Exception:
        return 0.0
    name = name.replace(" ", "")
    for key, flops in _PEAK_FLOPS:
        if key in name:
            return flops
    return 0.0


def has_streams(dev: torch.device | DeviceInfo) -> bool:
    """Whether work on the device runs on streams, so communication issued on a
    side stream overlaps compute (cuda, npu); CPU ops run inline."""
    mod = _module(dev)
    return mod is not None and hasattr(mod, "Stream")


_COMM_STREAMS: dict[tuple[str, int], object] = {}


def _index(dev: torch.device) -> int:
    return dev.index if dev.index is not None else _module(dev).current_device()


def comm_stream(dev: torch.device):
    """The side stream pipeline p2p runs on (one per device, made once); None without streams."""
    if not has_streams(dev):
        return None
    key = (dev.type, _index(dev))
    if key not in _COMM_STREAMS:
        _COMM_STREAMS[key] = _module(dev).Stream(device=torch.device(dev.type, key[1]))
    return _COMM_STREAMS[key]


def current_stream(dev: torch.device):
    """The stream compute runs on now; None without streams."""
    return _module(dev).current_stream(torch.device(dev.type, _index(dev))) if has_streams(dev) else None


def use_stream(dev: torch.device, stream):
    """Context that makes `stream` current (a no-op for None)."""
    return _module(dev).stream(stream) if stream is not None else contextlib.nullcontext()


def autocast(dev: torch.device | DeviceInfo, dtype: torch.dtype | None):
    """Autocast context for the compute dtype; a no-op for fp32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=dtype)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def experts_implementation(dev: torch.device | DeviceInfo) -> str:
    """transformers' MoE experts implementation for this device
    (`config._experts_implementation`): torch's grouped GEMM where torch has
    one (`grouped_mm`; transformers falls back to its own per-group kernel
    where torch's does not take the device / dtype), else HF's per-expert loop
    (`eager`). On CPU fp32 both give bitwise the same results here (see
    scripts/bench_moe.py, which also times them)."""
    del dev  # every backend omnitrain names goes through the same dispatch today
    if hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm"):
        return "grouped_mm"
    return "eager"
