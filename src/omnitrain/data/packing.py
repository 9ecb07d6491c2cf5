"""Sequence packing: the samples of a micro-batch laid end to end in as few
rows of at most `data.max_tokens` tokens as first-fit decreasing finds,
instead of one right-padded row per sample.

Packing only re-lays tokens; it never cuts, drops or moves a sample to
another micro-batch, so the step trains on the same samples and tokens.
The samples are reordered row by row before the collator runs, so media
rows (pixels, audio features) follow the packed token order, and the
encoders see the same media as unpacked.

A packed micro-batch has the collator's keys (`input_ids`, `labels`,
`attention_mask` as (rows, L), media unchanged, per-sample keys such as
`use_audio_in_video` per sample) plus `pack_index` (samples, 3): each
sample's (row, start, length) in the collator's sample order. The label of
each sample's first token is ignored (it is never predicted; unpacked, the
causal shift drops it): so no position predicts across a sample boundary.
The model side (models/family.py) computes rope positions per sample on
the `unpack`ed view and attends within samples only (`sequence_positions`).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import torch

from omnitrain.data.errors import DataError

IGNORE = -100
KEY = "pack_index"
TOKEN_KEYS = ("input_ids", "labels", "attention_mask")


def plan(lengths: Sequence[int], max_tokens: int) -> List[List[int]]:
    """Rows of sample indices, each summing to at most `max_tokens`, every
    index once: first-fit decreasing (longest first, ties by index), a row's
    samples in index order. Deterministic; a sample longer than `max_tokens`
    is an error (never cut)."""
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise DataError(
                f"sample {i} of the micro-batch has {n} tokens, more than data.max_tokens={max_tokens}; "
                "raise data.max_tokens (packing never cuts a sample)",
                reason="too_long_to_pack",
            )
    rows: List[List[int]] = []
    room: List[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = next((r for r, left in enumerate(room) if left >= lengths[i]), None)
        if r is None:
            rows.append([])
            room.append(max_tokens)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return [sorted(r) for r in rows]


def pack_samples(samples: Sequence, collate: Callable[[list], Dict], lengths: Sequence[int], max_tokens: int, pad_id: int) -> Dict:
    """Collate `samples` packed: reorder them row by row (`plan`), collate
    (the micro-batch's own collator, right-padded), fold the rows together."""
    rows = plan(lengths, max_tokens)
    order = [i for r in rows for i in r]
    mb = collate([samples[i] for i in order])
    return fold(mb, [len(r) for r in rows], pad_id)


def fold(mb: Dict, row_sizes: Sequence[int], pad_id: int) -> Dict:
    """A right-padded micro-batch whose consecutive samples fill the rows
    (`row_sizes` samples each) -> the packed micro-batch (see module doc)."""
    lens = mb["attention_mask"].sum(1).tolist()
    assert sum(row_sizes) == len(lens), (row_sizes, len(lens))
    index, b = [], 0
    for r, k in enumerate(row_sizes):
        start = 0
        for _ in range(k):
            index.append((r, start, lens[b]))
            start += lens[b]
            b += 1
    width = max(s + n for _, s, n in index)
    R = len(row_sizes)
    out = dict(mb)
    fill = {"input_ids": pad_id, "labels": IGNORE, "attention_mask": 0}
    for key in TOKEN_KEYS:
        src = mb[key]
        dst = torch.full((R, width), fill[key], dtype=src.dtype)
        for b, (r, s, n) in enumerate(index):
            dst[r, s : s + n] = src[b, :n]
        out[key] = dst
    for r, s, n in index:
        out["labels"][r, s] = IGNORE  # a sample's first token is never predicted
    out[KEY] = torch.tensor(index, dtype=torch.long).reshape(-1, 3)
    return out


def is_packed(mb: Dict) -> bool:
    return KEY in mb


def unpack(mb: Dict, pad_id: int = 0) -> Dict:
    """The right-padded (samples, longest) view of a packed micro-batch's
    `input_ids` and `attention_mask` (labels are not needed there), other keys
    as they are: what the family's per-sample code (rope positions) reads."""
    idx = mb[KEY].tolist()
    S = max(n for _, _, n in idx)
    ids = mb["input_ids"]
    out = {k: v for k, v in mb.items() if k != KEY and k != "labels"}
    out["input_ids"] = torch.full((len(idx), S), pad_id, dtype=ids.dtype, device=ids.device)
    out["attention_mask"] = torch.zeros((len(idx), S), dtype=mb["attention_mask"].dtype, device=ids.device)
    for b, (r, s, n) in enumerate(idx):
        out["input_ids"][b, :n] = ids[r, s : s + n]
        out["attention_mask"][b, :n] = 1
    return out


def fold_positions(pos: torch.Tensor, mb: Dict) -> torch.Tensor:
    """Per-sample positions (..., samples, longest) -> the packed layout
    (..., rows, L); padding gets position 1 (as HF gives masked positions)."""
    idx = mb[KEY].tolist()
    R, L = mb["input_ids"].shape
    out = pos.new_ones((*pos.shape[:-2], R, L))
    for b, (r, s, n) in enumerate(idx):
        out[..., r, s : s + n] = pos[..., b, :n]
    return out


def segment_ids(mb: Dict) -> torch.Tensor:
    """(rows, L): the sample each token belongs to; a row's trailing padding
    counts as its last sample's (padding attends like unpacked padding does;
    no real token attends to it)."""
    idx = mb[KEY].tolist()
    R, L = mb["input_ids"].shape
    seg = torch.zeros((R, L), dtype=torch.long)
    for b, (r, s, n) in enumerate(idx):
        seg[r, s:] = b
    return seg.to(mb["input_ids"].device)


def sequence_positions(mb: Dict) -> torch.Tensor:
    """(rows, L): 0, 1, ... restarting at every sample, a row's trailing padding
    continuing its last sample: how transformers recognises packed sequences
    (`create_causal_mask` without a 2-D mask: block-diagonal causal; flash
    attention: varlen over the spans). Padding comes last in a row, so no real
    token attends to it."""
    idx = mb[KEY].tolist()
    R, L = mb["input_ids"].shape
    pos = torch.zeros((R, L), dtype=torch.long)
    for r, s, n in idx:
        pos[r, s:] = torch.arange(L - s)
    return pos.to(mb["input_ids"].device)


def num_samples(mb: Dict) -> int:
    return int(mb[KEY].shape[0]) if KEY in mb else int(mb["input_ids"].shape[0])


def computed_tokens(mb: Dict) -> tuple[int, int]:
    """(LLM positions this micro-batch computes, what it would compute unpacked:
    samples x its longest sample)."""
    R, L = mb["input_ids"].shape
    if KEY not in mb:
        return R * L, R * L
    idx = mb[KEY]
    return R * L, int(idx.shape[0]) * int(idx[:, 2].max())
