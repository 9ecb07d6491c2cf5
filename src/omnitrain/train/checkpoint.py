"""Sharded, atomic, resumable checkpoints through torch.distributed.checkpoint.

Layout under the run dir:

    checkpoints/step_<N>/     .metadata, __<rank>_0.distcp, meta.json
    checkpoints/step_<N>.tmp/ a save in progress (ignored; removed by the next save)
    checkpoints/latest        name of the newest complete step dir, written last

The DCP state dict holds
    model.<HF name>                     each rank the tensors it owns (meta tensors skipped)
    optimizer.state.<HF name>.<key>     flattened, so it reshards with the model
    optimizer.param_groups.<HF name>.<key>
    step
    rank<r>                             that rank's pickled RNG, scheduler, loader and extra state
Tensors are keyed by name, so a checkpoint saved under one layout loads under
any other; per-rank state falls back to rank 0's when the world changed.

Works without a process group (one process) and with one (every rank calls
`save`/`load`; each writes only what it owns).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from omnitrain import device
from omnitrain.errors import UserError

__all__ = ["CheckpointError", "find_resume", "latest", "load", "save"]

logger = logging.getLogger(__name__)

LATEST = "latest"
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True, strict=False)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be loaded into this run; nothing was modified."""

    kind = "checkpoint error"


# ----------------------------------------------------------------------------- paths


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step}"


