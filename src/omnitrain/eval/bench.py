"""Benchmarks in VLMEvalKit's TSV format: read, prompt, score.

A file is tab-separated with a header: `index`, `question`, `answer`,
`image` (a base64-encoded image; a list literal of several for multi-image
questions; or, as VLMEvalKit stores repeats, the `index` of the row holding
it), and for multiple choice one column per option letter (`A`, `B`, ...;
empty where a question has fewer). `hint`, `category` and others are used
where present (a hint is put before the question; scores are also given per
category). An `answer` that is a list literal (`['5', 'five']`, DocVQA) holds
several accepted answers.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from omnitrain.errors import UserError
from omnitrain.eval import metrics


class EvalError(UserError, ValueError):
    """A benchmark file or option that cannot be evaluated; nothing was written."""

    kind = "eval error"


@dataclass(frozen=True)
class Benchmark:
    name: str
    metric: str  # the score's name in scores.csv
    multiple_choice: bool
    instruction: str  # appended to the question


MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
VQA_INSTRUCTION = "Answer the question using a single word or phrase."

BENCHMARKS = {
    "ai2d": Benchmark("ai2d", "accuracy", True, MCQ_INSTRUCTION),
    "mmmu": Benchmark("mmmu", "accuracy", True, MCQ_INSTRUCTION),
    "chartqa": Benchmark("chartqa", "relaxed_accuracy", False, VQA_INSTRUCTION),
    "docvqa": Benchmark("docvqa", "anls", False, VQA_INSTRUCTION),
}


def benchmark(name: str) -> Benchmark:
    if name.lower() not in BENCHMARKS:
        raise EvalError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)} (--bench NAME=FILE.tsv)")
    return BENCHMARKS[name.lower()]


@dataclass
class Item:
    bench: str
    row: int  # 0-based data row in the file
    index: str  # the file's `index` column
    question: str
    answers: List[str]
    images: List[bytes]  # decoded image files
    options: Dict[str, str] = field(default_factory=dict)
    hint: Optional[str] = None
    category: Optional[str] = None

    @property
    def answer(self) -> str:
        return self.answers[0]


def _missing(value) -> bool:
    return value is None or str(value).strip() in ("", "nan", "NaN", "None")


def _list_literal(text: str) -> Optional[list]:
    text = text.strip()
    if not text.startswith("["):
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    return [str(v) for v in value] if isinstance(value, list) else None


def _decode_image(text: str, where: str) -> bytes:
    from PIL import Image

    try:
        data = base64.b64decode(text.strip(), validate=True)
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except (binascii.Error, ValueError) as e:
        raise EvalError(f"{where}: column image is not valid base64 ({e}); VLMEvalKit TSVs hold base64-encoded images") from None
    except Exception as e:  # PIL raises many types for a bad image
        raise EvalError(f"{where}: column image decodes to no image PIL can read ({type(e).__name__}: {e})") from None
    return data


def read_tsv(path: str, bench: Benchmark, limit: Optional[int] = None) -> List[Item]:
    """The file's rows as items, each checked (columns, answer, image) before anything runs."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise EvalError(f"--bench {bench.name}={path}: no such file")
    csv.field_size_limit(sys.maxsize)  # base64 images are far over csv's 128 KiB default
    with file.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        columns = reader.fieldnames or []
        required = ["index", "question", "answer", "image"] + (["A", "B"] if bench.multiple_choice else [])
        absent = [c for c in required if c not in columns]
        if absent:
            raise EvalError(
                f"{file}: no column {', '.join(absent)} (has {', '.join(columns) or 'none'}); a {bench.name} file in "
                f"VLMEvalKit's format has {', '.join(required)}"
            )
        rows = list(reader)
    if not rows:
        raise EvalError(f"{file}: no rows")
    by_index = {str(r["index"]).strip(): r for r in rows}  # before --limit: a kept row may point at a later one
    rows = rows[:limit] if limit else rows
    items = []
    for i, r in enumerate(rows):
        where = f"{file} row {i + 1} (index {r['index']})"
        if any(r.get(c) is None for c in required):
            raise EvalError(f"{where}: fewer fields than the header's {len(columns)}")
        if _missing(r["answer"]):
            raise EvalError(f"{where}: empty answer")
        images = _images(r, by_index, where)
        options = {c: r[c].strip() for c in string.ascii_uppercase if c in r and not _missing(r[c])}
        if bench.multiple_choice and options and r["answer"].strip().upper() not in options:
            raise EvalError(f"{where}: answer {r['answer'].strip()!r} is none of its options {', '.join(options)}")
        items.append(Item(
            bench=bench.name, row=i, index=str(r["index"]).strip(), question=r["question"],
            answers=_list_literal(r["answer"]) or [r["answer"].strip()], images=images,
            options=options if bench.multiple_choice else {},
            hint=None if _missing(r.get("hint")) else r["hint"].strip(),
            category=None if _missing(r.get("category")) else r["category"].strip(),
        ))
    return items


def _images(row: dict, by_index: dict, where: str) -> List[bytes]:
    value = row["image"].strip()
    if _missing(value):
        raise EvalError(f"{where}: empty image")
    if len(value) <= 64 and value in by_index and by_index[value] is not row:
        value = by_index[value]["image"].strip()  # a repeat stored as the index of the row holding it
    parts = _list_literal(value) or [value]
    return [_decode_image(p, where) for p in parts]


def prompt_text(item: Item, bench: Benchmark) -> str:
    """The user's message after the images: hint, question, options, instruction."""
    text = f"Hint: {item.hint}\n" if item.hint else ""
    if item.options:
        text += f"Question: {item.question}\nOptions:\n"
        text += "".join(f"{k}. {v}\n" for k, v in item.options.items())
        return text + bench.instruction
    text += item.question
    return text + "\n" + VQA_INSTRUCTION  # an open question, also in a choice benchmark (MMMU)


def score(item: Item, prediction: str) -> Dict[str, object]:
    """The item's score and, for multiple choice, the letter read off the prediction."""
    bench = BENCHMARKS[item.bench]
    if bench.metric == "anls":
        return {"score": metrics.anls(prediction, item.answers)}
    if bench.metric == "relaxed_accuracy":
        return {"score": metrics.relaxed_accuracy(prediction, item.answers)}
    if item.options:
        return {"score": metrics.choice_accuracy(prediction, item.answer, item.options), "choice": metrics.extract_choice(prediction, item.options)}
    return {"score": metrics.exact_match(prediction, item.answers)}  # an open question in a choice benchmark (MMMU)


def summarize(items: List[Item], scores: List[float]) -> List[Dict[str, object]]:
    """Rows of scores.csv: per benchmark its mean score over all items, then per category."""
    rows: List[Dict[str, object]] = []
    benches = list(dict.fromkeys(it.bench for it in items))
    for b in benches:
        mine = [(it, s) for it, s in zip(items, scores) if it.bench == b]
        groups: Dict[str, List[float]] = {"all": [s for _, s in mine]}
        for it, s in mine:
            if it.category is not None:
                groups.setdefault(it.category, []).append(s)
        for cat, vals in groups.items():
            rows.append({"bench": b, "category": cat, "metric": BENCHMARKS[b].metric, "n": len(vals), "score": sum(vals) / len(vals)})
    return rows

