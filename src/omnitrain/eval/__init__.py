"""Evaluation on VLMEvalKit-format benchmarks (AI2D, ChartQA, DocVQA, MMMU).

    evaluate(model, {"ai2d": "AI2D_TEST.tsv", ...}, out_dir, ...) -> score rows

Every file is read and checked first (columns, answers, base64 images); the
images are written once to a temporary folder and each question becomes a
one-turn prompt built as in training (`generate.prompt_example`). All
questions of all benchmarks are generated in one data-parallel pass
(`generate.predict`: batches dealt to ranks, results gathered in order), then
scored (`bench.score`, `metrics`). Rank 0 writes `scores.csv` (bench,
category, metric, n, score; category `all` is the benchmark's score) and
`predictions.jsonl` (one line per question: bench, index, question,
answers, prediction, the letter read off it for multiple choice, score).
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from omnitrain.eval.bench import EvalError, benchmark, prompt_text, read_tsv, score, summarize

__all__ = ["EvalError", "evaluate"]

log = logging.getLogger("omnitrain.eval")


def _examples(items, folder: Path):
    from omnitrain.generate import prompt_example

    out = []
    for n, it in enumerate(items):
        files = []
        for k, data in enumerate(it.images):
            f = folder / f"{it.bench}_{it.row}_{k}.img"
            f.write_bytes(data)
            files.append(str(f))
        out.append(prompt_example(prompt_text(it, benchmark(it.bench)), files, dataset=it.bench, index=it.row, base=folder))
    return out


def _write(out_dir: Path, items, predictions: List[str], scored: List[dict], rows: List[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "scores.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["bench", "category", "metric", "n", "score"])
        w.writeheader()
        w.writerows(rows)
    with (out_dir / "predictions.jsonl").open("w", encoding="utf-8") as f:
        for it, pred, s in zip(items, predictions, scored):
            row = {"bench": it.bench, "index": it.index, "question": it.question, "answers": it.answers, "prediction": pred, **s}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def evaluate(
    model: str,
    benches: Dict[str, str],
    out_dir: Optional[str],
    load_kw: dict,
    opts,
    *,
    batch_size: int = 1,
    nproc: int = 1,
    limit: Optional[int] = None,
) -> List[dict]:
    """Score `model` on each benchmark file; returns the rows of scores.csv
    (and writes the files under `out_dir` on rank 0, unless it is None)."""
    from omnitrain.generate import predict
    from omnitrain.generate.cli import is_writer

    if not benches:
        raise EvalError("no benchmark given: --bench NAME=FILE.tsv (ai2d, chartqa, docvqa, mmmu)")
    items = []
    for name, path in benches.items():
        items += read_tsv(path, benchmark(name), limit)
    with tempfile.TemporaryDirectory(prefix="omnitrain-eval-") as tmp:
        examples = _examples(items, Path(tmp))
        results = predict(model, load_kw, examples, opts, batch_size=batch_size, nproc=nproc)
    predictions = [r["text"] for r in results]
    scored = [score(it, p) for it, p in zip(items, predictions)]
    rows = summarize(items, [float(s["score"]) for s in scored])
    if out_dir is not None and is_writer():
        _write(Path(out_dir), items, predictions, scored, rows)
        log.info("wrote %s and %s", Path(out_dir) / "scores.csv", Path(out_dir) / "predictions.jsonl")
    return rows
