"""`python -m omnitrain.convert`: move weights between HF folders and omnitrain checkpoints.

    python -m omnitrain.convert hf_to_mm HF_DIR OUT_DIR
        HF folder of any family (for an omni model: its thinker, or the whole
        model) -> checkpoint OUT_DIR (a step dir with model tensors only):
        train with train.resume=OUT_DIR.
    python -m omnitrain.convert mm_to_hf CKPT OUT_DIR [--config RUN/config.yaml] [--dtype bf16] [--base HF_DIR] [--merge-lora]
        checkpoint (step dir or run dir) -> HF folder: config.json, safetensors
        shards + index, tokenizer/processor; loads with from_pretrained.
        --base: merged into the folder the run started from, a folder of its
        kind (a folder that nests the trained model in a larger one, e.g. a
        whole omni folder, keeps the rest: talker, token2wav).
        A LoRA checkpoint (model.lora) gives a PEFT adapter folder that
        peft.PeftModel.from_pretrained loads over the HF base (model.init_from),
        or with --merge-lora an HF folder with the adapters merged in.
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
import functools
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


class _Shape:
    """Stands in for DCP's tensor metadata of an in-memory tensor (size, dtype)."""

    def __init__(self, size, dtype):
        self.size = size
        self.properties = type("P", (), {"dtype": dtype})


def _check_tied(fetch, tied: dict[str, str], step_dir: Path) -> None:
    """Tied tensors saved under both names must be equal: only one is exported."""
    for alias, source in tied.items():
        got = fetch([alias, source])
        if not torch.equal(got[alias], got[source]):
            raise ConvertError(
                f"{step_dir}: {alias} differs from {source}, but the model config ties them "
                "(tie_word_embeddings=true) and only one is exported; the checkpoint was trained untied"
            )


def _load_saved(step_dir: Path, saved: dict, names) -> dict:
    """The named model tensors of a checkpoint, as plain CPU tensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner

    from omnitrain.train import checkpoint

    state = {"model": {k: torch.empty(tuple(saved[k].size), dtype=saved[k].properties.dtype) for k in names}}
    with checkpoint._single_process_ok():
        dcp.load(state, checkpoint_id=str(step_dir), planner=DefaultLoadPlanner(allow_partial_load=True))
    return state["model"]


def _lora_model(step_dir: Path, saved: dict, family, config: str | None):
    """The whole model with its adapters: base from the run's seed or
    model.init_from (a LoRA checkpoint holds only what trained), then the
    checkpoint's tensors over it."""
    from omnitrain.parallel.layout import whole_plan

    run_cfg = _run_config(step_dir, config)
    if run_cfg is None or not family.lora:
        raise ConvertError(
            f"{step_dir} holds LoRA adapters, but {'no run config.yaml was found' if run_cfg is None else 'its config has no model.lora enabled'}: "
            "pass --config <run dir>/config.yaml of the run that trained it"
        )
    model = family.build([whole_plan(family.depths)], torch.device("cpu"), int(run_cfg.train.seed))
    own = dict(model.state_dict())
    unexpected = sorted(set(saved) - set(own))
    wrong = [f"{k} {tuple(saved[k].size)} vs config {tuple(own[k].shape)}" for k in saved if k in own and tuple(saved[k].size) != tuple(own[k].shape)]
    if unexpected or wrong:
        raise ConvertError(f"{step_dir} does not match the model config: unexpected {hf._listing(unexpected) or '-'}; shapes {hf._listing(wrong, 4) or '-'}")
    model.load_state_dict(_load_saved(step_dir, saved, list(saved)), strict=False)
    return model.eval(), run_cfg


