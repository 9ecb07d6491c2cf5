"""`build_loader`: an endless, resumable iterator of micro-batches.

torch DataLoader workers process samples; the order comes from `sampler`
(seed + global batch only). The position is the number of micro-batches
handed out, so `state_dict()` / `load_state_dict()` resume exactly.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Dict, Iterator, List, Optional

import torch

from omnitrain.data import dispatch, packing
from omnitrain.data.collate import collate
from omnitrain.data.dataset import ProcessedDataset, SampleCache, build_index, processor_fingerprint
from omnitrain.data.errors import DataError
from omnitrain.data.processor import token_ids
from omnitrain.data.sample import SampleBuilder, Settings
from omnitrain.data.sampler import check_batch_sizes, epoch_order, micro_batch_positions
from omnitrain.data.threads import one_thread

log = logging.getLogger(__name__)


class _MicroBatches(torch.utils.data.Sampler):
    """(dataset, sample) keys of this rank's micro-batches from `start` to
    `stop` (None: endless); with data.balance, this rank's whole share of each
    step's global batch (the steps `start` and `stop` fall in), which
    data/dispatch.py deals out."""

    def __init__(self, loader: "OmniLoader", start: int, stop: Optional[int] = None):
        self.loader = loader
        self.start = start
        self.stop = stop

    def __iter__(self) -> Iterator[List[Any]]:
        lo = self.loader
        if lo.balance:
            per_step = lo.micro_batches_per_step
            step = self.start // per_step
            while self.stop is None or step * per_step < self.stop:  # the step's micro-batches, all at once
                yield [lo.key_at(p) for j in range(per_step) for p in lo.positions(step * per_step + j)]
                step += 1
            return
        m = self.start
        while self.stop is None or m < self.stop:
            yield [lo.key_at(p) for p in lo.positions(m)]
            m += 1


class _Collate:
    """Picklable collate for workers: (micro-batch, per-sample meta); packed
    with data.packing (data/packing.py)."""

    def __init__(self, fn, pad_id: int, max_tokens: Optional[int] = None):
        self.fn, self.pad_id, self.max_tokens = fn, pad_id, max_tokens

    def one(self, samples):
        if self.max_tokens is None:
            return self.fn(samples, self.pad_id)
        lengths = [len(s["input_ids"]) for s in samples]
        return packing.pack_samples(samples, lambda ss: self.fn(ss, self.pad_id), lengths, self.max_tokens, self.pad_id)

    def __call__(self, samples):
        with one_thread():
            return self.one(samples), [s["meta"] for s in samples]


class _Costed:
    """data.balance, in a worker: this rank's share of the global batch,
    processed, with each sample's predicted cost (collated alone); collated
    after the ranks swap samples (data/dispatch.py)."""

    def __init__(self, fn, pad_id, cost):
        self.fn, self.pad_id, self.cost = fn, pad_id, cost

    def __call__(self, samples):
        with one_thread():
            return samples, [self.cost(self.fn([s], self.pad_id)) for s in samples]


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers already run in parallel; avoid oversubscription


class OmniLoader:
    def __init__(
        self,
        dataset: ProcessedDataset,
        *,
        seed: int,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        weights: Optional[List[float]] = None,
        on_error: str = "raise",
        collate_fn=collate,
        max_tokens: Optional[int] = None,
        cost_fn=None,
        dp_group=None,
    ):
        """`max_tokens`: pack each micro-batch into rows of that many tokens
        (None: no packing). `cost_fn(micro-batch) -> float`: balance each global
        batch over ranks and micro-batches by it (None: sampler order), swapping
        samples with the other ranks of `dp_group` (None: the default group;
        a private gloo group of its ranks carries the swaps)."""
        check_batch_sizes(global_batch_size, micro_batch_size, dp_size)
        self.dataset = dataset
        self.seed = seed
        self.micro = micro_batch_size
        self.global_batch = global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.weights = None if weights is None else tuple(float(w) for w in weights)
        self.on_error = on_error
        self.collate_fn = collate_fn
        self.max_tokens = max_tokens
        self.cost_fn = cost_fn
        self.balance = cost_fn is not None
        # data.balance swaps samples in a background thread: on a group of its own
        self._group = dispatch.own_group(dp_group) if self.balance and dp_size > 1 else None
        self.sizes = dataset.index.sizes
        self.epoch_len = len(epoch_order(self.sizes, self.weights, seed, 0))
        self.micro_step = 0
        self._counts: Counter = Counter()
        self._skipped: Counter = Counter()
        self._decodes: Counter = Counter()
        self._errors: List[str] = []

    # -- order --------------------------------------------------------------

    def positions(self, micro_step: int) -> List[int]:
        return micro_batch_positions(
            micro_step,
            global_batch_size=self.global_batch,
            micro_batch_size=self.micro,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
        )

    def key_at(self, position: int):
        epoch, offset = divmod(position, self.epoch_len)
        return epoch_order(self.sizes, self.weights, self.seed, epoch)[offset]

    @property
    def micro_batches_per_step(self) -> int:
        return self.global_batch // (self.micro * self.dp_size)

    # -- iteration ----------------------------------------------------------

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        return self.iterate()

    def iterate(self, limit: Optional[int] = None) -> Iterator[Dict[str, torch.Tensor]]:
        """Micro-batches from `micro_step` on; with `limit`, that many and no more
        decoded (an evaluation's fixed batches: workers and data.balance's
        background swap would otherwise prepare batches nobody takes)."""
        stop = None if limit is None else self.micro_step + limit
        kwargs: Dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs = dict(prefetch_factor=self.prefetch_factor, worker_init_fn=_worker_init, persistent_workers=False)
        pad = self.dataset.builder.ids.pad
        collate = _Collate(self.collate_fn, pad, self.max_tokens)
        fn = _Costed(self.collate_fn, pad, self.cost_fn) if self.balance else collate
        dl = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=_MicroBatches(self, self.micro_step, stop), collate_fn=fn, num_workers=self.num_workers, **kwargs
        )
        steps = self._balanced(iter(dl), collate) if self.balance else ([item] for item in dl)
        for parts in steps:
            if self.balance:  # a resume may start inside a step
                parts = parts[self.micro_step % self.micro_batches_per_step :]
            for mb, mb_metas in parts:
                if stop is not None and self.micro_step >= stop:
                    return
                self._account(mb_metas)
                self.micro_step += 1
                yield mb

    def _balanced(self, shares, collate) -> Iterator[List[Any]]:
        """data.balance: each step's (micro-batch, metas), from this rank's share
        swapped with the other dp ranks' (data/dispatch.py) and collated, the
        next step's made in the background while this one trains."""

        def step():
            samples, costs = next(shares)
            mbs = dispatch.balanced_micro_batches(
                samples, costs, group=self._group, dp_rank=self.dp_rank, dp_size=self.dp_size,
                micro_batches=self.micro_batches_per_step, micro_batch_size=self.micro,
            )
            return [(collate.one(mb), [s["meta"] for s in mb]) for mb in mbs]

        return dispatch.prefetched(step)

    def _account(self, metas: List[Dict[str, Any]]) -> None:
        for meta in metas:
            err: Optional[DataError] = meta.get("error")
            if err is not None:
                if self.on_error == "raise":
                    raise err
                self._skipped[err.reason] += 1
                self._errors.append(str(err))
                log.warning("skipping: %s", err)
                continue
            self._counts["samples"] += 1
            for path in meta.get("decoded", []):
                self._decodes[path] += 1
            if "cache_hit" in meta:
                self._counts["cache_hits" if meta["cache_hit"] else "cache_misses"] += 1
            for k in ("audio_chunked", "audio_capped"):
                self._counts[k] += meta.get(k, 0)

    # -- state --------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        return {
            "micro_step": self.micro_step,
            "seed": self.seed,
            "global_batch_size": self.global_batch,
            "epoch_len": self.epoch_len,
            "micro_batches_per_step": self.micro_batches_per_step,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume at the saved micro-batch (a new iterator starts there).

        A resume under another dp layout maps by global samples consumed; it
        must land on a global-step boundary.
        """
        if state.get("seed", self.seed) != self.seed or state.get("global_batch_size", self.global_batch) != self.global_batch:
            raise ValueError(
                f"data state was saved with seed={state.get('seed')} global_batch_size={state.get('global_batch_size')}; "
                f"this run has seed={self.seed} global_batch_size={self.global_batch}"
            )
        if state.get("epoch_len", self.epoch_len) != self.epoch_len:
            log.warning("dataset size changed since the checkpoint (%s -> %s samples per epoch)", state["epoch_len"], self.epoch_len)
        saved_per_step = int(state.get("micro_batches_per_step", self.micro_batches_per_step))
        step, rest = divmod(int(state["micro_step"]), saved_per_step)
        if saved_per_step == self.micro_batches_per_step:
            self.micro_step = int(state["micro_step"])
        elif rest == 0:
            self.micro_step = step * self.micro_batches_per_step
        else:
            raise ValueError(
                f"data state is {rest} micro-batches into global step {step}; a different micro-batch/dp layout "
                "can only resume on a global-step boundary"
            )

    def stats(self) -> Dict[str, Any]:
        idx = self.dataset.index
        skipped = Counter(idx.invalid) + self._skipped
        return {
            "samples": self._counts["samples"],  # real samples handed out
            # by reason: rejected while indexing (once) + failed while loading (per use)
            "skipped": dict(skipped),
            "skipped_total": sum(skipped.values()),
            "invalid": dict(idx.invalid),
            "failed": dict(self._skipped),
            "cache_hits": self._counts["cache_hits"],
            "cache_misses": self._counts["cache_misses"],
            "audio_chunked": self._counts["audio_chunked"],
            "audio_capped": self._counts["audio_capped"],
            "decodes": dict(self._decodes),
            "errors": list(idx.errors) + list(self._errors),
            "epoch_len": self.epoch_len,
            "micro_step": self.micro_step,
        }


def build_dataset(data_cfg: Any, family, processor, split: Optional[str] = None, seed: int = 0) -> ProcessedDataset:
    """`family`: the model family (models/family.py): its transform, chat tokens and media.
    `split`, `seed`: data.eval_fraction's part (dataset.build_index)."""
    ids = token_ids(processor.tokenizer, family)
    settings = Settings.from_config(data_cfg, family.hf_config)
    transform = family.transform or SampleBuilder
    builder = transform(processor, ids, settings, chat=family.chat, model_name=family.name, media_kinds=family.media_kinds())
    index = build_index(data_cfg, split, seed)
    cache = SampleCache(data_cfg.cache_dir, processor_fingerprint(processor, settings)) if data_cfg.cache_dir else None
    log.info(
        "data: %s (%s rejected: %s)%s",
        ", ".join(f"{s.name}={n}" for s, n in zip(index.specs, index.sizes)),
        sum(index.invalid.values()),
        dict(index.invalid) or "none",
        f"; cache {cache.folder}" if cache else "",
    )
    return ProcessedDataset(index, builder, cache)


