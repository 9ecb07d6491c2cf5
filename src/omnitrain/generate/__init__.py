"""Generation with a trained model: prompts built as in training, transformers' `generate`.

    load(path, ...)                       checkpoint of any layout or HF folder -> Loaded
    generate_batch(loaded, examples, opts) one left-padded batch -> [{tokens, text}]
    predict(path, load_kw, examples, opts) all examples, data parallel over ranks, in order

Each example is a `data.formats.Example` ending with the user's turn; the
family's transform builds it exactly as for training (template, media,
processor) with an open assistant turn after it. Batches are cut from the
whole list first and then dealt to ranks, and a sampling batch is seeded by
(seed, batch number), so the outputs do not depend on the number of ranks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Sequence, Tuple

import torch

from omnitrain.generate.load import Loaded, ModelNotFound, load

__all__ = ["GenOptions", "Loaded", "ModelNotFound", "generate_batch", "load", "plan_batches", "predict", "prompt_example"]


@dataclass(frozen=True)
class GenOptions:
    """transformers' generate options (greedy unless do_sample)."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    num_beams: int = 1
    seed: int = 0


def prompt_example(text: str, images=(), videos=(), audios=(), system=None, use_audio_in_video=None, *, dataset="prompt", index=0, base=None):
    """A one-turn `Example` ending with the user's `text`, checked as a data
    sample is (files exist, placeholders match); media without placeholders in
    the text are put before it (one `<image>` etc. per file). Relative paths
    are under `base` (default: the working directory)."""
    from omnitrain.data.formats import PLACEHOLDERS, DatasetSpec, parse_record

    lead = ""
    for kind, files in (("image", images), ("video", videos), ("audio", audios)):
        if files and PLACEHOLDERS[kind] not in text:
            lead += PLACEHOLDERS[kind] * len(files)
    record = {
        "messages": [{"role": "user", "content": lead + text}, {"role": "assistant", "content": ""}],
        "images": list(images), "videos": list(videos), "audios": list(audios),
    }
    if use_audio_in_video is not None:
        record["use_audio_in_video"] = use_audio_in_video
    from pathlib import Path

    ex = parse_record(DatasetSpec(name=dataset, file=Path(base or Path.cwd()) / dataset, formatting="sharegpt"), index, record)
    ex.turns = ex.turns[:-1]
    if system is not None:
        ex.system = system
    return ex


def generation_config(loaded: Loaded, opts: GenOptions):
    """An explicit GenerationConfig: a folder's generation_config.json (which
    may turn sampling on) does not change what the options say. Stops at the
    chat's end-of-turn token and the tokenizer's eos."""
    from transformers import GenerationConfig

    eos = [loaded.ids.im_end]
    tok_eos = loaded.processor.tokenizer.eos_token_id
    if tok_eos is not None and tok_eos not in eos:
        eos.append(int(tok_eos))
    kw: Dict[str, Any] = dict(
        max_new_tokens=opts.max_new_tokens, do_sample=opts.do_sample, num_beams=opts.num_beams,
        eos_token_id=eos, pad_token_id=loaded.ids.pad,
    )
    if opts.do_sample:
        kw.update(temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k)
    return GenerationConfig(**kw)


def left_pad(mb: Dict[str, torch.Tensor], pad_id: int) -> Dict[str, torch.Tensor]:
    """The collator's right-padded batch, left-padded (decoder-only generation
    appends at the right end). Media rows are per sample: unchanged."""
    ids, am = mb["input_ids"], mb["attention_mask"]
    new_ids, new_am = torch.full_like(ids, pad_id), torch.zeros_like(am)
    for b, n in enumerate(am.sum(1).tolist()):
        new_ids[b, ids.shape[1] - n :] = ids[b, :n]
        new_am[b, ids.shape[1] - n :] = 1
    return {**{k: v for k, v in mb.items() if k != "labels"}, "input_ids": new_ids, "attention_mask": new_am}


def _until_eos(tokens: List[int], eos: Sequence[int]) -> List[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def generate_batch(loaded: Loaded, examples: Sequence[Any], opts: GenOptions, batch_no: int = 0) -> List[Dict[str, Any]]:
    """Generate for one batch; per example the new tokens (through the first
    end token) and their text (special tokens dropped, stripped)."""
    from omnitrain.data.collate import collate

    samples = [loaded.builder.prompt(ex) for ex in examples]
    mb = left_pad(collate(samples, loaded.ids.pad), loaded.ids.pad)
    try:
        inputs = loaded.family.hf_inputs(mb)
    except ValueError as e:
        from omnitrain.data.errors import DataError

        raise DataError(f"{e}; use --batch-size 1", dataset=examples[0].dataset, index=examples[0].index, reason="bad_batch") from None
    inputs = {k: v.to(loaded.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    gc = generation_config(loaded, opts)
    if opts.do_sample:
        torch.manual_seed(opts.seed * 1_000_003 + batch_no)
    with torch.no_grad():
        out = loaded.model.generate(**inputs, generation_config=gc)
    new = out[:, mb["input_ids"].shape[1] :].tolist()
    tok = loaded.processor.tokenizer
    results = []
    for row in new:
        tokens = _until_eos(row, gc.eos_token_id)
        results.append({"tokens": tokens, "text": tok.decode(tokens, skip_special_tokens=True).strip()})
    return results


def plan_batches(n: int, batch_size: int, rank: int = 0, world: int = 1) -> List[Tuple[int, List[int]]]:
    """(batch number, positions) of this rank: batches of the whole list, dealt round-robin."""
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    return [(b, batches[b]) for b in range(rank, len(batches), world)]


def _predict_worker(path: str, load_kw: dict, examples: list, opts: dict, batch_size: int, timeout_s: float):
    import torch.distributed as dist

    from omnitrain import device, launch

    rank, world = 0, 1
    if launch.in_distributed_env():
        rank, world = launch.init_distributed(device.detect(load_kw.get("device", "auto")), timeout_s=timeout_s)
    loaded = load(path, **load_kw)
    options = GenOptions(**opts)
    mine: Dict[int, Dict[str, Any]] = {}
    for b, positions in plan_batches(len(examples), batch_size, rank, world):
        for pos, res in zip(positions, generate_batch(loaded, [examples[p] for p in positions], options, b)):
            mine[pos] = res
    if world > 1:
        parts: List[Any] = [None] * world
        dist.all_gather_object(parts, mine)
        for part in parts:
            mine.update(part)
    return [mine[i] for i in range(len(examples))]


def predict(path: str, load_kw: dict, examples: Sequence[Any], opts: GenOptions, *, batch_size: int = 1, nproc: int = 1, timeout_s: float = 600) -> List[Dict[str, Any]]:
    """Generate for every example on `nproc` ranks (forked here, or the
    torchrun world); results in the examples' order (on every rank)."""
    import os

    from omnitrain import launch

    if launch.in_distributed_env():  # torchrun: its world is the data-parallel one
        nproc = int(os.environ["WORLD_SIZE"])
    if batch_size < 1:
        from omnitrain.config import ConfigError

        raise ConfigError(f"--batch-size {batch_size}: must be >= 1")
    return launch.launch(
        _predict_worker, nproc, path, dict(load_kw), list(examples), asdict(opts), batch_size, timeout_s,
        timeout_s=timeout_s, layout=f"--nproc {nproc}",
    )
