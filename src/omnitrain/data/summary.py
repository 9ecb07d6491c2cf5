"""Look at a dataset without training: samples and media per modality, token
length histogram, label tokens, every error found (one line each)."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Dict, List

import torch

from omnitrain.data.dataset import ProcessedDataset
from omnitrain.data.template import IGNORE


def inspect_dataset(dataset: ProcessedDataset, num_workers: int = 0) -> Dict[str, Any]:
    """Process every indexed sample once and summarise (errors never raise here)."""
    keys = [(d, i) for d, n in enumerate(dataset.index.sizes) for i in range(n)]
    per_dataset: Dict[str, Counter] = {spec.name: Counter() for spec in dataset.index.specs}
    lengths: List[int] = []
    errors: List[str] = list(dataset.index.errors)
    reasons: Counter = Counter(dataset.index.invalid)
    decodes: Counter = Counter()
    label_tokens = 0
    t0 = time.perf_counter()
    loader = torch.utils.data.DataLoader(
        dataset, sampler=keys, batch_size=None, num_workers=num_workers, collate_fn=lambda s: s
    )
    for (d, _), s in zip(keys, loader):
        c = per_dataset[dataset.index.specs[d].name]
        err = s["meta"].get("error")
        if err is not None:
            errors.append(str(err))
            reasons[err.reason] += 1
            c["errors"] += 1
            continue
        c["samples"] += 1
        ids = s["input_ids"]
        lengths.append(len(ids))
        label_tokens += int((s["labels"][1:] != IGNORE).sum())
        for kind, key in (("image", "image_grid_thw"), ("video", "video_grid_thw")):
            if key in s:
                c[f"{kind}_samples"] += 1
                c[kind + "s"] += int(s[key].shape[0])
        if s["audio_features"]:
            c["audio_samples"] += 1
            c["audio_segments"] += len(s["audio_features"])
        if s["use_audio_in_video"]:
            c["audio_in_video"] += 1
        if not any(k in s for k in ("image_grid_thw", "video_grid_thw")) and not s["audio_features"]:
            c["text_only"] += 1
        for path in s["meta"]["decoded"]:
            decodes[path] += 1
    seconds = time.perf_counter() - t0
    return {
        "datasets": {k: dict(v) for k, v in per_dataset.items()},
        "samples": len(lengths),
        "errors": errors,
        "error_reasons": dict(reasons),
        "lengths": lengths,
        "label_tokens": label_tokens,
        "decodes": dict(decodes),
        "seconds": seconds,
    }


def histogram(values: List[int], bins: int = 8, width: int = 40) -> List[str]:
    if not values:
        return ["(no samples)"]
    lo, hi = min(values), max(values)
    step = max(1, -(-(hi - lo + 1) // bins))
    counts = Counter((v - lo) // step for v in values)
    top = max(counts.values())
    rows = []
    for b in range(-(-(hi - lo + 1) // step)):
        n = counts.get(b, 0)
        rows.append(f"  {lo + b * step:>6}-{lo + (b + 1) * step - 1:<6} {n:>6} {'#' * max(1 if n else 0, n * width // top)}")
    return rows


def format_report(report: Dict[str, Any], cutoff_len: int) -> str:
    lines = []
    for name, c in report["datasets"].items():
        parts = ", ".join(f"{k}={v}" for k, v in sorted(c.items()))
        lines.append(f"{name}: {parts or 'empty'}")
    n = report["samples"]
    lengths = report["lengths"]
    lines.append(f"samples: {n} ok, {len(report['errors'])} with errors; label tokens: {report['label_tokens']}")
    if lengths:
        srt = sorted(lengths)
        lines.append(
            f"tokens per sample: min {srt[0]}, median {srt[len(srt) // 2]}, max {srt[-1]} (cutoff_len={cutoff_len})"
        )
    lines += histogram(lengths)
    reuse = sum(v for v in report["decodes"].values())
    lines.append(f"media decodes: {reuse} over {len(report['decodes'])} files; {n / max(report['seconds'], 1e-9):.1f} samples/s")
    if report["errors"]:
        lines.append("errors: " + ", ".join(f"{k}={v}" for k, v in sorted(report["error_reasons"].items())))
        lines += [f"  {e}" for e in report["errors"]]
    return "\n".join(lines)
