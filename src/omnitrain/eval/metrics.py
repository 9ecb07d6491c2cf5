"""Benchmark metrics, pure functions of a prediction and its reference answers.

- `choice_accuracy` (AI2D, MMMU multiple choice): the option letter read off
  the prediction (`extract_choice`) equals the answer letter.
- `relaxed_accuracy` (ChartQA): a number within 5 % of a numeric answer
  (`x%` read as x / 100; an answer of 0 needs an exact match), otherwise an
  exact, case-insensitive match; the best over the reference answers.
- `anls` (DocVQA): average normalised Levenshtein similarity, per item the
  best over the answers of 1 - distance / longer length, after lower-casing
  and collapsing whitespace; a similarity below the threshold (0.5) scores 0.
  A similarity of exactly 0.5 is kept, as VLMEvalKit scores it.
- `exact_match` (MMMU's open questions): case- and whitespace-insensitive.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence


def normalize(text: str) -> str:
    return " ".join(str(text).strip().lower().split())


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def similarity(prediction: str, answer: str) -> float:
    """1 - normalised Levenshtein distance (1.0 for two empty strings)."""
    p, a = normalize(prediction), normalize(answer)
    longest = max(len(p), len(a))
    return 1.0 if longest == 0 else 1.0 - levenshtein(p, a) / longest


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    best = max(similarity(prediction, a) for a in answers)
    return 0.0 if best < threshold else best


def to_number(text: str) -> Optional[float]:
    """'12.5' -> 12.5, '40%' -> 0.4, else None."""
    text = str(text).strip()
    try:
        return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correct(prediction: str, answer: str, tolerance: float = 0.05) -> bool:
    pred, ref = to_number(prediction), to_number(answer)
    if pred is not None and ref:  # ref == 0 has no relative tolerance: exact match below
        return abs(pred - ref) / abs(ref) <= tolerance
    return str(prediction).strip().lower() == str(answer).strip().lower()


def relaxed_accuracy(prediction: str, answers: Sequence[str], tolerance: float = 0.05) -> float:
    return float(any(relaxed_correct(prediction, a, tolerance) for a in answers))


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    return float(any(normalize(prediction) == normalize(a) for a in answers))


_LEAD = re.compile(r"^\s*\(?([A-Z])(?:[.):]|$)")


def extract_choice(prediction: str, options: Mapping[str, str]) -> Optional[str]:
    """The option letter a prediction gives, or None when it gives none or several.

    In order: a leading letter marked as one ('B', 'B.', 'B)', '(B) cat');
    else the only option letter standing alone in the text ('The answer is
    B.'; 'A and B' gives none); else the only option whose text the
    prediction contains.
    """
    text = str(prediction).strip()
    m = _LEAD.match(text)
    if m and m.group(1) in options:
        return m.group(1)
    alone = {c for c in re.findall(r"\b([A-Z])\b", text) if c in options}
    if len(alone) == 1:
        return alone.pop()
    low = normalize(text)
    named = [k for k, v in options.items() if normalize(v) and normalize(v) in low]
    return named[0] if len(named) == 1 else None


def choice_accuracy(prediction: str, answer: str, options: Mapping[str, str]) -> float:
    return float(extract_choice(prediction, options) == str(answer).strip().upper())