def build_loader(
    data_cfg: Any,
    family,
    processor,
    *,
    seed: int,
    micro_batch_size: int,
    global_batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    split: Optional[str] = None,
    dp_group=None,
) -> OmniLoader:
    """Endless micro-batches for this dp rank (see module and sampler docs);
    `split` (train | eval): data.eval_fraction's part of the datasets;
    `dp_group`: the data-parallel group data.balance swaps samples in."""
    from hydra.utils import instantiate

    dataset = build_dataset(data_cfg, family, processor, split, seed)
    collator = getattr(data_cfg, "collator", None)
    max_tokens = None
    if data_cfg.get("packing", False):
        max_tokens = int(data_cfg.get("max_tokens") or data_cfg.cutoff_len)
        dataset.max_tokens = max_tokens  # a longer sample is an error naming it (data.on_error)
    cost_fn = None
    if data_cfg.get("balance", False):
        family.cost_per_token()  # computed once here, not in every worker
        cost_fn = family.batch_cost
    return OmniLoader(
        dataset,
        seed=seed,
        micro_batch_size=micro_batch_size,
        global_batch_size=global_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        num_workers=data_cfg.num_workers,
        prefetch_factor=getattr(data_cfg, "prefetch_factor", 2),
        weights=None if data_cfg.weights is None else list(data_cfg.weights),
        on_error=data_cfg.on_error,
        collate_fn=instantiate(collator) if collator else collate,
        max_tokens=max_tokens,
        cost_fn=cost_fn,
        dp_group=dp_group,
    )
