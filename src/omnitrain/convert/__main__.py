"""`python -m omnitrain.convert`: move weights between HF folders and omnitrain checkpoints.

    python -m omnitrain.convert hf_to_mm HF_DIR OUT_DIR
        HF folder of any family (for an omni model: its thinker, or the whole
        model) -> checkpoint OUT_DIR (a step dir with model tensors only):
        train with train.resume=OUT_DIR.
    python -m omnitrain.convert mm_to_hf CKPT OUT_DIR [--config RUN/config.yaml] [--dtype bf16]
        checkpoint (step dir or run dir) -> HF folder: config.json, safetensors
        shards + index, tokenizer/processor; loads with from_pretrained.
    python -m omnitrain.convert resplit CKPT OUT_RUN_DIR parallel=pp2 [overrides...]
        the checkpoint re-saved as the given layout's ranks would save it
        (OUT_RUN_DIR/checkpoints/step_<N>), optimizer and step included.

The model config comes from --config, else the run's config.yaml next to the
checkpoint, else the config.json that hf_to_mm stored in it. Outputs are
written to a temporary sibling and renamed when complete; an existing
non-empty output is never overwritten.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

from omnitrain.convert import hf
from omnitrain.errors import UserError

log = logging.getLogger("omnitrain.convert")

HF_CONFIG = "config.json"  # what hf_to_mm stores in a checkpoint it writes


class ConvertError(UserError, RuntimeError):
    """Bad input to a conversion; nothing was written."""

    kind = "convert error"


# ----------------------------------------------------------------------------- helpers


def _fresh_output(out: Path) -> Path:
    """A temporary sibling of `out` to write into; refuses a non-empty `out`."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"{out} exists and is not empty: choose another output (nothing was overwritten)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _usual_modes(folder: Path) -> None:
    """Files readable by group and others, as save_pretrained leaves them
    (safetensors writes through a private 0600 temporary file)."""
    mask = os.umask(0)
    os.umask(mask)
    for f in folder.rglob("*"):
        if f.is_file() and not f.is_symlink():
            f.chmod(0o666 & ~mask)


def _publish(tmp: Path, out: Path) -> None:
    _usual_modes(tmp)
    if out.exists():
        out.rmdir()  # empty, checked by _fresh_output
    tmp.rename(out)


def _step_dir(ckpt: str) -> Path:
    from omnitrain.train import checkpoint

    path = checkpoint.find_resume(ckpt, str(ckpt))
    if path is None:
        raise ConvertError(f"{ckpt}: not a checkpoint")
    return path


def _run_config(step_dir: Path, config: str | None):
    """The run's composed config (OmegaConf) or None."""
    from omegaconf import OmegaConf

    path = Path(config) if config else step_dir.parent.parent / "config.yaml"
    if path.is_file():
        return OmegaConf.load(path)
    if config:
        raise ConvertError(f"--config {config}: no such file")
    return None


def _family_of_config(config: dict, where):
    from omnitrain.models import FAMILIES, family_for_model_type

    found = family_for_model_type(config.get("model_type"))
    if found is None:
        raise ConvertError(f"{where}: model_type {config.get('model_type')!r} is not one omnitrain trains ({', '.join(FAMILIES)})")
    return found[1].from_hf_config(config, name=found[0])


def _model_family(step_dir: Path, config: str | None):
    """(model family with its HF config, model cfg or None) for a checkpoint."""
    run_cfg = _run_config(step_dir, config)
    if run_cfg is not None:
        from omnitrain.models.family import build_family

        return build_family(run_cfg.model), run_cfg.model
    stored = step_dir / HF_CONFIG
    if stored.is_file():
        return _family_of_config(json.loads(stored.read_text()), stored), None
    raise ConvertError(
        f"{step_dir}: cannot tell the model config; pass --config <run dir>/config.yaml "
        f"(no {step_dir.parent.parent / 'config.yaml'} nor {stored})"
    )