def latest(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = checkpoint_root(run_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def find_resume(run_dir: str | os.PathLike, resume: str | os.PathLike | None) -> Path | None:
    """Resolve train.resume: null -> None; auto -> this run's latest (or None); else a path.

    A path may be a step dir, a `checkpoints/` dir or a run dir (both via `latest`).
    """
    if resume in (None, "", "null", "none", False):
        return None
    if str(resume) == "auto":
        return latest(run_dir)
    path = Path(resume).expanduser()
    if path.name.endswith(".tmp"):
        raise CheckpointError(f"train.resume={resume}: an unfinished save, not a checkpoint")
    if (path / ".metadata").is_file():
        return path
    for root in (path, checkpoint_root(path)):
        if (root / LATEST).is_file():
            return latest(root.parent)
    raise CheckpointError(
        f"train.resume={resume}: not a checkpoint (no .metadata) nor a run with a "
        f"checkpoints/{LATEST} pointer; use auto, null or a step_<N> dir"
    )


def _complete_steps(root: Path) -> list[tuple[int, Path]]:
    out = []
    for p in root.glob("step_*"):
        tail = p.name[len("step_") :]
        if tail.isdigit() and p.is_dir():
            out.append((int(tail), p))
    return sorted(out)


# ----------------------------------------------------------------------------- save


def save(
    run_dir: str | os.PathLike,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    loader: Any = None,
    dev: device.DeviceInfo | torch.device | None = None,
    extra: dict | None = None,
    keep_last: int = 2,
    save_optimizer: bool = True,
    run: dict | None = None,
) -> Path:
    """Write checkpoint `step` and make it the latest; returns its dir.

    Every rank calls this. The step becomes visible (`latest`) only after all
    ranks finished writing; a failure on the way leaves the previous one as
    latest. `keep_last` <= 0 keeps every checkpoint. `dev` selects whose RNG
    state is saved besides the CPU's. `run` (steps, batch, schedule) goes into
    meta.json, so a resume can say what it changes (`read_meta`).
    """
    rank = _rank()
    root = checkpoint_root(run_dir)
    final = root / step_dir_name(step)
    tmp = root / (final.name + ".tmp")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        # Leftovers of a save that died (maybe under another world size).
        for stale in root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()

    state = _state_dict(model, optimizer if save_optimizer else None)
    state["step"] = step
    state[f"rank{rank}"] = _pickle(_rank_state(scheduler, loader, dev, extra))
    with _single_process_ok():
        dcp.save(state, checkpoint_id=str(tmp))
    # dcp.save returns after the coordinator wrote .metadata, i.e. after every
    # rank's data is on disk; the barrier keeps ranks in step for the rename.
    _barrier()

    if rank == 0:
        meta = {
            "step": step,
            "world_size": _world(),
            "time": time.time(),
            "run": run or {},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            # Re-saving a step (e.g. after resuming before it): swap, never mix.
            old = root / (final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(root)
        _write_atomic(root / LATEST, final.name)
        _prune(root, keep_last, keep=final)
    _barrier()
    return final


def read_meta(path: str | os.PathLike) -> dict:
    """A step dir's meta.json ({} when absent, e.g. written by convert)."""
    f = Path(path) / "meta.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    if keep_last <= 0:
        return
    steps = [p for _, p in _complete_steps(root)]
    for p in steps[: max(0, len(steps) - keep_last)]:
        if p != keep:
            shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------- load


def load(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    loader: Any = None,
    dev: device.DeviceInfo | torch.device | None = None,
    extra: dict | None = None,
    strict: bool = True,
) -> int:
    """Restore a checkpoint into the given objects; returns its step.

    Every rank calls this and loads what it owns. Before anything is modified
    every rank checks the checkpoint against its model (names, shapes, files);
    any mismatch on any rank raises CheckpointError on all of them. With
    `strict`, model tensors in the checkpoint that no rank asked for are an
    error too. `extra`, if given, is updated with the saved extra dict.
    """
    path = Path(path)
    rank = _rank()
    problem = None
    try:
        md = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # a missing or corrupt .metadata
        md, problem = None, f"cannot read {path / '.metadata'}: {type(e).__name__}: {e}"
    if md is not None:
        problem = _missing_files(path, md)

    fresh = optimizer is not None and not optimizer.state
    state = _state_dict(model, optimizer, init_optimizer=True)
    try:
        stateless = _check(path, md, problem, state, strict)
    except CheckpointError:
        if fresh:
            optimizer.state.clear()  # undo torch's zero-lr initialisation: nothing changed
        raise
    if fresh and "optimizer" not in state:
        optimizer.state.clear()

    saved = md.state_dict_metadata
    # Per-rank state of the same rank, else rank 0's (the world size changed).
    own = next((k for k in (f"rank{rank}", "rank0") if k in saved), None)
    if own is None:
        logger.warning("%s has no per-rank state (RNG, scheduler, loader): only tensors restored", path)
    elif own != f"rank{rank}" and rank == 0:
        logger.info("%s was saved by another world size: per-rank state (RNG, loader) from rank 0", path)
    if own is not None:
        state[own] = b""
    if "step" in saved:
        state["step"] = -1
    with _single_process_ok():
        dcp.load(state, checkpoint_id=str(path))
    if "optimizer" in state:
        params = dict(model.named_parameters(remove_duplicate=False))
        for fqn in stateless:  # never stepped when saved: keep them so
            optimizer.state.pop(params[fqn], None)
        set_state_dict(
            model, [optimizer], model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=_OPTIONS
        )
    else:
        set_model_state_dict(model, state["model"], options=_OPTIONS)
    if own is not None:
        _restore_rank_state(_unpickle(state[own]), scheduler, loader, dev, extra)
    return int(state.get("step", 0))


def _check(path: Path, md, problem: str | None, state: dict, strict: bool) -> list[str]:
    """All ranks agree that the checkpoint fits, or all raise. Returns stateless params."""
    stateless: list[str] = []
    if md is not None and problem is None and "optimizer" in state:
        stateless = _select_optimizer_keys(state, md, path)
    if md is not None and problem is None:
        problem = _check_tensors(path, md, state)
    problems = _gather(problem)
    if any(problems):
        raise CheckpointError(
            "; ".join(f"rank {r}: {p}" if len(problems) > 1 else p for r, p in enumerate(problems) if p)
        )
    if strict:
        _check_unused(path, md, state)
    return stateless


def _select_optimizer_keys(state: dict, md, path: Path) -> list[str]:
    """Drop optimizer entries the checkpoint cannot have; return params saved without state.

    No entry for this rank at all: saved with save_optimizer=false (or before
    any step) -> the optimizer stays fresh. A parameter none of whose state is
    saved had no gradient yet when saved -> it gets no state now either.
    Anything else missing is left for `_check_tensors` to report.
    """
    opt = state["optimizer"]
    saved = md.state_dict_metadata
    if not any(f"optimizer.{k}" in saved for k in opt):
        logger.warning("%s has no optimizer state for rank %d: starting with a fresh optimizer", path, _rank())
        del state["optimizer"]
        return []
    by_param: dict[str, list[str]] = {}
    for k in opt:
        if k.startswith("state."):
            fqn = k[len("state.") : k.rindex(".")]
            by_param.setdefault(fqn, []).append(k)
    stateless = [fqn for fqn, keys in by_param.items() if not any(f"optimizer.{k}" in saved for k in keys)]
    for fqn in stateless:
        for k in by_param[fqn]:
            del opt[k]
    return stateless


def _check_tensors(path: Path, md, state: dict) -> str | None:
    """Every tensor this rank wants exists in the checkpoint with the same shape."""
    missing, wrong = [], []
    for section in ("model", "optimizer"):
        for key, value in state.get(section, {}).items():
            name = f"{section}.{key}"
            saved = md.state_dict_metadata.get(name)
            if saved is None:
                missing.append(name)
            elif isinstance(value, torch.Tensor):
                if not isinstance(saved, TensorStorageMetadata):
                    wrong.append(f"{name}: saved as an object, wanted a tensor")
                elif tuple(saved.size) != tuple(value.shape):
                    wrong.append(f"{name}: checkpoint {tuple(saved.size)} vs model {tuple(value.shape)}")
    if not missing and not wrong:
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} names missing in {path} (first: {', '.join(missing[:3])})")
    if wrong:
        parts.append(f"{len(wrong)} shape mismatches ({'; '.join(wrong[:3])})")
    return "checkpoint does not fit this model: " + ", ".join(parts)


def _check_unused(path: Path, md, state: dict) -> None:
    wanted = set().union(*_gather({f"model.{k}" for k in state["model"]}))
    saved = {
        k for k, v in md.state_dict_metadata.items() if k.startswith("model.") and isinstance(v, TensorStorageMetadata)
    }
    unused = sorted(saved - wanted)
    if unused:
        raise CheckpointError(
            f"{path} holds {len(unused)} model tensors this model does not have "
            f"(first: {', '.join(unused[:3])}): a different model? (load(strict=False) ignores them)"
        )


def _missing_files(path: Path, md) -> str | None:
    """A shard file the metadata points into is absent or cut short."""
    need: dict[str, int] = {}
    for info in md.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    bad = []
    for name, size in sorted(need.items()):
        f = path / name
        if not f.is_file():
            bad.append(f"{name} missing")
        elif f.stat().st_size < size:
            bad.append(f"{name} truncated ({f.stat().st_size} < {size} bytes)")
    return f"checkpoint {path} is incomplete: {', '.join(bad)}" if bad else None


# ----------------------------------------------------------------------------- state


def _state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, init_optimizer: bool = False) -> dict:
    """Model (and optimizer) state keyed by HF names, without unmaterialized (meta) tensors.

    For saving, an optimizer that has not stepped yet is left out: torch would
    create its state with a zero-lr step, which counts as a step for Adam's
    bias correction. For loading that state is the template to load into.
    """
    # A LoRA model (models/lora.py) saves what trains: adapters and trained
    # parameters; its frozen base is rebuilt from the seed or model.init_from.
    frozen = set()
    if getattr(model, "_checkpoint_trained_only", False):
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    if optimizer is None or not (optimizer.state or init_optimizer):
        model_sd = get_model_state_dict(model, options=_OPTIONS)
        return {"model": {k: v for k, v in model_sd.items() if not _is_meta(v) and k not in frozen}}
    model_sd, optim_sd = get_state_dict(model, [optimizer], options=_OPTIONS)
    return {
        "model": {k: v for k, v in model_sd.items() if not _is_meta(v) and k not in frozen},
        "optimizer": {k: v for k, v in optim_sd.items() if not _is_meta(v)},
    }


def _is_meta(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.device.type == "meta"


def _rank_state(scheduler, loader, dev, extra) -> dict:
    rng = {"torch": device.rng_state(dev or torch.device("cpu")), "python": random.getstate()}
    try:
        import numpy as np

        rng["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return {
        "rng": rng,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "loader": loader.state_dict() if loader is not None else None,
        "extra": extra,
    }


def _restore_rank_state(saved: dict, scheduler, loader, dev, extra) -> None:
    rng = saved["rng"]
    device.set_rng_state(dev or torch.device("cpu"), rng["torch"])
    random.setstate(rng["python"])
    if "numpy" in rng:
        import numpy as np

        np.random.set_state(rng["numpy"])
    if scheduler is not None and saved["scheduler"] is not None:
        _load_scheduler(scheduler, saved["scheduler"])
    if loader is not None and saved["loader"] is not None:
        loader.load_state_dict(saved["loader"])
    if extra is not None and saved["extra"]:
        extra.update(saved["extra"])


def _load_scheduler(scheduler, sd: dict) -> None:
    """Load a scheduler; under another layout keep only its position.

    Per-group lists (base_lrs, _last_lr) belong to the saving rank's param
    groups; when the count differs the learning rates come from the
    optimizer's restored param groups instead.
    """
    groups = scheduler.optimizer.param_groups
    if len(sd.get("base_lrs", [])) == len(groups):
        scheduler.load_state_dict(sd)
        return
    for key in ("last_epoch", "_step_count"):
        if key in sd:
            setattr(scheduler, key, sd[key])
    scheduler._last_lr = [g["lr"] for g in groups]


def _pickle(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unpickle(data: bytes) -> Any:
    # Our own file, written by _pickle: RNG states and loader state are not tensors-only.
    return torch.load(io.BytesIO(data), weights_only=False)


# ----------------------------------------------------------------------------- dist helpers


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _world() -> int:
    return dist.get_world_size() if _dist() else 1


def _barrier() -> None:
    if _dist():
        dist.barrier()


@contextlib.contextmanager
def _single_process_ok():
    """Without a process group DCP warns that it assumes one process: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _gather(obj: Any) -> list:
    if not _dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