def _write_adapter(tmp: Path, step_dir: Path, family, model, saved: dict, run_cfg, target) -> None:
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors)
    that peft.PeftModel.from_pretrained loads on top of the HF base model."""
    from safetensors.torch import save_file

    from omnitrain.models.lora import adapter_state_dict, is_lora_name, peft_config

    extra = sorted(k for k in saved if not is_lora_name(k))
    if extra:
        raise ConvertError(
            f"{step_dir} also trained {len(extra)} non-LoRA tensors (first: {extra[0]}), which a PEFT adapter "
            "folder does not carry: export with --merge-lora for a full HF folder"
        )
    base = run_cfg.model.get("init_from")
    if not base:
        log.warning("the run had no model.init_from: its base is the seeded random init, which no HF folder holds (use --merge-lora)")
    peft_config(family, family.lora, base=str(base) if base else None).save_pretrained(str(tmp))
    sd = {k: v.to(target).contiguous() for k, v in adapter_state_dict(model).items()}
    save_file(sd, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})


# Files of a base folder that are weights (rewritten), not copied as they are.
_WEIGHT_FILES = ("*.safetensors", hf.INDEX, "pytorch_model*.bin", "pytorch_model.bin.index.json")


def _base_plan(base: str, family, expected: dict) -> tuple[str, dict[str, str], dict[str, str]]:
    """For `mm_to_hf --base`: (prefix of the trained model's tensors in the base,
    trained tensor's name -> the base's dtype name for it, the base's other
    tensors: key -> file). The base must be a folder of the checkpoint's
    family whose tensors of the trained model have the checkpoint's names and
    shapes; else one ConvertError, before anything is written."""
    from safetensors import safe_open

    config = hf.folder_config(base)
    kind, arch = config.get("model_type"), ", ".join(config.get("architectures") or []) or "?"
    if kind not in type(family).hf_model_types:
        raise ConvertError(
            f"--base {base} holds a {kind!r} model ({arch}); the checkpoint is a {family.hf_architecture} "
            f"(model_type {' or '.join(type(family).hf_model_types)}): give the folder it was trained from"
        )
    _, prefix, _ = hf.read_config(base, family)
    wm = hf.weight_map(base)
    dtypes, shapes, rest = {}, {}, {}
    for file in sorted(set(wm.values())):
        with safe_open(Path(base) / file, "pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                dtypes[key] = sl.get_dtype()
                if key.startswith(prefix):
                    shapes[key] = tuple(sl.get_shape())
                else:
                    rest[key] = file
    available = hf.model_tensors(family, base)
    missing, wrong, dtype_of = [], [], {}
    unexpected = sorted(key for name, got in available.items() if name not in expected for _, key in got.values())
    for name, shape in expected.items():
        # [family hook] the base may store one tensor as several keys (per-expert MoE weights)
        got = available.get(name, {})
        layout, miss, extra = hf.pick_layout(family, name, shape, got)
        missing += miss
        unexpected += [got[k][1] for k in extra]
        wrong += [f"{prefix + k} {shapes[prefix + k]} in the base vs {want}" for k, want in layout.items() if k in got and shapes[prefix + k] != want]
        if got and not miss:
            dtype_of[name] = dtypes[prefix + next(iter(layout))]
    if missing or unexpected or wrong:
        raise ConvertError(
            f"--base {base} does not match the checkpoint's {family.hf_architecture}: missing in the base "
            f"{hf._listing(missing) or '-'}; not in the checkpoint "
            f"{hf._listing(unexpected) or '-'}; shapes {hf._listing(wrong, 4) or '-'}"
        )
    return prefix, dtype_of, rest


def _copy_base_files(base: Path, tmp: Path) -> None:
    """Config, generation config, processor, tokenizer, speakers...: as the base has them."""
    import fnmatch

    for f in sorted(base.iterdir()):
        if f.is_file() and not f.name.startswith(".") and not any(fnmatch.fnmatch(f.name, p) for p in _WEIGHT_FILES):
            shutil.copy2(f, tmp / f.name)


def mm_to_hf(
    ckpt: str, out: str, config: str | None = None, dtype: str | None = None, max_shard_bytes: int = 5 * 2**30,
    processor: bool = True, merge_lora: bool = False, base: str | None = None,
) -> Path:
    """Checkpoint -> HF folder, one output shard in memory at a time. A LoRA
    checkpoint gives a PEFT adapter folder, or with `merge_lora` an HF folder
    with the adapters folded into the weights (the whole model in memory).

    With `base` (the folder the run started from): a folder of the base's
    kind, i.e. the trained tensors under the base's names and prefix (the
    family's `hf_model_types`, e.g. `thinker.` in a whole omni folder), every
    other tensor of the base (talker, token2wav) copied unchanged, and the
    base's other files (config, processor, speakers) as they are. `dtype` (fp32 | bf16) is the trained
    tensors' dtype: fp32 by default, each tensor as in the base with `base`."""
    from safetensors.torch import save_file

    from omnitrain.models.lora import is_lora_name, merge_and_unload

    step_dir = _step_dir(ckpt)
    family, model_cfg = _model_family(step_dir, config)
    hf_config = family.hf_config
    saved = _saved_model_tensors(step_dir)
    named = {"fp32": torch.float32, "bf16": torch.bfloat16}
    fetch = functools.partial(_load_saved, step_dir, saved)
    if any(is_lora_name(k) for k in saved):
        model, run_cfg = _lora_model(step_dir, saved, family, config)
        if not merge_lora:
            if base:
                raise ConvertError(f"--base writes a whole HF folder, but {step_dir} holds LoRA adapters: add --merge-lora")
            out = Path(out)
            tmp = _fresh_output(out)
            try:
                _write_adapter(tmp, step_dir, family, model, saved, run_cfg, named[dtype or "fp32"])
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            _publish(tmp, out)
            return out
        merged = merge_and_unload(model).state_dict()
        saved = {k: _Shape(tuple(v.shape), v.dtype) for k, v in merged.items()}

        def fetch(names):
            return {k: merged[k] for k in names}
    elif merge_lora:
        raise ConvertError(f"--merge-lora: {step_dir} holds no LoRA adapters (drop --merge-lora)")
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
    _check_tied(fetch, {k: v for k, v in tied.items() if k in saved and v in saved}, step_dir)
    prefix, base_dtypes, rest = _base_plan(base, family, expected) if base else ("", {}, {})
    # Output entries: (file key, checkpoint name or None for a base tensor, dtype, bytes).
    entries = []
    for name in sorted(expected):
        key = prefix + family.to_hf_name(name)
        target = named[dtype or "fp32"] if dtype or not base else hf.DTYPES[base_dtypes[name]]
        entries.append((key, name, target, torch.Size(expected[name]).numel() * target.itemsize))
    for key in sorted(rest):  # talker, token2wav: the base's tensors as they are
        entries.append((key, None, None, 0))
    rest_bytes = _tensor_bytes(base, rest) if rest else {}
    shards, cur, size = [], [], 0
    for e in entries:
        n = e[3] or rest_bytes[e[0]]
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += n
    shards.append(cur)

    out = Path(out)
    tmp = _fresh_output(out)
    try:
        index, total = {}, 0
        for i, group in enumerate(shards):
            file = hf.SINGLE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            names = [e[1] for e in group if e[1] is not None]
            fetched = fetch(names) if names else {}
            tensors = {}
            for key, name, target, _ in group:
                if name is None:
                    continue
                # [family hook] one in-memory tensor may be several in the HF files (fused MoE experts)
                for hk, hv in family.to_hf_tensors(name, fetched[name]).items():
                    tensors[prefix + hk] = hv.to(target).contiguous()
            tensors.update(_read_base(base, [e[0] for e in group if e[1] is None], rest))
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            index.update({key: file for key in tensors})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            del fetched, tensors
        if len(shards) > 1:
            (tmp / hf.INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1))
        if base:
            _copy_base_files(Path(base), tmp)
        else:
            hf_config.architectures = [family.hf_architecture]
            hf_config.dtype = {"fp32": "float32", "bf16": "bfloat16"}[dtype or "fp32"]
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


