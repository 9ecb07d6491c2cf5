"""The indexed datasets: parse and validate every record up front (cheap, no
decoding), then process samples on demand, optionally through an on-disk
cache keyed by content and settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from omnitrain import paths
from omnitrain.data.errors import DataError
from omnitrain.data.formats import DatasetSpec, Example, parse_record, read_records, resolve_specs, split_names
from omnitrain.data.sample import SampleBuilder

log = logging.getLogger(__name__)

# Bump when the processed-sample layout or processing changes.
CACHE_VERSION = 1


@dataclass
class Index:
    """Valid examples per dataset plus what was rejected while parsing."""

    specs: List[DatasetSpec]
    examples: List[List[Example]]
    invalid: Counter = field(default_factory=Counter)
    errors: List[str] = field(default_factory=list)

    @property
    def sizes(self) -> Tuple[int, ...]:
        return tuple(len(e) for e in self.examples)


def held_out(n: int, fraction: float, seed: int, name: str) -> set:
    """The indices (of n valid samples of dataset `name`) that data.eval_fraction
    holds out for validation: round(n * fraction), at least 1 and at most n - 1,
    drawn by (seed, name), so every process and every resume draws the same."""
    import random

    k = min(max(1, round(n * fraction)), n - 1)
    return set(random.Random(f"{seed}:{name}").sample(range(n), k))


def build_index(data_cfg: Any, split: Optional[str] = None, seed: int = 0) -> Index:
    """Parse every dataset named by `data.dataset` under `data.dataset_dir`.

    on_error=raise: the first bad sample raises its one-line DataError.
    on_error=skip: bad samples are dropped, counted by reason and logged.
    `split` (train | eval) with data.eval_fraction: the kept or the held-out
    samples of each dataset (`held_out`, by `seed`); None: all of them.
    """
    if data_cfg.on_error not in ("raise", "skip"):
        raise DataError(f"data.on_error={data_cfg.on_error!r}: use raise or skip", reason="bad_config")
    names = split_names(data_cfg.dataset)
    if not names:
        raise DataError("data.dataset is empty: name at least one dataset", reason="bad_config")
    weights = data_cfg.weights
    if weights is not None and len(weights) != len(names):
        raise DataError(
            f"data.weights has {len(weights)} entries for {len(names)} datasets ({', '.join(names)})", reason="bad_config"
        )
    folder = paths.resolve(str(data_cfg.dataset_dir), key="data.dataset_dir")
    specs = resolve_specs(folder, names)
    _apply_dataset_options(specs, dict(data_cfg.dataset_options or {}))
    index = Index(specs=specs, examples=[])
    for spec in specs:
        records = read_records(spec)
        cap = min(x for x in (data_cfg.max_samples, spec.num_samples, len(records)) if x is not None)
        good = []
        for i, record in enumerate(records[:cap]):
            try:
                good.append(parse_record(spec, i, record))
            except DataError as e:
                if data_cfg.on_error == "raise":
                    raise
                index.invalid[e.reason] += 1
                index.errors.append(str(e))
                log.warning("skipping: %s", e)
        fraction = data_cfg.get("eval_fraction")
        if split is not None and fraction:
            if len(good) < 2:
                raise DataError(
                    f"data.eval_fraction={fraction}: dataset {spec.name} has {len(good)} usable sample(s), too few to "
                    "hold any out; use data.eval datasets instead", reason="bad_config"
                )
            out = held_out(len(good), float(fraction), seed, spec.name)
            good = [e for i, e in enumerate(good) if (i in out) == (split == "eval")]
        index.examples.append(good)
    if sum(index.sizes) == 0:
        raise DataError(
            f"no usable samples in {', '.join(names)} ({sum(index.invalid.values())} rejected)", reason="empty_dataset"
        )
    return index


DATASET_OPTIONS = {"use_audio_in_video"}


def _apply_dataset_options(specs, options: Dict[str, Any]) -> None:
    by_name = {s.name: s for s in specs}
    for name, opts in options.items():
        if name not in by_name:
            raise DataError(
                f"data.dataset_options names {name!r}, which is not in data.dataset ({', '.join(by_name)})",
                reason="bad_config",
            )
        bad = set(opts) - DATASET_OPTIONS
        if bad:
            raise DataError(
                f"data.dataset_options.{name}: unknown option(s) {sorted(bad)}; known: {sorted(DATASET_OPTIONS)}",
                reason="bad_config",
            )
        if "use_audio_in_video" in opts:
            by_name[name].use_audio_in_video = bool(opts["use_audio_in_video"])


class SampleCache:
    """Processed samples on disk, one file per sample, keyed by a content hash."""

    def __init__(self, folder: str, fingerprint: str):
        self.folder = Path(folder).expanduser()
        self.fingerprint = fingerprint

    def key(self, ex: Example, uiv: bool) -> str:
        h = hashlib.sha256()
        h.update(self.fingerprint.encode())
        h.update(json.dumps(ex.record, sort_keys=True, ensure_ascii=False).encode())
        h.update(f"{ex.dataset}|{uiv}".encode())
        for p in ex.images + ex.videos + ex.audios:
            st = os.stat(p)  # a changed file gets a new key
            h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.pt"

    def get(self, key: str) -> Optional[Dict[str, Any]]:
        p = self.path(key)
        if not p.exists():
            return None
        try:
            return torch.load(p, weights_only=True)
        except Exception:  # a torn or stale file: recompute
            return None

    def put(self, key: str, sample: Dict[str, Any]) -> None:
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".tmp{os.getpid()}")
        torch.save(sample, tmp)
        os.replace(tmp, p)  # atomic: readers never see half a file


def processor_fingerprint(processor, settings) -> str:
    """Everything besides the record that changes a processed sample."""
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}".encode())
    h.update(json.dumps(asdict(settings), sort_keys=True).encode())
    for part in (processor.image_processor, processor.video_processor, getattr(processor, "feature_extractor", None)):
        if part is not None:  # a VL processor has no feature extractor (no audio): nothing to hash
            h.update(part.to_json_string().encode())
    tok = processor.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else str(sorted(tok.get_vocab().items()))).encode())
    return h.hexdigest()


class ProcessedDataset(torch.utils.data.Dataset):
    """Map-style dataset over (dataset, sample) keys.

    `__getitem__` never raises a DataError: a bad sample comes back as a
    one-token filler (no labels, no loss) carrying the error, so a worker
    does not print a traceback and the batch keeps its shape; the loader
    decides between raising and counting.
    """

    def __init__(self, index: Index, builder: SampleBuilder, cache: Optional[SampleCache] = None, max_tokens: Optional[int] = None):
        self.index = index
        self.builder = builder
        self.cache = cache
        self.max_tokens = max_tokens  # data.packing: a sample longer than this is an error

    def __getitem__(self, key: Tuple[int, int]) -> Dict[str, Any]:
        sample = self._get(key)
        n = len(sample["input_ids"])
        if self.max_tokens is not None and n > self.max_tokens and "error" not in sample["meta"]:
            d, i = key
            ex = self.index.examples[d][i]
            return self.filler(DataError(
                f"{n} tokens, more than data.max_tokens={self.max_tokens} (data.packing never cuts a sample); "
                "raise data.max_tokens, lower data.cutoff_len or the media resolution, or set data.on_error=skip",
                dataset=ex.dataset, index=ex.index, reason="too_long_to_pack",
            ))
        return sample

    def __len__(self) -> int:
        return sum(self.index.sizes)

    def _get(self, key: Tuple[int, int]) -> Dict[str, Any]:
        d, i = key
        ex = self.index.examples[d][i]
        uiv = self.index.specs[d].use_audio_in_video
        try:
            if self.cache is None:
                return self.builder(ex, uiv)
            ckey = self.cache.key(ex, self.builder.resolve_uiv(ex, uiv))
            sample = self.cache.get(ckey)
            if sample is not None:
                sample["meta"].update(decoded=[], cache_hit=True)
                return sample
            sample = self.builder(ex, uiv)
            self.cache.put(ckey, sample)
            sample["meta"]["cache_hit"] = False
            return sample
        except DataError as e:
            return self.filler(e.at(ex.dataset, ex.index))

    def filler(self, error: DataError) -> Dict[str, Any]:
        pad = self.builder.ids.pad
        return {
            "input_ids": torch.tensor([pad], dtype=torch.long),
            "labels": torch.tensor([-100], dtype=torch.long),
            "use_audio_in_video": False,
            "audio_features": [],
            "meta": {"dataset": error.dataset, "index": error.index, "decoded": [], "error": error},
        }