def _saved_model_tensors(step_dir: Path) -> dict:
    """name -> TensorStorageMetadata of the checkpoint's model tensors, after checking its files."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from omnitrain.train import checkpoint

    try:
        md = dcp.FileSystemReader(str(step_dir)).read_metadata()
    except Exception as e:
        raise ConvertError(f"cannot read {step_dir / '.metadata'}: {type(e).__name__}: {e}") from None
    problem = checkpoint._missing_files(step_dir, md)
    if problem:
        raise ConvertError(problem)
    return {
        k[len("model.") :]: v
        for k, v in md.state_dict_metadata.items()
        if k.startswith("model.") and isinstance(v, TensorStorageMetadata)
    }


# ----------------------------------------------------------------------------- hf_to_mm


def hf_to_mm(hf_dir: str, out: str, dtype: str = "fp32") -> Path:
    """HF folder -> checkpoint dir with the model's tensors (step 0, no optimizer)."""
    import torch.distributed.checkpoint as dcp

    from omnitrain.train import checkpoint

    config, _, _ = hf.read_config(hf_dir)
    family = _family_of_config(config, hf_dir)
    model = family.build_meta()
    # Check names and shapes before reading data or creating the output.
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    available = hf.model_tensors(family, hf_dir)
    missing = sorted(set(expected) - set(available) - set(hf.tied_keys(model)))
    unexpected = sorted(set(available) - set(expected))
    if missing or unexpected:
        raise ConvertError(
            f"{hf_dir} does not fit its own config: missing {hf._listing(missing) or '-'}; unexpected {hf._listing(unexpected) or '-'}"
        )
    out = Path(out)
    tmp = _fresh_output(out)
    try:
        model.to_empty(device="cpu")
        # to_empty gives a tied lm_head its own (uninitialised) tensor: share it
        # with embed_tokens again, or the checkpoint would hold garbage for it.
        model.tie_weights()
        hf.load_hf_weights(family, model, hf_dir)
        target = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        state = {"model": {k: v.to(target) for k, v in model.state_dict().items()}, "step": 0}
        with checkpoint._single_process_ok():
            dcp.save(state, checkpoint_id=str(tmp))
        (tmp / HF_CONFIG).write_text(json.dumps(config, indent=1))
        (tmp / "meta.json").write_text(json.dumps({"step": 0, "world_size": 1, "from": str(Path(hf_dir).resolve())}))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, out)
    return out


# ----------------------------------------------------------------------------- mm_to_hf


def _check_tied(step_dir: Path, saved: dict, tied: dict[str, str]) -> None:
    """Tied tensors saved under both names must be equal: only one is exported."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner

    from omnitrain.train import checkpoint

    for alias, source in tied.items():
        state = {"model": {k: torch.empty(tuple(saved[k].size), dtype=saved[k].properties.dtype) for k in (alias, source)}}
        with checkpoint._single_process_ok():
            dcp.load(state, checkpoint_id=str(step_dir), planner=DefaultLoadPlanner(allow_partial_load=True))
        if not torch.equal(state["model"][alias], state["model"][source]):
            raise ConvertError(
                f"{step_dir}: {alias} differs from {source}, but the model config ties them "
                "(tie_word_embeddings=true) and only one is exported; the checkpoint was trained untied"
            )


def mm_to_hf(ckpt: str, out: str, config: str | None = None, dtype: str = "fp32", max_shard_bytes: int = 5 * 2**30, processor: bool = True) -> Path:
    """Checkpoint -> HF folder, one output shard in memory at a time."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint import DefaultLoadPlanner

    from omnitrain.train import checkpoint

    step_dir = _step_dir(ckpt)
    family, model_cfg = _model_family(step_dir, config)
    hf_config = family.hf_config
    saved = _saved_model_tensors(step_dir)
    meta = family.build_meta()
    # A tied lm_head is not written (transformers re-ties it on load); a
    # training checkpoint holds it under its own name too (the state dict
    # lists both names): it must equal what it is tied to.
    tied = hf.tied_keys(meta)
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items() if k not in tied}
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected) - set(tied))
    wrong = [f"{k} {tuple(saved[k].size)} vs config {expected[k]}" for k in expected if k in saved and tuple(saved[k].size) != expected[k]]
    if missing or unexpected or wrong:
        raise ConvertError(
            f"{step_dir} does not match the model config: missing {hf._listing(missing) or '-'}; "
            f"unexpected {hf._listing(unexpected) or '-'}; shapes {hf._listing(wrong, 4) or '-'}"
        )
    _check_tied(step_dir, saved, {k: v for k, v in tied.items() if k in saved and v in saved})
    target = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    shards, cur, size = [], [], 0
    for name in sorted(expected):
        n = torch.Size(expected[name]).numel() * target.itemsize
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += n
    shards.append(cur)

    out = Path(out)
    tmp = _fresh_output(out)
    try:
        index = {}
        for i, names in enumerate(shards):
            file = hf.SINGLE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            state = {"model": {k: torch.empty(expected[k], dtype=saved[k].properties.dtype) for k in names}}
            with checkpoint._single_process_ok():
                dcp.load(state, checkpoint_id=str(step_dir), planner=DefaultLoadPlanner(allow_partial_load=True))
            # [family hook] one in-memory tensor may be several in the HF files (fused MoE experts)
            tensors = {hk: hv.to(target).contiguous() for k, v in state["model"].items() for hk, hv in family.to_hf_tensors(k, v).items()}
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            index.update({hk: file for hk in tensors})
            del state
        if len(shards) > 1:
            total = sum(torch.Size(s).numel() * target.itemsize for s in expected.values())
            (tmp / hf.INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1))
        hf_config.architectures = [family.hf_architecture]
        hf_config.dtype = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
        hf_config.save_pretrained(tmp)
        if processor and model_cfg is not None:
            from omnitrain.data import load_processor

            load_processor(model_cfg).save_pretrained(tmp)
        elif processor:
            log.warning("no run config.yaml: no processor/tokenizer written (pass --config)")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, out)
    return out