def _tensor_bytes(base: str, keys: dict[str, str]) -> dict[str, int]:
    from safetensors import safe_open

    out = {}
    for file in sorted(set(keys.values())):
        with safe_open(Path(base) / file, "pt") as f:
            for key in (k for k, v in keys.items() if v == file):
                sl = f.get_slice(key)
                out[key] = torch.Size(sl.get_shape()).numel() * hf.DTYPES[sl.get_dtype()].itemsize
    return out


def _read_base(base: str | None, keys: list[str], files: dict[str, str]) -> dict[str, torch.Tensor]:
    """The base's tensors `keys`, as stored (same dtype, same bytes)."""
    from safetensors import safe_open

    out = {}
    for file in sorted({files[k] for k in keys}):
        with safe_open(Path(base) / file, "pt") as f:
            for key in (k for k in keys if files[k] == file):
                out[key] = f.get_tensor(key)
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
    b.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="trained tensors' dtype (default fp32; with --base, the base's)")
    b.add_argument("--base", help="the HF folder the run started from: write a folder of its kind (a whole omni "
                   "folder keeps its talker and token2wav), with its config and processor files")
    b.add_argument("--max-shard-gb", type=float, default=5.0)
    b.add_argument("--no-processor", action="store_true", help="weights and config only")
    b.add_argument("--merge-lora", action="store_true", help="fold a LoRA checkpoint's adapters into the weights (else a PEFT adapter folder)")
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
            path = mm_to_hf(args.ckpt, args.out, args.config, args.dtype, int(args.max_shard_gb * 2**30), not args.no_processor,
                            merge_lora=args.merge_lora, base=args.base)
        else:
            path = resplit(args.ckpt, args.out, args.overrides, args.config)
        log.info("wrote %s", path)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