# ----------------------------------------------------------------------------- resplit


class _Carry:
    """Stands in for the data loader: keeps its saved position as it was."""

    def __init__(self):
        self.state = None

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state


def _resplit_worker(cfg, src: str, out: str) -> int:
    from omnitrain import device, launch
    from omnitrain.models.family import build_family
    from omnitrain.train import checkpoint
    from omnitrain.train.loop import Trainer, save_resolved_config

    ctx = None
    family = build_family(cfg.model)
    if launch.in_distributed_env():
        from omnitrain.parallel.context import ParallelContext

        launch.init_distributed(device.detect(cfg.train.device), timeout_s=cfg.parallel.timeout_s)
        ctx = ParallelContext.build(cfg, family)
    trainer = Trainer(cfg, family, dist_ctx=ctx)
    carry = _Carry()
    step = checkpoint.load(src, model=trainer.model, optimizer=trainer.optimizer, scheduler=trainer.scheduler, loader=carry, dev=trainer.dev)
    checkpoint.save(out, step, model=trainer.model, optimizer=trainer.optimizer, scheduler=trainer.scheduler, loader=carry, dev=trainer.dev, keep_last=0)
    if ctx is None or ctx.is_logging_rank:
        save_resolved_config(cfg, out)
    return step


def _typed(node, value):
    """`value` (a config loaded from a run's config.yaml) as a node of `node`'s
    schema dataclass, so it can replace `node` in a composed config."""
    from dataclasses import is_dataclass

    from omegaconf import OmegaConf

    kind = OmegaConf.get_type(node)
    return OmegaConf.merge(OmegaConf.structured(kind), value) if is_dataclass(kind) else value


def resplit(ckpt: str, out: str, overrides: list[str], config: str | None = None) -> Path:
    from omegaconf import open_dict

    from omnitrain import launch
    from omnitrain.config import register_configs
    from omnitrain.models.family import build_family
    from omnitrain.parallel.context import check_layout, world_size_for

    step_dir = _step_dir(ckpt)
    run_cfg = _run_config(step_dir, config)
    register_configs()
    from hydra import compose, initialize_config_dir

    conf = str(Path(__file__).resolve().parent.parent / "conf")
    with initialize_config_dir(config_dir=conf, version_base=None):
        cfg = compose("config", overrides=list(overrides))
    with open_dict(cfg):
        if run_cfg is not None:
            # The checkpoint's model and batch shape; the layout from the overrides.
            # A schema-typed group refuses a plain (loaded) node: type it first.
            cfg.model = _typed(cfg.model, run_cfg.model)
            for key in ("global_batch_size", "micro_batch_size", "steps", "seed"):
                cfg.train[key] = run_cfg.train[key]
            cfg.optim = _typed(cfg.optim, run_cfg.optim)
        cfg.train.output_dir = str(out)
        cfg.model.init_from = None  # weights come from the checkpoint
    family = build_family(cfg.model)
    check_layout(cfg, family)  # a layout whose depths do not match the model fails here
    out = Path(out)
    tmp = _fresh_output(out)
    try:
        with open_dict(cfg):
            cfg.train.output_dir = str(tmp)
        launch.launch(_resplit_worker, world_size_for(cfg, family), cfg, str(step_dir), str(tmp), timeout_s=cfg.parallel.timeout_s)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, out)
    return out


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m omnitrain.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf_to_mm", help="HF folder -> omnitrain checkpoint")
    a.add_argument("hf_dir")
    a.add_argument("out")
    a.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    b = sub.add_parser("mm_to_hf", help="omnitrain checkpoint -> HF folder")
    b.add_argument("ckpt")
    b.add_argument("out")
    b.add_argument("--config", help="the run's config.yaml (default: next to the checkpoint)")
    b.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    b.add_argument("--max-shard-gb", type=float, default=5.0)
    b.add_argument("--no-processor", action="store_true", help="weights and config only")
    c = sub.add_parser("resplit", help="re-save a checkpoint as another layout")
    c.add_argument("ckpt")
    c.add_argument("out")
    c.add_argument("overrides", nargs="*", help="Hydra overrides naming the layout, e.g. parallel=pp2")
    c.add_argument("--config", help="the run's config.yaml (default: next to the checkpoint)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from omnitrain.errors import run_cli

    def body():
        if args.cmd == "hf_to_mm":
            path = hf_to_mm(args.hf_dir, args.out, args.dtype)
        elif args.cmd == "mm_to_hf":
            path = mm_to_hf(args.ckpt, args.out, args.config, args.dtype, int(args.max_shard_gb * 2**30), not args.no_processor)
        else:
            path = resplit(args.ckpt, args.out, args.overrides, args.config)
        log.info("wrote %s", path)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
